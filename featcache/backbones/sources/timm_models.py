"""timm's models as a model source: ``timm:NAME``, pretrained tags, taps from ``feature_info``.

Inside backbones/sources: the taps are timm's own ``feature_info`` (channels, reduction, module), run through
``forward_intermediates``.
"""

from __future__ import annotations

import functools

from featcache.backbones.sources import LOGITS, MODEL_SOURCES, ModelSource, no_such_weights, unknown_backbone
from featcache.backbones.spec import BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError

TIMM = "timm:"


def timm_names() -> list[str]:
    """Every timm model as ``timm:NAME`` (empty when timm is not installed)."""
    try:
        import timm
    except ImportError:
        return []
    return [TIMM + n for n in timm.list_models("*")]


class TimmSource(ModelSource):
    """timm's models: pretrained tags, ``forward_intermediates`` (wrapped, so parameters carry ``net.``)."""

    prefix = TIMM
    param_prefix = "net."
    fold_batchnorm = False

    def names(self) -> list[str]:
        return timm_names()

    def discover(self, name: str) -> BackboneSpec:
        return _timm_spec(name[len(TIMM):])

    def size(self, name: str) -> tuple[int | None, int | None]:
        import timm
        import torch

        bare = name[len(TIMM):]
        try:
            with torch.device("meta"):
                model = timm.create_model(bare, pretrained=False)
        except Exception:  # noqa: BLE001 - a model that cannot be built has no size to show
            return None, None
        size = (model.pretrained_cfg or {}).get("input_size", (3, None, None))[-1]
        return int(sum(p.numel() for p in model.parameters())), size

    def has_weights(self, name: str) -> bool:
        import timm

        bare = name[len(TIMM):]
        return bare in {n.split(".")[0] for n in timm.list_pretrained(bare + "*")}

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
            self.whole = self.logits or bool(spec.modules)  # a --module tap may sit past the last tap
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
                outs = self.net.forward_intermediates(x, indices=order or [len(self.net.feature_info) - 1],
                                                      intermediates_only=True, stop_early=not self.whole, **extra)
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


def _timm_spec(name: str) -> BackboneSpec:
    import torch

    try:
        import timm
    except ImportError as exc:
        raise FeatcacheError(f"timm:{name} needs timm, which is not importable here: pip install timm") from exc
    if not timm.is_model(name):
        raise unknown_backbone(TIMM + name)

    build = MODEL_SOURCES["timm"].builder(name)
    with torch.device("meta"):
        model = build(None).eval()
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise FeatcacheError(f"timm:{name} has no forward_intermediates / feature_info (timm's feature API), "
                             f"so featcache cannot find its taps: choose another model")
    tokens = getattr(model, "num_prefix_tokens", 0) > 0 or hasattr(model, "cls_token")
    word, layout = ("block", "tokens") if tokens else ("stage", "nchw")
    taps = tuple(Tap(f"{word}{i + 1}", f["num_chs"], f["reduction"], module=f["module"], layout=layout)
                 for i, f in enumerate(model.feature_info))
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    modules = [t.module for t in taps]
    children = [n for n, _ in model.named_modules() if n and n.count(".") <= max(m.count(".") for m in modules)]
    stages = _timm_stages(modules, children)
    return BackboneSpec(
        name=TIMM + name, build=build, taps=taps, aliases=stage_aliases(taps), weights_name=name,
        head_prefixes=tuple(c + "." for c in classifier), blocks=tuple("+".join(s) for s in stages),
        last_block=stages[-1], model_source="timm",
        input=InputConfig(**timm_input(cfg), fixed_size=bool(cfg.get("fixed_input_size"))),
        prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        versions={"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    )


def _timm_stages(modules: list[str], names: list[str]) -> list[tuple[str, ...]]:
    """Each tap's module plus the sibling modules between it and the previous tap (efficientnet's blocks.3)."""
    stages, previous = [], None
    for module in modules:
        parent, _, _ = module.rpartition(".")
        group = [module]
        if previous is not None and previous.rpartition(".")[0] == parent:
            siblings = [n for n in names if n.rpartition(".")[0] == parent]
            if previous in siblings and module in siblings:
                group = siblings[siblings.index(previous) + 1 : siblings.index(module) + 1]
        stages.append(tuple(group))
        previous = module
    return stages


MODEL_SOURCES.register("timm")(TimmSource())
