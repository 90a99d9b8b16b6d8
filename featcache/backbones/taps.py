"""Taps: a backbone cut at its declared stages, every tap pooled, in one forward pass.

Second box of the flow (data -> **backbones** -> extraction). What runs the network:
``tap_model`` (the cut, BatchNorm folded, channels_last), global pooling, the device and
precision rules (``resolve_device``, ``resolve_precision``, ``autocast``). Extraction,
fine-tuning, prediction and Grad-CAM all build their networks here.
"""

from __future__ import annotations

from pathlib import Path

from featcache.backbones.registry import BackboneSpec, build_backbone
from featcache.errors import FeatcacheError

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device, precision: str):
    """torch.autocast for a resolved precision; a no-op for fp32."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST.get(precision, "float32")),
                          enabled=precision in AUTOCAST)


def pooled_dim(channels: int, pooling: str) -> int:
    return 2 * channels if pooling == "avgmax" else channels


def pool(x, pooling: str):
    """Global pooling of an (N, C, H, W) map to (N, C) or (N, 2C) for ``avgmax``."""
    import torch

    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def tap_model(spec: BackboneSpec, weights: str, seed: int, pooling: str, device):
    """The backbone cut at its taps, returning ``{tap: pooled (N, C)}`` in one pass."""
    import torch
    from torch.fx.experimental.optimization import fuse
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = spec.tap_names
    backbone = build_backbone(spec, weights, seed)
    extractor = create_feature_extractor(backbone, return_nodes={n: n for n in nodes}).eval()
    # Fold BatchNorm into the convolutions. In place: deep-copying torchvision's
    # feature extractor puts it back into training mode, where folding is invalid.
    extractor = fuse(extractor, inplace=True)

    class TapModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extractor = extractor

        def forward(self, x):
            maps = self.extractor(x)
            return {n: pool(maps[n], pooling) for n in nodes}

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    Elsewhere (AVX2-only x86, say) bf16 autocast is emulated and slower than fp32.
    """
    import torch

    queries = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(q) for q in queries):  # torch's own answer (private API: checked, with a fallback)
        return any(q() for q in queries)
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str]:
    """The processor's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}
