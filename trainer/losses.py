"""The top-down family's losses, importable as ``trainer.losses`` as before families existed (the README's
``trainer.losses.HeatmapLoss``): the module is ``trainer.topdown.losses``."""

from trainer.topdown.losses import *  # noqa: F403
from trainer.topdown.losses import LOSS_VARIANTS, VARIANT_PROPERTIES, HeatmapLoss, LossConfig  # noqa: F401
