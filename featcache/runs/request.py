"""``PredictRequest``: what ``featcache predict`` (and ``featcache.predict``) asks for.

Inside runs (request -> predict): a run and the image files to classify.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.requests import at_least, device_option, option, quiet_option, runs_dir_option

TRUST_PICKLES = ("Also load run folders written by featcache 0.1, whose pickled heads can run code. Only for folders "
                 "you trust.")


@dataclass(frozen=True)
class PredictRequest:
    """``featcache predict``: classify images with a run's backbones, preprocessing and head."""

    run: Path = option(help="A run folder, or its name inside --runs-dir (a path or a name, as a string or a Path).",
                       metavar="RUN")
    images: tuple[str, ...] = option(help="Image files, folders (every image inside, recursively), quoted glob "
                                          "patterns such as 'photos/**/*.jpg', a manifest (.csv / .parquet: the "
                                          "images it names), a WebDataset shard (.tar) or a Hugging Face "
                                          "save_to_disk folder.", argument=True, metavar="IMAGE...")
    runs_dir: Path = runs_dir_option("Where runs live.", writes=False)
    device: str = device_option("Where the backbones run.")
    top_k: int = option(1, **at_least(1),
                        help="Give the K most probable classes of each image, each with its probability.")
    output: Path | None = option(None, writes=True, metavar="FILE",
                                 help="Also write the predictions to FILE: .csv or .parquet (one row per image and "
                                      "rank: file, rank, label, probability).")
    force: bool = option(False, help="Replace --output even if featcache did not write that file.")
    quiet: bool = quiet_option()
    trust_pickles: bool = option(False, shared=False, help=TRUST_PICKLES)
