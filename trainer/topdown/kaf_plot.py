"""The KAF history figure of a KAL-family run (the paper's Fig. 5): lambda per keypoint over the epochs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

KAF_PLOT_FILE = "kaf_history.png"


def plot_kaf_history(
    kaf_history,
    out_png: str | os.PathLike,
    *,
    epochs=None,
    part_ranges: Mapping[str, tuple[int, int]] | None = None,
    title: str = "Keypoint-wise adaptive factors (KAF) over training",
) -> Path:
    """Draw per-keypoint KAF over epochs (the paper's Fig. 5) and save it as a PNG; returns the path.

    ``kaf_history`` is an array ``[num_epochs, K]`` (K = 133) of mean λ_k per epoch. Three panels share the
    epoch axis: the raw λ (white = 0, close to MSE; blue = 1, close to AWing, as in Fig. 5), the same values
    min-max normalised per epoch (Fig. 5's normalisation, which shows the *relative* focus across keypoints),
    and the mean λ per body part. Keypoints are grouped by part with separators and labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from trainer.datasets.keypoints import PART_RANGES

    ranges = dict(part_ranges if part_ranges is not None else PART_RANGES)
    history = np.asarray(kaf_history, dtype=np.float64)
    if history.ndim == 1:
        history = history[None, :]
    num_keypoints = max(stop for _, stop in ranges.values())
    if history.ndim != 2 or history.shape[0] < 1 or history.shape[1] != num_keypoints:
        raise ValueError(f"kaf_history must have shape [num_epochs, {num_keypoints}], got {history.shape}")
    epoch_axis = np.arange(1, history.shape[0] + 1) if epochs is None else np.asarray(epochs)
    if epoch_axis.shape != (history.shape[0],):
        raise ValueError(f"epochs must have {history.shape[0]} entries, got shape {epoch_axis.shape}")

    low = np.nanmin(history, axis=1, keepdims=True)
    span = np.nanmax(history, axis=1, keepdims=True) - low
    normalised = (history - low) / np.where(span > 0, span, 1.0)

    fig, axes = plt.subplots(3, 1, figsize=(9, 11), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]})
    extent = (epoch_axis[0] - 0.5, epoch_axis[-1] + 0.5, num_keypoints - 0.5, -0.5)
    for ax, data, label, limits in (
        (axes[0], history, "λ_k", (0.0, 1.0)),
        (axes[1], normalised, "λ_k min-max normalised per epoch", (0.0, 1.0)),
    ):
        image = ax.imshow(
            data.T,
            aspect="auto",
            cmap="Blues",
            vmin=limits[0],
            vmax=limits[1],
            extent=extent,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, label=label)
        for start, _ in ranges.values():
            if start > 0:
                ax.axhline(start - 0.5, color="darkred", linewidth=0.8)
        # Part names as y tick labels (readable on any colour), at the middle of each part's rows.
        ax.set_yticks([(start + stop - 1) / 2 for start, stop in ranges.values()], list(ranges))
        ax.set_ylabel("keypoints by part")
    axes[0].set_title(title)
    for name, (start, stop) in ranges.items():
        axes[2].plot(epoch_axis, np.nanmean(history[:, start:stop], axis=1), marker="o", label=name)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_ylabel("mean λ per part")
    axes[2].set_xlabel("epoch")
    axes[2].legend(loc="best", fontsize=8)
    fig.tight_layout()

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["KAF_PLOT_FILE", "plot_kaf_history"]
