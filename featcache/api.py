"""The Python API: each stage as a function, for the notebooks featcache's users work in.

A front-end beside the command line, not below it: keyword arguments are the command's
flags with underscores (``--image-size`` -> ``image_size``; a repeatable flag takes a
string or a list), parsed by the command's own click options and turned into the same
config by the same stage table. So a call and the command with the same flags run the
same request, hit the same cache and raise the same one-line :class:`FeatcacheError`.

    import featcache
    featcache.extract(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)
    X, y = featcache.load_features(backbone=["resnet18", "mobilenet_v2"], weights="random",
                                   image_size=64, taps="early,late", split="train")
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from featcache.cli.commands import cli
from featcache.cli.group import trusting
from featcache.cli.stages import STAGES
from featcache.comparison import runs_table
from featcache.errors import FeatcacheError, unknown
from featcache.extraction.run import extract as run_extract
from featcache.fuse.caches import load_features as load
from featcache.fuse.caches import locate_caches
from featcache.fuse.fusion import parse_taps
from featcache.records import pipeline_runs


def _params(command: str, kwargs: dict) -> dict:
    """Keyword arguments -> the command's parsed parameters, exactly as its flags would give them."""
    cmd = cli.commands[command]
    by_name = {}
    for param in cmd.params:
        if isinstance(param, click.Option):
            flag = next((o for o in param.opts if o.startswith("--")), None)
            if flag:
                by_name[flag[2:].replace("-", "_")] = param
        else:
            by_name[param.name] = param
    args: list[str] = []
    for key, value in kwargs.items():
        param = by_name.get(key)
        if param is None:
            raise unknown(f"{command}() keyword", key, by_name)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(param, click.Argument):
            args += [str(v) for v in values]
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
        else:
            for v in values:
                args += [next(o for o in param.opts if o.startswith("--")), str(v)]
    try:
        ctx = cmd.make_context(command, args)
    except click.ClickException as exc:
        raise FeatcacheError(exc.format_message()) from None
    return dict(ctx.params)


def _run(command: str, kwargs: dict, quiet: bool = False):
    spec = STAGES[command]
    params = _params(command, kwargs)
    params.setdefault("quiet", quiet)
    with trusting(params.get("trust_pickles", False)):
        return spec.run(spec.build(params), params, print)


def extract(**kwargs) -> Path | list[Path]:
    """``featcache extract``: cache every tap of the backbones; returns the cache file (a list for several)."""
    params = _params("extract", kwargs)
    results = run_extract(STAGES["extract"].build(params), progress=not params["quiet"])
    paths = [r.path for r in results]
    return paths[0] if len(paths) == 1 else paths


def load_features(taps: str = "late", split: str = "train", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The fused matrix of ``taps`` for one split, as fuse-train sees it before normalisation, and its labels.

    Takes the cache flags of ``fuse-train`` (backbone, dataset, weights, image_size, ...);
    the caches must exist (``extract`` first, or pass ``extract=True`` to make them).
    """
    if split not in ("train", "test"):
        raise FeatcacheError(f"split must be 'train' or 'test'. Got {split!r} instead.")
    config = STAGES["fuse-train"].build(_params("fuse-train", {**kwargs, "taps": taps}))
    refs = parse_taps(taps, config.features.backbones)
    if config.run_extract:
        STAGES["extract"].run(config.features, {}, print)
    features = load(locate_caches(config.features), set(refs), config.allow_dead_taps)
    X = np.concatenate([features.taps[split, ref] for ref in refs], axis=1)
    return X, features.labels[split]


def fuse_train(**kwargs) -> list[Path]:
    """``featcache fuse-train``: every taps x head combination; returns the run folders written."""
    return _run("fuse-train", kwargs).runs


def finetune(**kwargs) -> Path:
    """``featcache finetune``: the unfrozen variant; returns its run folder."""
    [run] = _run("finetune", kwargs).runs
    return run


def sweep(**kwargs):
    """``featcache sweep``: every tap combination x head; returns its table (a DataFrame, best validation
    accuracy first), with the sweep folder in ``table.attrs["folder"]``."""
    import pandas as pd

    from featcache.cli.flags import sweep_config
    from featcache.sweep.run import sweep as run_sweep

    params = _params("sweep", kwargs)
    folder = run_sweep(sweep_config(params), progress=not params["quiet"])
    table = pd.read_csv(folder / "table.csv")
    table.attrs["folder"] = folder
    return table


def runs(runs_dir: str | Path = "runs", pipeline: str | None = None):
    """``featcache runs``: the comparison table of every run in ``runs_dir`` (and one folder down), as a DataFrame."""
    return runs_table(pipeline_runs(Path(runs_dir), pipeline))


def report(**kwargs) -> Path:
    """``featcache report``: one HTML page (and its CSV) of the runs; returns the page's path."""
    return Path(_run("report", kwargs).outputs[0])
