"""`python -m featcache` runs the command line, as `torchrun -m featcache` will."""

from featcache.cli.commands import main

main()
