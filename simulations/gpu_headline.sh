#!/usr/bin/env bash
# The headline claims runs on one GPU machine: Fashion-MNIST (every row, 3 seeds, as many as fit) and CIFAR-10
# ResNet-20 (SGP, the 466x preset's row, its dense ablation and two earlier Sparse-Push rows, seed 0), then VGG-11
# (SGP and the 466x preset's row) at EPOCHS_CIFAR epochs (default
# 200, the paper's schedule; the CPU runs of results/cifar10_cpu use 20), all nodes' local SGD batched on the GPU
# (batched.py), many runs at once. Each finished run is journaled and each run checkpoints, so a second call
# continues where this one stopped.
#
#   OUT_DIR=results/gpu MAX_HOURS=0.12 JOBS_FMNIST=12 JOBS_CIFAR=3 EPOCHS_CIFAR=200 simulations/gpu_headline.sh
#
# Works where flower-sparsepush is installed (`make setup`) and on a bare machine that has torch, numpy, scipy,
# matplotlib, pillow and tqdm but not flwr: then the package is put together under /tmp/sparsepush-pkg. Data are
# found as usual (SPARSEPUSH_DATA, ../shared/data, Debian's Fashion-MNIST); partitions made by flwr-datasets are read
# from the partition cache (SPARSEPUSH_CACHE/partitions, data.partition) when flwr-datasets is missing.
# QUICK=1 runs the tiny schedules (a check that takes minutes on a CPU, DEVICE=cpu); ROWS=a,b runs only those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-results/gpu}
MAX_HOURS=${MAX_HOURS:-0.12}
JOBS_FMNIST=${JOBS_FMNIST:-12}
JOBS_CIFAR=${JOBS_CIFAR:-3}
EPOCHS_CIFAR=${EPOCHS_CIFAR:-200}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
QUICK_FLAG=""
EPOCHS_FLAG="--epochs $EPOCHS_CIFAR"
[ "${QUICK:-0}" = 1 ] && QUICK_FLAG="--quick" && EPOCHS_FLAG=""
ROWS_FLAG=""
[ -n "${ROWS:-}" ] && ROWS_FLAG="--rows $ROWS"
if [ "${FORCE_PKG:-0}" = 1 ] || ! $PY -c "import flower_sparsepush.simulations.claims" 2>/dev/null; then
  pkg=/tmp/sparsepush-pkg
  rm -rf "$pkg" && mkdir -p "$pkg"
  cp -r flower_sparsepush "$pkg/"
  cp -r simulations "$pkg/flower_sparsepush/simulations"
  cp -r strategies "$pkg/flower_sparsepush/strategies"
  export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
  # the checkout's flower_sparsepush/ (no simulations/ inside) must not shadow the assembled package, also in
  # the worker processes: run from the package's folder
  OUT_DIR=$(realpath -m "$OUT_DIR")
  cd "$pkg"
fi
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
mkdir -p "$OUT_DIR/fashion_mnist" "$OUT_DIR/cifar10"
$PY -m flower_sparsepush.simulations.claims $QUICK_FLAG $ROWS_FLAG --datasets fashion_mnist --jobs "$JOBS_FMNIST" \
  --device "$DEVICE" --max-hours "$MAX_HOURS" --out "$OUT_DIR/fashion_mnist" > "$OUT_DIR/fashion_mnist/log.txt" 2>&1 &
fmnist=$!
# decode CIFAR-10 once (JPEG -> the uint8 cache) before its workers start, so they do not all decode it
$PY -c "from flower_sparsepush.learn.data import load_dataset; load_dataset('cifar10')" >/dev/null || echo "CIFAR-10 decode failed"
$PY -m flower_sparsepush.simulations.claims $QUICK_FLAG $ROWS_FLAG --datasets cifar10 --seeds 0 --jobs "$JOBS_CIFAR" \
  $EPOCHS_FLAG \
  --device "$DEVICE" --max-hours "$MAX_HOURS" --out "$OUT_DIR/cifar10" > "$OUT_DIR/cifar10/log.txt" 2>&1 || true
# then the paper's other model, VGG-11, on the same CIFAR-10 rows (SGP and the 466x preset's row first); VGG=0 skips it
if [ "${VGG:-1}" = 1 ]; then
  mkdir -p "$OUT_DIR/cifar10_vgg11"
  $PY -m flower_sparsepush.simulations.claims $QUICK_FLAG --rows "${VGG_ROWS:-sgp,sp-h4-klr-la5}" --model vgg11 \
    --datasets cifar10 --seeds 0 --jobs "$JOBS_CIFAR" $EPOCHS_FLAG --device "$DEVICE" --max-hours "$MAX_HOURS" \
    --out "$OUT_DIR/cifar10_vgg11" > "$OUT_DIR/cifar10_vgg11/log.txt" 2>&1 || true
fi
wait "$fmnist" || echo "the Fashion-MNIST runs failed: see $OUT_DIR/fashion_mnist/log.txt"
grep -E "run .* failed|Error|error" "$OUT_DIR"/*/log.txt | head -20 || true
tail -n 25 "$OUT_DIR"/*/log.txt
