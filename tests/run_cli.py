"""`python tests/run_cli.py ARGS` = `featcache ARGS` with the tiny backbone registered."""

import known  # noqa: F401  (choose's test backbones)
import tiny  # noqa: F401

from featcache.cli.commands import main

main()
