"""Stage 3: the unfrozen variants, trained end to end with the frozen path's pieces.

Flow: dataset -> backbones (some blocks trainable) -> taps -> pooling -> per-tap
normalisation -> concatenation -> head -> run record. The model reuses
:func:`featcache.extract.pool` and the fitted :class:`~featcache.fusion.TapNormalizer`
(as fixed buffers), so a head from ``fuse-train`` (``--init-head RUN``) starts exactly
where the frozen experiment ended.

Training: phase 1 trains only the head (``--head-epochs``, or ``--init-head``); phase 2
applies the unfreeze policy with ``--backbone-lr-scale``. BatchNorm layers keep their
running statistics (eval mode), which is what makes batch size 1 work. Every epoch reseeds
from (seed, phase, epoch) and writes a checkpoint, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featcache.backbones import BACKBONES, BackboneSpec, build_backbone
from featcache.config import ExtractConfig, resolve_device, resolve_precision
from featcache.datasets import load_dataset
from featcache.errors import FeatcacheError
from featcache.evaluate import score, validation_split
from featcache.fusion import TapNormalizer, TapRef, parse_taps

AUGMENTS = ("none", "basic", "heavy")
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
        from featcache.errors import unknown

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


# --- unfreeze policies ------------------------------------------------------------------


def parse_policy(policy: str) -> tuple[str, int]:
    """``none``, ``last-block``, ``all`` or ``last-N`` -> (kind, N)."""
    if policy in ("none", "last-block", "all"):
        return policy, 0
    match = re.fullmatch(r"last-(\d+)", policy)
    if match and int(match.group(1)) >= 1:
        return "last-n", int(match.group(1))
    raise FeatcacheError(f"The '--unfreeze' option must be none, last-block, last-N (N >= 1) or all. Got '{policy}' instead.")


def trainable_prefixes(spec: BackboneSpec, policy: str) -> tuple[str, ...] | None:
    """Module prefixes made trainable; None means every parameter."""
    kind, n = parse_policy(policy)
    if kind == "none":
        return ()
    if kind == "all":
        return None
    if kind == "last-block":
        if not spec.last_block:
            raise FeatcacheError(f"backbone {spec.name} declares no last block: use --unfreeze last-N or all")
        return spec.last_block
    if n > len(spec.blocks):
        raise FeatcacheError(f"backbone {spec.name} declares {len(spec.blocks)} blocks; --unfreeze last-{n} asks for more")
    return spec.blocks[-n:]


def apply_unfreeze(extractor, spec: BackboneSpec, policy: str) -> list[str]:
    """Set requires_grad per the policy; return the trainable parameter names."""
    prefixes = trainable_prefixes(spec, policy)
    names = []
    for name, param in extractor.named_parameters():
        on = prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(on)
        if on:
            names.append(name)
    return names


# --- the model -------------------------------------------------------------------------


def _torch():
    import torch

    return torch


class ResBlock(_torch().nn.Module):
    """A ResNet basic block at constant width: x + BN(conv(ReLU(BN(conv(x)))))."""

    def __init__(self, channels: int):
        nn = _torch().nn
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return _torch().relu(x + self.body(x))


class TapNorm(_torch().nn.Module):
    """A fitted TapNormalizer as a layer: fixed per-tap affine (standard) or l2, then concat."""

    def __init__(self, normalizer: TapNormalizer):
        torch = _torch()
        super().__init__()
        self.method = normalizer.method
        n = len(normalizer.dims_)
        for i in range(n):
            mean = normalizer.mean_[i] if self.method == "standard" else np.zeros(normalizer.dims_[i], np.float32)
            scale = normalizer.scale_[i] if self.method == "standard" else np.ones(normalizer.dims_[i], np.float32)
            self.register_buffer(f"mean{i}", torch.from_numpy(np.asarray(mean, np.float32)))
            self.register_buffer(f"scale{i}", torch.from_numpy(np.asarray(scale, np.float32)))
        self.n = n

    def forward(self, blocks):
        torch = _torch()
        out = []
        for i, block in enumerate(blocks):
            block = block.float()
            if self.method == "standard":
                block = (block - getattr(self, f"mean{i}")) / getattr(self, f"scale{i}")
            elif self.method == "l2":
                block = torch.nn.functional.normalize(block, dim=1, eps=1e-12)
            out.append(block)
        return torch.cat(out, dim=1)


class FusedNet(_torch().nn.Module):
    """Backbones -> taps -> pooling -> per-tap normalisation -> concatenation -> head.

    With ``refine`` (the resblocks head) the single tap's feature map passes through
    residual blocks before pooling.
    """

    def __init__(self, extractors: dict, refs: list[TapRef], pooling: str, norm: TapNorm, head, refine=None):
        nn = _torch().nn
        super().__init__()
        self.extractors = nn.ModuleDict({k.replace(".", "_"): v for k, v in extractors.items()})
        self.names = list(extractors)
        self.refs = [(r.backbone, r.tap) for r in refs]
        self.pooling = pooling
        self.norm = norm
        self.head = head
        self.refine = refine

    def backbone_maps(self, x) -> dict:
        torch = _torch()
        maps = {}
        for name in self.names:
            ext = self.extractors[name.replace(".", "_")]
            frozen = not any(p.requires_grad for p in ext.parameters())
            with torch.no_grad() if frozen else torch.enable_grad():  # frozen: store no activations
                out = ext(x)
            maps.update({(name, tap): out[tap] for n, tap in self.refs if n == name})
        return maps

    def forward_maps(self, maps):
        from featcache.extract import pool

        blocks = []
        for ref in self.refs:
            fmap = maps[ref]
            if self.refine is not None:
                fmap = self.refine(fmap.float())
            blocks.append(pool(fmap, self.pooling))
        return self.head(self.norm(blocks))

    def forward(self, x):
        return self.forward_maps(self.backbone_maps(x))

    def train(self, mode: bool = True):
        """Train mode everywhere except BatchNorm in the backbones (running statistics kept)."""
        super().train(mode)
        for module in self.extractors.modules():
            if isinstance(module, _torch().nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def build_net(cfg: FinetuneConfig, refs: list[TapRef], normalizer: TapNormalizer, n_classes: int, device):
    """The untrained model (backbone weights as requested, head freshly initialised)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from featcache.heads import TorchClassifier

    feat = cfg.features
    extractors = {}
    for name in feat.backbones:
        spec = BACKBONES.lookup(name)
        nodes = [r.tap for r in refs if r.backbone == name]
        backbone = build_backbone(spec, feat.weights, feat.data.seed)
        extractors[name] = create_feature_extractor(backbone, return_nodes={n: n for n in nodes})
    refine = None
    if cfg.head == "resblocks":
        channels = BACKBONES.lookup(refs[0].backbone).tap(refs[0].tap).channels
        refine = _torch().nn.Sequential(*[ResBlock(channels) for _ in range(cfg.res_blocks)])
    dim = sum(normalizer.dims_)
    hidden = () if cfg.head == "linear" else cfg.hidden
    head = TorchClassifier(hidden=hidden, dropout=cfg.dropout)._build(dim, n_classes)
    net = FusedNet(extractors, refs, feat.pooling, TapNorm(normalizer), head, refine)
    import torch

    return net.to(device, memory_format=torch.channels_last)


# --- data ------------------------------------------------------------------------------


def augmentation(name: str, size: int, resize: str):
    """torchvision transforms v2 on uint8 CHW tensors -> uint8 (3, size, size); None for ``none``.

    Without augmentation images take exactly the extraction path (see :class:`SplitImages`).
    """
    from torchvision.transforms import v2

    if name == "none":
        return None
    if name == "basic":  # the ResNet50 + MobileNetV2 study: resize, random crop, flip
        fit = [v2.Resize((size, size), antialias=True)] if resize == "stretch" else \
            [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        return v2.Compose([*fit, v2.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
                           v2.RandomHorizontalFlip()])
    # heavy, the footwear study: rotation 20, flip, RandomResizedCrop, affine 20
    return v2.Compose([v2.RandomRotation(20), v2.RandomHorizontalFlip(), v2.RandomResizedCrop(size, antialias=True),
                       v2.RandomAffine(20)])


class SplitImages:
    """Rows of a split -> (uint8 HWC image, label), decoded in DataLoader workers.

    Without a transform an in-memory image is returned as stored (resized later on the
    device) and a file is decoded and resized by :func:`~featcache.extract.load_image`:
    the very path of extraction, so a fine-tune evaluates the pixels the cache saw.
    """

    def __init__(self, split, rows, transform, pre):
        self.split, self.rows, self.transform, self.pre = split, rows, transform, pre

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch

        from featcache.extract import load_image

        row = self.rows[i]
        label = int(self.split.labels[row])
        try:
            if self.transform is None:
                image = self.split.images[row] if self.split.images is not None else \
                    load_image(self.split.files[row], self.pre)
                return torch.from_numpy(np.ascontiguousarray(image)), label
            image = self.split.images[row] if self.split.images is not None else \
                load_image(self.split.files[row], self.pre, resize=False)
        except OSError as exc:
            raise FeatcacheError(f"cannot read image {self.split.files[row]}: {exc}") from exc
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.transform(chw).permute(1, 2, 0).contiguous(), label


def loader(split, rows, cfg: FinetuneConfig, transform, shuffle: bool, seed: int, device):
    import torch

    return torch.utils.data.DataLoader(
        SplitImages(split, rows, transform, cfg.features.preprocess), batch_size=cfg.batch_size, shuffle=shuffle,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed), drop_last=False,
    )


def normalise(images, pre):
    """uint8 NHWC on the device -> float input, channels_last (the extraction's own step)."""
    from featcache.extract import to_input

    return to_input(images, pre)


# --- phase 1 from a fuse-train run, or a statistics pass --------------------------------


def init_from_run(run_dir: Path, refs: list[TapRef], cfg: FinetuneConfig):
    """(normalizer, head state dict) of a fuse-train run whose taps and head fit this model."""
    from featcache.runs import load_head, load_record

    record = load_record(run_dir)
    if record.get("kind") != "frozen":
        raise FeatcacheError(f"--init-head {run_dir} is not a fuse-train run")
    if record["taps"] != [str(r) for r in refs]:
        raise FeatcacheError(f"--init-head {run_dir} was trained on taps {'+'.join(record['taps'])}, "
                             f"not {'+'.join(map(str, refs))}: pass the same --backbone and --taps")
    if record["config"]["tap_norm"] != cfg.tap_norm:
        raise FeatcacheError(f"--init-head {run_dir} used --tap-norm {record['config']['tap_norm']}: pass the same")
    normalizer, head = load_head(run_dir)
    return normalizer, head_state(head, record, cfg)


def head_state(head, record, cfg: FinetuneConfig) -> dict:
    """The head as an nn.Sequential state dict matching :func:`build_net`'s head."""
    import torch

    from featcache.heads import TorchClassifier

    n_classes = len(record["classes"])
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


def fit_normalizer(net, split, rows, cfg: FinetuneConfig, device) -> TapNormalizer:
    """One pass of the frozen backbones over the training rows to fit the tap normalisation."""
    import torch

    from featcache.extract import pool

    blocks = {ref: [] for ref in net.refs}
    transform = augmentation("none", cfg.features.preprocess.image_size, cfg.features.preprocess.resize)
    net.eval()
    with torch.inference_mode():
        for images, _ in loader(split, rows, cfg, transform, False, 0, device):
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


def _save_checkpoint(folder: Path, state: dict) -> None:
    import torch

    tmp = folder / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / "checkpoint.pt")  # never a half-written checkpoint


def evaluate_rows(net, split, rows, cfg, device, precision):
    """(mean loss, accuracy, probabilities) of the model on some rows, no augmentation."""
    import torch

    transform = augmentation("none", cfg.features.preprocess.image_size, cfg.features.preprocess.resize)
    net.eval()
    losses, probs = [], []
    with torch.inference_mode(), _autocast(device, precision):
        for images, labels in loader(split, rows, cfg, transform, False, 0, device):
            logits = net(normalise(images.to(device), cfg.features.preprocess)).float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item())
            probs.append(torch.softmax(logits, 1).cpu().numpy())
    proba = np.concatenate(probs)
    return sum(losses) / len(rows), float(np.mean(proba.argmax(1) == split.labels[rows])), proba


def _autocast(device, precision):
    import torch

    from featcache.extract import AUTOCAST

    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST.get(precision, "float32")),
                          enabled=precision in AUTOCAST)


def _steps(cfg: FinetuneConfig) -> list[tuple[str, int]]:
    """Every (phase, epoch) in training order: phase 1 trains the head, phase 2 fine-tunes."""
    return [("head", e) for e in range(1, cfg.head_epochs + 1)] + [("finetune", e) for e in range(1, cfg.epochs + 1)]


def _configure(net, cfg: FinetuneConfig, phase: str):
    """Freeze/unfreeze for the phase; its optimizer (head lr, backbone lr scaled) and trainable names."""
    import torch

    trainable = {}
    for name in net.names:
        policy = "none" if phase == "head" else cfg.unfreeze
        trainable[name] = apply_unfreeze(net.extractors[name.replace(".", "_")], BACKBONES.lookup(name), policy)
    head_params = list(net.head.parameters()) + (list(net.refine.parameters()) if net.refine is not None else [])
    groups = [{"params": head_params, "lr": cfg.lr}]
    backbone = [p for ext in net.extractors.values() for p in ext.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale})
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return optimizers[cfg.optimizer](groups), trainable


def finetune(cfg: FinetuneConfig, log=print, progress: bool = True) -> Path:
    """Train the model, write a run folder like fuse-train's, return it."""
    import torch

    from featcache.extract import pooled_dim
    from featcache.runs import library_versions, save_run

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
    train, test = data.splits["train"], data.splits["test"]
    fit_rows, val_rows = validation_split(train.labels, cfg.val_fraction, feat.data.seed)
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
        normalizer = fit_normalizer(net, train, fit_rows, cfg, device)
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
    best_state = ckpt["best_model"] if ckpt else copy.deepcopy(net.state_dict())
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
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
            if ckpt is not None and ckpt["phase"] == phase:
                opt.load_state_dict(ckpt["optimizer"])
                scaler.load_state_dict(ckpt["scaler"])
            phase_now = phase
        seed = feat.data.seed * 1000003 + index
        torch.manual_seed(seed)  # dropout and augmentation draw the same stream on a resume
        frozen = not any(p.requires_grad for ext in net.extractors.values() for p in ext.parameters())
        if frozen and cfg.augment == "none":
            if maps is None:  # frozen backbones, same inputs every epoch: compute their maps once
                maps = {"fit": _frozen_maps(net, train, fit_rows, cfg, device, precision),
                        "val": _frozen_maps(net, train, val_rows, cfg, device, precision)}
                log(f"frozen backbones: feature maps of {len(fit_rows) + len(val_rows)} images computed once")
            train_loss, train_acc, rate = _train_epoch_maps(net, opt, scaler, maps["fit"], train.labels[fit_rows],
                                                            cfg, seed, device, precision)
            val_loss, val_acc = _evaluate_maps(net, maps["val"], train.labels[val_rows], cfg, device, precision)
        else:
            train_loss, train_acc, rate = _train_epoch(net, opt, scaler, train, fit_rows, cfg, transform, seed,
                                                       device, precision, f"{phase} {epoch}", progress)
            val_loss, val_acc, _ = evaluate_rows(net, train, val_rows, cfg, device, precision)
        for key, value in zip(history, (phase, epoch, train_loss, train_acc, val_loss, val_acc, rate)):
            history[key].append(value)
        log(f"{phase} epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  {rate:.1f} img/s")
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch, "phase": phase}
            best_state = copy.deepcopy(net.state_dict())
        since_best = len(history["val_loss"]) - 1 - _last_index(history, best)
        stopped = cfg.patience is not None and phase == "finetune" and since_best >= cfg.patience
        _save_checkpoint(folder, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                  "scaler": scaler.state_dict(), "phase": phase, "epoch": epoch, "step": index,
                                  "history": history, "best": best, "best_model": best_state, "stopped": stopped})
        if stopped:
            log(f"early stop: no better validation loss for {cfg.patience} epochs")

    net.load_state_dict(best_state)
    _, _, proba = evaluate_rows(net, test, np.arange(len(test)), cfg, device, precision)
    metrics = score(_Fixed(proba), None, test.labels, data.classes)
    seconds = time.perf_counter() - started
    record = {
        "kind": "finetuned", "taps": [str(r) for r in refs], "head": cfg.head, "dim": sum(dims),
        "classes": list(data.classes),
        "config": {**_config_dict(cfg), "trainable_parameters": {k: len(v) for k, v in trainable.items()}},
        "caches": {},
        "rows": {"train": len(fit_rows), "val": len(val_rows), "test": len(test)},
        "selection": {"params": {"unfreeze": cfg.unfreeze, "lr": cfg.lr, "backbone_lr_scale": cfg.backbone_lr_scale},
                      "val_accuracy": best["val_acc"], "best_epoch": best["epoch"], "best_phase": best["phase"],
                      "candidates": []},
        "curves": history,
        "metrics": metrics,
        "timings": {"fit_seconds": seconds, "predict_seconds": metrics["predict_seconds"],
                    "images_per_s": float(np.mean(history["images_per_s"])) if history["images_per_s"] else None},
        "versions": library_versions(),
    }
    run = save_run(cfg.runs_dir, f"finetune-{'+'.join(map(str, refs))}-{cfg.head}-{cfg.unfreeze}", record,
                   normalizer, net.state_dict())
    shutil.rmtree(folder, ignore_errors=True)
    return run


def _frozen_maps(net, split, rows, cfg, device, precision) -> dict:
    """The frozen backbones' tap maps of ``rows`` (no augmentation), kept for every epoch."""
    import torch

    transform = augmentation("none", cfg.features.preprocess.image_size, cfg.features.preprocess.resize)
    out = {ref: [] for ref in net.refs}
    net.eval()
    with torch.no_grad(), _autocast(device, precision):  # no_grad, not inference_mode: reused in training
        for images, _ in loader(split, rows, cfg, transform, False, 0, device):
            maps = net.backbone_maps(normalise(images.to(device), cfg.features.preprocess))
            for ref in net.refs:
                out[ref].append(maps[ref].float())
    return {ref: torch.cat(v) for ref, v in out.items()}


def _train_epoch_maps(net, opt, scaler, maps, labels, cfg, seed, device, precision):
    """One epoch of head (and refinement) training on cached maps: (loss, accuracy, images/s)."""
    import torch

    net.train()
    y_all = torch.from_numpy(np.asarray(labels)).to(device)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed)).to(device)
    total, correct, tick = 0.0, 0, time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        with _autocast(device, precision):
            logits = net.forward_maps({ref: m[rows] for ref, m in maps.items()})
        loss = torch.nn.functional.cross_entropy(logits.float(), y_all[rows])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += loss.item() * len(rows)
        correct += (logits.argmax(1) == y_all[rows]).sum().item()
    return total / len(order), correct / len(order), len(order) / (time.perf_counter() - tick)


def _evaluate_maps(net, maps, labels, cfg, device, precision) -> tuple[float, float]:
    import torch

    net.eval()
    y = torch.from_numpy(np.asarray(labels)).to(device)
    with torch.no_grad(), _autocast(device, precision):
        logits = torch.cat([net.forward_maps({ref: m[i : i + cfg.batch_size] for ref, m in maps.items()}).float()
                            for i in range(0, len(y), cfg.batch_size)])
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _train_epoch(net, opt, scaler, split, rows, cfg, transform, seed, device, precision, desc, progress):
    """One epoch over ``rows`` with augmentation: (mean loss, accuracy, images/s)."""
    import torch
    from tqdm import tqdm

    net.train()
    seen, total, correct, tick = 0, 0.0, 0, time.perf_counter()
    for images, labels in tqdm(loader(split, rows, cfg, transform, True, seed, device), desc=desc, unit="batch",
                               leave=False, disable=not progress):
        x = normalise(images.to(device, non_blocking=True), cfg.features.preprocess)
        y = labels.to(device)
        with _autocast(device, precision):
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


def load_finetuned(run_dir: Path, record: dict, device):
    """Rebuild a fine-tuned run's model with its trained weights (for predict)."""
    import torch

    from featcache.runs import load_head

    cfg = finetune_config_from_record(record)
    normalizer, weights = load_head(run_dir)
    refs = [TapRef(*t.split(":", 1)) for t in record["taps"]]
    net = build_net(cfg, refs, normalizer, len(record["classes"]), device)
    net.load_state_dict(weights)
    return net.eval(), cfg


def finetune_config_from_record(record: dict) -> FinetuneConfig:
    from featcache.config import PreprocessConfig
    from featcache.datasets import DataRequest

    c = record["config"]
    feat = ExtractConfig(
        data=DataRequest(name=c["dataset"], data_dir=c["data_dir"], limit_train=c["limit_train"],
                         limit_test=c["limit_test"], test_fraction=c["test_fraction"], seed=c["seed"]),
        backbones=tuple(c["backbones"]), weights=c["weights"],
        preprocess=PreprocessConfig(image_size=c["image_size"], resize=c["resize"]), pooling=c["pooling"],
        device="cpu",
    )
    return FinetuneConfig(features=feat, taps=",".join(record["taps"]), head=c["head"], hidden=tuple(c["hidden"]),
                          dropout=c["dropout"], res_blocks=c["res_blocks"], tap_norm=c["tap_norm"],
                          unfreeze=c["unfreeze"], epochs=max(1, c["epochs"]))
