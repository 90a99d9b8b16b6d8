"""The command line: click commands made from the stages' requests.

Above every stage: imports them all, and nothing imports it (the API included). ``generate``
turns a request's fields into click options, ``commands`` registers one command per stage (and
``run`` for pipeline files) whose body only prints, ``browse`` the commands that look at
backbones, caches and runs, ``group`` how a user error becomes one line and exit status 2.
"""
