"""`python tests/run_cli.py ARGS` = `featcache ARGS` with the tiny backbone registered."""

import known  # noqa: F401  (choose's test backbones)
import tiny  # noqa: F401

import os

from featcache.cli.commands import main
from featcache.solvers import lanes

if "TEST_BATCH_BYTES" in os.environ:  # small logreg batches: a sweep's work in several units (tests/test_torchrun.py)
    lanes.BATCH_BYTES = int(os.environ["TEST_BATCH_BYTES"])
main()
