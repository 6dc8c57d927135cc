"""flip_back_heatmaps' modes: the exact sub-pixel mirror against MMPose's one-pixel shift, on the real mini
COCO-WholeBody set with perfect (ground-truth) heatmaps as predictions, and on synthetic Gaussians."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from shared_data import ANN, MINI, needs_mini

from trainer.topdown.codec import (
    FLIP_MODES,
    decode_dark,
    encode_unbiased,
    flip_back_heatmaps,
    heatmap_to_image_coords,
)
from trainer.topdown.data import PipelineConfig, WholeBodyTopDownDataset, load_wholebody_annotations


def _perfect_flip_test_errors() -> dict[str, np.ndarray]:
    """Image-pixel error per labelled keypoint of the mini set's GT boxes, for a perfect model: its heatmaps
    on the crop and on the mirrored crop are the pipeline's own targets for them, decoded as
    predict_keypoints does (average with the flipped-back mirror, DARK, inverse crop affine)."""
    config = PipelineConfig()
    plain_set = WholeBodyTopDownDataset(ANN, MINI, config=config, train=False)
    # A "training" view with every augmentation off but the flip: the mirrored crop and its targets.
    mirror_config = dataclasses.replace(
        config, flip_prob=1.0, half_body_prob=0.0, rot_prob=0.0, scale_range=(1.0, 1.0), shift_factor=0.0
    )
    mirror_set = WholeBodyTopDownDataset(ANN, MINI, config=mirror_config, train=True)
    plain = [plain_set[i] for i in range(len(plain_set))]
    mirrored = [mirror_set[i] for i in range(len(mirror_set))]
    assert len(plain) >= 10
    for a, b in zip(plain, mirrored, strict=True):
        assert b["flipped"] and a["ann_id"] == b["ann_id"]
        # The loop's images.flip(-1), to one grey level (OpenCV's fixed-point interpolation rounds).
        torch.testing.assert_close(b["image"], a["image"].flip(-1), atol=0.02, rtol=0)

    truth_by_ann = {inst.ann_id: inst.keypoints for inst in load_wholebody_annotations(ANN).instances}
    truth = np.stack([truth_by_ann[s["ann_id"]] for s in plain])
    labelled = np.stack([s["target_weight"].numpy() for s in plain]) > 0
    assert labelled.sum() > 500
    heatmaps = torch.stack([s["heatmaps"] for s in plain])
    on_mirror = torch.stack([s["heatmaps"] for s in mirrored])
    center = torch.stack([s["center"] for s in plain]).numpy()
    scale = torch.stack([s["scale"] for s in plain]).numpy()
    stride = config.input_size[0] / config.heatmap_size[0]

    def error(maps: torch.Tensor) -> np.ndarray:
        coords, _ = decode_dark(maps)
        image = heatmap_to_image_coords(coords, center, scale, config.heatmap_size)
        return np.linalg.norm(image - truth[..., :2], axis=-1)[labelled]

    errors = {"no flip": error(heatmaps)}
    for mode in FLIP_MODES:
        errors[mode] = error(0.5 * (heatmaps + flip_back_heatmaps(on_mirror, mode=mode, stride=stride)))
    return errors


@needs_mini
def test_exact_flip_test_is_as_accurate_as_no_flip_on_the_real_mini_set():
    errors = _perfect_flip_test_errors()
    means = {name: float(e.mean()) for name, e in errors.items()}
    assert means["no flip"] <= 0.01, means  # the decoding itself is exact
    assert means["exact"] <= 0.05, means
    # MMPose's one-pixel shift overshoots by 1/stride heatmap px: half of it survives the average.
    assert 0.55 <= means["shift"] <= 0.75, means
    assert means["none"] > 1.5, means
    # Keypoint by keypoint, exact is within 0.05 px of the no-flip decoding (which is the floor).
    assert np.percentile(np.abs(errors["exact"] - errors["no flip"]), 99) <= 0.05, means


def _mirrored_gaussians(width: int, height: int, stride: float, count: int, seed: int):
    """Targets of keypoints on a crop and on its mirror (input pixel x -> W_in - 1 - x), heatmap = input /
    stride; interior keypoints, identity flip index."""
    rng = np.random.default_rng(seed)
    input_w = width * stride
    truth_input = rng.uniform(
        [8 * stride, 8 * stride], [input_w - 8 * stride, (height - 8) * stride], (1, count, 2)
    )
    mirrored_input = truth_input.copy()
    mirrored_input[..., 0] = input_w - 1 - mirrored_input[..., 0]
    visible = np.ones((1, count))
    plain, _ = encode_unbiased(truth_input / stride, visible, heatmap_size=(width, height))
    on_mirror, _ = encode_unbiased(mirrored_input / stride, visible, heatmap_size=(width, height))
    return truth_input / stride, plain, on_mirror


@pytest.mark.parametrize(("stride", "size"), [(4, (48, 64)), (2, (40, 30)), (3.5, (27, 33))])
def test_exact_puts_a_mirrored_gaussian_back_on_the_truth(stride, size):
    truth, plain, on_mirror = _mirrored_gaussians(*size, stride, count=40, seed=int(stride * 10))
    identity = list(range(truth.shape[1]))
    back = flip_back_heatmaps(on_mirror, flip_index=identity, mode="exact", stride=stride)
    # The map itself is the Gaussian at the true location to 1e-3 of its peak (the tail reflected at the
    # border is the only difference), not just its decoded peak ...
    np.testing.assert_allclose(back, plain, atol=1e-3)
    coords, _ = decode_dark(back)
    np.testing.assert_allclose(coords, truth, atol=1e-3)
    # ... while the one-pixel shift leaves 1/stride px, and no shift 1 - 1/stride px.
    for mode, expected_dx in (("shift", 1 / stride), ("none", -(1 - 1 / stride))):
        coords, _ = decode_dark(flip_back_heatmaps(on_mirror, flip_index=identity, mode=mode))
        np.testing.assert_allclose(coords[..., 0] - truth[..., 0], expected_dx, atol=0.02)
        np.testing.assert_allclose(coords[..., 1], truth[..., 1], atol=1e-3)


def test_exact_with_stride_one_is_the_plain_reversal_and_channels_are_swapped():
    rng = np.random.default_rng(3)
    maps = rng.random((2, 3, 5, 7)).astype(np.float32)
    out = flip_back_heatmaps(maps, flip_index=[2, 1, 0], mode="exact", stride=1)
    np.testing.assert_allclose(out, maps[:, [2, 1, 0], :, ::-1], atol=1e-6)


def test_modes_shift_and_none_are_what_shift_true_and_false_mean():
    maps = torch.rand(2, 4, 6, 8)
    index = [1, 0, 3, 2]
    for mode, shift in (("shift", True), ("none", False)):
        expected = flip_back_heatmaps(maps, flip_index=index, shift=shift)
        assert torch.equal(flip_back_heatmaps(maps, flip_index=index, mode=mode), expected)
        assert torch.equal(flip_back_heatmaps(maps, flip_index=index, shift=shift, mode=mode), expected)
    assert not torch.equal(
        flip_back_heatmaps(maps, flip_index=index, mode="shift"),
        flip_back_heatmaps(maps, flip_index=index, mode="none"),
    )


def test_exact_keeps_kind_dtype_and_shape():
    maps = np.random.default_rng(0).random((1, 2, 8, 6))
    for dtype in (np.float64, np.float32, np.float16):
        out = flip_back_heatmaps(maps.astype(dtype), flip_index=[1, 0], mode="exact")
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == maps.shape
    tensor = torch.from_numpy(maps).to(torch.bfloat16)
    out = flip_back_heatmaps(tensor, flip_index=[1, 0], mode="exact")
    assert out.dtype == torch.bfloat16 and out.shape == tensor.shape
    reference = flip_back_heatmaps(tensor.float(), flip_index=[1, 0], mode="exact")
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)


def test_contradicting_shift_and_mode_are_an_error_naming_both():
    maps = torch.rand(1, 2, 4, 4)
    for mode in ("shift", "exact"):
        with pytest.raises(ValueError, match=rf"mode='{mode}'.*shift=False"):
            flip_back_heatmaps(maps, flip_index=[0, 1], shift=False, mode=mode)


def test_unknown_mode_and_bad_stride_are_clear_errors():
    maps = torch.rand(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"shift, none, exact; got mode='subpixel'"):
        flip_back_heatmaps(maps, flip_index=[0, 1], mode="subpixel")
    for stride in (0, -4, float("nan"), "4", None):
        with pytest.raises(ValueError, match=r"stride must be a positive number .* got"):
            flip_back_heatmaps(maps, flip_index=[0, 1], mode="exact", stride=stride)
