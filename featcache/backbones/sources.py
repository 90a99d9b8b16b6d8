"""Model sources: the one place a backbone's library (torchvision or timm) is asked anything.

Stage 2, below weights, taps and discovery (spec -> **sources** -> weights / taps / discovery).
A spec's ``source`` names its entry in ``MODEL_SOURCES``: ``declared`` and ``torchvision`` share
torchvision's (the declared four are torchvision models whose taps are written by hand), ``timm``
is timm's. An entry answers everything that differs between the libraries: which pretrained
weights a model has, what a weights name means, how those weights are identified (for the
fingerprint) and fed (the preprocessing defaults), where a download is kept, how the network is
cut at its taps, whether BatchNorm may be folded, and the prefix its parameters carry inside the
cut. Adding a library is one class and one entry.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from featcache.backbones.spec import LOGITS, BackboneSpec, Tap
from featcache.errors import FeatcacheError
from featcache.registry import Registry


def no_such_weights(spec: BackboneSpec, weights: str, known: list[str]) -> FeatcacheError:
    listed = ", ".join(known) if known else "none"
    return FeatcacheError(f"--weights {weights}: {spec.name} has no such weights (its pretrained weights: {listed}); "
                          f"or use imagenet, random or the path of a state-dict file")


class TorchvisionSource:
    """torchvision's models: weights enums, ``create_feature_extractor`` at each tap's graph node."""

    param_prefix = ""  # the cut's parameter names are the network's own
    fold_batchnorm = True

    def builder(self, name: str):
        """``build(weights)``: the model ``name`` with a weights enum member, or None for random weights."""

        def build(weights):
            import torchvision

            return torchvision.models.get_model(name, weights=weights)

        return build

    def tags(self, spec: BackboneSpec) -> list[str]:
        if spec.weights_name is None:
            return []
        import torchvision

        return [w.name for w in torchvision.models.get_model_weights(spec.weights_name)]

    def named(self, spec: BackboneSpec, weights: str):
        """The weights enum member ``weights`` (``imagenet``: the default) names."""
        if spec.weights_name is None:
            raise FeatcacheError(f"backbone {spec.name} has no imagenet weights: use --weights random or --weights PATH")
        import torchvision

        enum = torchvision.models.get_model_weights(spec.weights_name)
        if weights == "imagenet":
            return enum.DEFAULT
        try:
            return enum[weights]
        except KeyError:
            raise no_such_weights(spec, weights, [w.name for w in enum]) from None

    def identity(self, spec: BackboneSpec, w, kind: str) -> dict:
        return {"kind": kind, "id": str(w), "url": w.url}

    def input_defaults(self, spec: BackboneSpec, w) -> dict:
        import torchvision

        t = (w or torchvision.models.get_model_weights(spec.weights_name).DEFAULT).transforms()
        mode = getattr(t.interpolation, "value", str(t.interpolation))
        return {"image_size": t.crop_size[0], "mean": tuple(t.mean), "std": tuple(t.std),
                "interpolation": mode if mode in ("bilinear", "bicubic") else "bilinear",
                "crop_pct": round(t.crop_size[0] / t.resize_size[0], 4)}

    def where(self, spec: BackboneSpec, w) -> str:
        import torch

        return f" at {Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(w.url)}"

    @staticmethod
    def classifier_output(model) -> str | None:
        """The graph node that gives the model's output (``create_feature_extractor``'s name for it)."""
        from torchvision.models.feature_extraction import NodePathTracer

        tracer = NodePathTracer()
        graph = tracer.trace(model)
        [output] = [n for n in graph.nodes if n.op == "output"]
        node = output.args[0]
        return tracer.node_to_qualname.get(node) if hasattr(node, "op") else None

    def extractor(self, spec: BackboneSpec, backbone, taps):
        from torchvision.models.feature_extraction import create_feature_extractor

        return create_feature_extractor(backbone, return_nodes={spec.tap(t).graph_node: t for t in taps}).eval()


class TimmSource:
    """timm's models: pretrained tags, ``forward_intermediates`` (wrapped, so parameters carry ``net.``)."""

    param_prefix = "net."
    fold_batchnorm = False

    def builder(self, name: str):
        """``build(tag)``: the model ``name`` with the pretrained tag's weights, or None for random weights."""

        def build(tag):
            import timm

            return timm.create_model(name if tag is None else f"{name}.{tag}", pretrained=tag is not None)

        return build

    def tags(self, spec: BackboneSpec) -> list[str]:
        import timm

        return [n.split(".", 1)[1] for n in timm.list_pretrained(spec.weights_name + ".*")]

    def named(self, spec: BackboneSpec, weights: str):
        """The timm tag ``weights`` (``imagenet``: the model's default pretrained tag) names."""
        import timm

        known = self.tags(spec)
        tag = timm.models.get_pretrained_cfg(spec.weights_name).tag if weights == "imagenet" else weights
        if weights == "imagenet" and not known:
            tag = None
        if tag not in known:
            raise no_such_weights(spec, weights, known)
        return tag

    def identity(self, spec: BackboneSpec, w, kind: str) -> dict:
        cfg = self._cfg(spec, w)
        return {"kind": kind, "id": f"timm/{spec.weights_name}.{w}", "hub": cfg.get("hf_hub_id") or cfg.get("url")}

    def input_defaults(self, spec: BackboneSpec, w) -> dict:
        return timm_input(self._cfg(spec, w))

    def where(self, spec: BackboneSpec, w) -> str:
        return " in the Hugging Face cache"

    @staticmethod
    def classifier_output(model) -> str | None:
        """timm's head (``forward_head``), where the model was built with one (``num_classes`` > 0)."""
        return "forward_head" if getattr(model, "num_classes", 0) else None

    def extractor(self, spec: BackboneSpec, backbone, taps):
        return _timm_taps_class()(spec, backbone, taps)

    @staticmethod
    def _cfg(spec: BackboneSpec, tag: str | None) -> dict:
        import timm

        name = spec.weights_name if tag is None else f"{spec.weights_name}.{tag}"
        return timm.models.get_pretrained_cfg(name).to_dict()


def on_meta(build):
    """The network with random weights on the meta device (no memory, no time). Where its construction computes
    with real numbers (RegNet's widths), it is built on the CPU with each parameter moved to the meta device as it
    is registered, so the initialisation that follows costs nothing (regnet_y_128gf: 0.3 s against 21 s)."""
    import torch

    try:
        with torch.device("meta"):
            return build(None).eval()
    except (NotImplementedError, RuntimeError):
        pass
    register = torch.nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = to_meta
    try:
        return build(None).eval().to("meta")
    except (NotImplementedError, RuntimeError):  # its construction reads a parameter's values: built for real
        pass
    finally:
        torch.nn.Module.register_parameter = register
    return build(None).eval().to("meta")



def with_logits(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` with its source classifier's output as one more tap, ``logits`` (``--logits``: what LEEP and NCE
    read); one line where the model has none."""
    import dataclasses

    if any(t.layout == "logits" for t in spec.taps):
        return spec
    key = (spec.source, spec.name)
    if key not in _LOGITS_TAPS:  # a meta-device build and pass: once per model and process
        _LOGITS_TAPS[key] = _logits_tap(spec)
    return dataclasses.replace(spec, taps=(*spec.taps, _LOGITS_TAPS[key]))


_LOGITS_TAPS: dict = {}


def _logits_tap(spec: BackboneSpec) -> Tap:
    import torch

    model = on_meta(spec.build)
    size = spec.input.image_size if spec.input is not None else 224
    where = source_of(spec).classifier_output(model)
    try:
        with torch.no_grad():
            out = model(torch.empty(1, 3, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - any failure of the meta pass: the model cannot be asked
        raise FeatcacheError(f"{spec.name}: cannot find its source classifier's output ({type(exc).__name__}); "
                             f"LEEP and NCE need one: drop --logits and those scores") from exc
    if where is None or getattr(out, "ndim", 0) != 2 or out.shape[1] < 2:
        raise FeatcacheError(f"{spec.name} has no source classifier (its output is not one score per source class): "
                             f"LEEP and NCE need one; drop --logits and those scores, or use a classification model")
    return Tap(LOGITS, int(out.shape[1]), spec.taps[-1].stride, module=where, layout="logits")


def timm_input(cfg: dict) -> dict:
    """A timm pretrained config's preprocessing, in featcache's terms."""
    mode = cfg.get("interpolation")
    return {"image_size": cfg.get("input_size", (3, 224, 224))[-1], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "interpolation": mode if mode in ("bilinear", "bicubic") else "bicubic",
            "crop_pct": float(cfg.get("crop_pct", 0.875))}


@functools.lru_cache(maxsize=1)
def _timm_taps_class():
    import torch

    class TimmTaps(torch.nn.Module):
        """timm's ``forward_intermediates`` as ``{tap: output}``; a transformer's tokens come back (N, T, D)."""

        def __init__(self, spec, net, taps):
            super().__init__()
            self.net = net
            self.logits = LOGITS in taps  # the classifier's output too: the whole network runs, then its head
            self.names = tuple(t for t in taps if t != LOGITS)
            self.indices = [spec.tap_names.index(spec.tap(t).node) for t in self.names]
            self.tokens = spec.taps[0].layout == "tokens"
            self.prefix = spec.prefix_tokens

        def forward(self, x):
            extra = {"return_prefix_tokens": True} if self.tokens and self.prefix else {}
            order = sorted(set(self.indices))
            result = {}
            if self.logits:
                final, outs = self.net.forward_intermediates(x, indices=order, intermediates_only=False,
                                                            stop_early=False, **extra)
                result[LOGITS] = self.net.forward_head(final)
            else:
                outs = self.net.forward_intermediates(x, indices=order, intermediates_only=True, stop_early=True,
                                                      **extra)
            by_index = dict(zip(order, outs))
            for name, i in zip(self.names, self.indices):
                out = by_index[i]
                if self.tokens:
                    grid, prefix = out if isinstance(out, tuple) else (out, None)
                    out = grid.flatten(2).transpose(1, 2)
                    out = torch.cat([prefix, out], dim=1) if prefix is not None else out
                result[name] = out
            return result

    return TimmTaps


def TimmTaps(spec, net, taps):  # noqa: N802 - a class made on first use, so importing this module needs no torch
    return _timm_taps_class()(spec, net, taps)


MODEL_SOURCES = Registry("model source")
MODEL_SOURCES.register("declared")(TorchvisionSource())
MODEL_SOURCES.register("torchvision")(MODEL_SOURCES["declared"])
MODEL_SOURCES.register("timm")(TimmSource())


def source_of(spec: BackboneSpec):
    """The model source that answers for ``spec``."""
    return MODEL_SOURCES.lookup(spec.source)
