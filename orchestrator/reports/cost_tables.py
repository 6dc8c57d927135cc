"""An ablation's cost, arm by arm, for ``fowkal report``: what each arm's runs recorded, side by side.

- Inference (``cost/*``, ``latency/*``: logged once per run by ``orchestrator.runs.outputs`` from the best
  checkpoint on a few val images, ``trainer.latency``): parameters, FLOPs per image, forward /
  post-processing / total ms per image at batch 1 and batched, the poses kept per image.
- Training: the loop's ``throughput/img_per_s`` and ``time/epoch_s``, each the mean over a run's epochs
  (``records.EPOCH_COST_METRICS``); wall-clock hours of the runs (MLflow start to end) and the CPU- and
  GPU-hours they held: hours x the trial's resources (``orchestrator.runs.resources``: ``TRIAL_CPUS`` +
  ``num_workers`` x ``CPUS_PER_WORKER`` CPUs; ``num_workers`` GPUs when the run used GPUs, the default of
  ``--gpus-per-trial``).

Means are over an arm's FINISHED runs that logged the metric; hours are summed over all its runs that ended
(failed and stopped runs spent them too).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from orchestrator.reports.records import EPOCH_COST_METRICS, ChildRecord, SweepRecord, setting_value
from orchestrator.runs.resources import CPUS_PER_WORKER, TRIAL_CPUS
from trainer.families import DEFAULT_FAMILY, UnknownFamilyError, get_family
from trainer.latency import COST_METRICS

# What each finished run logged once about its kept model (trainer.latency.inference_cost).
INFERENCE_METRICS = COST_METRICS


@dataclass
class CostRow:
    """One arm's cost: means over its finished runs, hours summed over its ended runs."""

    key: str
    label: str
    family: str
    predicts_per_box: bool  # the family's inputs are crops of given person boxes (a top-down family)
    measured: int  # finished runs that logged the inference cost
    finished: int
    inference: dict[str, float] = field(default_factory=dict)  # INFERENCE_METRICS -> mean
    training: dict[str, float] = field(default_factory=dict)  # EPOCH_COST_METRICS -> mean
    ended: int = 0  # runs with a start and an end
    wall_hours: float = 0.0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0


def run_resources(child: ChildRecord) -> tuple[float, float]:
    """(CPUs, GPUs) a training trial held: its own ``TRIAL_CPUS``, ``CPUS_PER_WORKER`` per Ray Train worker,
    and a GPU per worker when the run used GPUs (its ``use_gpu`` and ``num_workers`` params)."""
    workers = setting_value(child.params.get("num_workers"))
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    use_gpu = setting_value(child.params.get("use_gpu")) is True
    return TRIAL_CPUS + workers * CPUS_PER_WORKER, float(workers) if use_gpu else 0.0


def _family_name(record: SweepRecord, arm: dict, runs: list[ChildRecord]) -> str:
    tagged = {c.family for c in runs if c.family}
    if len(tagged) == 1:
        return tagged.pop()
    return (arm.get("overrides") or {}).get("family") or record.params.get("base.family") or DEFAULT_FAMILY


def _means(runs: list[ChildRecord], metrics, source) -> dict[str, float]:
    out = {}
    for name in metrics:
        values = [source(c)[name] for c in runs if name in source(c)]
        if values:
            out[name] = statistics.fmean(values)
    return out


def cost_rows(record: SweepRecord) -> list[CostRow]:
    """Per arm (in the arms file's order) its inference and training cost."""
    rows = []
    for arm in record.arms:
        runs = [c for c in record.children if c.arm_key == arm["key"]]
        done = [c for c in runs if c.status == "FINISHED"]
        name = _family_name(record, arm, runs)
        try:
            per_box = bool(get_family(name).predicts_per_box)
        except UnknownFamilyError:
            per_box = False
        row = CostRow(
            key=arm["key"],
            label=arm.get("label", arm["key"]),
            family=name,
            predicts_per_box=per_box,
            measured=sum(1 for c in done if "cost/params" in c.last_metrics),
            finished=len(done),
            inference=_means(done, INFERENCE_METRICS, lambda c: c.last_metrics),
            training=_means(done, EPOCH_COST_METRICS, lambda c: c.epoch_means),
        )
        for child in runs:
            hours = child.hours
            if hours is None:
                continue
            cpus, gpus = run_resources(child)
            row.ended += 1
            row.wall_hours += hours
            row.cpu_hours += hours * cpus
            row.gpu_hours += hours * gpus
        rows.append(row)
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _latency(row: CostRow, suffix: str) -> str:
    values = [row.inference.get(f"latency/{part}_ms_{suffix}") for part in ("forward", "post", "total")]
    if any(v is None for v in values):
        return "—"
    forward, post, total = values
    share = f" ({100 * post / total:.0f}% post)" if total > 0 else ""
    return f"{forward:.1f} / {post:.1f} / {total:.1f}{share}"


def _flops(row: CostRow) -> str:
    per_image = row.inference.get("cost/flops_per_image")
    if per_image is None:
        return "—"
    text = f"{per_image / 1e9:.2f}"
    inputs, per_input = row.inference.get("cost/inputs_per_image"), row.inference.get("cost/flops_per_input")
    if inputs is not None and per_input is not None and abs(inputs - 1.0) > 1e-9:
        text += f" ({inputs:.2g} inputs × {per_input / 1e9:.3f})"
    return text


def inference_cost_table(rows: list[CostRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): parameters, GFLOPs per image, latency per image at batch 1 and batched (forward /
    post-processing / total ms, with the post-processing share), poses kept per image."""
    header = [
        "Arm",
        "Family",
        "n",
        "Params (M)",
        "GFLOPs per image",
        "Batch 1: forward / post / total ms per image",
        "Batched: forward / post / total ms per image",
        "Poses per image",
    ]
    out = []
    for row in rows:
        params = row.inference.get("cost/params")
        batch = row.inference.get("latency/batch_images")
        batched = _latency(row, "batched")
        if batched != "—" and batch is not None:
            batched += f", batch {batch:g}"
        out.append(
            [
                row.label,
                row.family,
                f"{row.measured}" if row.measured == row.finished else f"{row.measured}/{row.finished}",
                "—" if params is None else f"{params / 1e6:.2f}",
                _flops(row),
                _latency(row, "b1"),
                batched,
                _num(row.inference.get("latency/poses_per_image")),
            ]
        )
    return header, out


def training_cost_table(rows: list[CostRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): training samples/s and seconds per epoch (means over epochs and runs), and the runs'
    wall-clock, CPU- and GPU-hours."""
    header = [
        "Arm",
        "Family",
        "Training samples/s",
        "s per epoch",
        "Runs ended",
        "Wall-clock h",
        "CPU-hours",
        "GPU-hours",
    ]
    out = []
    for row in rows:
        hours = row.ended > 0
        out.append(
            [
                row.label,
                row.family,
                _num(row.training.get("throughput/img_per_s")),
                _num(row.training.get("time/epoch_s")),
                str(row.ended),
                f"{row.wall_hours:.3g}" if hours else "—",
                f"{row.cpu_hours:.3g}" if hours else "—",
                f"{row.gpu_hours:.3g}" if hours else "—",
            ]
        )
    return header, out


def inference_note(rows: list[CostRow]) -> str:
    """How the inference numbers were measured."""
    threads = sorted({int(r.inference["latency/threads"]) for r in rows if "latency/threads" in r.inference})
    on_gpu = any(r.inference.get("latency/on_gpu", 0.0) > 0 for r in rows)
    where = "a GPU" if on_gpu else "the CPU of the trial's process"
    if threads and not on_gpu:
        where += f" ({', '.join(map(str, threads))} torch thread(s))"
    return (
        f"Each run's best checkpoint, measured once after training on {where}, on the first val images "
        "(by image id): per image at batch 1 (an image alone: a top-down image is its person crops in one "
        "batch, a whole-image family's one letterboxed image) and all of them in one batch, after an untimed "
        "warm-up; a single pass, no flip test or test-time augmentation. Forward ends when the network's "
        "outputs are ready, post-processing when the poses are (decoding, NMS, fusion, rescoring: the "
        "family's own). GFLOPs: 2 × multiply-adds of the network per image (torch's FlopCounterMode), not "
        "post-processing. Means over each arm's finished runs (n); single measurements on a shared "
        "machine, so compare orders of magnitude more than digits."
    )


def detector_note(rows: list[CostRow]) -> str | None:
    """The sentence that the person detector of the arms evaluating given boxes is not in their numbers."""
    per_box = [r.label for r in rows if r.predicts_per_box]
    if not per_box:
        return None
    whole = [r.label for r in rows if not r.predicts_per_box]
    text = (
        f"The person detector's cost is NOT included for {', '.join(per_box)}: a top-down family estimates "
        "poses in crops of given person boxes (ground-truth boxes or a detection file), and the detector "
        "that produced them is not measured here; its latency, parameters and FLOPs come on top"
    )
    if whole:
        verb = "finds" if len(whole) == 1 else "find"
        text += f", whereas {', '.join(whole)} {verb} the people in the whole image itself"
    return text + "."


def training_note(rows: list[CostRow]) -> str:
    """What the training columns are."""
    return (
        "Training samples/s: the loop's throughput/img_per_s (training samples per second over the epoch's "
        "training part: person crops for a top-down family, whole images otherwise), and s per epoch "
        "(time/epoch_s, evaluation included), each the mean over the epochs of the arm's finished runs. "
        f"Hours: each run's MLflow start to end, summed over the arm's runs that ended; CPU-hours count "
        f"{TRIAL_CPUS:g} CPU for the trial plus {CPUS_PER_WORKER:g} per Ray Train worker, GPU-hours one GPU "
        "per worker of a run that used GPUs (the default of --gpus-per-trial; a sweep run with a smaller "
        "--gpus-per-trial held less)."
    )


__all__ = [
    "INFERENCE_METRICS",
    "CostRow",
    "cost_rows",
    "detector_note",
    "inference_cost_table",
    "inference_note",
    "run_resources",
    "training_cost_table",
    "training_note",
]
