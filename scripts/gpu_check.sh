#!/usr/bin/env bash
# The GPU checks of polyglean, in one short run (under 4 minutes on one H200 with 16 cores: the step limits add up
# to 230 s).
#
# Run from the repository root, with the data copied to ./.gpu/data/ (cifar10/test and weights/cifar10-resnet/):
#     PYTHONPATH=$PWD bash scripts/gpu_check.sh                 # on the GPU machine
#     PYTHONPATH=$PWD bash scripts/gpu_check.sh --device cpu    # dry run anywhere (CUDA tests skip)
# Environment: OUT (folder for the logs and JSON; default ./.gpu/out), POLYGLEAN_DATA (default ./.gpu/data),
# PYTHON (default python), LIMIT (images per eval; default 300).
# What it does: the CUDA-marked tests (search and eval on CUDA, autocast, the layers' CUDA tests), then
# `polyglean eval` of cifar10-resnet20 on LIMIT CIFAR-10 test images at fp32 and bf16 (fp16: in the tests), printing
# each table; every step has its own time limit and a failing step does not stop the others. Exit status: the
# number of failed steps.
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ] && [ -n "${2:-}" ]; then DEVICE=$2; fi
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu/out}
export POLYGLEAN_DATA=${POLYGLEAN_DATA:-$ROOT/.gpu/data}
export PYTHONPATH=${PYTHONPATH:-$ROOT}
PY=${PYTHON:-python}
LIMIT=${LIMIT:-300}
mkdir -p "$OUT"
FAILED=0
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs to $OUT/NAME.log, prints the tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "--- $name: exit $rc after $(( $(date +%s) - t0 ))s (log: $OUT/$name.log)"
    tail -n 25 "$OUT/$name.log"
    if [ $rc -ne 0 ]; then FAILED=$((FAILED + 1)); fi
}

if [ ! -d "$POLYGLEAN_DATA/cifar10/test" ] || [ ! -d "$POLYGLEAN_DATA/weights/cifar10-resnet" ]; then
    echo "data missing: expected $POLYGLEAN_DATA/cifar10/test and $POLYGLEAN_DATA/weights/cifar10-resnet" >&2
    exit 100
fi

step env 30 "$PY" -c "
import torch, platform
print('torch', torch.__version__, 'python', platform.python_version(), 'cuda', torch.version.cuda)
print('cuda available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
"

# The CUDA tests (they skip without a GPU); -p no:cacheprovider: write nothing in the tree.
step pytest_cuda 110 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_devices.py tests/cli/test_eval_devices.py \
    tests/layers/test_blurpool.py tests/layers/test_softpool.py tests/layers/test_aps.py -k "cuda or Cuda"

EVAL_ARGS=(--model cifar10-resnet20 --data "$POLYGLEAN_DATA/cifar10/test" --limit "$LIMIT" --budgets 1,4,10
           --batch-size 100 --workers 4 --no-progress --device "$DEVICE")
PRECISIONS="fp32 bf16"
for P in $PRECISIONS; do
    step "eval_$P" 45 "$PY" -m polyglean eval "${EVAL_ARGS[@]}" --precision "$P" --json "$OUT/eval_$P.json"
done

"$PY" - "$OUT" $PRECISIONS <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("=== summary: top1 / nll per budget, images per second")
for p in sys.argv[2:]:
    f = out / f"eval_{p}.json"
    if not f.is_file():
        print(f"{p}: no result")
        continue
    d = json.loads(f.read_text())
    rows = ", ".join(f"B={r['budget']}: {r['top1']:.2f} / {r['nll']:.4f}" for r in d["results"])
    print(f"{p} on {d['config']['device']}: {rows}; {d['images_per_second']:.1f} img/s "
          f"({d['results'][0]['n_images']} images)")
EOF
echo "=== done in $(( $(date +%s) - START ))s, $FAILED failed step(s); logs in $OUT"
exit $FAILED
