#!/usr/bin/env bash
# Set up and run featcache on a fresh machine with only Python 3.11+:
#   bash dev.sh demo    offline demo: pipelines/quickstart.toml, every stage on the bundled digits, then a report
#   bash dev.sh test    the test suite (what CI runs)
#   bash dev.sh bench   the extraction throughput benchmark (slow on a CPU)
# The first call creates .venv and installs featcache with its dependencies (PyTorch is
# several GB); later calls reuse it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/featcache" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    echo "dev.sh: installing featcache into $VENV with PyTorch (several GB: a few quiet minutes the first time)" >&2
    # .venv takes about 6 GB (torch with its CUDA libraries); say so up front rather than fail half-way
    "$PYTHON" -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30
if free < 8: print(f"dev.sh: warning: {free:.1f} GB free here; the install needs about 8 GB", file=sys.stderr)'
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # no wheel cache: it would hold another copy of those GB
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir -e '.[dev]'
    touch "$VENV/.installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-}" in
    demo)
        # Every stage offline (random weights, bundled digits), ending with reports/quickstart.html.
        featcache run pipelines/quickstart.toml
        ;;
    test)
        shift
        # one worker per core (pytest-xdist; each with its share of threads: tests/conftest.py): 363 s against
        # 551 s in one process on 2 cores. FEATCACHE_TEST_WORKERS=0 runs them in this process.
        python -m pytest -n "${FEATCACHE_TEST_WORKERS:-auto}" "$@"
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
