"""`python tests/fork_server.py`: pay torch's import once, then fork one featcache CLI run per request.

For the fault tests, which SIGKILL many runs: a fresh interpreter per run would spend most
of the test importing torch. Protocol on stdin/stdout, one line each:
``run ARGS-AS-JSON`` -> ``pid N`` (the child runs ``featcache ARGS``); ``wait N`` -> ``exit S``
(S is the exit status, or -9 when the child was killed with SIGKILL). Nothing touches
torch's thread pools before forking, so each child starts clean.
"""

import json
import os
import sys

import h5py  # noqa: F401  the rest of what a run imports lazily
import sklearn.datasets  # noqa: F401
import sklearn.model_selection  # noqa: F401
import tiny  # noqa: F401  registers the tiny backbone
import torchvision.models.feature_extraction  # noqa: F401
import torchvision.transforms.v2  # noqa: F401
import tqdm  # noqa: F401

import featcache.cli.commands  # noqa: F401  imports click
import featcache.extraction.run  # noqa: F401  imports torch
import featcache.finetuning.run  # noqa: F401

for line in sys.stdin:
    command, _, rest = line.strip().partition(" ")
    if command == "run":
        args = json.loads(rest)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                featcache.cli.commands.cli.main(args, prog_name="featcache")
            except SystemExit as exc:
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            except BaseException:
                os._exit(1)
            os._exit(0)
        print(f"pid {pid}", flush=True)
    elif command == "wait":
        _, status = os.waitpid(int(rest), 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
