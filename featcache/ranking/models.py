"""The models a ranking covers: name patterns resolved, which have weights, their size, their speed.

Inside ranking (**models** -> run): everything ``featcache rank`` asks of a model besides its features.
"""

from __future__ import annotations

import fnmatch

from featcache.backbones.discovery import timm_names, torchvision_names
from featcache.backbones.registry import BACKBONES
from featcache.errors import FeatcacheError

TIMM = "timm:"


def resolve(patterns, pretrained_only: bool = False) -> list[str]:
    """Every model name the patterns match (declared, torchvision, timm:NAME), each once, in pattern order."""
    if not patterns:
        raise FeatcacheError("featcache rank needs --backbone: names or patterns such as 'resnet*' or 'timm:convnext*'")
    every = list(dict.fromkeys([*sorted(BACKBONES), *torchvision_names()]))
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(TIMM):
            found = [n for n in timm_names() if fnmatch.fnmatchcase(n, pattern)]
        elif any(ch in pattern for ch in "*?["):
            found = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        else:
            found = [BACKBONES.lookup(pattern).name]  # a plain name: the registry names the closest if unknown
        if not found:
            from difflib import get_close_matches

            close = get_close_matches(pattern, every + timm_names(), n=3)
            raise FeatcacheError(f"--backbone {pattern!r} matches no model" + (f"; did you mean {', '.join(close)}?"
                                 if close else "") + " featcache backbones --all PATTERN lists what matches")
        out += [n for n in found if n not in out]
    if pretrained_only:
        out = [n for n in out if has_weights(n)]
        if not out:
            raise FeatcacheError(f"no model matching {', '.join(patterns)} has pretrained weights")
    return out


def has_weights(name: str) -> bool:
    """Whether the model has weights to load: timm's pretrained list, torchvision's weights enum."""
    if name.startswith(TIMM):
        import timm

        return name[len(TIMM):] in {n.split(".")[0] for n in timm.list_pretrained(name[len(TIMM):] + "*")}
    import torchvision

    try:
        return len(list(torchvision.models.get_model_weights(name))) > 0
    except (ValueError, KeyError):
        return False


def parameters(name: str) -> int | None:
    """The model's number of parameters, built on the meta device (nothing allocated), or None."""
    import torch

    try:
        with torch.device("meta"):
            model = BACKBONES.lookup(name).build(None)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # a model that cannot be built says so when it is extracted
        return None


def tap_count(name: str) -> int:
    try:
        return len(BACKBONES.lookup(name).taps)
    except Exception:  # a model that cannot be found or traced fails, recorded, when it is extracted
        return 0


def speed(cfg, name: str, batch_size: int, least_seconds: float = 0.5) -> float | None:
    """Images/s of the model's network on this device: batches of random inputs at its input size, after one
    warm-up batch. Measured apart because the extraction's pass is shared by a group of models (its time is
    theirs together) and may have been served from a cache."""
    import time

    import torch

    from featcache.backbones.taps import autocast, resolve_device, resolve_precision, tap_model
    from featcache.extraction.config import preprocess_for

    try:
        spec = BACKBONES.lookup(name)
        device = resolve_device(cfg.device)
        size = preprocess_for(cfg, spec).image_size
        model = tap_model(spec, "random", 0, cfg.pooling, device)  # the weights' values do not change its speed
        x = torch.randn(min(batch_size, 32), 3, size, size, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, resolve_precision(cfg.precision, device)):
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, batches = time.perf_counter(), 0
            while batches < 3 or (time.perf_counter() - started < least_seconds and batches < 50):
                model(x)
                batches += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        return batches * len(x) / (time.perf_counter() - started)
    except Exception:  # the model scored already; a speed it cannot give is left empty
        return None
