"""Where and how precisely a network runs: the one device rule and the one precision rule.

Below every stage (with errors and registry): extraction, fine-tuning, the heads, the scores, prediction and
Grad-CAM all resolve ``--device`` and ``--precision`` here, and run under :func:`autocast`.
"""

from __future__ import annotations

import os
from pathlib import Path

from featcache.errors import FeatcacheError

DEVICES = ("auto", "cpu", "cuda")  # what --device takes

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device, precision: str):
    """torch.autocast for a resolved precision; a no-op for fp32."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST.get(precision, "float32")),
                          enabled=precision in AUTOCAST)


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
