"""``ReportRequest``: what ``featcache report`` (its API function and a pipeline's ``[report]``) asks for.

Inside reporting (request -> page): the fields, and the one place they become a
:class:`~featcache.reporting.page.ReportConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.requests import at_least, carried, device_option, option, quiet_option, runs_dir_option
from featcache.runs.request import TRUST_PICKLES


@dataclass(frozen=True)
class ReportRequest:
    """``featcache report``: one self-contained HTML page comparing runs."""

    runs: tuple[str, ...] = option((), argument=True, metavar="[RUN]...",
                                   help="Runs to report (folders or names in --runs-dir) [default: every run there].")
    runs_dir: Path = runs_dir_option("Where runs live; without RUN arguments every run in it is reported.",
                                     writes=False)
    pipeline: str | None = option(None, help="Only the runs of this pipeline (the folder --runs-dir/NAME).")
    out: Path = option(Path("reports/report.html"), short="-o", writes=True,
                       help="The HTML file; the table is also written beside it as .csv.")
    title: str = option("featcache report", help="The page's title.")
    grid_images: int = option(12, **at_least(0),
                              help="Test images in each prediction grid.")
    gradcam_images: int = option(4, **at_least(0),
                                 help="Images per Grad-CAM grid; 0: none.")
    device: str = device_option("Where Grad-CAM runs.", default="cpu")
    trust_pickles: bool = option(False, shared=False, help=TRUST_PICKLES)
    force: bool = option(False, shared=False, help="Replace the -o file (and the CSV beside it) even where "
                                                    "featcache did not write them.")
    quiet: bool = quiet_option()

    def config(self):
        from featcache.reporting.page import ReportConfig
        from featcache.runs.records import pipeline_runs

        return carried(ReportConfig, self, runs_dir=pipeline_runs(self.runs_dir, self.pipeline))
