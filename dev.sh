#!/usr/bin/env bash
# Set up and run featcache on a fresh machine with only Python 3.10+:
#   bash dev.sh demo    offline demo: extract two backbones on the bundled digits, show the cache
#   bash dev.sh test    the test suite (what CI runs)
#   bash dev.sh bench   the extraction throughput benchmark (slow on a CPU)
# The first call creates .venv and installs featcache with its dependencies (PyTorch is
# several GB); later calls reuse it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/featcache" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$VENV/.installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-}" in
    demo)
        # Random weights and 64 px keep the demo offline and about a minute long on 2 CPU cores;
        # float32 because a randomly initialised MobileNetV2's late taps are below float16's range.
        featcache extract --dataset digits --backbone resnet18 --backbone mobilenet_v2 \
            --weights random --image-size 64 --dtype float32 --cache-dir cache
        featcache info cache/digits
        ;;
    test)
        shift
        python -m pytest "$@"
        ;;
    bench)
        shift
        python benchmarks/extract_throughput.py "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test|bench" >&2
        exit 2
        ;;
esac
