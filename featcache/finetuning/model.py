"""The end-to-end model of the fine-tune path, and which of its parameters train.

Flow: backbones (blocks unfrozen by policy) -> taps -> pooling -> :class:`TapNorm` ->
concatenation -> head, built from the frozen path's own pieces
(:func:`featcache.backbones.taps.pool`, a fitted :class:`~featcache.fuse.fusion.TapNormalizer`, the
head layout of :class:`~featcache.fuse.heads.TorchClassifier`). Used by
:mod:`featcache.finetuning.run`.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from featcache.backbones.registry import BACKBONES, BackboneSpec
from featcache.backbones.sources import source_of
from featcache.backbones.taps import map_extractor, pool
from featcache.backbones.weights import build_backbone
from featcache.errors import FeatcacheError
from featcache.fuse.fusion import TapNormalizer, TapRef, normalize_tap
from featcache.fuse.torch_head import TorchClassifier

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
    if prefixes is not None:
        prefixes = tuple(p for group in prefixes for p in group.split("+"))  # a discovered stage: several modules
    names = []
    for name, param in extractor.named_parameters():
        own = name.removeprefix(source_of(spec).param_prefix)  # timm's wrapper holds the model as .net
        on = prefixes is None or any(own == p or own.startswith(p + ".") for p in prefixes)
        param.requires_grad_(on)
        if on:
            names.append(name)
    return names


# --- the model -------------------------------------------------------------------------


class ResBlock(torch.nn.Module):
    """A ResNet basic block at constant width: x + BN(conv(ReLU(BN(conv(x)))))."""
    def __init__(self, channels: int):
        nn = torch.nn
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


class TapNorm(torch.nn.Module):
    """A fitted TapNormalizer as a layer: fixed per-tap affine (standard) or l2, then concat."""
    def __init__(self, normalizer: TapNormalizer):
        super().__init__()
        self.method = normalizer.method
        for i in range(len(normalizer.dims_)):
            mean = normalizer.mean_[i] if self.method == "standard" else np.zeros(normalizer.dims_[i], np.float32)
            scale = normalizer.scale_[i] if self.method == "standard" else np.ones(normalizer.dims_[i], np.float32)
            self.register_buffer(f"mean{i}", torch.from_numpy(np.asarray(mean, np.float32)))
            self.register_buffer(f"scale{i}", torch.from_numpy(np.asarray(scale, np.float32)))

    def forward(self, blocks):
        return torch.cat([normalize_tap(block.float(), self.method, getattr(self, f"mean{i}"), getattr(self, f"scale{i}"))
                          for i, block in enumerate(blocks)], dim=1)


class FusedNet(torch.nn.Module):
    """Backbones -> taps -> pooling -> per-tap normalisation -> concatenation -> head.

    With ``refine`` (the resblocks head) the single tap's feature map passes through
    residual blocks before pooling.
    """

    def __init__(self, extractors: dict, refs: list[TapRef], pooling: str, norm: TapNorm, head, refine=None):
        super().__init__()
        self.extractors = torch.nn.ModuleDict({_key(k): v for k, v in extractors.items()})
        self.names = list(extractors)
        self.refs = [(r.backbone, r.tap) for r in refs]
        self.layouts = {}
        for r in refs:  # how each tap's output is laid out: maps (nchw / nhwc) or tokens
            spec = BACKBONES.lookup(r.backbone)
            self.layouts[(r.backbone, r.tap)] = (spec.tap(r.tap).layout, spec.prefix_tokens)
        self.pooling = pooling
        self.norm = norm
        self.head = head
        self.refine = refine

    def extractor(self, name: str):
        """The feature extractor of backbone ``name``."""
        return self.extractors[_key(name)]

    def backbone_maps(self, x) -> dict:
        maps = {}
        for name in self.names:
            ext = self.extractor(name)
            frozen = not any(p.requires_grad for p in ext.parameters())
            with torch.no_grad() if frozen else torch.enable_grad():  # frozen: store no activations
                out = ext(x)
            maps.update({(name, tap): out[tap] for n, tap in self.refs if n == name})
        return maps

    def forward_maps(self, maps):

        blocks = []
        for ref in self.refs:
            fmap = maps[ref]
            if self.refine is not None:
                fmap = self.refine(fmap.float())
            blocks.append(pool(fmap, self.pooling, *self.layouts[ref]))
        return self.head(self.norm(blocks))

    def forward(self, x):
        return self.forward_maps(self.backbone_maps(x))

    def train(self, mode: bool = True):
        """Train mode everywhere except BatchNorm in the backbones (running statistics kept)."""
        super().train(mode)
        for module in self.extractors.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot hold dots


def build_net(cfg, refs: list[TapRef], normalizer: TapNormalizer, n_classes: int, device, built: dict | None = None):
    """The untrained model (backbone weights as requested, head freshly initialised).

    Only backbones with a chosen tap are built. ``built`` (optional) keeps the extractors made
    here, returning every tap, for the next call with the same backbone and weights: a report
    explaining many frozen runs builds each backbone once. Not for backbones that will train.
    """
    feat = cfg.features
    extractors = {}
    for name in feat.backbones:
        nodes = tuple(r.tap for r in refs if r.backbone == name)
        if not nodes:  # given with --backbone, but none of its taps chosen: it would run for nothing
            continue
        key = (name, str(feat.weights), feat.data.seed, str(device))
        if built is not None and key in built:
            extractors[name] = built[key]
            continue
        spec = BACKBONES.lookup(name)
        if built is not None:  # every tap, so that runs with other taps share it too
            nodes = spec.tap_names
        extractors[name] = map_extractor(spec, build_backbone(spec, feat.weights, feat.data.seed), nodes)
        if built is not None:
            built[key] = extractors[name]  # moved to the device with the net below (Module.to works in place)
    refine = None
    if cfg.head == "resblocks":
        channels = BACKBONES.lookup(refs[0].backbone).tap(refs[0].tap).channels
        refine = torch.nn.Sequential(*[ResBlock(channels) for _ in range(cfg.res_blocks)])
    dim = sum(normalizer.dims_)
    hidden = () if cfg.head == "linear" else cfg.hidden
    head = TorchClassifier(hidden=hidden, dropout=cfg.dropout).build_module(dim, n_classes)
    net = FusedNet(extractors, refs, feat.pooling, TapNorm(normalizer), head, refine)
    return net.to(device, memory_format=torch.channels_last)
