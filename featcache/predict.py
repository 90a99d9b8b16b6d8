"""Classify new image files with a run: its backbones, preprocessing, tap fusion and head.

Flow: image files -> backbones (as extracted) -> fusion (the run's fitted normaliser) ->
head. Features are rounded to the cache's storage dtype, as they were for training. A
fine-tuned run is rebuilt from its record and ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.backbones.registry import BACKBONES
from featcache.backbones.taps import resolve_device, tap_model
from featcache.data.images import load_image
from featcache.data.preprocess import to_input
from featcache.extraction.config import preprocess_for, shared_preprocess
from featcache.finetuning.saved import load_finetuned
from featcache.records import load_record, record_features
from featcache.run_files import load_head


def predict_files(run_dir: Path, files: list[Path], device: str = "auto", batch_size: int = 32):
    """[(file, label, probability)] for each image file."""
    import torch

    record = load_record(run_dir)
    cfg = record.config
    feat = record_features(record)
    dev = resolve_device(device)
    if record.finetuned:
        pre = shared_preprocess(feat, "fine-tuning")
        images = [load_image(file, pre) for file in files]  # an unreadable file is one line naming it
        proba = _finetuned_proba(run_dir, record, images, pre, dev, batch_size)
        classes = record.classes
        return [(f, classes[int(k)], float(proba[i, k])) for i, (f, k) in enumerate(zip(files, proba.argmax(1)))]
    normalizer, head = load_head(run_dir)
    refs = [tuple(t.rsplit(":", 1)) for t in record.taps]
    storage = np.float16 if cfg["dtype"] == "float16" else np.float32
    pooled: dict[tuple[str, str], list[np.ndarray]] = {ref: [] for ref in refs}
    decoded: dict = {}  # one decode per distinct preprocessing
    for backbone in dict.fromkeys(b for b, _ in refs):
        spec = BACKBONES.lookup(backbone)
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
                        pooled[(b, tap)].append(out[tap].float().cpu().numpy().astype(storage))
    X = normalizer.transform([np.concatenate(pooled[ref]) for ref in refs])
    proba = head.predict_proba(X)
    classes = record.classes
    best = proba.argmax(axis=1)
    return [(f, classes[int(head.classes_[k])], float(proba[i, k])) for i, (f, k) in enumerate(zip(files, best))]


def _finetuned_proba(run_dir, record, images, pre, device, batch_size) -> np.ndarray:
    import torch

    net, _ = load_finetuned(run_dir, record, device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size])).to(device)
            out.append(torch.softmax(net(to_input(batch, pre)).float(), 1).cpu().numpy())
    return np.concatenate(out)
