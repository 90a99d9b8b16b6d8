"""One epoch at a time: training and evaluation of the fine-tune model.

On images (with augmentation, through :mod:`featcache.data.augment`) or on feature maps that
frozen backbones computed once (:func:`frozen_maps`). Used by :mod:`featcache.finetuning.run`.
"""

from __future__ import annotations

import time

import numpy as np

from featcache.backbones.taps import autocast
from featcache.data.augment import loader, normalise


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


def train_epoch_maps(net, opt, scaler, maps, labels, cfg, seed, device, precision):
    """One epoch of head (and refinement) training on cached maps: (loss, accuracy, images/s)."""
    import torch

    net.train()
    y_all = torch.from_numpy(np.asarray(labels)).to(device)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed)).to(device)
    total, correct, tick = 0.0, 0, time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        with autocast(device, precision):
            logits = net.forward_maps({ref: m[rows] for ref, m in maps.items()})
        loss = torch.nn.functional.cross_entropy(logits.float(), y_all[rows])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
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


def train_epoch(net, opt, scaler, split, rows, cfg, transform, seed, device, precision, desc, progress):
    """One epoch over ``rows`` with augmentation: (mean loss, accuracy, images/s)."""
    import torch
    from tqdm.auto import tqdm

    net.train()
    seen, total, correct, tick = 0, 0.0, 0, time.perf_counter()
    for images, labels in tqdm(loader(split, rows, cfg, transform, True, seed, device), desc=desc, unit="batch",
                               leave=False, disable=not progress):
        x = normalise(images.to(device, non_blocking=True), cfg.features.preprocess)
        y = labels.to(device)
        with autocast(device, precision):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += len(y)
        total += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return total / seen, correct / seen, seen / (time.perf_counter() - tick)
