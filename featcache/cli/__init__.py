"""The command line: click commands, flags -> configs, and pipeline files.

Above every stage: imports them all, and nothing imports it. ``commands`` holds the click
commands, ``flags`` turns their parameters into the stages' configs, ``pipeline`` runs
``pipelines/*.toml`` with the same commands.
"""
