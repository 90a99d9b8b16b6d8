"""Taps: a backbone cut at its declared stages, every tap pooled, in one forward pass.

Stage 2 (data -> **backbones** -> extraction). What runs the network:
``tap_model`` (the cut, BatchNorm folded, channels_last), global pooling, the device and
precision rules (``resolve_device``, ``resolve_precision``, ``autocast``). Extraction,
fine-tuning, prediction and Grad-CAM all build their networks here.
"""

from __future__ import annotations

import os
from pathlib import Path

from featcache.backbones.registry import BackboneSpec
from featcache.backbones.sources import source_of
from featcache.backbones.weights import build_backbone
from featcache.errors import FeatcacheError

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device, precision: str):
    """torch.autocast for a resolved precision; a no-op for fp32."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST.get(precision, "float32")),
                          enabled=precision in AUTOCAST)


def pool(x, pooling: str, layout: str = "nchw", prefix: int = 0):
    """Global pooling of one tap to (N, C), or (N, 2C) for ``avgmax``.

    ``nchw`` / ``nhwc`` maps pool over space; ``tokens`` (N, T, D) pool over the patch tokens, and
    ``cls`` takes the class token (the first of the ``prefix`` tokens).
    """
    if layout == "logits":  # the classifier's output: nothing to pool
        return x
    import torch

    if layout == "tokens":
        if pooling == "cls":
            return x[:, 0]
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
    ``forward_intermediates``). Parameter names are the network's own behind the source's
    ``param_prefix`` (what ``--unfreeze`` prefixes name)."""
    return source_of(spec).extractor(spec, backbone, taps)


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
            return {t.node: pool(maps[t.node], pooling, t.layout, spec.prefix_tokens) for t in taps}

    return TapModel().eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def compiled(model):
    """``torch.compile`` with weights frozen into the graph (pays off on large datasets)."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold weights into the compiled graph
    return torch.compile(model, dynamic=False)


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> bf16 (or fp16) autocast on a GPU; on a CPU bf16 where it multiplies bf16 natively, else fp32.

    One rule for extraction, fine-tuning and everything else that runs a network.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def emulated(precision: str, device) -> str | None:
    """A warning when a forced half precision runs emulated (a CPU without native bf16, or fp16 on any CPU),
    with what it was measured to cost; None where the precision is native or was chosen by ``auto``."""
    if device.type != "cpu" or precision not in ("bf16", "fp16") or (precision == "bf16" and cpu_has_native_bf16()):
        return None
    return (f"warning: --precision {precision} is emulated on this CPU (no native {precision} arithmetic): resnet50 "
            f"ran 4x slower than fp32 so (benchmarks/RESULTS.md); --precision auto picks fp32 here")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    Elsewhere (AVX2-only x86, say) bf16 autocast is emulated and slower than fp32. oneDNN's ISA cap
    (``ONEDNN_MAX_CPU_ISA=AVX2``, used on shared machines and to mimic older CPUs) counts: capped below
    its bf16 kernels, oneDNN emulates bf16 (4x slower than fp32 for resnet50 on a Zen 4 capped at AVX2).
    """
    import torch

    if onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    queries = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(q) for q in queries):  # torch's own answer (private API: checked, with a fallback)
        return any(q() for q in queries)
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


# oneDNN's ISA names below AVX512_CORE_BF16: capped at one of these, bf16 convolutions are emulated.
ONEDNN_ISAS_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}


def onednn_isa_cap() -> str:
    """The ISA oneDNN is capped at (``ONEDNN_MAX_CPU_ISA``, or its old name ``DNNL_MAX_CPU_ISA``), lower case; '' if none."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()


def cpu_flags() -> set[str]:
    """The processor's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}
