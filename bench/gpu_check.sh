#!/usr/bin/env bash
# The GPU path in one command: CUDA tests, step throughput (plain vs Ray Train), the loss's share of a step,
# FLOPs, DataLoader headroom, KAPAO-S at 1280 beside HRNet-w32 (bench/gpu_kapao.py), `fowkal train` of the
# smoke configs (top-down and KAPAO) with use_gpu and `fowkal eval --gpus 1`. Figures go to $OUT.
#
#   bench/gpu_check.sh --prepare   # here, with the package index reachable: writes .gpu_payload/ (git-ignored):
#                                  # the Python packages the GPU machine lacks, unpacked for CPython 3.12 and
#                                  # xz-packed, and a copy of the mini COCO-WholeBody set (../shared does not
#                                  # travel with the working tree)
#   OUT=DIR bench/gpu_check.sh     # on the GPU machine, from the repository root (carry .gpu_payload)
#   bench/gpu_check.sh --dry-run   # on a CPU, with .venv: every step shrunk, the whole path in a few minutes
#
# At most BUDGET_S seconds (default 470, inside 8 minutes) from start to the summary: every step gets what is
# left of it (minus what the steps after it are promised), so one hang cannot eat the others' time.
#
# Each step's reserve on the H200 (seconds; the promises below are sums of the later ones'). Estimated from
# fixed costs (a fresh Python with torch + CUDA init ~7 s; Ray up and a Train worker group ~15-20 s; MLflow's
# SQLite schema ~5 s; cuDNN autotuning of new shapes ~5-15 s per model), FLOPs at a fraction of the bf16
# peak (KAPAO-S at 1280: 233 GFLOP per training image, HRNet-w32 at 256x192: 46) and the CPU dry runs'
# per-step counts:
#   set-up (payload unpacked, versions)  15   not a step
#   pytest -m gpu                        70   ~35: 21 small tests, CUDA init, 2 cuDNN autotunings
#   bench/gpu_bench.py                  130   ~130 with --rounds 1: 4 fresh processes (2 plain ~12 s, 2 Ray
#                                             ~20 s, each after a 3 s pause), torch.compile of the loss
#                                             ~40 s, FLOPs ~3 s, loader 3 x ~5 s
#   bench/gpu_kapao.py                   70   ~55: 25 KAPAO-S steps at 1280 x 16 (~0.3 s each + autotuning),
#                                             batch-1 latencies, the planted crowd (~3 s on the CPU), HRNet
#   fowkal train (smoke)                 65   ~55: Ray + MLflow ~25 s, 2 epochs of 256 crops, 2 evaluations
#   fowkal eval --gpus 1                 45   ~35: Ray, the mini set with its detections
#   fowkal train (smoke_kapao)           75   ~60: Ray + MLflow ~25 s, 2 epochs of 256 mosaics at 256,
#                                             2 evaluations, 175 MB checkpoints logged
# 470 in all (~385 expected). gpu_bench's ABBA second round (GPU_BENCH_ROUNDS=2) would add ~75 s: it fits only
# without the KAPAO steps. In a dry run the promises scale with BUDGET_S (a 2-core CPU is slower than the H200).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PAYLOAD="$REPO/.gpu_payload"
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: bench/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

# What the GPU machine's image (Python 3.12, torch, timm, numpy, OpenCV, pandas, pyarrow, pytest, ...) lacks
# of the project's dependencies: the closure of ray[default,train,tune], optuna and mlflow at the versions of
# constraints.txt minus the image's packages. xtcocotools is built from source here (its wheel targets numpy 1).
PACKAGES=(
  ray optuna mlflow mlflow-skinny mlflow-tracing alembic SQLAlchemy Mako cryptography cffi pycparser docker
  Flask flask-cors blinker itsdangerous graphene graphql-core graphql-relay gunicorn huey skops prettytable
  wcwidth opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-prometheus opencensus opencensus-context py-spy pydantic pydantic_core
  annotated-types typing-inspection tensorboardX virtualenv distlib platformdirs python-discovery
  aiohttp-cors colorful colorlog jsonschema jsonschema-specifications referencing rpds-py smart_open
  cachetools databricks-sdk google-api-core google-auth googleapis-common-protos proto-plus pyasn1
  pyasn1_modules fastapi starlette uvicorn GitPython gitdb smmap importlib_metadata python-dotenv sqlparse
  protobuf  # the image's own may be older than opentelemetry-proto's and Ray's generated code want
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

prepare() {
  local py312="${PY312:-python3.12}" work
  "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "PY312=$py312 is not a Python 3.12 (the GPU machine's)" >&2; exit 2; }
  work="$(mktemp -d /tmp/gpu_payload.XXXXXX)"
  mkdir -p "$work/wheels" "$PAYLOAD"
  grep -qxF '/.gpu_payload/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu_payload/' >> .git/info/exclude; }
  echo "downloading ${#PACKAGES[@]} wheels (cp312, versions of constraints.txt) ..."
  "$py312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -c constraints.txt -d "$work/wheels" "${PACKAGES[@]}" || exit 1
  echo "building xtcocotools for CPython 3.12 against numpy 2 ..."
  "$py312" -m venv "$work/venv" && "$work/venv/bin/pip" install -q -c constraints.txt numpy cython setuptools wheel \
    && "$work/venv/bin/pip" download -q --no-deps --no-binary=:all: --no-build-isolation -c constraints.txt \
         -d "$work/sdist" xtcocotools \
    && "$work/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$work"/sdist/xtcocotools-* \
    || exit 1
  "$work/venv/bin/pip" install -q --no-deps --no-index --no-compile --target "$work/site" "$work"/wheels/*.whl || exit 1
  # Not needed here and a third of the size: Ray's Java jar, RLlib, the LLM library, JS source maps, MLflow's UI.
  rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/llm" "$work/site/mlflow/server/js"
  find "$work/site" -name '*.js.map' -delete
  echo "packing (xz) ..."
  tar -cJf "$PAYLOAD/site.tar.xz" -C "$work" site || exit 1
  ls "$work/wheels" > "$PAYLOAD/MANIFEST.txt"
  rm -rf "$PAYLOAD/coco_wholebody_mini"
  cp -r ../shared/data/coco_wholebody_mini "$PAYLOAD/coco_wholebody_mini" || exit 1
  rm -rf "$work"
  du -sh "$PAYLOAD" "$PAYLOAD"/*
  echo "ready: run it on the GPU machine with carry [\".gpu_payload\"]: OUT=\$OUT bash bench/gpu_check.sh"
}

if [[ $MODE == prepare ]]; then prepare; exit $?; fi

START=$(date +%s)
GPU_BUDGET_S=470  # what the promises below are sized for
BUDGET_S=${BUDGET_S:-$([[ $MODE == dry ]] && echo 1500 || echo $GPU_BUDGET_S)}  # a 2-core CPU is slower
STATUS=()
if [[ $MODE == dry ]]; then
  OUT="${OUT:-/tmp/gpu_check_dry}"
  PY="${PYTHON:-$REPO/.venv/bin/python}"
  MINI="${FOWKAL_MINI_DIR:-$REPO/../shared/data/coco_wholebody_mini}"
  export FOWKAL_TEST_DEVICE=cpu
else
  : "${OUT:?set OUT to the directory for the figures}"
  PY=python3
  MINI="$PAYLOAD/coco_wholebody_mini"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"
export FOWKAL_MINI_DIR="$MINI" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

# step NAME PROMISED_LATER_S CMD...: run CMD with what is left of the budget minus what later steps need
# (PROMISED_LATER_S in the H200's seconds, scaled by BUDGET_S / GPU_BUDGET_S).
step() {
  local name=$1 later=$(( $2 * BUDGET_S / GPU_BUDGET_S )) left rc began; shift 2
  left=$(( BUDGET_S - ($(date +%s) - START) - later ))
  if (( left < 10 )); then STATUS+=("$name: SKIPPED (budget spent)"); echo "== $name: skipped"; return; fi
  echo "== $name (up to ${left} s): $*"
  began=$(date +%s)
  timeout -k 10 "$left" "$@"; rc=$?
  STATUS+=("$name: $([[ $rc == 0 ]] && echo ok || echo "FAILED rc=$rc") in $(( $(date +%s) - began )) s")
}

echo "== gpu_check ($MODE) $(date -u +%FT%TZ) in $REPO, figures to $OUT"
if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.csv"
  [[ -f $PAYLOAD/site.tar.xz ]] || { echo "missing $PAYLOAD/site.tar.xz: run bench/gpu_check.sh --prepare here first and carry .gpu_payload" >&2; exit 2; }
  # tar needs xz(1); Python's tarfile reads xz without it.
  tar -xJf "$PAYLOAD/site.tar.xz" -C /tmp 2>/dev/null || python3 -c "import tarfile, sys
tarfile.open(sys.argv[1]).extractall('/tmp', filter='tar')" "$PAYLOAD/site.tar.xz" || exit 1
  export PYTHONPATH="$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
# Not fatal: the CUDA tests and most of the bench need only torch, timm and OpenCV.
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt" || STATUS+=("imports: FAILED (see versions.txt)")
import importlib, importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for module, dist in (("ray", "ray"), ("mlflow", "mlflow"), ("optuna", "optuna"), ("xtcocotools", "xtcocotools"),
                     ("timm", "timm"), ("cv2", "opencv-python-headless"), ("numpy", "numpy"),
                     ("safetensors", "safetensors"), ("yaml", "PyYAML"), ("sqlalchemy", "SQLAlchemy")):
    importlib.import_module(module)  # importable, not just installed
    print(dist, importlib.metadata.version(dist))
EOF

if [[ $MODE == dry ]]; then
  TRAIN_SET=(--set use_gpu=false --set epochs=1 --set eval_interval=1 --set batch_size=4
             --set data.synthetic_train_images=8 --set data.synthetic_val_images=2 --set data.val_batch_size=4)
  KAPAO_SET=("${TRAIN_SET[@]}" --set data.input_size=128)
  BENCH=(--dry-run) KAPAO_BENCH=(--dry-run) GPUS=0
else
  TRAIN_SET=(--set use_gpu=true --set epochs=2 --set eval_interval=1)
  KAPAO_SET=("${TRAIN_SET[@]}")
  BENCH=(--rounds "${GPU_BENCH_ROUNDS:-1}") KAPAO_BENCH=() GPUS=1
fi

step "pytest -m gpu" 385 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/pytest_gpu.xml"
step "bench/gpu_bench.py" 255 "$PY" bench/gpu_bench.py --out "$OUT" "${BENCH[@]}"
step "bench/gpu_kapao.py" 185 "$PY" bench/gpu_kapao.py --out "$OUT" "${KAPAO_BENCH[@]}"
step "fowkal train (smoke)" 120 "$PY" -m orchestrator.cli train --config configs/smoke.yaml "${TRAIN_SET[@]}" \
  --set output_dir="$WORK/smoke" --set data.synthetic_dir="$WORK/synthetic" \
  --tracking-uri "sqlite:///$WORK/mlflow.db" --storage-path "$WORK/ray_results"
CHECKPOINT="$(find "$WORK/ray_results" "$WORK/smoke" -name checkpoint.pt 2>/dev/null | sort | tail -1)"  # the last epoch's
if [[ -n $CHECKPOINT ]]; then
  step "fowkal eval --gpus $GPUS" 75 "$PY" -m orchestrator.cli eval --checkpoint "$CHECKPOINT" \
    --ann "$MINI/test_coco_wholebody.json" --images "$MINI" --det-file "$MINI/test_coco_det_AP_H_56.json" \
    --gpus "$GPUS" --out "$OUT/wholebody_results.json" --tracking-uri "sqlite:///$WORK/mlflow.db" --no-progress
else
  STATUS+=("fowkal eval: SKIPPED (no checkpoint from fowkal train under $WORK)")
fi
# The same synthetic images as the smoke run (same counts and seeds: generated once), its own Ray storage.
step "fowkal train (smoke_kapao)" 0 "$PY" -m orchestrator.cli train --config configs/smoke_kapao.yaml \
  "${KAPAO_SET[@]}" --set output_dir="$WORK/smoke_kapao" --set data.synthetic_dir="$WORK/synthetic" \
  --tracking-uri "sqlite:///$WORK/mlflow.db" --storage-path "$WORK/ray_results_kapao"

{
  echo "# gpu_check ($MODE), $(date -u +%FT%TZ), $(( $(date +%s) - START )) s"
  echo
  cat "$OUT/versions.txt"
  echo
  printf -- '- %s\n' "${STATUS[@]}"
  echo
  for name in gpu_bench gpu_kapao; do
    if [[ -f $OUT/$name.md ]]; then
      echo "## $name"; echo; cat "$OUT/$name.md"; echo
    elif [[ -f $OUT/$name.json ]]; then  # stopped before its tables: what it measured so far
      echo "## $name (no tables: stopped early; its JSON)"; echo; echo '```'; cat "$OUT/$name.json"; echo '```'; echo
    fi
  done
} > "$OUT/summary.md"
rm -rf "$WORK"
cat "$OUT/summary.md"
for s in "${STATUS[@]}"; do [[ $s == *": ok in"* ]] || exit 1; done
