"""KAPAO's costs on this machine, beside the top-down family's where they do the same job.

1. Forward images/s of KAPAO-S (batch 1, eval, no grad) at the smoke size and at the paper's 1280, K = 17
   and 133, torch's default threads.
2. The size of the raw head output per image at 1280 (K = 17 and 133): what an inference-time sweep must not
   cache (trainer.kapao.postprocess.candidates keeps the candidates above the thresholds instead).
3. Post-processing ms per image on one thread (decode of the candidates + NMS of both object types + fusion +
   unfused scores; ``poses_from_outputs``) for 3 people (a COCO image's average) and a crowd of 20, K = 17
   and 133 (goal: <= 2 ms at K = 17, as the paper's fusion <= 1.7 ms), now and at BASELINE_COMMIT, beside
   the top-down family's decoding of the same 20 people (flip-back
   + DARK + the inverse crop affine of 20 crops with 64x48 heatmaps;
   ``trainer.topdown.inference.decode_heatmaps``).

4. ``--latency``: per-image latency as the KAPAO paper measures it (batch 1: forward + post-processing, and
   the post-processing share) for both families on the same images (the real mini set
   ../shared/data/coco_wholebody_mini/ if present, else synthetic), at their paper input sizes (top-down
   256x192 per person crop x the people in the image + DARK, rescoring, OKS-NMS; KAPAO 1280 whole image) and
   at the smoke sizes; random-init weights. The same measurement as the cost a finished run logs
   (``ExperimentFamily.latency_probe`` timed by ``trainer.latency.inference_cost``).

5. ``--bf16-head``: what bf16 autocast (``amp: auto`` on a GPU that has it) costs the pose keypoints: each
   head convolution's output in bf16 against the same convolution in float32 on the same bf16 features, as
   the keypoint offsets ``(4 sigmoid - 2) * anchor`` in input pixels (KAPAO-S at 1280, K = 17, random init,
   the keypoint logits scaled to a trained-like spread, std 1.5). On the CPU's bf16 autocast.

    .venv/bin/python bench/kapao.py [--quick]
    .venv/bin/python bench/kapao.py --latency [--quick] [--device cuda]
    .venv/bin/python bench/kapao.py --bf16-head

Prints Markdown tables (for bench/RESULTS.md, "KAPAO").
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor  # noqa: E402
from trainer.kapao.model import build_kapao_model  # noqa: E402
from trainer.kapao.postprocess import KapaoEvalConfig, candidates, poses_from_outputs  # noqa: E402
from trainer.topdown.inference import decode_heatmaps  # noqa: E402

BACKGROUND = -20.0  # objectness logit of an empty anchor: sigmoid ~2e-9, below every floor


def _logit(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def best_ms(fn, repeats: int) -> float:
    """The best of ``repeats`` timed calls after one warm-up (the machine is shared), in ms."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def crowd_outputs(k: int, size: int, people: int, rng) -> list[torch.Tensor]:
    """Raw outputs of a crowd: per person ~150 pose anchors in a cluster (0.001-0.9), two keypoint objects per
    keypoint type near its pose keypoint, plus a few hundred stray low-confidence objects."""
    outputs = [torch.zeros(1, 3, size // s, size // s, outputs_per_anchor(k)) for s in STRIDES]
    for out in outputs:
        out[..., 4] = BACKGROUND
        out[..., 5:] = torch.from_numpy(rng.normal(0, 0.5, out.shape[:4] + (out.shape[-1] - 5,))).float()
        out[..., 5 : 5 + k + 1] = -8.0

    def put(level, a, gy, gx, cls, conf):
        cells = outputs[level].shape[2]
        gy, gx = int(np.clip(gy, 0, cells - 1)), int(np.clip(gx, 0, cells - 1))
        row = outputs[level][0, a, gy, gx]
        row[4] = float(_logit(np.sqrt(conf)))
        row[5 + cls] = float(_logit(np.sqrt(conf)))
        return gx, gy, row

    for _ in range(people):
        level = int(rng.integers(1, 3))
        s = STRIDES[level]
        cx, cy = rng.integers(0, size // s, 2)
        for _ in range(150):  # the cluster of weaker duplicates, then the person's best anchor
            put(
                level,
                rng.integers(0, 3),
                cy + rng.integers(-3, 4),
                cx + rng.integers(-3, 4),
                0,
                rng.uniform(0.03, 0.5) ** 2,
            )
        a = int(rng.integers(0, 3))
        gx, gy, row = put(level, a, cy, cx, 0, 0.9)
        keypoints = (4 * torch.sigmoid(row[-2 * k :]).reshape(k, 2) - 2) * torch.tensor(
            P6_ANCHORS[level][a], dtype=torch.float32
        ) + torch.tensor([gx, gy]) * s
        for kp in range(k):
            for _ in range(2):
                x, y = (keypoints[kp].numpy() + rng.normal(0, 3, 2)) / 8
                put(0, 1, y, x, kp + 1, float(rng.uniform(0.2, 0.9)))
    for _ in range(300):  # stray objects
        level, a = int(rng.integers(0, 4)), int(rng.integers(0, 3))
        cells = outputs[level].shape[2]
        cls = int(rng.integers(0, k + 1))
        put(level, a, rng.integers(0, cells), rng.integers(0, cells), cls, float(rng.uniform(0.001, 0.3)))
    return outputs


def forward_rows(sizes, repeats: int) -> list[str]:
    rows = ["| input | K | forward ms (batch 1) | img/s |", "| --- | --- | --- | --- |"]
    for k in (17, 133):
        model = build_kapao_model("s", k).eval()
        for size in sizes:
            images = torch.rand(1, 3, size, size)
            with torch.no_grad():
                ms = best_ms(lambda model=model, images=images: model(images), repeats)
            rows.append(f"| {size} | {k} | {ms:.1f} | {1e3 / ms:.2f} |")
    return rows


def head_size_rows() -> list[str]:
    rows = [
        "| K | anchors at 1280 | outputs per anchor | float32 MB per image |",
        "| --- | --- | --- | --- |",
    ]
    anchors = sum(3 * (1280 // s) ** 2 for s in STRIDES)
    for k in (17, 133):
        values = anchors * outputs_per_anchor(k)
        rows.append(f"| {k} | {anchors:,} | {outputs_per_anchor(k)} | {values * 4 / 1e6:.0f} |")
    return rows


# The post-processing before it moved to numpy and read the head's planes (issue 19): the baseline of
# postprocess_rows, measured in the same run from the repository's own history.
BASELINE_COMMIT = "8e4b04d"


def _module_at(commit: str, path: str):
    """``path`` (a module of this repository) as it was at ``commit``, imported under a private name; None
    when git or the commit is not at hand (a copy without history)."""
    import importlib.util
    import subprocess
    import tempfile

    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    file = Path(tempfile.mkdtemp(prefix="fowkal_bench_")) / Path(path).name
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{Path(path).stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def head_layout(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs as the head returns them: ``[B, A, H, W, No]`` views of ``[B, A, No, H, W]`` memory."""
    return [out.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2) for out in outputs]


def postprocess_rows(repeats: int) -> list[str]:
    """Post-processing ms per image (module docstring, 3), now and before in the same run: "before" is
    ``trainer/kapao/postprocess.py`` at BASELINE_COMMIT (torch throughout) on the contiguous outputs its head
    returned; "now" reads the head's view (its planes contiguous). Both give the same poses (asserted)."""
    from trainer.kapao.postprocess import poses_from_candidates

    before = _module_at(BASELINE_COMMIT, "trainer/kapao/postprocess.py")
    torch.set_num_threads(1)
    settings, letterbox = KapaoEvalConfig(), (1.0, (0.0, 0.0))
    rows = [
        "| family | K | people | candidates (pose / keypoint) | decode + 2 NMS + fusion: before / now ms "
        "| candidates alone (a sweep's cache): before / now ms "
        "| NMS + fusion from candidates: before / now ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in (17, 133):
        for people in (3, 20):
            contiguous = crowd_outputs(k, 1280, people=people, rng=np.random.default_rng(k))
            outputs = head_layout(contiguous)
            found = candidates(outputs, settings.tau_cp, settings.tau_ck)[0]
            poses = poses_from_outputs(outputs, settings, [letterbox])[0]
            now = (
                best_ms(lambda o=outputs: poses_from_outputs(o, settings, [letterbox]), repeats),
                best_ms(lambda o=outputs: candidates(o, settings.tau_cp, settings.tau_ck), repeats),
                best_ms(lambda f=found: poses_from_candidates(f, settings, letterbox), repeats),
            )
            then = ("-",) * 3
            if before is not None:
                old_found = before.candidates(contiguous, settings.tau_cp, settings.tau_ck)[0]
                old_poses = before.poses_from_outputs(contiguous, settings, [letterbox])[0]
                for new, old in zip(poses, old_poses, strict=True):
                    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-3)
                timed = (
                    lambda o=contiguous: before.poses_from_outputs(o, settings, [letterbox]),
                    lambda o=contiguous: before.candidates(o, settings.tau_cp, settings.tau_ck),
                    lambda f=old_found: before.poses_from_candidates(f, settings, letterbox),
                )
                then = tuple(f"{best_ms(fn, repeats):.2f}" for fn in timed)
            counts = f"{len(found.pose_scores)} / {len(found.kp_scores)}"
            cells = " | ".join(f"{b} / {n:.2f}" for b, n in zip(then, now, strict=True))
            rows.append(f"| KAPAO | {k} | {people} | {counts} | {cells} |")
    # The top-down family decodes the same 20 people: 20 crops, their mirrors, 133 heatmaps of 64x48 each.
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.rand(20, 133, 64, 48, generator=generator)
    flipped = torch.rand(20, 133, 64, 48, generator=generator)
    center = np.full((20, 2), 300.0)
    scale = np.full((20, 2), 200.0)
    ms = best_ms(lambda: decode_heatmaps(heatmaps, flipped, center, scale), repeats)
    rows.append(f"| top-down: flip-back + DARK (20 crops) | 133 | 20 | 20 boxes | - / {ms:.2f} | | |")
    return rows


MINI_SET = ROOT.parent / "shared" / "data" / "coco_wholebody_mini"

# (row label, config, boxes): the paper's recipes and the smoke configs of both families.
LATENCY_SETUPS = (
    ("top-down paper: HRNet-W32 256x192, detections", "paper_hrnet_w32_fowkal.yaml", "detections"),
    ("top-down paper: HRNet-W32 256x192, GT boxes", "paper_hrnet_w32_fowkal.yaml", "gt"),
    ("top-down smoke: HRNet-W18-small 96x128, GT boxes", "smoke.yaml", "gt"),
    ("KAPAO paper: KAPAO-S 1280", "kapao_wholebody_s.yaml", None),
    ("KAPAO smoke: KAPAO-S 256", "smoke_kapao.yaml", None),
)


def latency_data() -> tuple[str, str, str | None, str]:
    """(annotation file, image root, person detections or None, what it is): the real mini set if present,
    else the smoke configs' synthetic val set."""
    ann = MINI_SET / "test_coco_wholebody.json"
    if ann.is_file():
        detections = str(MINI_SET / "test_coco_det_AP_H_56.json")
        return str(ann), str(MINI_SET), detections, "COCO-WholeBody mini set"
    from trainer.config import load_config
    from trainer.datasets.sources import resolve_datasets

    paths = resolve_datasets(load_config(ROOT / "configs" / "smoke.yaml").data)
    return paths["val_ann"], paths["val_images"], None, "synthetic val set (no mini set at ../shared)"


def latency_rows(quick: bool, device: str, repeats: int, images: int | None = None) -> list[str]:
    """Per setup: crops per image, forward / post-processing / total ms per image at batch 1, the post share,
    GFLOPs per image and parameters, on the same images."""
    from trainer.config import load_config
    from trainer.families import family_of
    from trainer.latency import PROBE_IMAGES, inference_cost

    ann, image_root, detections, what = latency_data()
    setups = [s for s in LATENCY_SETUPS if "smoke" in s[0]] if quick else list(LATENCY_SETUPS)
    count = images or (2 if quick else PROBE_IMAGES)
    rows = [
        f"Data: {what}, the {count} images with the smallest ids; {device}, {torch.get_num_threads()} torch "
        f"threads; random-init weights; batch 1 = one image (top-down: its crops in one batch); forward and "
        f"post-processing each the best of {repeats} per image.",
        "",
        "| setup | inputs per image | forward ms | post ms | total ms | post share | GFLOPs per image "
        "| params M |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    image_ids = None
    for label, config, boxes in setups:
        if boxes == "detections" and detections is None:
            continue
        cfg = load_config(ROOT / "configs" / config, ["model.pretrained_path=null"])
        family = family_of(cfg)
        det_file = detections if boxes == "detections" else None
        dataset = family.eval_dataset(cfg, ann, image_root, det_file=det_file)
        if image_ids is None:  # the same images for every setup: the first ones that hold people
            ids = dataset.sample_ids[0] if family.predicts_per_box else dataset.image_ids
            image_ids = sorted({int(i) for i in ids})[:count]
        torch.manual_seed(0)
        model = family.build_model(cfg, pretrained=False)
        probe = family.latency_probe(cfg, dataset, image_ids=image_ids)
        cost = inference_cost(model, probe, device, repeats=repeats)
        forward, post, total = (cost[f"latency/{part}_ms_b1"] for part in ("forward", "post", "total"))
        rows.append(
            f"| {label} | {cost['cost/inputs_per_image']:.1f} | {forward:.1f} | {post:.2f} | {total:.1f} | "
            f"{100 * post / total:.1f}% | {cost['cost/flops_per_image'] / 1e9:.1f} | "
            f"{cost['cost/params'] / 1e6:.2f} |"
        )
    return rows


def bf16_head_rows(size: int = 1280) -> list[str]:
    """Module docstring, 5: the keypoint error of the head's bf16 outputs per stride, in input pixels."""
    k = 17
    torch.manual_seed(0)
    model = build_kapao_model("s", k).eval()
    features = {}

    def keep_input(module, inputs, output) -> None:  # (a hook returning a value would replace the output)
        features[id(module)] = inputs[0]

    for conv in model.head.convs:
        conv.register_forward_hook(keep_input)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(1, 3, size, size))
    rows = [
        "| stride | largest anchor side (px) | keypoint error: median / p99 / max px |",
        "| --- | --- | --- |",
    ]
    for level, conv in enumerate(model.head.convs):
        x = features[id(conv)]
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = conv(x).float()
            full = torch.nn.functional.conv2d(x.float(), conv.weight, conv.bias)
        batch, _, height, width = full.shape
        shape = (batch, 3, outputs_per_anchor(k), height, width)
        low, full = low.view(shape)[:, :, -2 * k :], full.view(shape)[:, :, -2 * k :]
        scale = 1.5 / full.std()
        anchors = torch.tensor(P6_ANCHORS[level], dtype=torch.float32).view(1, 3, 1, 2, 1, 1)
        error = 4 * (torch.sigmoid(low * scale) - torch.sigmoid(full * scale))
        error = (error.view(batch, 3, k, 2, height, width) * anchors).abs().flatten()
        rows.append(
            f"| {STRIDES[level]} | {max(max(a) for a in P6_ANCHORS[level]):.0f} | {error.median():.2f} / "
            f"{error.quantile(0.99):.2f} / {error.max():.2f} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smoke size only for the forward")
    parser.add_argument(
        "--latency", action="store_true", help="only the per-image latency of both families (item 4)"
    )
    parser.add_argument("--device", default="cpu", help="--latency: where to run (cpu, cuda)")
    parser.add_argument("--images", type=int, default=None, help="--latency: images (default 4, --quick 2)")
    parser.add_argument("--bf16-head", action="store_true", help="only the head's bf16 error (item 5)")
    args = parser.parse_args(argv)
    if args.bf16_head:
        print("\n".join(bf16_head_rows()))
        return 0
    if args.latency:
        print(
            f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"device {args.device}"
        )
        print("\n".join(latency_rows(args.quick, args.device, 2 if args.quick else 3, args.images)))
        return 0
    repeats = 3 if args.quick else 10
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print("\n".join(forward_rows((256,) if args.quick else (256, 1280), 2 if args.quick else 5)))
    print()
    print("\n".join(head_size_rows()))
    print()
    print("\n".join(postprocess_rows(repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
