"""Stage 3: the unfrozen variants, trained end to end with the frozen path's pieces.

Flow: dataset -> :mod:`featcache.data.augment` -> :mod:`featcache.finetuning.model` (backbones with some
blocks trainable -> taps -> pooling -> per-tap normalisation -> concatenation -> head) ->
run record. The model reuses the frozen path's pooling and fitted normaliser, so a head
from ``fuse-train`` (``--init-head RUN``) starts exactly where the frozen experiment ended.

Training: phase 1 trains only the head (``--head-epochs``, or ``--init-head``); phase 2
applies the unfreeze policy with ``--backbone-lr-scale``. BatchNorm layers keep their
running statistics (eval mode), which is what makes batch size 1 work. Every epoch reseeds
from (seed, phase, epoch) and writes a checkpoint, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featcache.backbones.registry import BACKBONES
from featcache.backbones.taps import pool, pooled_dim, resolve_device, resolve_precision
from featcache.data.augment import AUGMENTS, augmentation, loader, normalise
from featcache.data.datasets import load_dataset
from featcache.errors import FeatcacheError, unknown
from featcache.extraction.config import ExtractConfig
from featcache.files import atomic_write
from featcache.finetuning.loop import evaluate_maps, evaluate_rows, frozen_maps, train_epoch, train_epoch_maps
from featcache.finetuning.model import TapNorm, apply_unfreeze, build_net, parse_policy, trainable_prefixes
from featcache.fuse.evaluate import score, validation_split
from featcache.fuse.fusion import TapNormalizer, TapRef, parse_taps
from featcache.fuse.torch_head import TorchClassifier, make_optimizer
from featcache.records import RunRecord, library_versions, load_head, load_record, record_features, save_run

FT_HEADS = ("mlp", "linear", "resblocks")


@dataclass(frozen=True)
class FinetuneConfig:
    """Flags of ``featcache finetune``."""

    features: ExtractConfig = field(default_factory=ExtractConfig)
    taps: str = "late"
    head: str = "mlp"
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    res_blocks: int = 2
    tap_norm: str = "standard"
    unfreeze: str = "last-block"
    head_epochs: int = 0
    epochs: int = 6
    optimizer: str = "adamw"
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    batch_size: int = 32
    augment: str = "none"
    val_fraction: float = 0.1
    patience: int | None = None
    init_head: Path | None = None
    runs_dir: Path = Path("runs")
    resume: bool = False
    num_workers: int = 2

    def __post_init__(self):

        if self.head not in FT_HEADS:
            raise unknown("--head", self.head, FT_HEADS)
        if self.augment not in AUGMENTS:
            raise unknown("--augment", self.augment, AUGMENTS)
        TapNormalizer(self.tap_norm)
        parse_policy(self.unfreeze)
        if self.epochs < 0 or self.head_epochs < 0 or self.epochs + self.head_epochs < 1:
            raise FeatcacheError("--epochs and --head-epochs must be 0 or more, and train at least one epoch together")
        if self.init_head is not None and self.head_epochs:
            raise FeatcacheError("--init-head replaces phase 1: leave --head-epochs at 0")
        if self.head == "resblocks" and len(self.features.backbones) != 1:
            raise FeatcacheError("--head resblocks refines one backbone's feature map: give exactly one --backbone")
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be at least 1. Got {self.batch_size} instead.")


# --- phase 1 from a fuse-train run, or a statistics pass --------------------------------


def init_from_run(run_dir: Path, refs: list[TapRef], cfg: FinetuneConfig):
    """(normalizer, head state dict, class names) of a fuse-train run whose taps and head fit this model."""
    record = load_record(run_dir)
    if record.finetuned:
        raise FeatcacheError(f"--init-head {run_dir} is not a fuse-train run")
    if record.taps != [str(r) for r in refs]:
        raise FeatcacheError(f"--init-head {run_dir} was trained on taps {'+'.join(record.taps)}, "
                             f"not {'+'.join(map(str, refs))}: pass the same --backbone and --taps")
    if record.config["tap_norm"] != cfg.tap_norm:
        raise FeatcacheError(f"--init-head {run_dir} used --tap-norm {record.config['tap_norm']}: pass the same")
    normalizer, head = load_head(run_dir)
    return normalizer, head_state(head, record, cfg), record.classes


def head_state(head, record, cfg: FinetuneConfig) -> dict:
    """The head as an nn.Sequential state dict matching :func:`build_net`'s head."""
    import torch

    n_classes = len(record["classes"])  # a RunRecord, or the same keys in a dict
    if isinstance(head, TorchClassifier):
        want = () if cfg.head == "linear" else tuple(cfg.hidden)
        if tuple(head.hidden) != want or len(head.classes_) != n_classes:
            raise FeatcacheError(f"--init-head run has a head with hidden {tuple(head.hidden)}; "
                                 f"this fine-tune builds {want}: pass the same --hidden")
        return head.module_.state_dict()
    from sklearn.linear_model import LogisticRegression

    if isinstance(head, LogisticRegression) and cfg.head == "linear" and len(head.classes_) == n_classes:
        coef, bias = head.coef_, head.intercept_
        if coef.shape[0] == 1:  # binary: logits (0, w.x + b) give the same softmax
            coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
        return {"0.weight": torch.tensor(coef, dtype=torch.float32), "0.bias": torch.tensor(bias, dtype=torch.float32)}
    raise FeatcacheError(f"--init-head needs a run with head mlp or linear (or logreg for --head linear); "
                         f"this one has {record['head']}")


def fit_normalizer_on_images(net, split, rows, cfg: FinetuneConfig, device) -> TapNormalizer:
    """One pass of the frozen backbones over the training rows to fit the tap normalisation."""
    import torch

    blocks = {ref: [] for ref in net.refs}
    net.eval()
    with torch.inference_mode():
        for images, _ in loader(split, rows, cfg, None, False, 0, device):  # no augmentation
            maps = net.backbone_maps(normalise(images.to(device), cfg.features.preprocess))
            for ref in net.refs:
                blocks[ref].append(pool(maps[ref], cfg.features.pooling).float().cpu().numpy())
    return TapNormalizer(cfg.tap_norm).fit([np.concatenate(blocks[r]) for r in net.refs])


# --- the training loop -----------------------------------------------------------------


def partial_dir(cfg: FinetuneConfig) -> Path:
    """Where an unfinished fine-tune keeps its checkpoint: fixed by what changes the result."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "num_workers", "runs_dir")}
    text = json.dumps(settings, sort_keys=True, default=str)
    return Path(cfg.runs_dir) / f".finetune-{hashlib.sha256(text.encode()).hexdigest()[:12]}.partial"


def _check_one_image_batches(ref, image_size: int, batch_size: int, rows: int) -> None:
    """The residual blocks' BatchNorm cannot train on one value per channel: a 1x1 map in a batch of one."""
    stride = BACKBONES.lookup(ref.backbone).tap(ref.tap).stride
    if math.ceil(image_size / stride) == 1 and (batch_size == 1 or rows % batch_size == 1):
        batch = "--batch-size 1" if batch_size == 1 else f"the last batch ({rows} images, batches of {batch_size})"
        raise FeatcacheError(f"--head resblocks: {ref} is 1x1 at --image-size {image_size} and {batch} holds one "
                             f"image, which leaves BatchNorm one value per channel: use --image-size {2 * stride} "
                             f"or more")


def _save_checkpoint(folder: Path, state: dict) -> None:
    import torch

    atomic_write(folder / "checkpoint.pt", lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint


def _steps(cfg: FinetuneConfig) -> list[tuple[str, int]]:
    """Every (phase, epoch) in training order: phase 1 trains the head, phase 2 fine-tunes."""
    return [("head", e) for e in range(1, cfg.head_epochs + 1)] + [("finetune", e) for e in range(1, cfg.epochs + 1)]


def _configure(net, cfg: FinetuneConfig, phase: str):
    """Freeze/unfreeze for the phase; its optimizer (head lr, backbone lr scaled) and trainable names."""
    trainable = {}
    for name in net.names:
        policy = "none" if phase == "head" else cfg.unfreeze
        trainable[name] = apply_unfreeze(net.extractor(name), BACKBONES.lookup(name), policy)
    head_params = list(net.head.parameters()) + (list(net.refine.parameters()) if net.refine is not None else [])
    groups = [{"params": head_params, "lr": cfg.lr}]
    backbone = [p for ext in net.extractors.values() for p in ext.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale})
    return make_optimizer(cfg.optimizer, groups, lr=cfg.lr), trainable


def finetune(cfg: FinetuneConfig, log=print, progress: bool = True) -> Path:
    """Train the model, write a run folder like fuse-train's, return it."""
    import torch

    feat = cfg.features
    device = resolve_device(feat.device)
    precision = resolve_precision(feat.precision, device)
    refs = list(parse_taps(cfg.taps, feat.backbones))
    if cfg.head == "resblocks" and len(refs) != 1:
        raise FeatcacheError("--head resblocks refines one feature map: give one tap, e.g. --taps late")
    for name in feat.backbones:
        trainable_prefixes(BACKBONES.lookup(name), cfg.unfreeze)  # a bad policy fails before any work
    init = init_from_run(Path(cfg.init_head), refs, cfg) if cfg.init_head is not None else None
    data = load_dataset(feat.data)
    if init is not None and init[2] != list(data.classes):
        raise FeatcacheError(f"--init-head {cfg.init_head} was trained on other classes ({', '.join(init[2][:5])}, ...): "
                             f"pass the dataset flags of that run")
    train, test = data.splits["train"], data.splits["test"]
    fit_rows, val_rows = validation_split(train.labels, cfg.val_fraction, feat.data.seed)
    if cfg.head == "resblocks":
        _check_one_image_batches(refs[0], feat.preprocess.image_size, cfg.batch_size, len(fit_rows))
    started = time.perf_counter()

    dims = [pooled_dim(BACKBONES.lookup(r.backbone).tap(r.tap).channels, feat.pooling) for r in refs]
    identity = TapNormalizer("none").fit([np.zeros((1, d), np.float32) for d in dims])
    torch.manual_seed(feat.data.seed)  # the head's initialisation
    net = build_net(cfg, refs, init[0] if init else identity, len(data.classes), device)
    if init is not None:
        normalizer = init[0]
        net.head.load_state_dict(init[1])
    elif cfg.head == "resblocks" or cfg.tap_norm == "none":
        normalizer = identity  # one refined map: nothing to balance
    else:
        normalizer = fit_normalizer_on_images(net, train, fit_rows, cfg, device)
        net.norm = TapNorm(normalizer).to(device)

    folder = partial_dir(cfg)
    ckpt = None
    if cfg.resume and (folder / "checkpoint.pt").exists():
        ckpt = torch.load(folder / "checkpoint.pt", map_location=device, weights_only=False)
        net.load_state_dict(ckpt["model"])
        log(f"resuming {folder} after {ckpt['phase']} epoch {ckpt['epoch']}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    history = ckpt["history"] if ckpt else {k: [] for k in ("phase", "epoch", "train_loss", "train_acc", "val_loss",
                                                            "val_acc", "images_per_s")}
    best = ckpt["best"] if ckpt else {"val_loss": float("inf"), "val_acc": None, "epoch": 0, "phase": None}
    # The best weights travel inside the checkpoint, so a kill can never pair them with another epoch.
    best_state = copy.deepcopy(net.state_dict()) if ckpt is None or ckpt["best_model"] is None else ckpt["best_model"]
    transform = augmentation(cfg.augment, feat.preprocess.image_size, feat.preprocess.resize)
    steps = _steps(cfg)
    done = ckpt["step"] + 1 if ckpt else 0
    stopped = bool(ckpt and ckpt["stopped"])
    phase_now, opt, scaler, trainable, maps = None, None, None, {}, None
    for index in range(done, len(steps)):
        if stopped:
            break
        phase, epoch = steps[index]
        if phase != phase_now:
            opt, trainable = _configure(net, cfg, phase)
            # fp16 gradients underflow without loss scaling (bf16 has fp32's range); torch scales on CPU too.
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            if ckpt is not None and ckpt["phase"] == phase:
                opt.load_state_dict(ckpt["optimizer"])
                scaler.load_state_dict(ckpt["scaler"])
            phase_now = phase
        seed = feat.data.seed * 1000003 + index
        torch.manual_seed(seed)  # dropout and augmentation draw the same stream on a resume
        frozen = not any(p.requires_grad for ext in net.extractors.values() for p in ext.parameters())
        if frozen and cfg.augment == "none":
            if maps is None:  # frozen backbones, same inputs every epoch: compute their maps once
                maps = {"fit": frozen_maps(net, train, fit_rows, cfg, device, precision),
                        "val": frozen_maps(net, train, val_rows, cfg, device, precision)}
                log(f"frozen backbones: feature maps of {len(fit_rows) + len(val_rows)} images computed once")
            train_loss, train_acc, rate = train_epoch_maps(net, opt, scaler, maps["fit"], train.labels[fit_rows],
                                                            cfg, seed, device, precision)
            val_loss, val_acc = evaluate_maps(net, maps["val"], train.labels[val_rows], cfg, device, precision)
        else:
            train_loss, train_acc, rate = train_epoch(net, opt, scaler, train, fit_rows, cfg, transform, seed,
                                                       device, precision, f"{phase} {epoch}", progress)
            val_loss, val_acc, _ = evaluate_rows(net, train, val_rows, cfg, device, precision)
        for key, value in zip(history, (phase, epoch, train_loss, train_acc, val_loss, val_acc, rate)):
            history[key].append(value)
        log(f"{phase} epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  {rate:.1f} img/s")
        improved = val_loss < best["val_loss"]
        if improved:
            best = {"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch, "phase": phase}
            best_state = copy.deepcopy(net.state_dict())
        since_best = len(history["val_loss"]) - 1 - _last_index(history, best)
        stopped = cfg.patience is not None and phase == "finetune" and since_best >= cfg.patience
        _save_checkpoint(folder, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                  "scaler": scaler.state_dict(), "phase": phase, "epoch": epoch, "step": index,
                                  "history": history, "best": best, "stopped": stopped,
                                  "best_model": None if improved else best_state})  # None: the model itself
        if stopped:
            log(f"early stop: no better validation loss for {cfg.patience} epochs")

    if not trainable:  # resumed after the last epoch: report the final phase's parameters
        _, trainable = _configure(net, cfg, steps[-1][0])
    net.load_state_dict(best_state)
    _, _, proba = evaluate_rows(net, test, np.arange(len(test)), cfg, device, precision)
    metrics = score(_Fixed(proba), None, test.labels, data.classes)
    seconds = time.perf_counter() - started
    record = RunRecord(
        kind="finetuned", taps=[str(r) for r in refs], head=cfg.head, dim=sum(dims),
        classes=list(data.classes),
        config={**_config_dict(cfg), "trainable_parameters": {k: len(v) for k, v in trainable.items()}},
        caches={},
        rows={"train": len(fit_rows), "val": len(val_rows), "test": len(test)},
        selection={"params": {"unfreeze": cfg.unfreeze, "lr": cfg.lr, "backbone_lr_scale": cfg.backbone_lr_scale},
                   "val_accuracy": best["val_acc"], "best_epoch": best["epoch"], "best_phase": best["phase"],
                   "candidates": []},
        curves=history,
        metrics=metrics,
        timings={"fit_seconds": seconds, "predict_seconds": metrics["predict_seconds"],
                 "images_per_s": float(np.mean(history["images_per_s"])) if history["images_per_s"] else None},
        versions=library_versions(),
    )
    run = save_run(cfg.runs_dir, f"finetune-{cfg.head}-{cfg.unfreeze}-{'+'.join(map(str, refs))}", record,
                   normalizer, net.state_dict())
    shutil.rmtree(folder, ignore_errors=True)
    return run


def _last_index(history, best) -> int:
    for i in range(len(history["val_loss"]) - 1, -1, -1):
        if history["phase"][i] == best["phase"] and history["epoch"][i] == best["epoch"]:
            return i
    return -1


class _Fixed:
    """Already computed probabilities behind the predict_proba interface of :func:`score`."""

    def __init__(self, proba):
        self.proba = proba
        self.classes_ = np.arange(proba.shape[1])

    def predict_proba(self, X):
        return self.proba


def _config_dict(cfg: FinetuneConfig) -> dict:
    feat = cfg.features
    out = {k: v for k, v in asdict(cfg).items() if k not in ("features",)}
    out.update({
        "dataset": feat.data.name, "data_dir": feat.data.data_dir, "backbones": list(feat.backbones),
        "weights": feat.weights, "image_size": feat.preprocess.image_size, "resize": feat.preprocess.resize,
        "pooling": feat.pooling, "precision": feat.precision, "dtype": "float32", "seed": feat.data.seed,
        "limit_train": feat.data.limit_train, "limit_test": feat.data.limit_test,
        "test_fraction": feat.data.test_fraction,
    })
    return out


def load_finetuned(run_dir: Path, record: RunRecord, device):
    """Rebuild a fine-tuned run's model with its trained weights (for predict)."""

    cfg = finetune_config_from_record(record)
    normalizer, weights = load_head(run_dir)
    refs = [TapRef(*t.split(":", 1)) for t in record.taps]
    net = build_net(cfg, refs, normalizer, len(record.classes), device)
    net.load_state_dict(weights)
    return net.eval(), cfg


def finetune_config_from_record(record: RunRecord) -> FinetuneConfig:

    c = record.config
    return FinetuneConfig(features=record_features(record), taps=",".join(record.taps), head=c["head"],
                          hidden=tuple(c["hidden"]), dropout=c["dropout"], res_blocks=c["res_blocks"],
                          tap_norm=c["tap_norm"], unfreeze=c["unfreeze"], epochs=max(1, c["epochs"]))
