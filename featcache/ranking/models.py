"""The models a ranking covers: name patterns resolved, which have weights, their size, their speed.

Inside ranking (**models** -> run): everything ``featcache rank`` asks of a model besides its features.
"""

from __future__ import annotations

import fnmatch

from featcache.backbones.registry import BACKBONES
from featcache.backbones.sources import every_name, owner, sources
from featcache.errors import FeatcacheError


def resolve(patterns, pretrained_only: bool = False) -> list[str]:
    """Every model name the patterns match (declared, and every model source's: torchvision's bare names,
    timm:NAME ...), each once, in pattern order. A pattern with a source's prefix searches that source's names;
    one without searches the declared and bare names."""
    if not patterns:
        raise FeatcacheError("featcache rank needs --backbone: names or patterns such as 'resnet*' or 'timm:convnext*'")
    out: list[str] = []
    for pattern in patterns:
        prefixed = [s for s in sources() if s.prefix and pattern.startswith(s.prefix)]
        searched = [n for s in (prefixed or [s for s in sources() if not s.prefix]) for n in s.names()]
        every = list(dict.fromkeys([*([] if prefixed else sorted(BACKBONES)), *searched]))
        if any(ch in pattern for ch in "*?["):
            found = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        else:
            found = [BACKBONES.lookup(pattern).name]  # a plain name: the registry names the closest if unknown
        if not found:
            from difflib import get_close_matches

            close = get_close_matches(pattern, every + [n for n, _ in every_name()], n=3)
            raise FeatcacheError(f"--backbone {pattern!r} matches no model" + (f"; did you mean {', '.join(close)}?"
                                 if close else "") + " featcache backbones --all PATTERN lists what matches")
        out += [n for n in found if n not in out]
    if pretrained_only:
        out = [n for n in out if has_weights(n)]
        if not out:
            raise FeatcacheError(f"no model matching {', '.join(patterns)} has pretrained weights")
    return out


def has_weights(name: str) -> bool:
    """Whether the model has weights to load, from its name (its source's list: timm's pretrained tags,
    torchvision's weights enums); a declared backbone by its weights name."""
    if name in BACKBONES:
        spec = BACKBONES[name]
        return spec.weights_name is not None and owner(spec.weights_name) is not None and \
            owner(spec.weights_name).has_weights(spec.weights_name)
    source = owner(name)
    return source is not None and source.has_weights(name)


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

    from featcache.device import autocast, resolve_device, resolve_precision
    from featcache.backbones.taps import tap_model
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
