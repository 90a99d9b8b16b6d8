"""Parsed command-line flags -> the frozen config of each stage.

Flow: cli (and pipeline, which parses its tables with the same click options) -> **flags**
-> the stages. One builder per command, so a command and a pipeline stage with the same
options run with the same config. Each builder imports its stage's config class when it
is called: the stage modules load torch, and the command line must start without it.
"""

from __future__ import annotations

from featcache.errors import FeatcacheError


def feature_config(opts: dict, backbones: tuple[str, ...], **speed):
    """The ExtractConfig that the shared data and feature flags describe."""
    from featcache.extraction.config import ExtractConfig

    return ExtractConfig(
        data=data_request(opts), backbones=backbones, weights=opts["weights"],
        preprocess=preprocess_request(opts),
        pooling=opts["pooling"], precision=opts["precision"], dtype=opts["dtype"], device=opts["device"],
        cache_dir=opts["cache_dir"], **speed,
    )


def preprocess_request(opts: dict):
    """The preprocessing flags; those not given stay None (the backbone's own)."""
    from featcache.data.preprocess import PreprocessConfig

    return PreprocessConfig.from_model(
        image_size=opts.get("image_size"), resize=opts.get("resize") or "center-crop",
        crop_pct=opts.get("crop_pct"), interpolation=opts.get("interpolation"),
        mean=triple("--mean", opts.get("mean")), std=triple("--std", opts.get("std")))


def triple(flag: str, text) -> tuple[float, float, float] | None:
    if text is None or isinstance(text, (tuple, list)):
        return tuple(text) if text is not None else None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise FeatcacheError(f"{flag} takes three comma-separated numbers such as 0.5,0.5,0.5. Got {text!r} instead.")
    return values


def data_request(opts: dict):
    from featcache.data.datasets import DataRequest

    return DataRequest(
        name=opts["dataset"], data_dir=opts["data_dir"], download=opts["download"],
        limit_train=opts["limit_train"], limit_test=opts["limit_test"],
        test_fraction=opts["test_fraction"], seed=opts["seed"],
    )


def extract_config(params: dict):
    """The ExtractConfig of ``featcache extract``'s parsed flags."""
    return feature_config(params, tuple(params["backbone_names"]), batch_size=params["batch_size"],
                          num_workers=params["num_workers"], compile=params["compile_"],
                          skip_bad_images=params["skip_bad_images"])


def csv_values(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def hidden_widths(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise FeatcacheError(f"--hidden takes comma-separated widths such as 512 or 512,256. Got {text!r} instead.") from None


def grid_values(flag: str, text: str | None) -> tuple[float, ...] | None:
    """``0.01,0.1,1`` -> (0.01, 0.1, 1.0); None stays None (the head's default grid)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise FeatcacheError(f"{flag} takes comma-separated numbers such as 0.01,0.1,1. Got {text!r} instead.") from None
    if any(v < 0 for v in values) or (flag == "--C" and any(v == 0 for v in values)):
        raise FeatcacheError(f"{flag} values must be {'positive' if flag == '--C' else '0 or more'}. Got {text!r} instead.")
    return values


def fuse_train_config(params: dict):
    """The FuseTrainConfig of ``featcache fuse-train``'s parsed flags."""
    from featcache.fuse.train import FuseTrainConfig

    p = params
    options = head_options(p)
    features = feature_config(p, tuple(p["backbone_names"]), skip_bad_images=p["skip_bad_images"])
    return FuseTrainConfig(features=features, taps=tuple(p["taps"]), heads=csv_values(p["heads"]), tap_norm=p["tap_norm"],
                           val_fraction=p["val_fraction"], options=options, runs_dir=p["runs_dir"],
                           run_extract=p["run_extract"],
                           out_of_core=p["out_of_core"], force=p["force"],
                           allow_dead_taps=p["allow_dead_taps"])


def head_options(p: dict):
    """The torch heads' flags and the candidate grids, shared by fuse-train and sweep."""
    from featcache.backbones.taps import resolve_device, resolve_precision
    from featcache.fuse.heads import HeadOptions

    return HeadOptions(hidden=hidden_widths(p["hidden"]), dropout=p["dropout"], optimizer=p["optimizer"], lr=p["lr"],
                       epochs=p["epochs"], batch_size=p["batch_size"], patience=p["patience"],
                       device=resolve_device(p["device"]).type,
                       precision=resolve_precision(p["precision"], resolve_device(p["device"])), seed=p["seed"],
                       grid={k: v for k, v in (("C", grid_values("--C", p["c_grid"])),
                                               ("weight_decay", grid_values("--weight-decay", p["wd_grid"])))
                             if v is not None})


def sweep_config(p: dict):
    """The SweepConfig of ``featcache sweep``'s parsed flags."""
    from featcache.sweep.config import SweepConfig, parse_ints

    features = feature_config(p, tuple(p["backbone_names"]), skip_bad_images=p["skip_bad_images"])
    return SweepConfig(features=features, combos=p["combos"],
                       taps=tuple(p["taps"]), heads=csv_values(p["heads"]), val_fraction=p["val_fraction"],
                       seeds=parse_ints("--seeds", p["seeds"]) or (p["seed"],), shots=parse_ints("--shots", p["shots"]),
                       repeats=p["repeats"], keep=p["keep"], max_combos=p["max_combos"], options=head_options(p),
                       runs_dir=p["runs_dir"], run_extract=p["run_extract"])


def finetune_config(params: dict):
    """The FinetuneConfig of ``featcache finetune``'s parsed flags."""
    from featcache.finetuning.config import FinetuneConfig
    from featcache.records import resolve_run

    p = params
    return FinetuneConfig(
        features=feature_config(p, tuple(p["backbone_names"])), taps=p["taps"], head=p["head"],
        hidden=hidden_widths(p["hidden"]), dropout=p["dropout"], res_blocks=p["res_blocks"], tap_norm=p["tap_norm"],
        unfreeze=p["unfreeze"], head_epochs=p["head_epochs"], epochs=p["epochs"], optimizer=p["optimizer"],
        lr=p["lr"], backbone_lr_scale=p["backbone_lr_scale"], batch_size=p["batch_size"], augment=p["augment"],
        val_fraction=p["val_fraction"], patience=p["patience"],
        init_head=resolve_run(str(p["init_head"]), p["runs_dir"]) if p["init_head"] else None,
        runs_dir=p["runs_dir"], resume=p["resume"], num_workers=p["num_workers"],
    )


def report_config(params: dict):
    """The ReportConfig of ``featcache report``'s parsed flags."""
    from featcache.records import pipeline_runs
    from featcache.reporting.page import ReportConfig

    p = params
    return ReportConfig(runs=tuple(p["run_names"]), runs_dir=pipeline_runs(p["runs_dir"], p["pipeline"]),
                        out=p["out"], title=p["title"],
                        grid_images=p["grid_images"], gradcam_images=p["gradcam_images"], device=p["device"])
