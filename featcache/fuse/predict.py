"""A frozen run's predictions on new image files: its backbones as extracted, its taps fused, its head.

Inside fuse (saved -> **predict**), registered as the ``frozen`` run kind of
:mod:`featcache.runs.predict`. Features are rounded to the cache's storage dtype, as they were
for training; only the backbones the run's taps read are built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.device import resolve_device
from featcache.backbones.taps import tap_model
from featcache.data.images import load_image
from featcache.data.preprocess import to_input
from featcache.extraction.config import ExtractConfig, preprocess_for
from featcache.fuse.saved import load_head
from featcache.runs.predict import register_predictor


@register_predictor("frozen")
def frozen_proba(run_dir: Path, record, files: list[Path], device: str, batch_size: int):
    """(probabilities, class names of their columns) of a fuse-train run on ``files``."""
    import torch

    cfg = record.config
    feat = ExtractConfig.from_record(cfg)
    dev = resolve_device(device)
    normalizer, head = load_head(run_dir)
    refs = [tuple(t.rsplit(":", 1)) for t in record.taps]
    storage = np.float16 if cfg["dtype"] == "float16" else np.float32
    pooled: dict[tuple[str, str], list[np.ndarray]] = {ref: [] for ref in refs}
    decoded: dict = {}  # one decode per distinct preprocessing
    for backbone in dict.fromkeys(b for b, _ in refs):
        spec = feat.spec(backbone)
        pre = preprocess_for(feat, spec)
        if pre not in decoded:
            decoded[pre] = [load_image(file, pre) for file in files]
        images = decoded[pre]
        model = tap_model(spec, cfg["weights"], cfg["seed"], cfg["pooling"], dev)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.stack(images[start : start + batch_size])).to(dev)
                out = model(to_input(batch, pre))
                for b, tap in refs:
                    if b == backbone:
                        pooled[(b, tap)].append(as_stored(out[tap].float().cpu().numpy(), storage))
    X = normalizer.transform([np.concatenate(pooled[ref]) for ref in refs])
    return head.predict_proba(X), [record.classes[int(k)] for k in head.classes_]


def as_stored(values: np.ndarray, storage) -> np.ndarray:
    """``values`` rounded as the cache stores them: float16 after a power-of-two scale where they lie outside its
    range (the same significant bits whatever power of two the cache chose), float32 as they are."""
    from featcache.extraction.store import storage_scale

    if storage != np.float16:
        return values.astype(storage)
    scale = storage_scale(float(np.abs(values).max()) if values.size else 0.0)
    return values.astype(np.float16) if scale == 1.0 else (values * scale).astype(np.float16).astype(np.float32) / scale
