#!/usr/bin/env bash
# Every GPU figure benchmarks/RESULTS.md asks for, in one command, for a session lent a GPU:
#   PYTHONPATH=. bash benchmarks/gpu.sh            (logs go to $OUT, or benchmarks/out/)
# Each step has its own time limit so one slow step cannot eat the others. Record what it
# prints in RESULTS.md with the device named. Needs torch, torchvision, h5py, scikit-learn,
# click, pandas, matplotlib, jinja2 and grad-cam (carry its wheel where it is missing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=${OUT:-benchmarks/out}
mkdir -p "$LOGS"
step() {  # step NAME SECONDS COMMAND...: run, log to $LOGS/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep "Model name"; nproc;
  python -c "import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, torch.cuda.get_device_name())"'
# The whole flow on CUDA: extract, fuse-train (torch and sklearn heads), both fine-tunes, report.
step quickstart_cuda 300 python -m featcache run pipelines/quickstart.toml --set device=cuda
step extract 420 python benchmarks/extract_throughput.py --backbone all --device cuda --repeat 8 --images 8192 --batch-size 128 --together
# A run long enough that the loop, not the fixed costs, is what (a) measures.
step extract_50k 240 python benchmarks/extract_throughput.py --backbone resnet50 --device cuda --repeat 35 --images 50000 --batch-size 256
# Issue 14: a JPEG folder at 224 px, JPEGs decoded on the GPU in batches, against ImageFolder + PIL (target >= 3x).
step folder_jpeg 360 python benchmarks/folder_throughput.py --device cuda --format jpg --source-size 320 --image-size 224 --backbone resnet50 --images 8192 --batch-size 128
step fidelity 120 python benchmarks/device_fidelity.py --device cuda --precision auto
step finetune 300 python benchmarks/finetune_throughput.py --device cuda --repeat 4 --images 4096 --num-workers 8
step frozen_fusion 300 python benchmarks/frozen_fusion.py --device cuda --skip-pairs
