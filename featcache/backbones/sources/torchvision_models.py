"""torchvision's classification models as a model source: bare names, weights enums, taps read off the graph.

Inside backbones/sources: a name that is a torchvision model is traced once on the meta device and its taps read
off the graph (:mod:`featcache.backbones.graph`); this reproduces the four declared backbones' hand-written taps
exactly (tests/test_discovery.py). The declared four share this entry as ``declared``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from featcache.backbones.graph import graph_taps, stage_modules, traced
from featcache.backbones.sources import MODEL_SOURCES, ModelSource, no_such_weights, on_meta
from featcache.backbones.spec import BackboneSpec, InputConfig, stage_aliases
from featcache.errors import FeatcacheError


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


class TorchvisionSource(ModelSource):
    """torchvision's models: weights enums, ``create_feature_extractor`` at each tap's graph node."""

    param_prefix = ""  # the cut's parameter names are the network's own
    fold_batchnorm = True
    cuts_modules = True  # a --module tap is a node of its graph

    def names(self) -> list[str]:
        return list(torchvision_names())

    def discover(self, name: str) -> BackboneSpec:
        return _torchvision_spec(name)

    def size(self, name: str) -> tuple[int | None, int | None]:
        try:
            model = on_meta(self.builder(name))
        except Exception:  # noqa: BLE001 - a model that cannot be built has no size to show
            return None, _weights_size(name)
        return int(sum(p.numel() for p in model.parameters())), getattr(model, "image_size", None) or _weights_size(name)

    def top1(self, name: str) -> float | None:
        import torchvision

        try:
            metrics = torchvision.models.get_model_weights(name).DEFAULT.meta["_metrics"]
            return float(metrics["ImageNet-1K"]["acc@1"])
        except (ValueError, KeyError, AttributeError, TypeError):
            return None

    def has_weights(self, name: str) -> bool:
        import torchvision

        try:
            return len(list(torchvision.models.get_model_weights(name))) > 0
        except (ValueError, KeyError):
            return False

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

        wanted = [t for t in taps if t in spec.modules]
        if wanted:
            return _module_cut(spec, backbone, taps, wanted)
        return create_feature_extractor(backbone, return_nodes={spec.tap(t).graph_node: t for t in taps}).eval()


def _module_cut(spec: BackboneSpec, backbone, taps, wanted):
    """torchvision's cut with each ``--module`` tap at the last graph node inside that module (what the module
    returns: torchvision's own reading of a module name stops before a final leaf call such as BasicBlock's last
    ReLU), copied where it is made (an in-place ReLU may follow a BatchNorm tap), two taps on one node sharing
    it."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    names = get_graph_node_names(backbone)[1]  # eval mode's

    def last_inside(node: str) -> str:
        inside = [n for n in names if n == node or n.startswith(node + ".")]
        return inside[-1] if inside else node

    own = [t for t in taps if t not in wanted]
    resolved = {last_inside(spec.tap(t).graph_node): t for t in own}
    alias = {}  # a module tap on the node of another tap (a model's own, or NAME beside NAME@NORM) shares it
    for t in wanted:
        node = last_inside(spec.tap(t).graph_node)
        if node in resolved:
            alias[t] = resolved[node]
        else:
            resolved[node] = t
    nodes = {spec.tap(t).graph_node: t for t in own} | \
        {last_inside(spec.tap(t).graph_node): t for t in wanted if t not in alias}
    cut = create_feature_extractor(backbone, return_nodes=nodes).eval()
    graph = cut.graph
    output = next(n for n in graph.nodes if n.op == "output")
    returned = dict(output.args[0])
    for t in wanted:
        source = returned[alias.get(t, t)]
        with graph.inserting_after(source):
            returned[t] = graph.call_method("clone", (source,))
    output.args = (returned,)
    cut.recompile()
    return cut


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
        last_block=stages[-2], model_source="torchvision",
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



MODEL_SOURCES.register("declared")(TorchvisionSource())
MODEL_SOURCES.register("torchvision")(MODEL_SOURCES["declared"])
