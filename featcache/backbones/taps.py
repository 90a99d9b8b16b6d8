"""Taps: a backbone cut at its declared stages, every tap pooled, in one forward pass.

Stage 2 (data -> **backbones** -> extraction). What runs the network:
``tap_model`` (the cut, BatchNorm folded, channels_last) and global pooling; the device and precision rules
are :mod:`featcache.device`'s. Extraction, fine-tuning, prediction and Grad-CAM all build their networks here.
"""

from __future__ import annotations


from featcache.backbones.registry import BackboneSpec
from featcache.backbones.sources import source_of
from featcache.backbones.spec import FLAT
from featcache.backbones.weights import build_backbone

def pool(x, pooling: str, layout: str = "nchw", prefix: int = 0):
    """Global pooling of one tap to (N, C), or (N, 2C) for ``avgmax`` and ``cls+avg``.

    ``nchw`` / ``nhwc`` maps pool over space; ``tokens`` (N, T, D) pool over the patch tokens (the ``prefix``
    class and register tokens left out), ``cls`` takes the class token (the first of the ``prefix`` tokens),
    and ``cls+avg`` the class token beside the patch tokens' mean (dinov2's linear protocol's last block).
    """
    if layout in FLAT:  # the classifier's output, an image embedding, an output kept whole: nothing to pool
        return x.flatten(1)
    import torch

    if layout == "tokens":
        if pooling == "cls":
            return x[:, 0]
        if pooling == "cls+avg":
            return torch.cat([x[:, 0], x[:, prefix:].mean(dim=1)], dim=1)
        x, dims = x[:, prefix:], (1,)
    elif layout == "nhwc":
        dims = (1, 2)
    else:
        dims = (2, 3)
    if pooling == "avg":
        return x.mean(dim=dims)
    if pooling == "max":
        return x.amax(dim=dims)
    return torch.cat([x.mean(dim=dims), x.amax(dim=dims)], dim=1)


def as_grid(x, layout: str, prefix: int = 0):
    """A tap's raw output as an (N, C, H, W) map: Grad-CAM's view (tokens: the patch grid)."""
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "tokens":
        patches = x[:, prefix:]
        side = int(patches.shape[1] ** 0.5)
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    return x


def from_grid(grid, raw, layout: str, prefix: int = 0):
    """:func:`as_grid` undone: the map back in the tap's own layout (prefix tokens taken from ``raw``)."""
    import torch

    if layout == "nhwc":
        return grid.permute(0, 2, 3, 1)
    if layout == "tokens":
        return torch.cat([raw[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)
    return grid


def map_extractor(spec: BackboneSpec, backbone, taps):
    """A module returning ``{tap: raw output}`` of ``backbone`` for the named taps, in one pass: its model
    source's cut (torchvision's ``create_feature_extractor`` at each tap's graph node, timm's own
    ``forward_intermediates``), plus each ``--module`` tap (:mod:`featcache.backbones.modules`). Parameter names
    are the network's own behind the source's ``param_prefix`` (what ``--unfreeze`` prefixes name)."""
    from featcache.backbones.modules import hooked_extractor

    return hooked_extractor(spec, backbone, taps)


def tap_model(spec: BackboneSpec, weights: str, seed: int, pooling: str, device):
    """The backbone cut at its taps, returning ``{tap: pooled (N, C)}`` in one pass."""
    import torch
    from torch.fx.experimental.optimization import fuse

    taps = spec.taps
    extractor = map_extractor(spec, build_backbone(spec, weights, seed), spec.tap_names)
    if source_of(spec).fold_batchnorm:
        # Fold BatchNorm into the convolutions. In place: deep-copying torchvision's
        # feature extractor puts it back into training mode, where folding is invalid.
        extractor = fuse(extractor, inplace=True)

    class TapModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extractor = extractor

        def forward(self, x):
            maps = self.extractor(x)
            return {t.node: pool(maps[t.node], t.pooling or pooling, t.layout, spec.prefix_tokens) for t in taps}

    return TapModel().eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
