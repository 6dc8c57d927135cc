"""The error a settings check raises (a loss's, KAPAO's inference settings'): a ``ValueError`` that names the
field out of range, so that a config error can name the dotted key."""

from __future__ import annotations


class SettingError(ValueError):
    """A setting out of range; ``field`` names the settings dataclass's field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


__all__ = ["SettingError"]
