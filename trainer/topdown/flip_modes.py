"""The flip test's ways of putting the mirrored heatmaps back (``trainer.topdown.codec.flip_back_heatmaps``).

Apart from the codec so that the command line can offer them as choices without importing torch.
"""

from __future__ import annotations

# MMPose's one-pixel shift, none, or the exact sub-pixel mirror about the input's pixel grid.
FLIP_MODES: tuple[str, ...] = ("shift", "none", "exact")

__all__ = ["FLIP_MODES"]
