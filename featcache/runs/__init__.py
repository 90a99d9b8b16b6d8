"""Runs: the run record schema, run folders, the comparison table, and predictions with a run.

Stage 4 of 8, below the stages that write runs (extraction -> **runs** -> fuse, finetuning,
sweeping -> reporting): it knows no model. ``records`` writes and reads a run folder (the model's
files through a callable the writing stage hands it), ``comparison`` labels and tables runs,
``predict`` dispatches to the predictor each run kind registers.
"""

import sys as _sys
import types as _types


class _RunsModule(_types.ModuleType):
    """``featcache.runs(...)`` is the command ``featcache runs`` from Python; its modules stay attributes."""

    def __call__(self, runs_dir="runs", pipeline: str | None = None):
        """The comparison table of every run in ``runs_dir`` (and one folder down), as a DataFrame."""
        from pathlib import Path

        from featcache.runs.comparison import runs_table
        from featcache.runs.records import pipeline_runs

        return runs_table(pipeline_runs(Path(runs_dir), pipeline))


_sys.modules[__name__].__class__ = _RunsModule
