"""``PipelineRequest``: what ``featcache run`` (and ``featcache.run_pipeline``) asks for.

Inside the pipeline package (request -> files): a pipeline file, the ``--set`` overrides, and
whether to run it or only show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.requests import option


@dataclass(frozen=True)
class PipelineRequest:
    """``featcache run``: a study's pipeline file, stage by stage."""

    pipeline: Path = option(help="The pipeline file (TOML).", argument=True, metavar="PIPELINE")
    set: tuple[str, ...] = option((), metavar="KEY=VALUE",
                                  help="Override an option in every stage that takes it, e.g. --set epochs=1 --set "
                                       "weights=random; repeat for several.")
    dry_run: bool = option(False, help="Check the file and list its stages with their options, running nothing.")
