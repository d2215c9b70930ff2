#!/usr/bin/env bash
# Trains the full-width models on a CUDA machine in one go and leaves each run
# (checkpoints, metrics.json with the val/ accuracy without TTA, with flip, with
# ten-crop and with rotate, curves, confusion matrix and the log) under $OUT, and the best
# run's model recalibrated (emotion-train recalibrate) beside it. Needs only
# python3 with torch, numpy, opencv, safetensors, matplotlib and tqdm: it runs
# from the source tree, uninstalled.
#
#   emotion-train pack --data ../shared/data/fer2013 --out fer2013.npz   # 49 MB, on any machine
#   OUT=out training/gpu.sh fer2013.npz                                  # on the GPU machine
#
# Settings, from the environment:
#   BEST_EPOCHS (100)  epochs of the best recipe at full width
#   SEED_EPOCHS (140)  epochs of the seed recipe; 0 skips the baseline
#   WIDTH (1)          channel multiplier
#   DEVICE (cuda)      cuda, or cpu to try the script on a small LIMIT
#   LIMIT              train on a stratified subset of this many images
set -euo pipefail

data=${1:?usage: OUT=DIR training/gpu.sh DATA (a folder, fer2013.csv or a packed .npz)}
out=${OUT:?set OUT to the folder for the runs}
best_epochs=${BEST_EPOCHS:-100}
seed_epochs=${SEED_EPOCHS:-140}
width=${WIDTH:-1}
device=${DEVICE:-cuda}
limit=(${LIMIT:+--limit "$LIMIT"})
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
mkdir -p "$out"
{
    date -u
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    nvidia-smi -L 2>/dev/null || true
} | tee "$out/device.txt"

train() {  # recipe epochs
    local run="$out/$1-w$width"
    local start=$SECONDS
    "$py" -m training.cli fit --data "$data" --out "$run" --recipe "$1" --width "$width" \
        --epochs "$2" --device "$device" "${limit[@]}" 2>&1 | tee "$run.log"
    echo "$1: $((SECONDS - start)) s" | tee -a "$out/device.txt"
}

train best "$best_epochs"
# The kept model with BatchNorm statistics of clean train/ images (seconds on a GPU).
"$py" -m training.cli recalibrate --run "$out/best-w$width" --data "$data" --out "$out/best-w$width-bn" \
    --device "$device" 2>&1 | tee "$out/best-w$width-bn.log"
if [ "$seed_epochs" -gt 0 ]; then
    train seed "$seed_epochs"
fi
