"""The Python API: each stage as a function, made from the stage's request.

Above the pipeline package, beside the command line and never through it. A function's keyword
arguments are its request's fields (``help(featcache.extract)`` lists them, with types and
defaults) and take typed values: ``mean=(0.5, 0.5, 0.5)``, ``taps=["early", "late"]``,
``head=("logreg", "svm")``, paths as ``pathlib.Path``. :func:`featcache.requests.build` checks
them as it checks a command's flags; an error names the keyword and the value passed. A call
and the command with the same values build the same request, hit the same cache and write the
same runs.

    import featcache
    featcache.extract(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)
    X, y, classes = featcache.load_features(backbone=["resnet18", "mobilenet_v2"], weights="random",
                                            image_size=64, taps=["early", "late"], split="train")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np

from featcache.backbones.sources.own_models import own_backbone
from featcache.errors import FeatcacheError, closest
from featcache.pipeline.request import PipelineRequest
from featcache.pipeline.stages import STAGES, Outcome
from featcache.requests import API, build, docs, params, signature


def _silent(message: str) -> None:
    pass


def _log(request) -> Callable[[str], None]:
    return _silent if getattr(request, "quiet", False) else print


def _function(stage: str, result: Callable[[Outcome], object], summary: str) -> Callable:
    """The API function of ``stage``: keyword arguments -> its request -> its runner -> ``result(outcome)``."""
    spec = STAGES[stage]
    name = stage.replace("-", "_")

    def function(**kwargs):
        request = build(spec.request, kwargs, API)
        return result(spec.run(request, _log(request)))

    function.__name__ = function.__qualname__ = name
    function.__module__ = __name__
    function.__signature__ = signature(spec.request)
    function.__doc__ = f"{summary}\n\nKeyword arguments (``featcache {stage} --help`` says the same):\n\n" + docs(spec.request)
    return function


def _paths(outcome: Outcome):
    paths = [r.path for r in outcome.result]
    return paths[0] if len(paths) == 1 else paths


def _table(outcome: Outcome):
    import pandas as pd

    table = pd.read_csv(outcome.result / "table.csv")
    table.attrs["folder"] = outcome.result
    return table


def _result(outcome: Outcome):
    return outcome.result


_extract = _function("extract", _paths, "``featcache extract``: cache every tap of the backbones; returns the cache "
                                        "file (a list for several).")


def extract(model=None, taps=None, name: str | None = None, version: str = "", **kwargs):
    """``model``: a network of your own (a ``torch.nn.Module``), registered as ``own:NAME`` with ``taps`` (its
    module names) and the preprocessing given (``image_size``, ``mean``, ``std``, optionally ``interpolation``,
    ``crop_pct``); every later call names it as ``backbone="own:NAME"``."""
    if model is None:
        if taps is not None or name is not None or version:
            raise FeatcacheError("taps, name and version go with model=: extract caches every tap of a named backbone")
        return _extract(**kwargs)
    missing = [k for k in ("image_size", "mean", "std") if kwargs.get(k) is None]
    if missing or not taps:
        raise FeatcacheError(f"extract(model=...) needs taps=[module names], image_size, mean and std (a network of "
                             f"your own has no weights' config to read them from); missing: "
                             f"{', '.join((['taps'] if not taps else []) + missing)}")
    if "backbone" in kwargs:
        raise FeatcacheError("give model= or backbone=, not both")
    backbone = own_backbone(model, taps, kwargs["image_size"], kwargs["mean"], kwargs["std"], name=name,
                            version=version, interpolation=kwargs.get("interpolation") or "bilinear",
                            crop_pct=kwargs.get("crop_pct") or 1.0)
    return _extract(backbone=[backbone], **kwargs)


extract.__doc__ = _extract.__doc__ + "\n\n" + extract.__doc__
extract.__signature__ = _extract.__signature__.replace(parameters=[
    *_extract.__signature__.parameters.values(),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
      for name, default in (("model", None), ("taps", None), ("name", None), ("version", "")))])
fuse_train = _function("fuse-train", _result, "``featcache fuse-train``: every taps x head combination; "
                                                         "returns the run folders written or served.")
rank = _function("rank", _table, "``featcache rank``: every tap of the models the patterns match, scored by "
                                 "transferability scores; returns the table (a DataFrame: model, tap, width, "
                                 "parameters, images/s, each score; ``.attrs['folder']`` is the ranking's folder).")
choose = _function("choose", _result, "``featcache choose``: which model, taps and head for this data, how sure, "
                                     "at what cost; returns a Choice (``.recommended``, ``.fast``, ``.tied``, "
                                     "``.table`` of the finalists, ``.trust``, ``.folder``; shown as its answer).")
sweep = _function("sweep", _table, "``featcache sweep``: every tap combination x head; returns its table (a "
                                   "DataFrame, best validation accuracy first), with the sweep folder in "
                                   "``table.attrs['folder']``.")
similarity = _function("similarity", _result, "``featcache similarity``: linear CKA between every pair of cached "
                                             "taps; returns the matrix (a DataFrame, taps in network order; "
                                             "``.attrs['folder']`` holds cka.csv and pairs.csv).")
finetune = _function("finetune", _result, "``featcache finetune``: the unfrozen variant; returns its run folder.")
report = _function("report", _result, "``featcache report``: one HTML page (and its CSV) of the runs; returns the "
                                      "page's path.")
def _predictions(outcome: Outcome):
    from featcache.runs.predict import prediction_table

    return prediction_table(outcome.result)


predict = _function("predict", _predictions, "``featcache predict``: the predictions as a DataFrame (file, rank, "
                                             "label, probability: one row per image, or per image and rank with "
                                             "top_k), as --output writes them.")


def run_pipeline(**kwargs):
    """``featcache run``: a pipeline file, stage by stage; returns what each stage did (a list of StageResult)."""
    from featcache.pipeline.files import load_pipeline, parse_override
    from featcache.pipeline.files import run_pipeline as run

    request = build(PipelineRequest, kwargs, API)
    pipeline = load_pipeline(request.pipeline, dict(parse_override(text) for text in request.set))
    return [] if request.dry_run else run(pipeline, log=print)


run_pipeline.__signature__ = signature(PipelineRequest)


def load_features(taps=("late",), split: str = "train", **kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The fused matrix of ``taps`` for one split, as fuse-train sees it before normalisation, its labels and
    the class names: ``X, y, classes = featcache.load_features(...)``.

    Takes fuse-train's keywords (backbone, dataset, weights, image_size, ...); the caches must exist
    (``extract`` first, or pass ``extract=True`` to make them).
    """
    from featcache.fuse.caches import load_features as load
    from featcache.fuse.caches import locate_caches
    from featcache.fuse.fusion import parse_taps
    from featcache.fuse.request import FuseRequest

    if split not in ("train", "test"):
        raise FeatcacheError(f"split must be 'train' or 'test'. Got {split!r} instead.")
    known = ["taps", "split", *(p.name for p in params(FuseRequest))]
    for name in kwargs:
        if name not in known:  # a typo of split is not "did you mean seed?"
            guess = closest(name, known)
            raise FeatcacheError(f"unknown keyword '{name}'" + (f"; did you mean '{guess}'?" if guess else ""))
    request = build(FuseRequest, {**kwargs, "taps": [",".join(taps)] if isinstance(taps, (list, tuple)) else taps},
                    API)
    config = request.config()
    [refs] = [parse_taps(t, config.features) for t in config.taps]
    if config.run_extract:
        STAGES["extract"].run(build(STAGES["extract"].request, _extract_fields(request), API), _log(request))
    features = load(locate_caches(config.features), set(refs), config.allow_dead_taps)
    X = np.concatenate([features.taps[split, ref] for ref in refs], axis=1)
    return X, features.labels[split], list(features.classes)


def _extract_fields(request) -> dict:
    """The fields of ``request`` that an extraction of its caches takes."""
    from dataclasses import fields

    mine = {f.name for f in fields(STAGES["extract"].request)}
    return {f.name: getattr(request, f.name) for f in fields(request) if f.name in mine}


def runs_table(runs_dir: str | Path = "runs", pipeline: str | None = None):
    """``featcache runs``: the comparison table of every run in ``runs_dir`` (and one folder down), as a DataFrame."""
    from featcache.runs.comparison import runs_table as table
    from featcache.runs.records import pipeline_runs

    return table(pipeline_runs(Path(runs_dir), pipeline))


def datasets():
    """``featcache datasets``: every dataset source, with what ``--data-dir`` it reads, as a DataFrame."""
    import pandas as pd

    from featcache.data.datasets import DATASETS

    return pd.DataFrame([(name, DATASETS[name].about) for name in sorted(DATASETS)], columns=["dataset", "about"])
