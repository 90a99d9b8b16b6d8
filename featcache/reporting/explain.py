"""Grad-CAM for any run, through the maintained ``grad-cam`` package (pytorch_grad_cam).

Flow: records -> **explain** -> page. A fine-tuned run is rebuilt from its record and
weights. A head trained on the cache is put back on its backbones: the same
extractors, pooling and fitted tap normaliser, with the head as a torch module (a torch
head as it is; logistic regression and linear SVMs as the linear map of their
decision function, which is what Grad-CAM differentiates). Each tap's feature map
passes through an identity "probe" whose activations and gradients the library hooks,
so a heatmap is made for exactly the map the head was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featcache.backbones.taps import as_grid, from_grid
from featcache.data.preprocess import resized, to_input
from featcache.errors import FeatcacheError
from featcache.extraction.config import shared_preprocess
from featcache.finetuning.config import FinetuneConfig
from featcache.finetuning.model import build_net
from featcache.finetuning.saved import load_finetuned
from featcache.fuse.fusion import TapRef
from featcache.fuse.saved import load_head
from featcache.fuse.torch_head import TorchClassifier
from featcache.runs.records import RunRecord, record_features


class _Probed(torch.nn.Module):
    """A FusedNet whose tap maps each pass through an identity module Grad-CAM can hook."""
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.probes = torch.nn.ModuleList(torch.nn.Identity() for _ in net.refs)

    def forward(self, x):
        maps = self.net.backbone_maps(x)
        # Grad-CAM needs d(score)/d(map) only, so frozen backbones stay without stored activations.
        # The probe sees every tap as an (N, C, H, W) map: a transformer's patch tokens on their grid.
        probed = {}
        for ref, probe in zip(self.net.refs, self.probes):
            layout, prefix = self.net.layouts[ref]
            raw = maps[ref].detach().float()
            grid = probe(as_grid(raw, layout, prefix).requires_grad_())
            probed[ref] = from_grid(grid, raw, layout, prefix)
        return self.net.forward_maps(probed)


def head_module(head) -> torch.nn.Module:
    """A fitted head as a torch module giving one score per class (the classes the head saw)."""

    if isinstance(head, TorchClassifier):
        return head.module_
    estimator = head
    if hasattr(estimator, "calibrated_classifiers_"):  # calibration is monotone per class: CAM its scores
        estimator = estimator.calibrated_classifiers_[0].estimator
    coef = getattr(estimator, "coef_", None) if getattr(estimator, "kernel", "linear") == "linear" else None
    if coef is None:
        raise FeatcacheError(f"Grad-CAM needs a differentiable head; this {type(estimator).__name__} "
                             f"(kernel {getattr(estimator, 'kernel', '?')}) is not")
    coef = np.asarray(coef, dtype=np.float32)
    intercept = np.asarray(estimator.intercept_, dtype=np.float32)
    if coef.shape[0] == 1:  # binary: one decision value d, scores (-d, d)
        coef, intercept = np.concatenate([-coef, coef]), np.concatenate([-intercept, intercept])
    linear = torch.nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef))
        linear.bias.copy_(torch.from_numpy(intercept))
    return linear


def run_network(run_dir: Path, record: RunRecord, device, built: dict | None = None):
    """The run as one torch model: images in, class scores out. Returns (model, class labels of its outputs).

    ``built`` carries frozen backbones from one call to the next (see :func:`featcache.finetuning.model.build_net`).
    """

    if record.finetuned:
        net, _ = load_finetuned(run_dir, record, device)
        return net, list(range(len(record.classes)))
    normalizer, head = load_head(run_dir)
    refs = [TapRef(*t.rsplit(":", 1)) for t in record.taps]
    cfg = FinetuneConfig(features=record_features(record, device.type), taps=",".join(record.taps),
                         head="linear")
    net = build_net(cfg, refs, normalizer, len(record.classes), device, built)
    net.head = head_module(head).to(device)
    return net.eval(), [int(c) for c in head.classes_]


def gradcam(run_dir: Path, record: RunRecord, images: np.ndarray, device: str = "cpu", built: dict | None = None) -> dict:
    """Grad-CAM of each tap for uint8 images (N, H, W, 3), explaining the predicted class.

    ``built``: a dict kept across calls so that frozen runs on the same backbones share them.

    Returns ``{"images": float (N, S, S, 3) in [0, 1] as the backbone sees them,
    "predicted": class indices, "heatmaps": {tap: float (N, S, S) in [0, 1]},
    "map_sizes": {tap: (h, w) of the feature map the heatmap was computed on},
    "empty": {tap: per image, True where every gradient was zero (nothing to show)}}``.
    """
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError as exc:  # grad-cam imports OpenCV, which needs libGL on some machines
        raise FeatcacheError(f"Grad-CAM unavailable: cannot import pytorch_grad_cam ({exc}); install libgl1, or "
                             f"replace opencv-python with opencv-python-headless") from None

    dev = torch.device(device)
    net, labels = run_network(Path(run_dir), record, dev, built)
    probed = _Probed(net).eval()
    pre = shared_preprocess(record_features(record), "Grad-CAM")
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    x = to_input(batch, pre)
    with torch.no_grad():
        predicted = probed(x).argmax(1).cpu().numpy()
    heatmaps, sizes, empty = {}, {}, {}
    for (backbone, tap), probe in zip(net.refs, probed.probes):
        name = f"{backbone}:{tap}"
        hook = probe.register_forward_hook(lambda m, i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
        try:
            with GradCAM(model=probed, target_layers=[probe]) as cam:
                heatmaps[name] = cam(input_tensor=x, targets=None)
        finally:
            hook.remove()
        empty[name] = [bool(np.ptp(h) < 1e-6) for h in heatmaps[name]]  # the library leaves a blank map as all zeros
    shown = resized(batch, pre).permute(0, 2, 3, 1).cpu().numpy().clip(0, 1)
    return {"images": shown, "predicted": np.asarray([labels[k] for k in predicted]), "heatmaps": heatmaps,
            "map_sizes": sizes, "empty": empty}


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap laid over the image (uint8 RGB), as the library draws it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32), heatmap, use_rgb=True, image_weight=0.5)
