"""DARK heatmap codec (Zhang et al. 2020, "Distribution-Aware Coordinate Representation"), flip test and
the map from heatmap pixels back to image pixels.

Conventions:
- Heatmap pixel ``(i, j)`` (column i, row j) has its centre at coordinate ``(x, y) = (i, j)``; a keypoint at
  input-crop pixel ``p`` sits at heatmap coordinate ``p / stride`` (stride = input / heatmap = 4 for the
  paper's 256x192 input and 64x48 heatmaps), as in MMPose's DARK configuration.
- ``heatmap_size`` is ``(W, H)``; arrays are ``[N, K, H, W]``.

Encoding ("unbiased" = the Gaussian is centred on the exact sub-pixel location, not on a rounded pixel)
and decoding (Gaussian modulation, log, second-order Taylor expansion at the maximum) are both vectorised
over instances and keypoints; ``decode_dark`` runs on CPU or GPU tensors.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from trainer.datasets.keypoints import flip_index as coco_wholebody_flip_index
from trainer.topdown.flip_modes import FLIP_MODES

# Half-width of the Gaussian support, in sigmas, for the keypoint weight rule of encode_unbiased.
_GAUSSIAN_SUPPORT_SIGMAS = 3.0
# Floor before the log in DARK modulation (the DARK reference implementation uses 1e-10).
_LOG_FLOOR = 1e-10
# Outputs at least this large (elements) are multiplied with torch even when it runs several threads.
_TORCH_PRODUCT_MIN_SIZE = 1 << 22
# sqrt of the smallest normal float32: products of two values above it are normal numbers.
_TAIL_FLOOR = float(np.sqrt(np.finfo(np.float32).tiny))
_TAIL_EXPONENT = np.float32(-np.log(_TAIL_FLOOR))


def _check_heatmap_size(heatmap_size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in heatmap_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"heatmap_size must be (W, H), got {heatmap_size!r}") from error
    if width <= 0 or height <= 0:
        raise ValueError(f"heatmap_size must be positive (W, H), got {heatmap_size!r}")
    return width, height


def encode_unbiased(
    keypoints, visible, heatmap_size=None, sigma: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian target heatmaps centred on exact sub-pixel keypoint locations (DARK's unbiased encoding).

    Args:
        keypoints: ``[N, K, 2]`` (x, y) in heatmap pixels (array-like or tensor).
        visible: ``[N, K]``; a keypoint is drawn when ``visible > 0`` (COCO flags 1 and 2 both count).
        heatmap_size: ``(W, H)`` of the heatmaps (None: ``trainer.topdown.data.PipelineConfig``'s).
        sigma: Gaussian standard deviation in heatmap pixels (None: ``PipelineConfig``'s, the paper's 2).

    Returns:
        ``(heatmaps [N, K, H, W] float32, weights [N, K] float32)``. ``heatmaps[n, k, y, x] =
        exp(-((x - kx)^2 + (y - ky)^2) / (2 sigma^2))`` over the whole map (peak 1 when the keypoint is on a
        pixel centre; values below 1e-19 are flushed to 0). Weight and heatmap are 0 for invisible
        keypoints, non-finite coordinates and keypoints outside MMPose's bound: a keypoint keeps weight 1
        while ``k - 3 sigma < size`` and ``k + 3 sigma + 1 >= 0`` on each axis (``k`` in ``[-7, size + 6)``
        heatmap px for sigma 2), its target then being the Gaussian's faint tail on the map.
    """
    if heatmap_size is None or sigma is None:
        from trainer.topdown.data import (
            PipelineConfig,  # lazily: trainer.topdown.data encodes with this module
        )

        heatmap_size = PipelineConfig.heatmap_size if heatmap_size is None else heatmap_size
        sigma = PipelineConfig.sigma if sigma is None else sigma
    width, height = _check_heatmap_size(heatmap_size)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    keypoints = np.asarray(keypoints, dtype=np.float32)
    visible = np.asarray(visible)
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must have shape [N, K, 2], got {keypoints.shape}")
    if visible.shape != keypoints.shape[:2]:
        raise ValueError(f"visible must have shape {keypoints.shape[:2]} (as keypoints), got {visible.shape}")

    kx, ky = keypoints[..., 0], keypoints[..., 1]
    radius = _GAUSSIAN_SUPPORT_SIGMAS * sigma
    with np.errstate(invalid="ignore"):
        # MMPose's bound (generate_unbiased_gaussian_heatmaps): weight 1 while mu - 3 sigma < size and
        # mu + 3 sigma + 1 >= 0, i.e. mu in [-7, size + 6) px for sigma 2, with the Gaussian's faint tail
        # on the map as the target.
        inside = (
            (kx - radius < width) & (kx + radius + 1 >= 0) & (ky - radius < height) & (ky + radius + 1 >= 0)
        )
    weights = ((visible > 0) & np.isfinite(kx) & np.isfinite(ky) & inside).astype(np.float32)

    # The 2D Gaussian is separable: outer product of a row and a column profile per keypoint. Both profiles
    # come from one pass over a shared pixel grid ([N, K, 2, max(W, H)]: half the calls for one instance,
    # the dataset's case).
    centres = np.where(weights[..., None] > 0, keypoints, 0.0)[..., None]  # [N, K, 2, 1]
    grid = np.arange(max(width, height), dtype=np.float32)
    profiles = _gaussian_profile(grid, centres, 1.0 / (2.0 * sigma * sigma))
    profiles *= weights[..., None, None]  # all-zero map where the weight is 0
    profile_x, profile_y = profiles[..., 0, :width], profiles[..., 1, :height]  # [N, K, W], [N, K, H]
    heatmaps = np.empty(keypoints.shape[:2] + (height, width), dtype=np.float32)
    # The outer product writes the whole output once. torch's broadcast multiply reaches the memory-write
    # floor (NumPy's broadcasting over the short W axis is ~1.5-3x slower), but a small product split over
    # several threads on a busy machine waits for them, so small outputs use NumPy unless single-threaded.
    if heatmaps.size >= _TORCH_PRODUCT_MIN_SIZE or torch.get_num_threads() == 1:
        torch.mul(
            torch.from_numpy(profile_y).unsqueeze(-1),
            torch.from_numpy(profile_x).unsqueeze(-2),
            out=torch.from_numpy(heatmaps),
        )
    else:
        np.multiply(profile_y[..., :, None], profile_x[..., None, :], out=heatmaps)
    return heatmaps, weights


def _gaussian_profile(grid: np.ndarray, centres: np.ndarray, inv_two_var: float) -> np.ndarray:
    """``exp(-(grid - centres)^2 * inv_two_var)`` (float32), with 0 wherever it would fall below
    ``_TAIL_FLOOR`` (1.1e-19).

    Zeroing the far tails keeps every product of two profiles out of the subnormal range (subnormal arithmetic
    is much slower on x86; the change is far below float32 resolution at the peak). Clamping the exponent
    before ``exp`` keeps ``exp`` itself off its slow underflow path (figures: bench/RESULTS.md). In place:
    one buffer, no temporaries (NumPy: fewer per-call costs than torch for the dataset's one instance).
    """
    profile = np.subtract(grid, centres, dtype=np.float32)
    np.square(profile, out=profile)
    profile *= np.float32(inv_two_var)
    inside = profile < _TAIL_EXPONENT
    np.minimum(profile, _TAIL_EXPONENT, out=profile)
    np.negative(profile, out=profile)
    np.exp(profile, out=profile)
    profile *= inside
    return profile


def _gaussian_kernel_1d(kernel_size: int) -> torch.Tensor:
    # OpenCV's GaussianBlur with sigma=0 derives sigma from the kernel size (2.0 for 11); DARK uses that blur.
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _valid_blur_matrix(kernel_size: int, num_outputs: int, dtype, device) -> torch.Tensor:
    """``[num_outputs + kernel_size - 1, num_outputs]`` matrix: 1D "valid" Gaussian filtering as a product."""
    kernel = _gaussian_kernel_1d(kernel_size)
    matrix = torch.zeros(num_outputs + kernel_size - 1, num_outputs, dtype=torch.float64)
    for output in range(num_outputs):
        matrix[output : output + kernel_size, output] = kernel
    return matrix.to(dtype=dtype, device=device)


def _peaks_and_patches(flat: torch.Tensor, height: int, width: int, reach: int):
    """Per row of ``flat`` ([B, H*W]): argmax (first on ties), maximum, and a ``[P, P]`` patch (P =
    2 reach + 1) of the map near the argmax.

    The patch is the window centred on the argmax, slid back inside the map where it would cross a border,
    so every read is a plain in-bounds copy of P contiguous values per row (maps smaller than P are
    zero-padded first). Also returns ``row_shift, col_shift`` ([B]): patch row/column j is row/column
    ``j + shift`` of the window centred on the argmax.
    """
    batch = flat.shape[0]
    size = 2 * reach + 1
    if flat.device.type == "cpu":
        # NumPy's argmax and flat ``take`` are several times faster than torch's argmax and max on CPU
        # (the tensor shares its memory with the array; the values are identical).
        array = flat.contiguous().numpy()
        argmax = np.argmax(array, axis=1)
        scores = array.reshape(-1).take(argmax + np.arange(batch) * (height * width))
        argmax, scores = torch.from_numpy(argmax), torch.from_numpy(scores)
    else:
        scores, argmax = flat.max(dim=1)
    py, px = argmax // width, argmax % width
    maps = flat.reshape(batch, height, width)
    if height < size or width < size:
        maps = torch.nn.functional.pad(maps, (0, max(size - width, 0), 0, max(size - height, 0)))
    padded_height, padded_width = maps.shape[1:]
    row0 = (py - reach).clamp(0, padded_height - size)
    col0 = (px - reach).clamp(0, padded_width - size)
    # Every length-P run of the flat buffer, as rows of an overlapping view; pick P runs per map.
    values = maps.contiguous().reshape(-1)
    runs = values.as_strided((values.numel() - size + 1, size), (1, 1))
    offsets = torch.arange(size, device=flat.device)
    starts = (torch.arange(batch, device=flat.device) * (padded_height * padded_width))[:, None] + (
        (row0[:, None] + offsets) * padded_width + col0[:, None]
    )
    # index_select is faster than runs[...] here.
    patches = runs.index_select(0, starts.reshape(-1)).reshape(batch, size, size)
    return argmax, scores, patches, row0 - (py - reach), col0 - (px - reach)


def _blur_stencil(patch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows^T @ patch @ cols`` per map (``[B, P, P]``, ``[B, P, 5]`` twice -> ``[B, 5, 5]``), summed term
    by term in a fixed order (elementwise products and sums, exact IEEE operations wherever they run).

    Not a batched ``@``: BLAS picks its kernel by the batch's size and the data's alignment, so a box's
    keypoints moved in the last bits with the boxes decoded beside it (up to 1.6e-5 image px on noisy maps)
    and a cached tune-eval trial could not equal ``fowkal eval`` at another box selection. Here a map's
    result depends on that map alone.
    """
    size = patch.shape[-1]
    inner = patch[:, :, 0, None] * cols[:, None, 0, :]  # [B, P, 5]: patch @ cols
    for j in range(1, size):
        inner += patch[:, :, j, None] * cols[:, None, j, :]
    out = rows[:, 0, :, None] * inner[:, 0, None, :]  # [B, 5, 5]: rows^T @ inner
    for i in range(1, size):
        out += rows[:, i, :, None] * inner[:, i, None, :]
    return out


def decode_dark(heatmaps, blur_kernel: int | None = None):
    """DARK decoding (Zhang et al. 2020): argmax, Gaussian modulation, log, Taylor refinement at the maximum.

    Args:
        heatmaps: ``[N, K, H, W]`` NumPy array or torch tensor (any device).
        blur_kernel: odd size of the modulating Gaussian kernel (sigma derived as OpenCV does: 2.0 for 11);
            None is ``trainer.config.EvalConfig.blur_kernel``, the evaluation default.

    Returns:
        ``(coords [N, K, 2], scores [N, K])`` of the same kind as the input (NumPy arrays, or tensors on the
        input's device). ``coords`` are (x, y) in heatmap pixels; ``scores`` is each map's maximum.
        Maps whose maximum is <= 0 get coords (-1, -1). The refinement ``offset = -H^-1 g`` of the
        log of the blurred heatmap at the integer maximum (gradient by central differences, Hessian with
        step 2, as the DARK reference code) is applied where the maximum is at least 2 pixels from the
        border and the Hessian is non-singular; elsewhere the integer argmax is returned.

    The blur is the reference one (zero padding outside the map, then rescaled so that the maximum is the
    original one), but only evaluated where the Taylor step reads it: on the 5x5 pixels around the argmax,
    from the 15x15 (for an 11 kernel) patch around it. The rescaling uses the maximum of those 5x5 blurred
    values; it only matters where the 1e-10 floor before the log applies, i.e. never near a real peak.
    """
    if blur_kernel is None:
        from trainer.topdown.config import EvalConfig  # lazily: trainer.topdown.config imports this module

        blur_kernel = EvalConfig.blur_kernel
    is_numpy = not isinstance(heatmaps, torch.Tensor)
    tensor = torch.from_numpy(np.ascontiguousarray(heatmaps)) if is_numpy else heatmaps.detach()
    if tensor.ndim != 4:
        raise ValueError(f"heatmaps must have shape [N, K, H, W], got {tuple(tensor.shape)}")
    if blur_kernel < 1 or blur_kernel % 2 != 1:
        raise ValueError(f"blur_kernel must be a positive odd integer, got {blur_kernel!r}")
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    num, num_kpts, height, width = tensor.shape
    batch = num * num_kpts
    device, dtype = tensor.device, tensor.dtype
    flat = tensor.reshape(batch, height * width)
    if batch == 0:
        coords, scores = tensor.new_zeros((num, num_kpts, 2)), tensor.new_zeros((num, num_kpts))
        return (coords.cpu().numpy(), scores.cpu().numpy()) if is_numpy else (coords, scores)

    # Patch around the maximum, large enough to blur the 5x5 stencil neighbourhood exactly.
    reach = blur_kernel // 2 + 2
    argmax, scores, patch, row_shift, col_shift = _peaks_and_patches(flat, height, width, reach)
    px = argmax % width
    py = argmax // width
    # Blur weights of the window centred on the argmax ([P, 5]: 1D "valid" filtering to the 5 stencil
    # positions), zero-extended on both sides and re-indexed by each patch's shift: rows/columns of the
    # centred window that fall outside the map get weight 0, the reference's zero padding.
    size = patch.shape[-1]
    blur = torch.zeros(3 * size, 5, dtype=dtype, device=device)
    blur[size : 2 * size] = _valid_blur_matrix(blur_kernel, 5, dtype, device)
    offsets = torch.arange(size, device=device) + size
    blur_rows = blur.index_select(0, (offsets + row_shift[:, None]).reshape(-1)).reshape(batch, size, 5)
    blur_cols = blur.index_select(0, (offsets + col_shift[:, None]).reshape(-1)).reshape(batch, size, 5)
    blurred = _blur_stencil(patch, blur_rows, blur_cols)  # [B, 5, 5], centred on the argmax
    blurred_max = blurred.amax(dim=(1, 2))
    ratio = torch.where(blurred_max > 0, scores / blurred_max.clamp_min(torch.finfo(dtype).tiny), 1.0)
    log_map = torch.log((blurred * ratio[:, None, None]).clamp_min(_LOG_FLOOR))

    def at(dx: int, dy: int) -> torch.Tensor:
        return log_map[:, 2 + dy, 2 + dx]

    center = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = 0.25 * (at(2, 0) - 2 * center + at(-2, 0))
    dyy = 0.25 * (at(0, 2) - 2 * center + at(0, -2))
    dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = dxx * dyy - dxy * dxy
    refinable = (px >= 2) & (px <= width - 3) & (py >= 2) & (py <= height - 3) & (det != 0)
    safe_det = torch.where(refinable, det, torch.ones_like(det))
    # offset = -H^{-1} g with the closed-form 2x2 inverse.
    offset_x = -(dyy * dx - dxy * dy) / safe_det
    offset_y = -(dxx * dy - dxy * dx) / safe_det
    coords = torch.stack([px.to(dtype), py.to(dtype)], dim=-1)
    coords = torch.where(refinable[:, None], coords + torch.stack([offset_x, offset_y], dim=-1), coords)
    coords = torch.where((scores > 0)[:, None], coords, torch.full_like(coords, -1.0))

    coords = coords.reshape(num, num_kpts, 2)
    scores = scores.reshape(num, num_kpts)
    if is_numpy:
        return coords.numpy(), scores.numpy()
    return coords, scores


def _resolve_flip_mode(shift: bool, mode: str | None) -> str:
    if mode is None:
        return "shift" if shift else "none"
    if mode not in FLIP_MODES:
        raise ValueError(f"flip mode must be one of {', '.join(FLIP_MODES)}; got mode={mode!r}")
    # shift=True is the default, so only shift=False can contradict a mode on purpose.
    if not shift and mode != "none":
        raise ValueError(
            f"mode={mode!r} shifts the flipped heatmaps but shift=False asks for no shift: pass one of them "
            "(mode='none' is shift=False)"
        )
    return mode


@functools.lru_cache(maxsize=16)
def _exact_flip_matrix(width: int, stride: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[W, W]`` matrix R such that ``maps @ R`` mirrors the W axis about the input's pixel grid.

    The crop is mirrored about its input pixels (x -> W_in - 1 - x), i.e. heatmap u -> W - 1/stride - u,
    while reversing the array maps u -> W - 1 - u: the reversed map must move 1 - 1/stride px to the right.
    That sub-pixel move is a Fourier phase ramp applied to the map's mirror-symmetric extension (length 2W,
    so nothing wraps around from the opposite border): exact for band-limited maps, which a sigma-2 Gaussian
    is to float32 precision, so DARK's Gaussian fit still holds. Reversal and move are one matrix (one pass).
    """
    delta = 1.0 - 1.0 / stride
    identity = torch.eye(width, dtype=torch.float64)
    extended = torch.cat([identity, identity.flip(0)])  # columns: each unit map and its mirror image
    ramp = torch.exp(-2j * torch.pi * delta * torch.fft.rfftfreq(2 * width, dtype=torch.float64))
    moved = torch.fft.irfft(torch.fft.rfft(extended, dim=0) * ramp[:, None], n=2 * width, dim=0)[:width]
    # moved[x, j]: weight of input column j in output column x; flipping the transpose's rows reverses.
    return moved.T.flip(0).contiguous().to(dtype=dtype, device=device)


def flip_back_heatmaps(heatmaps, flip_index=None, shift: bool = True, mode: str | None = None, stride=4):
    """Un-mirror heatmaps predicted on a horizontally flipped image (test-time flip).

    Swaps left/right channels and mirrors the W axis. Test-time flip is then
    ``(model(image) + flip_back_heatmaps(model(image.flip(-1)))) / 2``. How the mirror is put back (``mode``):

    - ``"shift"``: reverse the W axis and move the result one pixel to the right (column 0 is kept), as
      MMPose's ``flip_test=True, shift_heatmap=True`` (the paper's recipe). The crop is mirrored about the
      input's pixel grid (``image.flip(-1)``: x -> W_in - 1 - x), which in heatmap pixels is a move of
      ``1 - 1/stride`` px (0.75 at stride 4), so this leaves a ``1/stride`` px bias to the right.
    - ``"none"``: reverse the W axis only (``1 - 1/stride`` px to the left of the truth).
    - ``"exact"``: reverse about the input's pixel grid for ``stride``, a sub-pixel move done as a Fourier
      phase ramp on the map's mirror-symmetric extension (keeps a Gaussian a Gaussian for DARK).

    Args:
        heatmaps: ``[N, K, H, W]`` torch tensor (or NumPy array) predicted on the mirrored image.
        flip_index: permutation of length K mapping each channel to its mirror; defaults to
            COCO-WholeBody's (``trainer.datasets.keypoints.flip_index()``, K = 133).
        shift: with ``mode=None``, True is ``"shift"`` and False is ``"none"``. With a mode, ``shift=False``
            and a shifting mode (``"shift"``, ``"exact"``) contradict each other: ``ValueError``.
        mode: one of ``FLIP_MODES``; None reads ``shift``.
        stride: input size / heatmap size (4 for 256x192 -> 64x48); used by ``"exact"``.

    Returns:
        The un-mirrored heatmaps, same kind, shape and device as the input (a new array/tensor); same dtype,
        except that ``"exact"`` returns float32 for integer input (computed in float32 for 16-bit floats).
    """
    resolved = _resolve_flip_mode(shift, mode)
    if isinstance(stride, bool) or not (
        isinstance(stride, int | float | np.number) and np.isfinite(stride) and stride > 0
    ):
        raise ValueError(f"stride must be a positive number (input / heatmap size), got {stride!r}")
    stride = float(stride)
    is_numpy = not isinstance(heatmaps, torch.Tensor)
    tensor = torch.from_numpy(np.asarray(heatmaps)) if is_numpy else heatmaps
    if tensor.ndim != 4:
        raise ValueError(f"heatmaps must have shape [N, K, H, W], got {tuple(tensor.shape)}")
    num_kpts = tensor.shape[1]
    index = coco_wholebody_flip_index() if flip_index is None else [int(i) for i in flip_index]
    if sorted(index) != list(range(num_kpts)):
        raise ValueError(
            f"flip_index must be a permutation of 0..{num_kpts - 1} (heatmaps have K={num_kpts}), "
            f"got length {len(index)}"
        )
    on_cpu = tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16  # (NumPy has no bfloat16)
    if resolved != "exact" and on_cpu:
        return _permute_channels(tensor, index, resolved, is_numpy)
    if resolved == "exact" and on_cpu:
        # The matrix's rows do not mix channels: reverse-and-move first (one product over the batch as it
        # lies), then swap the channels in one copy.
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        moved = tensor.to(dtype) @ _exact_flip_matrix(tensor.shape[-1], stride, dtype, tensor.device)
        flipped = _permute_channels(moved, index, "keep", False)
        if tensor.dtype == torch.float16:
            flipped = flipped.to(tensor.dtype)
        return flipped.numpy() if is_numpy else flipped
    index_tensor = torch.as_tensor(index, dtype=torch.long, device=tensor.device)
    swapped = tensor.index_select(1, index_tensor)
    if resolved == "exact":
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        matrix = _exact_flip_matrix(tensor.shape[-1], stride, dtype, tensor.device)
        flipped = swapped.to(dtype) @ matrix
        if tensor.dtype in (torch.float16, torch.bfloat16):
            flipped = flipped.to(tensor.dtype)
    else:
        flipped = swapped.flip(-1)
        if resolved == "shift":
            flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
    return flipped.numpy() if is_numpy else flipped


def _permute_channels(tensor: torch.Tensor, index: list[int], columns: str, is_numpy: bool):
    """Output channel ``c`` is input channel ``index[c]``, its columns reversed and moved one to the right
    (``"shift"``: column 0 is kept), reversed (``"none"``) or as they are (``"keep"``), on the CPU in one pass
    through NumPy's reversed views. The values of ``index_select`` + ``flip`` + ``cat`` (a copy moves no
    bits), without their intermediate copies of the batch (figures: bench/RESULTS.md, "Flip test")."""
    source = tensor.detach().numpy()
    out = np.empty(source.shape, dtype=source.dtype)
    for channel, mirror in enumerate(index):
        if columns == "shift":
            out[:, channel, :, 1:] = source[:, mirror, :, :0:-1]
            out[:, channel, :, 0] = source[:, mirror, :, -1]
        elif columns == "none":
            out[:, channel] = source[:, mirror, :, ::-1]
        else:
            out[:, channel] = source[:, mirror]
    return out if is_numpy else torch.from_numpy(out)


def heatmap_to_image_coords(coords, center, scale, heatmap_size) -> np.ndarray:
    """Map heatmap pixels back to image pixels through the inverse of the crop's affine (no rotation).

    Equals ``apply_affine(coords[n], get_warp_matrix(center[n], scale[n], 0, heatmap_size, inv=True))`` for
    every instance n, i.e. the inverse of ``get_warp_matrix(center, scale, 0, input_size)`` followed by the
    division by the stride (input_size / heatmap_size), vectorised over instances.

    Args:
        coords: ``[N, K, 2]`` (x, y) in heatmap pixels (NumPy or tensor).
        center: ``[N, 2]`` crop centres in image pixels.
        scale: ``[N, 2]`` crop (w, h) in image pixels, at the input's aspect ratio.
        heatmap_size: ``(W, H)``.

    Returns:
        ``[N, K, 2]`` float32 image coordinates.
    """
    width, height = _check_heatmap_size(heatmap_size)
    if isinstance(coords, torch.Tensor):
        coords = coords.detach().cpu().numpy()
    coords = np.asarray(coords, dtype=np.float64)
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise ValueError(f"coords must have shape [N, K, 2], got {coords.shape}")
    expected = (coords.shape[0], 2)
    if center.shape != expected:
        raise ValueError(f"center must have shape {expected}, got {center.shape}")
    if scale.shape != expected:
        raise ValueError(f"scale must have shape {expected}, got {scale.shape}")
    # get_warp_matrix scales both axes by output_w / scale_w; its inverse divides by the same factor.
    pixels_per_heatmap_pixel = (scale[:, 0] / width)[:, None, None]
    heatmap_center = np.array([width * 0.5, height * 0.5])
    image = (coords - heatmap_center) * pixels_per_heatmap_pixel + center[:, None, :]
    return image.astype(np.float32)
