"""featcache: extract every layer of frozen CNN backbones once, then fuse and compare heads.

The flow, one subpackage a stage: data -> backbones -> extraction (HDF5 cache) -> runs (run
folders) -> fuse (heads on cached taps) -> finetuning / sweeping -> ranking / choosing -> reporting, driven through
one stage table (pipeline) by the command line (``featcache.cli``) and the Python API below:

    import featcache
    featcache.extract(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)
    X, y, classes = featcache.load_features(backbone=["resnet18", "mobilenet_v2"], weights="random",
                                            image_size=64, taps=["early", "late"])
    featcache.fuse_train(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64,
                         taps=["late"], head=["logreg", "mlp"])
    featcache.sweep(backbone=["resnet18"], weights="random", image_size=64, combos="pairs")  # every tap x head
    featcache.rank(backbone=["resnet*", "mobilenet*"], weights="random", image_size=64)  # every model's taps scored
    featcache.choose(backbone=["resnet18", "mobilenet_v2"], weights="random", image_size=64)  # one answer, how sure
    featcache.runs()  # the comparison table of every run, a pandas DataFrame (also featcache.runs_table())
    featcache.backbones("timm:convnext*", sizes=True)  # names, sources, parameters, input sizes
    featcache.datasets()  # every dataset source

Keyword arguments are the request fields of each stage (``help(featcache.extract)``), with
typed values; errors raise FeatcacheError naming the keyword.
"""

from featcache.errors import FeatcacheError

from featcache._version import __version__  # noqa: E402,F401  (re-exported)
API = ("extract", "own_backbone", "load_features", "fuse_train", "sweep", "rank", "choose", "similarity", "finetune", "predict", "report", "runs_table",
       "run_pipeline", "datasets")
CALLABLE_PACKAGES = ("runs", "backbones")  # featcache.runs(), featcache.backbones(): the commands of those names
__all__ = ["FeatcacheError", *API, *CALLABLE_PACKAGES]


def __getattr__(name: str):
    # The API loads the stage table; `import featcache` and the CLI's start stay fast until it is used.
    if name in API:
        from featcache import api

        return getattr(api, name)
    if name in CALLABLE_PACKAGES:  # the subpackage, whose module is callable as its command
        import importlib

        return importlib.import_module(f"featcache.{name}")
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API, *CALLABLE_PACKAGES})
