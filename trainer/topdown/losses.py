"""Heatmap losses of the FoWKAL paper (Eq. 1-11): MSE, AWing, the heuristic loss, KAL, WAHR/FWAHR weighting.

Element-wise functions (any shape, ``pred`` = p-hat, ``target`` = p):

- :func:`awing` - Eq. 2, the Adaptive Wing loss of Wang, Bo and Fuxin (2019);
- :func:`wahr_weight` - the WAHR pixel weight of Luo et al. (2021);
- :func:`fwahr_weight` - Eq. 9, the FWAHR pixel weight.

:class:`HeatmapLoss` reduces them over heatmaps ``[B, K, H, W]`` for the variants of Tables 2 and 3 (see
:data:`LOSS_VARIANTS`). Every variant is computed as

    term[b, k]  = awing_coef[b, k] * mean_px(W * AWing) + mse_coef[b, k] * mean_px(W * (p - p_hat)^2)
    total       = mean_b( sum_k keypoint_scale[k] * term[b, k] ) + reg

where W is 1, the WAHR or the FWAHR weight, and the coefficients/scales come from the variant's mix function
(the target weight enters through the coefficients). The pixel work, which is almost all of the cost, runs
by default in ``trainer.topdown.loss_pixels``: one pass over cache-sized slabs that computes the per-pixel
loss
and its analytic derivative together (no autograd graph over the ``B*K*H*W`` elements, no full-size
temporaries). ``HeatmapLoss(..., fused=False)`` runs the same equations through the element-wise functions
and autograd instead; the tests check that both agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS
from trainer.setting_error import SettingError
from trainer.topdown.loss_pixels import PixelLossConfig, _FusedKeypointTerms

# Parts the heuristic loss (Eq. 4-5) trains with MSE (coarse) and with AWing (dense).
COARSE_PARTS: tuple[str, ...] = ("body", "foot")
DENSE_PARTS: tuple[str, ...] = ("face", "hand")

WEIGHTINGS = ("none", "wahr", "fwahr")
FWAHR_CONDITIONS = ("pred", "target")
KAF_MODES = ("literal", "uncertainty")


class LossSettingError(SettingError):
    """A loss setting out of range; ``field`` names the :class:`LossConfig` field."""


@dataclass
class LossConfig:
    """The loss's settings: the variant of Tables 2-3 and its hyperparameters (defaults as the paper).

    The ``loss:`` section of a training config; :class:`HeatmapLoss` takes it whole.
    """

    variant: str = "fowkal"
    # Weight of sum_part Var(lambda_part), Eq. 7-8 (the paper adds it unweighted); 0 = Eq. 8 without Eq. 7.
    reg_weight: float = 1.0
    # WAHR/FWAHR exponent and FWAHR background factor (Eq. 9; Luo et al. 2021's gamma).
    gamma: float = 0.01
    tau: float = 0.01
    # AWing, Eq. 2 (Wang, Bo and Fuxin 2019's values, which the paper keeps).
    omega: float = 14.0
    theta: float = 0.5
    epsilon: float = 1.0
    alpha: float = 2.1
    # Stop the gradient through the WAHR/FWAHR weight.
    detach_weight: bool = False
    # Eq. 9's gate on the prediction (as printed) or on the target (the text's reading): see fwahr_weight.
    fwahr_condition: str = "pred"
    # "literal" = Eq. 8 as written; "uncertainty" adds Kendall et al.'s (2018) log-precision prior.
    kaf_mode: str = "literal"
    kaf_prior_weight: float = 0.5

    def validate(self) -> None:
        """Raise :class:`LossSettingError` naming the field of the first setting out of range."""
        if self.variant not in LOSS_VARIANTS:
            raise LossSettingError(
                "variant", f"variant={self.variant!r} is not one of {', '.join(map(repr, LOSS_VARIANTS))}"
            )
        for name in ("gamma", "tau", "omega", "theta", "epsilon", "alpha", "kaf_prior_weight"):
            value = getattr(self, name)
            if not _is_finite_number(value):
                raise LossSettingError(name, f"{name} must be a finite number, got {value!r}")
            if value <= 0:
                raise LossSettingError(name, f"{name} must be positive, got {value!r}")
        # reg_weight = 0 is a legitimate ablation (Eq. 8 without Eq. 7); only negative values are refused.
        if not _is_finite_number(self.reg_weight) or self.reg_weight < 0:
            raise LossSettingError(
                "reg_weight", f"reg_weight must be a finite number >= 0, got {self.reg_weight!r}"
            )
        for name, choices in (("fwahr_condition", FWAHR_CONDITIONS), ("kaf_mode", KAF_MODES)):
            value = getattr(self, name)
            if value not in choices:
                raise LossSettingError(
                    name, f"{name}={value!r} is not one of {', '.join(map(repr, choices))}"
                )
        if not isinstance(self.detach_weight, bool):
            raise LossSettingError(
                "detach_weight", f"detach_weight must be true or false, got {self.detach_weight!r}"
            )

    @property
    def spec(self) -> LossVariant:
        """This variant's row of :data:`LOSS_VARIANTS` (its weighting, needs_kaf, required parts)."""
        return LOSS_VARIANTS[self.variant]


_DEFAULTS = LossConfig()


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not _is_finite_number(value):
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        if value <= 0:
            raise ValueError(f"{owner}: {name} must be positive, got {value!r}")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ------------------------------------------------------------------------------------------------------------
# Element-wise functions, written as the paper writes them (autograd differentiates them).
# ------------------------------------------------------------------------------------------------------------


def awing(
    pred: Tensor,
    target: Tensor,
    *,
    omega: float = _DEFAULTS.omega,
    theta: float = _DEFAULTS.theta,
    epsilon: float = _DEFAULTS.epsilon,
    alpha: float = _DEFAULTS.alpha,
) -> Tensor:
    """Adaptive Wing loss per element, Eq. 2 (defaults: Wang, Bo and Fuxin 2019, as the paper uses).

    ``omega * ln(1 + |(p - p_hat) / epsilon|^(alpha - p))`` where ``|p - p_hat| < theta``, else
    ``A * |p - p_hat| - C`` with A and C chosen so that value and slope are continuous at ``theta``.
    """
    _check_positive("awing", omega=omega, theta=theta, epsilon=epsilon, alpha=alpha)
    if pred.shape != target.shape:
        raise ValueError(
            f"awing: pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
        )
    diff = (target - pred).abs()
    exponent = alpha - target
    near = omega * torch.log1p(torch.pow(diff / epsilon, exponent))
    ratio_pow = torch.pow(theta / epsilon, exponent)  # (theta/epsilon)^(alpha - p)
    slope = (
        omega * (1.0 / (1.0 + ratio_pow)) * exponent * torch.pow(theta / epsilon, exponent - 1.0) / epsilon
    )
    offset = theta * slope - omega * torch.log1p(ratio_pow)
    far = slope * diff - offset
    return torch.where(diff < theta, near, far)


def wahr_weight(pred: Tensor, target: Tensor, *, gamma: float = _DEFAULTS.gamma) -> Tensor:
    """WAHR pixel weight of Luo et al. (2021): ``p^gamma * |1 - p_hat| + |p_hat| * (1 - p^gamma)``."""
    _check_positive("wahr_weight", gamma=gamma)
    if pred.shape != target.shape:
        raise ValueError(
            f"wahr_weight: pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
        )
    target_pow = target.pow(gamma)
    return target_pow * (1.0 - pred).abs() + pred.abs() * (1.0 - target_pow)


def fwahr_weight(
    pred: Tensor,
    target: Tensor,
    *,
    gamma: float = _DEFAULTS.gamma,
    tau: float = _DEFAULTS.tau,
    condition: str = _DEFAULTS.fwahr_condition,
) -> Tensor:
    """FWAHR pixel weight, Eq. 9 read literally: WAHR where the gate is ``>= 2^(-1/gamma)``, else ``tau * p``.

    Eq. 9 writes the gate on p_hat (``condition="pred"``, the default). The text calls ``2^(-1/gamma)`` the
    soft boundary between positive and negative samples, which is where ``p^gamma = 1/2``, i.e. a condition
    on the ground truth p (``condition="target"``). The two readings differ a lot: with ``gamma=0.01`` the
    threshold is ~7.9e-31, so under "pred" nearly every pixel with a positive prediction gets the WAHR
    weight and only pixels predicted <= 0 get ``tau * p``; under "target" every pixel where the ground-truth
    heatmap is 0 gets ``tau * 0 = 0``, i.e. the background drops out of the loss. The switch lets the
    ablation settle it.
    """
    _check_positive("fwahr_weight", gamma=gamma, tau=tau)
    _check_choice("fwahr_weight", "condition", condition, FWAHR_CONDITIONS)
    gate = pred if condition == "pred" else target
    return torch.where(gate >= 2.0 ** (-1.0 / gamma), wahr_weight(pred, target, gamma=gamma), tau * target)


# ------------------------------------------------------------------------------------------------------------
# Variants: each is a mix function (coefficients and scales per keypoint) plus its pixel weighting.
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypointMix:
    """How a variant combines the per-keypoint pixel means into its total.

    ``awing_coef`` / ``mse_coef``: ``[B, K]`` coefficients of each keypoint's (weighted) AWing and MSE pixel
    means (the target weight is folded in; None = that loss is not used). ``keypoint_scale``: ``[K]`` factor
    of each keypoint's term in the per-sample sum (1/K, 1/N_part, lambda_fh/N_bf, ...). ``reg``: 0-dim terms
    that depend on the KAF only (or None). ``report_part_means``: the per-part log entries are part means
    (mse, awing) rather than each part's contribution to the total.
    """

    awing_coef: Tensor | None
    mse_coef: Tensor | None
    keypoint_scale: Tensor
    reg: Tensor | None = None
    report_part_means: bool = False


@dataclass(frozen=True)
class LossVariant:
    """One row of Tables 2-3: a mix function, the pixel weighting, and what the variant needs and uses.

    The properties are what the rest of the project asks of a variant (the model builds the KAF head when
    ``needs_kaf``; search-space ``when:`` conditions may name ``weighting``, ``needs_kaf`` or
    ``uses_awing``), so a new variant is its mix function and one line in :data:`LOSS_VARIANTS`.
    """

    mix: Callable[[HeatmapLoss, Tensor, Tensor | None], KeypointMix]
    weighting: str = "none"
    needs_kaf: bool = False
    required_parts: tuple[str, ...] = ()
    # Whether AWing (Eq. 2) enters the loss, i.e. whether omega/theta/epsilon/alpha matter.
    uses_awing: bool = True


def _mse_mix(loss: HeatmapLoss, target_weight: Tensor, kaf: Tensor | None) -> KeypointMix:
    """Eq. 1: the mean over all K keypoints of the MSE pixel mean."""
    scale = target_weight.new_full((loss.num_keypoints,), 1.0 / loss.num_keypoints)
    return KeypointMix(None, target_weight, scale, report_part_means=True)


def _awing_mix(loss: HeatmapLoss, target_weight: Tensor, kaf: Tensor | None) -> KeypointMix:
    """Eq. 3: the mean over all K keypoints of the AWing pixel mean."""
    scale = target_weight.new_full((loss.num_keypoints,), 1.0 / loss.num_keypoints)
    return KeypointMix(target_weight, None, scale, report_part_means=True)


def _heuristic_mix(loss: HeatmapLoss, target_weight: Tensor, kaf: Tensor | None) -> KeypointMix:
    """Eq. 4-5: ``lambda_fh * L_bf + lambda_bf * L_fh`` with lambda_fh = N_fh/N on the body+foot MSE term."""
    n_coarse, n_total = loss.num_coarse, loss.num_keypoints
    n_dense = n_total - n_coarse
    lambda_fh, lambda_bf = n_dense / n_total, n_coarse / n_total
    coarse = loss.keypoint_is_coarse.to(target_weight.dtype)
    scale = coarse * (lambda_fh / n_coarse) + (1.0 - coarse) * (lambda_bf / n_dense)
    return KeypointMix(target_weight * (1.0 - coarse), target_weight * coarse, scale)


def _kal_mix(loss: HeatmapLoss, target_weight: Tensor, kaf: Tensor | None) -> KeypointMix:
    """Eq. 6-8 (and 10-11 with FWAHR): part means of ``lambda AWing + (1 - lambda) MSE`` plus Var(lambda)."""
    assert kaf is not None  # checked by HeatmapLoss.forward
    part_id, num_parts = loss.keypoint_part_id, len(loss.parts)
    part_sizes = loss.part_sizes.to(kaf.dtype)

    def part_mean(values: Tensor) -> Tensor:  # [B, K] -> [B, P]
        sums = values.new_zeros(values.shape[0], num_parts).index_add(1, part_id, values)
        return sums / part_sizes

    # Eq. 7: population variance of lambda within each part, per sample; summed over parts, batch mean.
    deviation = kaf - part_mean(kaf)[:, part_id]
    reg = loss.reg_weight * part_mean(deviation.square()).sum(dim=1).mean()
    if loss.kaf_mode == "uncertainty":
        # Kendall et al. (2018): lambda and 1 - lambda act as the precisions of the two terms, each adding
        # -1/2 log(precision) (scaled by kaf_prior_weight); part means like Eq. 8, summed, batch mean.
        clamped = kaf.clamp(_KAF_LOG_FLOOR, 1.0 - _KAF_LOG_FLOOR)
        prior = -loss.kaf_prior_weight * (torch.log(clamped) + torch.log1p(-clamped))
        reg = reg + part_mean(prior).sum(dim=1).mean()
    scale = 1.0 / loss.keypoint_part_size.to(kaf.dtype)
    return KeypointMix(target_weight * kaf, target_weight * (1.0 - kaf), scale, reg)


_KAF_LOG_FLOOR = 1e-6

# name -> variant, as named in Tables 2 and 3. A new variant is a mix function and one line here.
LOSS_VARIANTS: dict[str, LossVariant] = {
    "mse": LossVariant(_mse_mix, uses_awing=False),
    "awing": LossVariant(_awing_mix),
    "heuristic": LossVariant(_heuristic_mix, required_parts=COARSE_PARTS + DENSE_PARTS),
    "kal": LossVariant(_kal_mix, needs_kaf=True),
    "heuristic_wahr": LossVariant(_heuristic_mix, "wahr", required_parts=COARSE_PARTS + DENSE_PARTS),
    "heuristic_fwahr": LossVariant(_heuristic_mix, "fwahr", required_parts=COARSE_PARTS + DENSE_PARTS),
    "kal_wahr": LossVariant(_kal_mix, "wahr", needs_kaf=True),
    "fowkal": LossVariant(_kal_mix, "fwahr", needs_kaf=True),  # Eq. 11
}
# Properties of LossVariant that name a set of variants (in search-space ``when:`` conditions).
VARIANT_PROPERTIES: tuple[str, ...] = ("weighting", "needs_kaf", "uses_awing")


def variants_where(**properties) -> tuple[str, ...]:
    """Names of the variants whose properties match, e.g. ``variants_where(needs_kaf=True)``.

    A value may be a tuple/list of accepted values (``weighting=("wahr", "fwahr")``).
    """
    for name in properties:
        if name not in VARIANT_PROPERTIES:
            raise ValueError(
                f"unknown loss-variant property {name!r} (known: {', '.join(VARIANT_PROPERTIES)})"
            )
    accepted = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in properties.items()}
    return tuple(
        name
        for name, spec in LOSS_VARIANTS.items()
        if all(getattr(spec, key) in values for key, values in accepted.items())
    )


class HeatmapLoss(nn.Module):
    """Heatmap loss of one variant of Tables 2-3: ``mse``, ``awing``, ``heuristic``, ``kal``,
    ``heuristic_wahr``, ``heuristic_fwahr``, ``kal_wahr``, ``fowkal`` (see :data:`LOSS_VARIANTS`).

    Reductions (comparable with MMPose and across variants): a keypoint's term is the pixel mean of
    (weight x) the per-pixel loss times its target weight, then the batch mean; ``mse``/``awing`` average
    the K terms (Eq. 1, 3); ``heuristic`` is ``lambda_fh * L_bf + lambda_bf * L_fh`` exactly as Eq. 5 writes
    it; the ``kal`` family sums over parts the part mean of ``lambda_k AWing_k + (1 - lambda_k) MSE_k`` and
    adds ``reg_weight * sum_part Var(lambda_part)`` (Eq. 6-8, 10-11; population variance per sample, batch
    mean). ``*_wahr``/``*_fwahr`` multiply each pixel's loss by the WAHR/FWAHR weight (Eq. 9), whose
    gradient flows into pred unless ``detach_weight``; ``fwahr_condition`` is :func:`fwahr_weight`'s switch.

    KAF collapse and ``kaf_mode``: Eq. 8 is linear in each lambda_k with slope
    ``target_weight * (AWing_k - MSE_k) / N_part``, and AWing is larger than MSE at every pixel where
    ``|p - p_hat| < 1`` (about 10x on Gaussian heatmaps), so nothing but the small variance term resists
    pushing every lambda to 0; ``bench/losses.py --kaf-toy`` shows it on a toy problem (figures in
    bench/RESULTS.md). The paper's Fig. 5 shows KAF min-max normalized per pose, which would hide a common
    collapse.
    ``kaf_mode="literal"`` (default) is Eq. 8 as written. ``kaf_mode="uncertainty"`` adds Kendall et al.'s
    (2018) homoscedastic-uncertainty term: lambda_k and 1 - lambda_k are read as the precisions of the AWing
    and MSE terms and each adds ``-kaf_prior_weight * log(precision)`` (default 1/2, Kendall's value for a
    per-pixel Gaussian likelihood; part means, summed over parts, batch mean; lambda clamped to
    [1e-6, 1 - 1e-6] inside the log). That makes the optimum interior: ``AWing_k - MSE_k =
    kaf_prior_weight * (1/lambda_k - 1/(1 - lambda_k))``, so lambda_k falls below 1/2 as AWing exceeds MSE
    and is 1/2 for an invisible keypoint.

    ``forward(pred, target, target_weight, kaf=None, return_parts=False)`` returns the 0-dim total, or
    ``(total, parts)`` where ``parts`` maps each part name to a detached 0-dim tensor: that part's term as
    it enters the total (``heuristic``, ``kal`` family; they add up to the total together with ``"reg"``,
    present for the ``kal`` family: every term that depends on lambda only), or that part's mean of the
    keypoint terms (``mse``, ``awing``; the total is ``sum_part N_part / K * parts[part]``).
    """

    def __init__(
        self,
        config: LossConfig | str | None = None,
        *,
        parts: Mapping[str, tuple[int, ...]] = COCO_WHOLEBODY_PARTS,
        fused: bool = True,
        chunk_elements: int | None = None,
        **settings,
    ) -> None:
        """``HeatmapLoss(LossConfig(...))``, or ``HeatmapLoss("fowkal", gamma=0.02)``: a variant name and
        :class:`LossConfig` fields (``settings`` also override the fields of a given config)."""
        super().__init__()
        if config is None:
            config = LossConfig()
        elif isinstance(config, str):
            config = LossConfig(variant=config)
        elif not isinstance(config, LossConfig):
            raise TypeError(f"HeatmapLoss: expected a LossConfig or a variant name, got {config!r}")
        known = {f.name for f in dataclasses.fields(LossConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"HeatmapLoss: unknown settings {unknown} (LossConfig fields: {sorted(known)})")
        config = dataclasses.replace(config, **settings)
        try:
            config.validate()
        except LossSettingError as err:
            raise LossSettingError(err.field, f"HeatmapLoss: {err}") from None
        if chunk_elements is not None and (not isinstance(chunk_elements, int) or chunk_elements <= 0):
            raise ValueError(f"HeatmapLoss: chunk_elements must be a positive int, got {chunk_elements!r}")
        self.config = config
        self.variant = config.variant
        self.spec = config.spec
        self.parts = {name: tuple(int(k) for k in idx) for name, idx in parts.items()}
        self.num_keypoints = _check_parts(self.parts)
        missing = [name for name in self.spec.required_parts if name not in self.parts]
        if missing:
            raise ValueError(
                f"HeatmapLoss: variant={self.variant!r} needs parts {list(self.spec.required_parts)}, "
                f"parts has {list(self.parts)} (missing {missing})"
            )
        self.reg_weight = float(config.reg_weight)
        self.kaf_mode = config.kaf_mode
        self.kaf_prior_weight = float(config.kaf_prior_weight)
        self.fused = fused
        self.chunk_elements = chunk_elements
        self.pixel_config = PixelLossConfig(settings=config, weighting=self.spec.weighting)
        part_id = torch.empty(self.num_keypoints, dtype=torch.long)
        is_coarse = torch.zeros(self.num_keypoints, dtype=torch.bool)
        for i, (name, idx) in enumerate(self.parts.items()):
            part_id[list(idx)] = i
            is_coarse[list(idx)] = name in COARSE_PARTS
        sizes = torch.tensor([float(len(idx)) for idx in self.parts.values()])
        self.register_buffer("keypoint_part_id", part_id, persistent=False)
        self.register_buffer("part_sizes", sizes, persistent=False)
        self.register_buffer("keypoint_part_size", sizes[part_id], persistent=False)
        self.register_buffer("keypoint_is_coarse", is_coarse, persistent=False)
        self.num_coarse = int(is_coarse.sum())
        # Maximal runs of consecutive keypoints of one part: slabs never mix parts (heuristic skips work).
        runs, start = [], 0
        for k in range(1, self.num_keypoints + 1):
            if k == self.num_keypoints or part_id[k] != part_id[start]:
                runs.append((start, k))
                start = k
        self._runs = tuple(runs)

    @property
    def needs_kaf(self) -> bool:
        """Whether forward needs the keypoint-wise adaptive factors (the model must build the KAF head)."""
        return self.spec.needs_kaf

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, kaf_mode={self.kaf_mode!r}, fused={self.fused}"

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        target_weight: Tensor,
        kaf: Tensor | None = None,
        *,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total (0-dim) for ``pred``/``target`` ``[B,K,H,W]`` and ``target_weight``/``kaf`` ``[B,K]``."""
        self._check_inputs(pred, target, target_weight, kaf)
        target = target.to(pred.dtype)
        target_weight = target_weight.to(pred.dtype)
        if kaf is not None:
            kaf = kaf.to(pred.dtype)
        mix = self.spec.mix(self, target_weight, kaf)
        terms = self.keypoint_terms(pred, target, mix.awing_coef, mix.mse_coef)
        scale = mix.keypoint_scale.to(pred.dtype)
        total = (terms * scale).sum(dim=1).mean()
        if mix.reg is not None:
            total = total + mix.reg
        if not return_parts:
            return total
        with torch.no_grad():
            per_keypoint = (
                terms / self.keypoint_part_size.to(terms.dtype) if mix.report_part_means else terms * scale
            )
            by_part = per_keypoint.new_zeros(pred.shape[0], len(self.parts))
            by_part = by_part.index_add(1, self.keypoint_part_id, per_keypoint).mean(dim=0)
            parts = {name: by_part[i] for i, name in enumerate(self.parts)}
            if mix.reg is not None:
                parts["reg"] = mix.reg.detach()
        return total, parts

    def keypoint_terms(
        self, pred: Tensor, target: Tensor, awing_coef: Tensor | None, mse_coef: Tensor | None
    ) -> Tensor:
        """``[B, K]`` terms ``awing_coef * mean_px(W * AWing) + mse_coef * mean_px(W * MSE)``."""
        cfg = self.pixel_config
        if self.fused and not target.requires_grad:
            chunk = self.chunk_elements
            if chunk is None:  # slabs that stay in cache on CPU; one pass over everything on GPUs
                chunk = 1 << 18 if pred.device.type == "cpu" else pred.numel()
            cfg = dataclasses.replace(cfg, chunk_elements=chunk)
            return _FusedKeypointTerms.apply(pred, target, awing_coef, mse_coef, cfg, self._runs)
        hp = cfg.settings
        if cfg.weighting == "none":
            weight = None
        elif cfg.weighting == "wahr":
            weight = wahr_weight(pred, target, gamma=hp.gamma)
        else:
            weight = fwahr_weight(pred, target, gamma=hp.gamma, tau=hp.tau, condition=hp.fwahr_condition)
        if weight is not None and hp.detach_weight:
            weight = weight.detach()
        terms = pred.new_zeros(pred.shape[:2])
        for coef, pixel_loss in ((awing_coef, "awing"), (mse_coef, "mse")):
            if coef is None:
                continue
            if pixel_loss == "awing":
                loss = awing(pred, target, omega=hp.omega, theta=hp.theta, epsilon=hp.epsilon, alpha=hp.alpha)
            else:
                loss = (pred - target).square()
            if weight is not None:
                loss = weight * loss
            terms = terms + coef * loss.mean(dim=(2, 3))
        return terms

    def _check_inputs(self, pred: Tensor, target: Tensor, target_weight: Tensor, kaf: Tensor | None) -> None:
        if pred.dim() != 4:
            raise ValueError(f"HeatmapLoss: pred must be [B, K, H, W], got shape {tuple(pred.shape)}")
        if target.shape != pred.shape:
            raise ValueError(
                f"HeatmapLoss: target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}"
            )
        batch, keypoints = pred.shape[:2]
        if keypoints != self.num_keypoints:
            raise ValueError(
                f"HeatmapLoss: pred has K={keypoints} heatmaps but parts {list(self.parts)} "
                f"cover {self.num_keypoints} keypoints"
            )
        if target_weight.shape != (batch, keypoints):
            raise ValueError(
                f"HeatmapLoss: target_weight must be [B, K] = [{batch}, {keypoints}], "
                f"got shape {tuple(target_weight.shape)}"
            )
        if not self.needs_kaf:
            if kaf is not None:
                raise ValueError(f"HeatmapLoss: variant={self.variant!r} takes no kaf, but kaf was given")
            return
        if kaf is None:
            raise ValueError(f"HeatmapLoss: variant={self.variant!r} needs kaf [B, K] in [0, 1], got None")
        if kaf.shape != (batch, keypoints):
            raise ValueError(
                f"HeatmapLoss: kaf must be [B, K] = [{batch}, {keypoints}], got shape {tuple(kaf.shape)}"
            )
        # NaN/inf come from a diverging model, not from a caller's mistake: they pass, so the total is
        # non-finite and the training loop's guard reports the epoch, iteration and lr.
        outside = ((kaf < 0) | (kaf > 1)) & torch.isfinite(kaf)
        if bool(outside.any()):
            bad = kaf.detach()[outside]
            raise ValueError(f"HeatmapLoss: kaf must lie in [0, 1], got values such as {bad[:5].tolist()}")


def _check_parts(parts: dict[str, tuple[int, ...]]) -> int:
    """Check that the parts partition 0..K-1 into non-empty groups; return K."""
    if not parts:
        raise ValueError("HeatmapLoss: parts is empty")
    indices = sorted(k for idx in parts.values() for k in idx)
    for name, idx in parts.items():
        if not idx:
            raise ValueError(f"HeatmapLoss: parts[{name!r}] is empty")
    if indices != list(range(len(indices))):
        raise ValueError(
            f"HeatmapLoss: parts must cover keypoints 0..K-1 exactly once, got indices {indices[:10]}..."
            f" ({len(indices)} in total, {len(set(indices))} distinct)"
        )
    return len(indices)
