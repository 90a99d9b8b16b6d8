"""featcache: extract every layer of frozen CNN backbones once, then fuse and compare heads.

The flow, one subpackage a stage: data -> backbones -> extraction (HDF5 cache) -> fuse
(heads on cached taps) or finetuning (unfrozen) -> records (run folders) -> reporting.
The command line (``featcache.cli``) and the Python API below drive the same stages:

    import featcache
    featcache.extract(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)
    X, y = featcache.load_features(backbone=["resnet18", "mobilenet_v2"], weights="random",
                                   image_size=64, taps="early,late")
    featcache.fuse_train(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64,
                         taps="late", head="logreg,mlp")
    featcache.sweep(backbone="resnet18", weights="random", image_size=64, combos="pairs")  # every tap x head
    featcache.runs()        # the comparison table, a pandas DataFrame

Keyword arguments are the command's flags with underscores; errors raise FeatcacheError.
"""

from featcache.errors import FeatcacheError

__version__ = "0.1.0"
API = ("extract", "load_features", "fuse_train", "sweep", "finetune", "runs", "report")
__all__ = ["FeatcacheError", *API]


def __getattr__(name: str):
    # The API loads torch and the stages; `import featcache` and the CLI's start stay fast until it is used.
    if name in API:
        from featcache import api

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
