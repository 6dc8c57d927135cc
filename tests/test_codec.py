"""DARK codec, flip-back and heatmap -> image mapping, checked against independent NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.datasets.keypoints import FLIP_PAIRS, KEYPOINT_NAMES, NUM_KEYPOINTS
from trainer.topdown.codec import decode_dark, encode_unbiased, flip_back_heatmaps, heatmap_to_image_coords
from trainer.topdown.geometry import apply_affine, get_warp_matrix

HEATMAP_W, HEATMAP_H = 48, 64
INPUT_W, INPUT_H = 192, 256


def reference_gaussian(x0: float, y0: float, width: int, height: int, sigma: float) -> np.ndarray:
    """One Gaussian map, pixel by pixel in float64 (independent of the vectorised code)."""
    out = np.zeros((height, width), dtype=np.float64)
    for y in range(height):
        for x in range(width):
            out[y, x] = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2.0 * sigma**2))
    return out


def test_encode_matches_pixelwise_gaussian_and_weight_rules():
    rng = np.random.default_rng(0)
    sigma = 2.0
    keypoints = rng.uniform([-3.0, -3.0], [HEATMAP_W + 2.0, HEATMAP_H + 2.0], size=(2, 6, 2))
    visible = np.ones((2, 6))
    visible[0, 1] = 0  # invisible -> weight 0
    keypoints[1, 2] = [-7.5, 30.0]  # MMPose's bound: x + 3 sigma + 1 < 0 -> weight 0
    keypoints[1, 3] = [-6.5, 30.0]  # x + 3 sigma + 1 >= 0 -> weight 1, the faint tail as target
    keypoints[1, 4] = [20.0, HEATMAP_H + 6.0]  # y - 3 sigma = H, not < H -> weight 0
    keypoints[1, 5] = [np.nan, 10.0]
    heatmaps, weights = encode_unbiased(keypoints, visible, heatmap_size=(HEATMAP_W, HEATMAP_H), sigma=sigma)

    assert heatmaps.shape == (2, 6, HEATMAP_H, HEATMAP_W) and heatmaps.dtype == np.float32
    assert weights.shape == (2, 6) and weights.dtype == np.float32
    expected_weights = np.ones((2, 6))
    expected_weights[0, 1] = expected_weights[1, 2] = expected_weights[1, 4] = expected_weights[1, 5] = 0
    np.testing.assert_array_equal(weights, expected_weights)
    for n in range(2):
        for k in range(6):
            if expected_weights[n, k]:
                expected = reference_gaussian(*keypoints[n, k], HEATMAP_W, HEATMAP_H, sigma)
            else:
                expected = np.zeros((HEATMAP_H, HEATMAP_W))
            np.testing.assert_allclose(heatmaps[n, k], expected, atol=1e-6)


def test_encode_weights_follow_mmpose_bound_at_every_border():
    """MMPose's generate_unbiased_gaussian_heatmaps keeps weight 1 while mu - 3 sigma < size and
    mu + 3 sigma + 1 >= 0 on both axes (mu in [-7, size + 6) for sigma 2); a direct port of that test."""
    sigma, radius = 2.0, 6.0
    offsets = np.array([-9.0, -7.5, -7.0, -6.99, -6.0, -0.5, 10.0])
    positions = np.concatenate([offsets, HEATMAP_W - 1 - offsets + 1.0, [HEATMAP_W + 5.99, HEATMAP_W + 6.0]])
    keypoints = np.stack(np.meshgrid(positions, positions - HEATMAP_W + HEATMAP_H), axis=-1).reshape(1, -1, 2)
    _, weights = encode_unbiased(keypoints, np.ones(keypoints.shape[:2]), (HEATMAP_W, HEATMAP_H), sigma)
    for (x, y), weight in zip(keypoints[0], weights[0], strict=True):
        left, top = x - radius, y - radius
        right, bottom = x + radius + 1, y + radius + 1
        expected = not (left >= HEATMAP_W or top >= HEATMAP_H or right < 0 or bottom < 0)
        assert weight == float(expected), (x, y)
    assert 0 < weights.mean() < 1
    # A kept keypoint outside the map gets the Gaussian's tail on the map, peak at the nearest border.
    heatmaps, weights = encode_unbiased([[[-6.5, 30.0]]], [[1]], (HEATMAP_W, HEATMAP_H), sigma)
    assert weights[0, 0] == 1
    np.testing.assert_allclose(
        heatmaps[0, 0], reference_gaussian(-6.5, 30.0, HEATMAP_W, HEATMAP_H, sigma), atol=1e-7
    )
    assert heatmaps[0, 0].max() == pytest.approx(np.exp(-(6.5**2) / 8), rel=1e-5)


def test_encode_other_sigma_and_size_and_bad_input():
    heatmaps, weights = encode_unbiased([[[3.25, 5.5]]], [[2]], heatmap_size=(10, 12), sigma=1.5)
    assert heatmaps.shape == (1, 1, 12, 10)
    np.testing.assert_allclose(heatmaps[0, 0], reference_gaussian(3.25, 5.5, 10, 12, 1.5), atol=1e-6)
    with pytest.raises(ValueError, match="keypoints"):
        encode_unbiased(np.zeros((3, 2)), np.ones(3))
    with pytest.raises(ValueError, match="visible"):
        encode_unbiased(np.zeros((1, 3, 2)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="sigma"):
        encode_unbiased(np.zeros((1, 3, 2)), np.ones((1, 3)), sigma=0)


def test_dark_recovers_subpixel_location_and_beats_argmax():
    rng = np.random.default_rng(1)
    num = 40
    truth = rng.uniform([6.0, 6.0], [HEATMAP_W - 7.0, HEATMAP_H - 7.0], size=(1, num, 2))
    # Put every coordinate 0.3-0.5 px off the pixel grid so that the integer argmax is clearly worse.
    truth = np.floor(truth) + 0.5 + rng.uniform(-0.2, 0.2, size=truth.shape)
    heatmaps = np.stack([reference_gaussian(x, y, HEATMAP_W, HEATMAP_H, 2.0) for x, y in truth[0]])[None]
    heatmaps = heatmaps.astype(np.float32)

    coords, scores = decode_dark(heatmaps)
    dark_error = np.linalg.norm(coords - truth, axis=-1)
    assert dark_error.max() < 0.05

    flat_argmax = heatmaps.reshape(1, num, -1).argmax(-1)
    argmax_coords = np.stack([flat_argmax % HEATMAP_W, flat_argmax // HEATMAP_W], axis=-1)
    argmax_error = np.linalg.norm(argmax_coords - truth, axis=-1)
    assert argmax_error.mean() > 5 * dark_error.mean()
    np.testing.assert_allclose(scores, heatmaps.reshape(1, num, -1).max(-1))


def test_dark_decodes_unbiased_encoding():
    rng = np.random.default_rng(2)
    truth = rng.uniform([5.0, 5.0], [HEATMAP_W - 6.0, HEATMAP_H - 6.0], size=(3, NUM_KEYPOINTS, 2))
    heatmaps, _ = encode_unbiased(truth, np.ones(truth.shape[:2]))
    coords, _ = decode_dark(heatmaps)
    assert np.abs(coords - truth).max() < 0.05


def test_decode_torch_and_numpy_agree():
    rng = np.random.default_rng(3)
    heatmaps = rng.random((2, 5, HEATMAP_H, HEATMAP_W)).astype(np.float32) * 0.2
    heatmaps += encode_unbiased(rng.uniform(3, 40, size=(2, 5, 2)), np.ones((2, 5)))[0]
    coords_np, scores_np = decode_dark(heatmaps)
    coords_t, scores_t = decode_dark(torch.from_numpy(heatmaps))
    assert isinstance(coords_np, np.ndarray) and isinstance(coords_t, torch.Tensor)
    assert coords_np.shape == (2, 5, 2) and scores_np.shape == (2, 5)
    np.testing.assert_allclose(coords_t.numpy(), coords_np, atol=1e-6)
    np.testing.assert_allclose(scores_t.numpy(), scores_np, atol=1e-7)


def test_decode_empty_and_border_maps():
    heatmaps = np.zeros((1, 3, HEATMAP_H, HEATMAP_W), dtype=np.float32)
    heatmaps[0, 1, 0, 7] = 1.0  # maximum on the top border: no room for the Taylor stencil
    heatmaps[0, 2, 1, 40] = 0.5  # one pixel from the border: still unrefined
    coords, scores = decode_dark(heatmaps)
    np.testing.assert_array_equal(coords[0, 0], [-1, -1])
    assert scores[0, 0] == 0
    np.testing.assert_array_equal(coords[0, 1], [7, 0])
    np.testing.assert_array_equal(coords[0, 2], [40, 1])
    np.testing.assert_allclose(scores[0], [0, 1.0, 0.5])
    with pytest.raises(ValueError, match="heatmaps"):
        decode_dark(np.zeros((3, HEATMAP_H, HEATMAP_W)))
    with pytest.raises(ValueError, match="blur_kernel"):
        decode_dark(heatmaps, blur_kernel=4)


def test_flip_back_unmirrors_and_swaps_left_right():
    rng = np.random.default_rng(4)
    num = 2
    truth = rng.uniform([8.0, 8.0], [HEATMAP_W - 9.0, HEATMAP_H - 9.0], size=(num, NUM_KEYPOINTS, 2))
    original, _ = encode_unbiased(truth, np.ones((num, NUM_KEYPOINTS)))

    # Heatmaps of the mirrored image: channel of "left_x" holds the mirror image of "right_x" and so on.
    def mirror_name(name: str) -> str:
        if name.startswith("left_"):
            return "right_" + name[len("left_") :]
        if name.startswith("right_"):
            return "left_" + name[len("right_") :]
        return name

    name_to_index = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
    columns = np.arange(HEATMAP_W)
    mirrored = np.empty_like(original)
    # Body, feet and hands are paired by name; the face is checked through the round trip below.
    for k, name in enumerate(KEYPOINT_NAMES):
        source = name_to_index[mirror_name(name)] if not name.startswith("face-") else k
        mirrored[:, k] = original[:, source][..., HEATMAP_W - 1 - columns]

    unshifted = flip_back_heatmaps(torch.from_numpy(mirrored), shift=False)
    assert isinstance(unshifted, torch.Tensor)
    body_feet_hands = [k for k, name in enumerate(KEYPOINT_NAMES) if not name.startswith("face-")]
    np.testing.assert_array_equal(unshifted.numpy()[:, body_feet_hands], original[:, body_feet_hands])
    assert torch.equal(unshifted[:, name_to_index["left_wrist"]], torch.from_numpy(original[:, 9]))

    # Mirroring twice (with the same flip pairs) is the identity for every channel, the face included.
    twice = flip_back_heatmaps(flip_back_heatmaps(original, shift=False), shift=False)
    np.testing.assert_array_equal(twice, original)

    shifted = flip_back_heatmaps(mirrored)  # numpy in, numpy out; one-pixel shift to the right
    assert isinstance(shifted, np.ndarray)
    np.testing.assert_array_equal(shifted[:, body_feet_hands, :, 1:], original[:, body_feet_hands, :, :-1])
    np.testing.assert_array_equal(shifted[..., 0], unshifted.numpy()[..., 0])
    coords, _ = decode_dark(shifted[:, body_feet_hands])
    np.testing.assert_allclose(coords[..., 0], truth[:, body_feet_hands, 0] + 1, atol=0.05)
    np.testing.assert_allclose(coords[..., 1], truth[:, body_feet_hands, 1], atol=0.05)


def test_flip_back_custom_index_and_bad_index():
    heatmaps = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    out = flip_back_heatmaps(heatmaps, flip_index=[2, 1, 0], shift=False)
    assert torch.equal(out[:, 0], heatmaps[:, 2].flip(-1))
    assert torch.equal(out[:, 1], heatmaps[:, 1].flip(-1))
    with pytest.raises(ValueError, match="flip_index"):
        flip_back_heatmaps(heatmaps)  # K = 3, default index is for 133 keypoints
    with pytest.raises(ValueError, match="flip_index"):
        flip_back_heatmaps(heatmaps, flip_index=[0, 0, 1])


def test_heatmap_to_image_round_trip_through_input_crop():
    rng = np.random.default_rng(5)
    num = 4
    centers = rng.uniform(100, 500, size=(num, 2))
    heights = rng.uniform(80, 400, size=num)
    scales = np.stack([heights * INPUT_W / INPUT_H, heights], axis=1)  # input aspect ratio
    image_points = centers[:, None, :] + rng.uniform(-0.5, 0.5, size=(num, 7, 2)) * scales[:, None, :]

    heatmap_points = np.empty_like(image_points)
    for n in range(num):
        to_input = get_warp_matrix(centers[n], scales[n], 0, (INPUT_W, INPUT_H))
        heatmap_points[n] = apply_affine(image_points[n], to_input) / (INPUT_W / HEATMAP_W)  # stride 4

    back = heatmap_to_image_coords(heatmap_points, centers, scales, (HEATMAP_W, HEATMAP_H))
    assert back.shape == image_points.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, image_points, atol=2e-3 * heights.max())
    for n in range(num):
        expected = apply_affine(
            heatmap_points[n], get_warp_matrix(centers[n], scales[n], 0, (HEATMAP_W, HEATMAP_H), inv=True)
        )
        np.testing.assert_allclose(back[n], expected, rtol=1e-5, atol=1e-2)


def test_heatmap_to_image_by_hand():
    center = np.array([[300.0, 200.0]])
    scale = np.array([[96.0, 128.0]])  # 2 image pixels per heatmap pixel
    coords = np.array([[[24.0, 32.0], [0.0, 0.0], [48.0, 64.0], [30.0, 33.0]]])
    back = heatmap_to_image_coords(torch.from_numpy(coords), center, scale, (48, 64))
    np.testing.assert_allclose(back[0], [[300, 200], [252, 136], [348, 264], [312, 202]])
    with pytest.raises(ValueError, match="center"):
        heatmap_to_image_coords(coords, center[0], scale, (48, 64))


def reference_dark(heatmap: np.ndarray, kernel: int = 11) -> tuple[float, float]:
    """DARK for one map, written out: full-map OpenCV blur with zero padding, rescale, log, Taylor step."""
    import cv2

    height, width = heatmap.shape
    border = (kernel - 1) // 2
    py, px = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    padded = np.zeros((height + 2 * border, width + 2 * border), dtype=np.float64)
    padded[border:-border, border:-border] = heatmap
    blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
    log_map = np.log(np.maximum(blurred * heatmap.max() / blurred.max(), 1e-10))
    if not (2 <= px <= width - 3 and 2 <= py <= height - 3):
        return float(px), float(py)
    gradient = 0.5 * np.array(
        [log_map[py, px + 1] - log_map[py, px - 1], log_map[py + 1, px] - log_map[py - 1, px]]
    )
    dxx = 0.25 * (log_map[py, px + 2] - 2 * log_map[py, px] + log_map[py, px - 2])
    dyy = 0.25 * (log_map[py + 2, px] - 2 * log_map[py, px] + log_map[py - 2, px])
    dxy = 0.25 * (
        log_map[py + 1, px + 1] - log_map[py - 1, px + 1] - log_map[py + 1, px - 1] + log_map[py - 1, px - 1]
    )
    offset = -np.linalg.solve(np.array([[dxx, dxy], [dxy, dyy]]), gradient)
    return float(px + offset[0]), float(py + offset[1])


def test_decode_matches_full_map_reference_on_noisy_maps():
    rng = np.random.default_rng(6)
    num_kpts = 30
    centers = rng.uniform([0.0, 0.0], [HEATMAP_W - 1.0, HEATMAP_H - 1.0], size=(1, num_kpts, 2))
    centers[0, :6] = [
        [2.3, 30.1],
        [45.2, 3.4],
        [6.6, 60.5],
        [24.0, 5.2],
        [3.1, 3.2],
        [44.4, 59.6],
    ]  # near borders
    heatmaps = encode_unbiased(centers, np.ones((1, num_kpts)), sigma=rng.uniform(1.5, 3.0))[0]
    heatmaps = (0.8 * heatmaps + 0.05 * rng.random(heatmaps.shape)).astype(np.float32)  # peaked, noisy
    coords, _ = decode_dark(heatmaps)
    expected = np.array([reference_dark(heatmaps[0, k].astype(np.float64)) for k in range(num_kpts)])
    np.testing.assert_allclose(coords[0], expected, atol=2e-3)


@pytest.mark.parametrize("width, height", [(9, 12), (20, 14), (14, 40)])
def test_decode_matches_reference_on_maps_smaller_than_the_blur_patch(width, height):
    """Maps narrower or shorter than the 15-pixel patch the decoder reads around each peak (kernel 11 + the
    stencil) are zero-padded before the patch is read: still the reference's result."""
    rng = np.random.default_rng(width * height)
    num_kpts = 12
    centers = rng.uniform([0.0, 0.0], [width - 1.0, height - 1.0], size=(1, num_kpts, 2))
    centers[0, :4] = [[2.2, 2.4], [width - 2.6, height - 2.3], [width / 2 + 0.3, 2.1], [2.4, height / 2]]
    heatmaps = encode_unbiased(centers, np.ones((1, num_kpts)), heatmap_size=(width, height), sigma=1.5)[0]
    heatmaps = (0.8 * heatmaps + 0.05 * rng.random(heatmaps.shape)).astype(np.float32)
    coords, _ = decode_dark(heatmaps)
    expected = np.array([reference_dark(heatmaps[0, k].astype(np.float64)) for k in range(num_kpts)])
    np.testing.assert_allclose(coords[0], expected, atol=2e-3)


def test_flip_test_with_the_datasets_mirror_convention():
    """A perfect model on the mirrored crop (input pixel x -> W_in - 1 - x, heatmap = input / 4): flip-back
    puts the peak at x - 0.75 heatmap px without the shift and at x + 0.25 with it (MMPose's behaviour)."""
    rng = np.random.default_rng(7)
    stride = INPUT_W / HEATMAP_W
    truth_input = rng.uniform([40.0, 40.0], [INPUT_W - 40.0, INPUT_H - 40.0], size=(1, NUM_KEYPOINTS, 2))
    flip = np.arange(NUM_KEYPOINTS)
    for a, b in FLIP_PAIRS:
        flip[a], flip[b] = b, a
    mirrored_input = truth_input[:, flip].copy()
    mirrored_input[..., 0] = INPUT_W - 1 - mirrored_input[..., 0]
    on_mirror, _ = encode_unbiased(mirrored_input / stride, np.ones((1, NUM_KEYPOINTS)))
    truth = truth_input / stride
    for shift, expected_dx in ((False, -0.75), (True, 0.25)):
        coords, _ = decode_dark(flip_back_heatmaps(on_mirror, shift=shift))
        np.testing.assert_allclose(coords[..., 0] - truth[..., 0], expected_dx, atol=0.05)
        np.testing.assert_allclose(coords[..., 1], truth[..., 1], atol=0.05)
