#!/usr/bin/env bash
# Every GPU figure benchmarks/RESULTS.md asks for, in one command, for a session lent a GPU:
#   PYTHONPATH=. bash benchmarks/gpu.sh            (logs go to $OUT, or benchmarks/out/; about 8 minutes on an H100)
#   bash benchmarks/gpu.sh --small                 the same steps on the CPU with a few images: a smoke test
# Each step has its own time limit so one slow step cannot eat the others. Record what it
# prints in RESULTS.md with the device named. Needs torch, torchvision, h5py, scikit-learn,
# click, pandas, matplotlib, jinja2 and grad-cam (carry its wheel where it is missing); the sources step also
# datasets and pyarrow (featcache[hub]: carry their wheels too).
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

DEV=cuda N=8192 REP=8 BATCH=128 N50=50000 REP50=35 NF=8192 NFT=4096 REPFT=4 TRAIN=1000 TEST=300 SIZE=224 ROWS=50000
HEADS_PRECISION=bf16  # what --precision auto gives the torch heads on a GPU
CV_COMBOS=pairs PROBE_TRAIN=50000 INET_ROWS=1281167 INET_TEST=50000 INET_CLASSES=1000 SCALE_IMAGES=3000 CHOOSE_IMAGES=2000 CHOOSE_MODELS=resnet18,mobilenet_v2,mobilenet_v3_small,shufflenet_v2_x0_5,squeezenet1_1,mnasnet0_5
if [ "${1:-}" = "--small" ]; then  # every step, tiny, on the CPU: checks the script, not the speed
    DEV=cpu N=64 REP=1 BATCH=32 N50=64 REP50=1 NF=64 NFT=64 REPFT=1 TRAIN=60 TEST=20 SIZE=64 ROWS=2000 HEADS_PRECISION=fp32 CV_COMBOS=singles
    CHOOSE_IMAGES=200 CHOOSE_MODELS=resnet18,mobilenet_v2 PROBE_TRAIN=1000 INET_ROWS=5000 INET_TEST=500 INET_CLASSES=20
    SCALE_IMAGES=300
fi
ALL="--image-size $SIZE"  # the study backbones and the folder at 224 px on the GPU

step env 60 bash -c '(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true); lscpu | grep "Model name"; nproc;
  python -c "import torch, torchvision, timm; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"timm\", timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"'
# The whole flow on the device: extract, fuse-train (torch and sklearn heads), both fine-tunes, report.
step quickstart 300 python -m featcache run pipelines/quickstart.toml --set device=$DEV
step extract 420 python benchmarks/extract_throughput.py --backbone all $ALL --device $DEV --repeat $REP --images $N --batch-size $BATCH --together
# Issue 13: three found backbones (torchvision's graph, timm's feature_info), each at its own 224 px input.
step extract_any 240 python benchmarks/extract_throughput.py --backbone efficientnet_b0,convnext_tiny,timm:vit_small_patch16_224 --device $DEV --repeat $REP --images $((N / 2)) --batch-size $BATCH
# A run long enough that the loop, not the fixed costs, is what (a) measures.
step extract_50k 240 python benchmarks/extract_throughput.py --backbone resnet50 $ALL --device $DEV --repeat $REP50 --images $N50 --batch-size $((BATCH * 2))
# Issue 14: a JPEG folder at 224 px, JPEGs decoded on the GPU in batches, against ImageFolder + PIL (target >= 3x).
step folder_jpeg 360 python benchmarks/folder_throughput.py --device $DEV --format jpg --source-size 320 $ALL --backbone resnet50 --images $NF --batch-size $BATCH
step fidelity 120 python benchmarks/device_fidelity.py --device $DEV --precision auto
step finetune 300 python benchmarks/finetune_throughput.py --device $DEV --repeat $REPFT --images $NFT --num-workers 8 --image-size $SIZE
step frozen_fusion 300 python benchmarks/frozen_fusion.py --device $DEV --skip-pairs --train $TRAIN --test $TEST
# Issue 15, point 2: the 24 tap pairs' logreg, every C of every pair at once, and svm, on the device (sweep only).
step sweep_pairs 300 python benchmarks/sweep.py --device $DEV --sweep-only --heads logreg,svm --train $TRAIN --test $TEST
# and the linear heads' solvers alone on the same rows, two ways each: logreg every C and pair at once against one C
# at a time (1.2-1.4x on 2 CPU cores); the svm every C at once (the sweep's choice on a GPU, unmeasured there until
# this step runs) against one C at a time, warm-started (the CPU's: at once took 1.4x its time on 2 cores)
step sweep_solvers 300 python benchmarks/sweep.py --device $DEV --solvers --train $TRAIN --test $TEST
# The torch heads' candidates (weight decays) one by one against stacked as one network (fuse.torch_stack: the
# GPU's way, unmeasured there until this step runs; on 2 CPU cores the linear head is stacked in one thread
# and the mlp trains in threads, see RESULTS.md).
step head_fit 240 python benchmarks/head_fit.py --device $DEV --precision $HEADS_PRECISION
# Issue 15, point 10: logreg, svm and knn probes on 50,000 x 1,792 fused late taps (target <= 5 s each on a GPU).
step sweep_large 420 python benchmarks/sweep.py --large --rows $ROWS --device $DEV
# Issue 31: LogME, H-score and the regularised H-score (one Gram) against the logreg probe: 45,000 x 1,792 (target
# >= 10x), and every tap and pair of resnet50 x mobilenet_v2 on 1,000 digits (target >= 20x).
step scores 420 python benchmarks/scores.py --device $DEV --rows $ROWS
# Issue 31, point 7: featcache rank over 20 small timm models (wall, peak memory, disk).
step rank 240 python benchmarks/rank_models.py --device $DEV
# Issue 30: the manifest, Hugging Face (Arrow, Parquet) and WebDataset sources against a folder of the same JPEGs,
# decoded on the GPU (target: each >= 0.9x the folder's images/s).
step sources 360 python benchmarks/source_throughput.py --device $DEV --images $NF --source-size 320 --image-size $SIZE --backbone resnet50 --batch-size $BATCH --repeats 3
# issue 32: --cv 5 against five seeds (the folds served as seeds are) and GridSearchCV; float16 storage with a
# per-tap scale against float32 (cosine, dead taps), on the GPU's precision
step cv 300 python benchmarks/cv.py --device $DEV --combos $CV_COMBOS
# Issue 40: featcache choose against the exhaustive sweep (pairs, logreg + knn, --cv 5) over six small models on
# 2,000 generated photos (target: choose <= 1/5 of the sweep; its recommendation in the sweep's tied set).
step choose 420 python benchmarks/choose.py --device $DEV --images $CHOOSE_IMAGES --models $CHOOSE_MODELS
# Issue 44: each head as a whole `featcache sweep` command on a CIFAR-shaped folder (50,000 / 10,000 PNGs of 32 px,
# resnet18 + mobilenet_v2 late taps fused, 1,792 columns; target <= 5 s per head on a GPU).
step probes 540 python benchmarks/probes.py --device $DEV --train $PROBE_TRAIN --test $((PROBE_TRAIN / 5)) --work /tmp/featcache-probes-gpu
# Issue 43, point 7: the pair search by promise against every pair, four backbone pairs (pretrained weights where
# the machine has them cached; random otherwise: say which in RESULTS.md).
step pair_search 420 bash -c "python benchmarks/pair_search.py --device $DEV --images $CHOOSE_IMAGES --weights imagenet ||
  python benchmarks/pair_search.py --device $DEV --images $CHOOSE_IMAGES --weights random"
# Issue 43: the hf:, openclip: and --module paths on the device against the CPU (small offline models; fp32 both).
step model_sources 240 python benchmarks/model_sources.py --device $DEV
step storage 240 python benchmarks/storage_fidelity.py --device $DEV --train $((TRAIN < 128 ? TRAIN : 128))
# Issue 42: the ImageNet-shaped cache (1,281,167 x resnet50's four taps, 1,000 planted classes; 9.8 GB on disk), every
# tap's LogME and H-score with its rows streamed under --memory 4G (the host's cores: the scores' moments are read on
# the CPU), peak RSS and time; then sweep and rank in one process against torchrun over the GPUs (tables equal).
step imagenet_shaped 600 python benchmarks/imagenet_shaped.py --series $INET_ROWS --test-rows $INET_TEST --classes $INET_CLASSES --in-memory-up-to 0 --memory 4G --work /tmp/featcache-inet
step torchrun 600 python benchmarks/torchrun_scale.py --device $DEV --images $SCALE_IMAGES --processes "$( (nvidia-smi -L 2>/dev/null || echo x) | wc -l | awk '{print ($1 < 2 ? 2 : $1)}')"
