"""Stage 6 (finetuning): the unfrozen variants, trained end to end with the frozen path's pieces.

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
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.backbones.registry import BACKBONES
from featcache.device import emulated, resolve_device, resolve_precision
from featcache.data.augment import augmentation
from featcache.data.datasets import load_dataset
from featcache.errors import FeatcacheError
from featcache.extraction.config import shared_preprocess
from featcache.finetuning.checkpoint import Progress, open_checkpoint, progress_from, save_checkpoint
from featcache.finetuning.config import (
    FinetuneConfig,
    check_one_image_batches,
    check_resblocks_taps,
    config_dict,
    partial_dir,
)
from featcache.finetuning.loop import (
    Trainer,
    evaluate_maps,
    evaluate_rows,
    fit_normalizer_on_images,
    frozen_maps,
    train_epoch,
    train_epoch_maps,
)
from featcache.finetuning.model import TapNorm, apply_unfreeze, build_net, trainable_prefixes
from featcache.finetuning.saved import init_from_run
from featcache.fuse.evaluate import score, small_validation, validation_split
from featcache.fuse.fusion import TapNormalizer, parse_taps
from featcache.fuse.saved import save_head
from featcache.fuse.torch_head import make_optimizer
from featcache.runs.comparison import base_label
from featcache.runs.records import RunRecord, library_versions, load_record, result_line, save_run

# --- the training loop -----------------------------------------------------------------


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


@dataclass
class _Setup:
    """Everything a fine-tune trains with, prepared before the first epoch."""

    device: object
    precision: str
    refs: list
    data: object  # the Dataset
    fit_rows: np.ndarray
    val_rows: np.ndarray
    dims: list
    net: object
    normalizer: TapNormalizer
    started: float
    notes: tuple = ()  # warnings about the split, said once and recorded in the run

    @property
    def train(self):
        return self.data.splits["train"]


def finetune(cfg: FinetuneConfig, log=print, progress: bool = True) -> Path:
    """Train the model, write a run folder like fuse-train's, return it."""
    feat = cfg.features  # one preprocessing for the end-to-end net, each unset field the backbones' own
    cfg = dataclasses.replace(cfg, features=dataclasses.replace(feat, preprocess=shared_preprocess(feat, "fine-tuning")))
    setup = _prepare(cfg, log)
    folder, ckpt = open_checkpoint(partial_dir(cfg), cfg.resume, setup.net, setup.device, log)
    state = progress_from(ckpt, setup.net)
    trainable = _train(cfg, setup, state, ckpt, folder, log, progress)
    run = _finish(cfg, setup, state, trainable, folder)
    log(result_line(run, load_record(run)))
    return run


def _prepare(cfg: FinetuneConfig, log=print) -> _Setup:
    """Check the request, load the data, build the model and its normaliser (phase 1's start)."""
    import torch

    feat = cfg.features
    device = resolve_device(feat.device)
    if warning := emulated(feat.precision, device):
        log(warning)
    refs = list(parse_taps(cfg.taps, feat))
    if cfg.head == "resblocks":
        check_resblocks_taps(refs)
    for name in feat.backbones:
        trainable_prefixes(BACKBONES.lookup(name), cfg.unfreeze)  # a bad policy fails before any work
    init = init_from_run(Path(cfg.init_head), refs, cfg) if cfg.init_head is not None else None
    data = load_dataset(feat.data)
    if init is not None and init[2] != list(data.classes):
        raise FeatcacheError(f"--init-head {cfg.init_head} was trained on other classes ({', '.join(init[2][:5])}, ...): "
                             f"pass the dataset flags of that run")
    fit_rows, val_rows = validation_split(data.splits["train"].labels, cfg.val_fraction, feat.data.seed,
                                          data.splits["train"].official_val)
    if cfg.head == "resblocks":
        check_one_image_batches(refs[0], feat.preprocess.image_size, cfg.batch_size, len(fit_rows))
    notes = data.notes + tuple(n for n in [small_validation(data.splits["train"].labels[val_rows])] if n)
    for note in notes:  # said once the request is known to be good
        log(f"warning: {note}")
    started = time.perf_counter()
    dims = [BACKBONES.lookup(r.backbone).tap(r.tap).width(feat.pooling) for r in refs]
    identity = TapNormalizer("none").fit([np.zeros((1, d), np.float32) for d in dims])
    torch.manual_seed(feat.data.seed)  # the head's initialisation
    net = build_net(cfg, refs, init[0] if init else identity, len(data.classes), device)
    if init is not None:
        normalizer = init[0]
        net.head.load_state_dict(init[1])
    elif cfg.head == "resblocks" or cfg.tap_norm == "none":
        normalizer = identity  # one refined map: nothing to balance
    else:
        normalizer = fit_normalizer_on_images(net, data.splits["train"], fit_rows, cfg, device)
        net.norm = TapNorm(normalizer).to(device)
    return _Setup(device, resolve_precision(feat.precision, device), refs, data, fit_rows, val_rows, dims, net,
                  normalizer, started, notes)


def _train(cfg: FinetuneConfig, setup: _Setup, state: Progress, ckpt, folder: Path, log, progress) -> dict:
    """Every remaining (phase, epoch), a checkpoint after each; returns the trainable parameter names."""
    import torch

    feat, net = cfg.features, setup.net
    transform = augmentation(cfg.augment, feat.preprocess.image_size, feat.preprocess.resize)
    steps, phase_now, trainer, trainable, maps = _steps(cfg), None, None, {}, {}
    for index in range(state.done, len(steps)):
        if state.stopped:
            break
        phase, epoch = steps[index]
        if phase != phase_now:
            opt, trainable = _configure(net, cfg, phase)
            # fp16 gradients underflow without loss scaling (bf16 has fp32's range); torch scales on CPU too.
            scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "fp16")
            if ckpt is not None and ckpt["phase"] == phase:
                opt.load_state_dict(ckpt["optimizer"])
                scaler.load_state_dict(ckpt["scaler"])
            trainer, phase_now = Trainer(net, opt, scaler, cfg, setup.device, setup.precision), phase
        seed = feat.data.seed * 1000003 + index
        torch.manual_seed(seed)  # dropout and augmentation draw the same stream on a resume
        if _on_maps(trainer) and not maps:  # frozen backbones, same inputs every epoch: their maps once
            maps["fit"] = frozen_maps(net, setup.train, setup.fit_rows, cfg, setup.device, setup.precision)
            maps["val"] = frozen_maps(net, setup.train, setup.val_rows, cfg, setup.device, setup.precision)
            log(f"frozen backbones: feature maps of {len(setup.fit_rows) + len(setup.val_rows)} images computed once")
        scores = _epoch(trainer, setup, maps, transform, seed, f"{phase} {epoch}", progress)
        improved = _note_epoch(cfg, state, net, phase, epoch, scores, log)
        save_checkpoint(folder, {"model": net.state_dict(), "optimizer": trainer.opt.state_dict(),
                                  "scaler": trainer.scaler.state_dict(), "phase": phase, "epoch": epoch,
                                  "step": index, "history": state.history, "best": state.best,
                                  "stopped": state.stopped,
                                  "best_model": None if improved else state.best_state})  # None: the model itself
    if not trainable:  # resumed after the last epoch: report the final phase's parameters
        _, trainable = _configure(net, cfg, steps[-1][0])
    return trainable


def _on_maps(trainer: Trainer) -> bool:
    """Frozen backbones and no augmentation: epochs can train on feature maps computed once."""
    net = trainer.net
    frozen = not any(p.requires_grad for ext in net.extractors.values() for p in ext.parameters())
    return frozen and trainer.cfg.augment == "none"


def _epoch(trainer: Trainer, setup: _Setup, maps: dict, transform, seed: int, desc: str, progress) -> tuple:
    """One epoch's (train loss, train acc, images/s, val loss, val acc)."""
    cfg, net, train = trainer.cfg, trainer.net, setup.train
    if _on_maps(trainer):
        fitted = train_epoch_maps(trainer, maps["fit"], train.labels[setup.fit_rows], seed)
        return (*fitted, *evaluate_maps(net, maps["val"], train.labels[setup.val_rows], cfg, setup.device,
                                        setup.precision))
    fitted = train_epoch(trainer, train, setup.fit_rows, transform, seed, desc, progress)
    val_loss, val_acc, _ = evaluate_rows(net, train, setup.val_rows, cfg, setup.device, setup.precision)
    return (*fitted, val_loss, val_acc)


def _note_epoch(cfg: FinetuneConfig, state: Progress, net, phase: str, epoch: int, scores: tuple, log) -> bool:
    """Add an epoch to the curves, keep its weights if it is the new best (returned), decide on early stopping."""
    train_loss, train_acc, rate, val_loss, val_acc = scores
    for key, value in zip(state.history, (phase, epoch, train_loss, train_acc, val_loss, val_acc, rate)):
        state.history[key].append(value)
    log(f"{phase} epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}  "
        f"val loss {val_loss:.4f} acc {val_acc:.4f}  {rate:.1f} img/s")
    improved = val_loss < state.best["val_loss"]
    if improved:
        state.best = {"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch, "phase": phase}
        state.best_state = copy.deepcopy(net.state_dict())
    since_best = len(state.history["val_loss"]) - 1 - _last_index(state.history, state.best)
    state.stopped = cfg.patience is not None and phase == "finetune" and since_best >= cfg.patience
    if state.stopped:
        log(f"early stop: no better validation loss for {cfg.patience} epochs")
    return improved


def _finish(cfg: FinetuneConfig, setup: _Setup, state: Progress, trainable: dict, folder: Path) -> Path:
    """Score the best weights on the test split once and write the run folder."""
    test, net = setup.data.splits["test"], setup.net
    net.load_state_dict(state.best_state)
    _, _, proba = evaluate_rows(net, test, np.arange(len(test)), cfg, setup.device, setup.precision)
    metrics = score(_Fixed(proba), None, test.labels, setup.data.classes)
    history, best = state.history, state.best
    record = RunRecord(
        kind="finetuned", taps=[str(r) for r in setup.refs], head=cfg.head, dim=sum(setup.dims),
        classes=list(setup.data.classes),
        config={**config_dict(cfg), "trainable_parameters": {k: len(v) for k, v in trainable.items()}},
        rows={"train": len(setup.fit_rows), "val": len(setup.val_rows), "test": len(test)},
        selection={"params": {"unfreeze": cfg.unfreeze, "lr": cfg.lr, "backbone_lr_scale": cfg.backbone_lr_scale},
                   "val_accuracy": best["val_acc"], "best_epoch": best["epoch"], "best_phase": best["phase"],
                   "candidates": []},
        curves=history,
        metrics=metrics,
        timings={"fit_seconds": time.perf_counter() - setup.started, "predict_seconds": metrics["predict_seconds"],
                 "images_per_s": float(np.mean(history["images_per_s"])) if history["images_per_s"] else None},
        versions=library_versions(),
        warnings=list(setup.notes),
    )
    state = net.state_dict()
    run = save_run(cfg.runs_dir, base_label(record), record, lambda folder: save_head(folder, setup.normalizer, state))
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


