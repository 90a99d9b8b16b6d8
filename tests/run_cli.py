"""`python tests/run_cli.py ARGS` = `featcache ARGS` with the tiny backbone registered."""

import tiny  # noqa: F401

from featcache.cli.commands import main

main()
