"""Small fake MLflow stores for the report tests: parent and child runs logged by hand (no Ray, no training).

``own_ablation`` is an ablation of one's own arms (no paper numbers): 4 arms x 3 seeds, 4 epochs each, every
run peaking at epoch 3 (so best-epoch and last-epoch numbers differ), and a KAF figure on the KAL arm (d)'s
seeds 0 and 1 (different images, to tell which seed's the report shows). The expected numbers live here as
plain data; the tests compute what the report must say from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from orchestrator import tracking
from trainer.topdown.kaf_plot import plot_kaf_history

OWN_ARMS = [
    {"key": "a", "name": "mse", "label": "(a) plain MSE", "overrides": {"loss.variant": "mse"}},
    {"key": "d", "name": "kal", "label": "(d) my KAL", "overrides": {"loss.variant": "kal"}},
    {"key": "e", "name": "hwahr", "label": "(e) my WAHR", "overrides": {"loss.variant": "heuristic_wahr"}},
    {"key": "f", "name": "fowkal", "label": "(f) my FoWKAL", "overrides": {"loss.variant": "fowkal"}},
]
SEEDS = (0, 1, 2)
EPOCHS = 4
BEST_EPOCH = 3
# Whole-body AP at the best epoch per arm and seed. (d) - (a) is +5, +6, +7 points (an interval away from 0);
# (e) - (a) is +1, -1, +2 (an interval around 0).
OWN_BEST_AP = {
    "a": (0.10, 0.12, 0.11),
    "d": (0.15, 0.18, 0.18),
    "e": (0.11, 0.11, 0.13),
    "f": (0.12, 0.15, 0.13),
}
DESCRIPTION = (
    "Ablation: 4 arms x 3 seed(s). Data: synthetic COCO-WholeBody-format data (256 training images, 32 "
    "validation images). Model: hrnet_w18_small at 128x96 (h x w), 4 epochs."
)
BASE_CONFIG = {
    "epochs": EPOCHS,
    "batch_size": 16,
    "num_workers": 1,
    "data": {
        "kind": "synthetic",
        "synthetic_train_images": 256,
        "synthetic_val_images": 32,
        "pipeline": {"input_size": [96, 128]},
    },
    "model": {"backbone": "hrnet_w18_small"},
    "optim": {"lr": 0.002},
}


def epoch_metrics(best_ap: float, epoch: int) -> dict[str, float]:
    """Validation metrics of one epoch: ``best_ap`` scaled so that epoch ``BEST_EPOCH`` is the best."""
    scale = {1: 0.5, 2: 0.8, 3: 1.0, 4: 0.9}[epoch]
    ap = best_ap * scale
    return {"val/wholebody_AP": ap, "val/body_AP": ap + 0.1, "val/hand_AP": ap / 2}


def make_parent(client, experiment_id, name, kind, metric="val/wholebody_AP", mode="max", extra_tags=None):
    tags = {
        tracking.TAG_SWEEP_KIND: kind,
        tracking.TAG_METRIC: metric,
        tracking.TAG_MODE: mode,
        tracking.TAG_SWEEP_ID: name,
        **(extra_tags or {}),
    }
    return tracking.start_run(client, experiment_id, name, tags=tags)


def make_child(
    client, experiment_id, parent_id, name, tags, params, history, status, best=None, unit="fraction"
):
    """A child run with one ``history`` entry per epoch (1, 2, ...) and, given ``best`` (epoch, metrics),
    the best/ metrics a trial logs at the end. The APs here are fractions, as runs of versions before 0.2
    logged them (tagged so; the report converts them to percent); ``unit="percent"`` for today's runs."""
    run_id = tracking.start_run(
        client,
        experiment_id,
        name,
        params=params,
        tags={tracking.TAG_PARENT_RUN_ID: parent_id, tracking.TAG_METRIC_UNIT: unit, **tags},
    )
    for epoch, metrics in enumerate(history, start=1):
        tracking.log_epoch_metrics(run_id, {"epoch": epoch, **metrics}, epoch, client=client)
    if best is not None:
        epoch, metrics = best
        values = {f"best/{k}": v for k, v in metrics.items()} | {"best/epoch": epoch}
        tracking.log_epoch_metrics(run_id, values, epoch, client=client)
    tracking.end_run(run_id, status, client=client)
    return run_id


def kaf_png(out: Path, seed: int) -> Path:
    """A real KAF figure (``tracking.plot_kaf_history``) of a made-up history; each seed draws another."""
    rng = np.random.default_rng(seed)
    history = rng.uniform(0.0, 1.0, (EPOCHS, 133)) * np.linspace(1.0, 0.1, EPOCHS)[:, None]
    return plot_kaf_history(history, out / f"seed{seed}" / tracking.KAF_PLOT_ARTIFACT)


def own_ablation(client, experiment_name: str, work_dir: Path, sweep_name: str = "own-ablate") -> dict:
    """Log the own-arms ablation; returns its parent id, experiment id, run ids by (arm, seed) and the KAF
    PNGs logged on arm (d) by seed."""
    experiment_id = tracking.get_or_create_experiment(client, experiment_name)
    parent = make_parent(
        client, experiment_id, sweep_name, "ablate", extra_tags={tracking.TAG_DESCRIPTION: DESCRIPTION}
    )
    tracking.log_params(
        parent, {"base.epochs": EPOCHS, "sweep.seeds": json.dumps(list(SEEDS))}, client=client
    )
    client.log_text(parent, json.dumps(OWN_ARMS), tracking.ARMS_ARTIFACT)
    client.log_text(parent, yaml.safe_dump(BASE_CONFIG), tracking.BASE_CONFIG_ARTIFACT)
    runs, pngs = {}, {}
    for arm in OWN_ARMS:
        for seed in reversed(SEEDS):  # created last-seed first: "first seed" must not mean "first created"
            best_ap = OWN_BEST_AP[arm["key"]][seed]
            history = [{"train/loss": 1.0 / e, **epoch_metrics(best_ap, e)} for e in range(1, EPOCHS + 1)]
            run_id = make_child(
                client,
                experiment_id,
                parent,
                f"{arm['key']}-{arm['name']}-s{seed}",
                {
                    tracking.TAG_ARM_KEY: arm["key"],
                    tracking.TAG_SEED: str(seed),
                    tracking.TAG_TRIAL_ID: f"t{arm['key']}{seed}",
                    tracking.TAG_LOSS_VARIANT: arm["overrides"]["loss.variant"],
                },
                {"seed": seed},
                history,
                "FINISHED",
                best=(BEST_EPOCH, epoch_metrics(best_ap, BEST_EPOCH)),
            )
            runs[arm["key"], seed] = run_id
            if arm["key"] == "d" and seed in (0, 1):
                pngs[seed] = kaf_png(work_dir, seed)
                client.log_artifact(run_id, str(pngs[seed]))
    tracking.end_run(parent, "FINISHED", client=client)
    return {"parent": parent, "experiment_id": experiment_id, "runs": runs, "kaf_pngs": pngs}
