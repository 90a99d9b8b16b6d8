"""Runs read back into the fine-tune: a fuse-train run as phase 1's start, a fine-tuned run rebuilt.

Inside finetuning (records -> **saved** -> model). ``--init-head RUN`` takes a frozen run's
normaliser and head; predict and Grad-CAM rebuild a fine-tuned model from its folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.finetuning.config import FinetuneConfig, finetune_config_from_record
from featcache.finetuning.model import build_net
from featcache.fuse.fusion import TapRef
from featcache.fuse.saved import load_head
from featcache.fuse.torch_head import TorchClassifier
from featcache.runs.predict import register_predictor
from featcache.runs.records import RunRecord, load_record


def init_from_run(run_dir: Path, refs: list[TapRef], cfg: FinetuneConfig):
    """(normalizer, head state dict, class names) of a fuse-train run whose taps and head fit this model."""
    record = load_record(run_dir)
    if record.finetuned:
        raise FeatcacheError(f"--init-head {run_dir} is not a fuse-train run")
    if record.taps != [str(r) for r in refs]:
        raise FeatcacheError(f"--init-head {run_dir} was trained on taps {'+'.join(record.taps)}, "
                             f"not {'+'.join(map(str, refs))}: pass the same --backbone and --taps")
    if record.config["tap_norm"] != cfg.tap_norm:
        raise FeatcacheError(f"--init-head {run_dir} used --tap-norm {record.config['tap_norm']}: pass the same")
    normalizer, head = load_head(run_dir)
    return normalizer, head_state(head, record, cfg), record.classes


def head_state(head, record, cfg: FinetuneConfig) -> dict:
    """The head as an nn.Sequential state dict matching :func:`build_net`'s head."""
    import torch

    n_classes = len(record["classes"])  # a RunRecord, or the same keys in a dict
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


def load_finetuned(run_dir: Path, record: RunRecord, device):
    """Rebuild a fine-tuned run's model with its trained weights (for predict)."""

    cfg = finetune_config_from_record(record)
    normalizer, weights = load_head(run_dir)
    refs = [TapRef(*t.rsplit(":", 1)) for t in record.taps]
    net = build_net(cfg, refs, normalizer, len(record.classes), device)
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors: not this run's model
        raise FeatcacheError(f"{Path(run_dir) / 'model.safetensors'} does not hold this run's model "
                             f"({str(exc).splitlines()[0][:100]}): train the run again, or ask for the folder "
                             f"again") from None
    return net.eval(), cfg


@register_predictor("finetuned")
def finetuned_proba(run_dir: Path, record: RunRecord, files: list[Path], device: str, batch_size: int):
    """(probabilities, class names) of a fine-tuned run on ``files``: its model rebuilt, fed as it was trained."""
    import torch

    from featcache.device import resolve_device
    from featcache.data.images import load_image
    from featcache.data.preprocess import to_input
    from featcache.extraction.config import shared_preprocess

    dev = resolve_device(device)
    net, cfg = load_finetuned(run_dir, record, dev)
    pre = shared_preprocess(cfg.features, "fine-tuning")
    images = [load_image(file, pre) for file in files]  # an unreadable file is one line naming it
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size])).to(dev)
            out.append(torch.softmax(net(to_input(batch, pre)).float(), 1).cpu().numpy())
    return np.concatenate(out), list(record.classes)
