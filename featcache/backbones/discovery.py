"""Discovery: the taps of any torchvision classification model or timm model, found from the model itself.

Stage 2 (data -> **backbones** -> extraction), beside the declared registry. A looked-up
name that is not declared comes here and leaves as an ordinary :class:`BackboneSpec`, so
everything downstream sees one kind of spec:

- ``timm:NAME``: the taps are timm's own ``feature_info`` (channels, reduction, module), run
  through ``forward_intermediates``.
- a torchvision name: the model is traced once on the meta device and its taps read off the
  graph (:mod:`featcache.backbones.graph`); this reproduces the four declared backbones'
  hand-written taps exactly (tests/test_discovery.py).
"""

from __future__ import annotations

import functools

from featcache.backbones.graph import graph_taps, stage_modules, traced
from featcache.backbones.sources import MODEL_SOURCES, on_meta, timm_input
from featcache.backbones.spec import BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError, closest

TIMM = "timm:"


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def timm_names(pattern: str = "") -> list[str]:
    """Every timm model as ``timm:NAME`` (empty when timm is not installed)."""
    try:
        import timm
    except ImportError:
        return []
    return [TIMM + n for n in timm.list_models(pattern or "*")]


@functools.lru_cache(maxsize=64)
def discover(name: str, declared: tuple[str, ...] = ()) -> BackboneSpec:
    """The spec of a torchvision model or ``timm:NAME``; an unknown name is one line with the closest of
    both and of the ``declared`` names."""
    if name.startswith(TIMM):
        return _timm_spec(name[len(TIMM):])
    if name in torchvision_names():
        return _torchvision_spec(name)
    raise unknown_backbone(name, declared)


def unknown_backbone(name: str, declared: tuple[str, ...] = ()) -> FeatcacheError:
    bare = name.removeprefix(TIMM)
    guesses = [g for g in (closest(name, list(declared) + torchvision_names()),
                           closest(TIMM + bare, timm_names())) if g]
    hint = f"; did you mean {' or '.join(repr(g) for g in guesses)}?" if guesses else "."
    return FeatcacheError(f"unknown backbone {name!r} (not a declared backbone, a torchvision classification model "
                          f"or timm:NAME){hint} featcache backbones --all lists every name")


# --- torchvision: taps from the graph ------------------------------------------------------


def _torchvision_spec(name: str) -> BackboneSpec:
    import torch
    import torchvision

    build = MODEL_SOURCES["torchvision"].builder(name)
    try:
        model = on_meta(build)
        size = getattr(model, "image_size", None) or _weights_size(name)  # a ViT takes its built size only
        graph = traced(model, size)
    except Exception as exc:  # FX cannot trace it (data-dependent control flow ...): one line, no traceback
        raise FeatcacheError(f"backbone {name}: torchvision's graph tracer cannot follow it ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}); try its timm version (featcache backbones --all "
                             f"{name.split('_')[0]})") from exc
    taps = graph_taps(graph)
    strides = [t.stride for t in taps]
    if strides != sorted(strides):
        raise FeatcacheError(f"backbone {name}: featcache cannot find stage outputs in its graph (strides "
                             f"{strides}); try its timm version (featcache backbones --all {name.split('_')[0]})")
    stages = stage_modules(graph, model, [t.graph_node for t in taps])
    # a ViT holds its one size; a model that traced at its size but not at a second (MaxViT: windows of 7 at every
    # stage) takes that size only too
    fixed = getattr(model, "image_size", None) or (size if graph.small is None else None)
    return BackboneSpec(
        name=name, build=build, taps=taps, aliases=stage_aliases(taps), weights_name=name,
        head_prefixes=tuple(p + "." for p in stages[-1]), blocks=tuple("+".join(s) for s in stages[:-1]),
        last_block=stages[-2], source="torchvision",
        input=InputConfig(image_size=fixed or size, fixed_size=fixed is not None),
        prefix_tokens=1 if hasattr(model, "class_token") else 0,
        versions={"torchvision": torchvision.__version__, "torch": torch.__version__.split("+")[0]},
    )


def _weights_size(name: str) -> int:
    """The input size of the model's default weights (299 for Inception), 224 without weights."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
    except (ValueError, AttributeError, IndexError):
        return 224


# --- timm: taps from feature_info ----------------------------------------------------------


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
        last_block=stages[-1], source="timm",
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
