"""featcache: extract every layer of frozen CNN backbones once, then fuse and compare heads.

The flow, one subpackage a stage: data -> backbones -> extraction (HDF5 cache) -> runs (run
folders) -> fuse (heads on cached taps) -> finetuning / sweeping -> reporting, driven through
one stage table (pipeline) by the command line (``featcache.cli``) and the Python API below:

    import featcache
    featcache.extract(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)
    X, y, classes = featcache.load_features(backbone=["resnet18", "mobilenet_v2"], weights="random",
                                            image_size=64, taps=["early", "late"])
    featcache.fuse_train(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64,
                         taps=["late"], head=["logreg", "mlp"])
    featcache.sweep(backbone=["resnet18"], weights="random", image_size=64, combos="pairs")  # every tap x head
    featcache.rank(backbone=["resnet*", "mobilenet*"], weights="random", image_size=64)  # every model's taps scored
    featcache.runs_table()  # the comparison table of every run, a pandas DataFrame

Keyword arguments are the request fields of each stage (``help(featcache.extract)``), with
typed values; errors raise FeatcacheError naming the keyword.
"""

from featcache.errors import FeatcacheError

from featcache._version import __version__  # noqa: E402,F401  (re-exported)
API = ("extract", "load_features", "fuse_train", "sweep", "rank", "finetune", "predict", "report", "runs_table",
       "run_pipeline")
__all__ = ["FeatcacheError", *API]


def __getattr__(name: str):
    # The API loads the stage table; `import featcache` and the CLI's start stay fast until it is used.
    if name in API:
        from featcache import api

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API})
