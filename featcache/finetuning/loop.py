"""One epoch at a time: training and evaluation of the fine-tune model.

On images (with augmentation, through :mod:`featcache.data.augment`) or on feature maps that
frozen backbones computed once (:func:`frozen_maps`). Used by :mod:`featcache.finetuning.run`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featcache.device import autocast
from featcache.backbones.taps import pool
from featcache.data.augment import loader, normalise
from featcache.fuse.fusion import TapNormalizer


def evaluate_rows(net, split, rows, cfg, device, precision):
    """(mean loss, accuracy, probabilities) of the model on some rows, no augmentation."""
    import torch

    net.eval()
    losses, probs = [], []
    with torch.inference_mode(), autocast(device, precision):
        for images, labels in loader(split, rows, cfg, None, False, 0, device):  # no augmentation
            logits = net(normalise(images.to(device), cfg.features.preprocess)).float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item())
            probs.append(torch.softmax(logits, 1).cpu().numpy())
    proba = np.concatenate(probs)
    return sum(losses) / len(rows), float(np.mean(proba.argmax(1) == split.labels[rows])), proba


def frozen_maps(net, split, rows, cfg, device, precision) -> dict:
    """The frozen backbones' tap maps of ``rows`` (no augmentation), kept for every epoch."""
    import torch

    out = {ref: [] for ref in net.refs}
    net.eval()
    with torch.no_grad(), autocast(device, precision):  # no_grad, not inference_mode: reused in training
        for images, _ in loader(split, rows, cfg, None, False, 0, device):  # no augmentation
            maps = net.backbone_maps(normalise(images.to(device), cfg.features.preprocess))
            for ref in net.refs:
                out[ref].append(maps[ref].float())
    return {ref: torch.cat(v) for ref, v in out.items()}


@dataclass(frozen=True)
class Trainer:
    """What a training epoch needs besides its data: the model, its optimizer and loss scaler, how to run."""

    net: object
    opt: object
    scaler: object  # torch.amp.GradScaler (enabled for fp16)
    cfg: object  # FinetuneConfig
    device: object
    precision: str

    def step(self, logits, y):
        """One optimisation step on a batch's logits; returns the batch's loss tensor."""
        import torch

        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss


def train_epoch_maps(trainer: Trainer, maps, labels, seed):
    """One epoch of head (and refinement) training on cached maps: (loss, accuracy, images/s)."""
    import torch

    net, cfg, device, precision = trainer.net, trainer.cfg, trainer.device, trainer.precision
    net.train()
    y_all = torch.from_numpy(np.asarray(labels)).to(device)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed)).to(device)
    total, correct, tick = 0.0, 0, time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        with autocast(device, precision):
            logits = net.forward_maps({ref: m[rows] for ref, m in maps.items()})
        loss = trainer.step(logits, y_all[rows])
        total += loss.item() * len(rows)
        correct += (logits.argmax(1) == y_all[rows]).sum().item()
    return total / len(order), correct / len(order), len(order) / (time.perf_counter() - tick)


def evaluate_maps(net, maps, labels, cfg, device, precision) -> tuple[float, float]:
    import torch

    net.eval()
    y = torch.from_numpy(np.asarray(labels)).to(device)
    with torch.no_grad(), autocast(device, precision):
        logits = torch.cat([net.forward_maps({ref: m[i : i + cfg.batch_size] for ref, m in maps.items()}).float()
                            for i in range(0, len(y), cfg.batch_size)])
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_epoch(trainer: Trainer, split, rows, transform, seed, desc, progress):
    """One epoch over ``rows`` with augmentation: (mean loss, accuracy, images/s)."""
    from tqdm.auto import tqdm

    net, cfg, device, precision = trainer.net, trainer.cfg, trainer.device, trainer.precision
    net.train()
    seen, total, correct, tick = 0, 0.0, 0, time.perf_counter()
    for images, labels in tqdm(loader(split, rows, cfg, transform, True, seed, device), desc=desc, unit="batch",
                               leave=False, disable=not progress):
        x = normalise(images.to(device, non_blocking=True), cfg.features.preprocess)
        y = labels.to(device)
        with autocast(device, precision):
            logits = net(x)
        loss = trainer.step(logits, y)
        seen += len(y)
        total += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return total / seen, correct / seen, seen / (time.perf_counter() - tick)


def fit_normalizer_on_images(net, split, rows, cfg, device) -> TapNormalizer:
    """One pass of the frozen backbones over the training rows to fit the tap normalisation."""
    import torch

    blocks = {ref: [] for ref in net.refs}
    net.eval()
    with torch.inference_mode():
        for images, _ in loader(split, rows, cfg, None, False, 0, device):  # no augmentation
            maps = net.backbone_maps(normalise(images.to(device), cfg.features.preprocess))
            for ref in net.refs:
                blocks[ref].append(pool(maps[ref], cfg.features.pooling, *net.layouts[ref]).float().cpu().numpy())
    return TapNormalizer(cfg.tap_norm).fit([np.concatenate(blocks[r]) for r in net.refs])
