"""Reading a torchvision model's taps off its traced graph (no weights, no memory: the meta device).

Used by :mod:`featcache.backbones.discovery`. A *cut point* is a node that every path from the
input to the output passes through (no edge jumps over it): there the whole state of the network
is one tensor. The taps are the last cut point at each stride (a pooling layer that opens the
next stride closes the stage before it), the final feature map, and ahead of a final 1x1 channel
expansion (MobileNet's 1280-wide head convolution) the last stage's own output; a transformer
gives one tap per block of its repeated encoder. Each tap is named by the shortest module path
that ends at it and holds no other stride (``layer1``, ``features.30``).
"""

from __future__ import annotations

from featcache.backbones.spec import Tap
from featcache.errors import FeatcacheError

POOL_OPS = ("max_pool2d", "avg_pool2d", "MaxPool2d", "AvgPool2d")


class Graph:
    """A traced model: its nodes in order, qualified names, output shapes at two input sizes, cut points,
    and ``spans``: every module path (each prefix of a qualified name) -> (first, last) node position."""

    def __init__(self, nodes, names, kinds, shapes, small, size):
        self.nodes, self.names, self.kinds, self.shapes, self.small, self.size = nodes, names, kinds, shapes, small, size
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.cuts = _cut_points(nodes, self.pos)
        self.spans: dict[str, tuple[int, int]] = {}
        for n in nodes:
            for prefix in prefixes(names[n]):
                self.spans[prefix] = (self.spans.get(prefix, (self.pos[n],))[0], self.pos[n])


def prefixes(qualname: str) -> list[str]:
    """``a.b.c`` -> [``a``, ``a.b``, ``a.b.c``]: the module paths that hold a node, outermost first."""
    parts = qualname.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def traced(model, size: int = 224) -> Graph:
    import contextlib
    import io

    import torch
    from torch.fx.passes.shape_prop import ShapeProp
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer()
    graph = tracer.trace(model)
    module = torch.fx.GraphModule(tracer.root, graph)
    same = _same_shape()

    class Shapes(ShapeProp):
        """ShapeProp, with the modules that keep their input's shape (normalisations, activations, dropout) passing
        it on instead of running their meta kernels: half of a convolutional network's propagation time."""

        def call_module(self, target, args, kwargs):
            if isinstance(self.module.get_submodule(target), same) and len(args) == 1 and not kwargs:
                return args[0]
            return super().call_module(target, args, kwargs)

    shapes = {}
    other = size * 5 // 7 // 32 * 32  # a second size tells what scales with the input: maps do, pooled outputs do not
    for s in (other, size):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback of a failing node
                Shapes(module).propagate(torch.empty(1, 3, s, s, device="meta"))
        except Exception:
            if s == size:
                raise
            continue  # a fixed-size model (ViT): one size only
        shapes[s] = {n: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes
                     if hasattr(n.meta.get("tensor_meta"), "shape")}
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    names = {n: tracer.node_to_qualname.get(n, n.name) for n in nodes}
    kinds = {n: type(module.get_submodule(n.target)).__name__ if n.op == "call_module"
             else getattr(n.target, "__name__", str(n.target)) for n in nodes}
    return Graph(nodes, names, kinds, shapes[size], shapes.get(other), size)


def _same_shape() -> tuple:
    from torch import nn
    from torchvision.ops import StochasticDepth

    return (StochasticDepth, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.SiLU,
            nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity)


def _cut_points(nodes, pos) -> list:
    """Nodes that every path from input to output passes through: no edge jumps over them."""
    cover = [0] * (len(nodes) + 2)
    for n in nodes:
        for u in n.all_input_nodes:
            if u in pos and pos[n] - pos[u] > 1:
                cover[pos[u] + 1] += 1
                cover[pos[n]] -= 1
    out, running = [], 0
    for i, n in enumerate(nodes):
        running += cover[i]
        if running == 0:
            out.append(n)
    return out


def _spatial(g: Graph, node) -> tuple[str, int, int] | None:
    """(layout, channels, stride) of a feature map or token sequence; None for anything else."""
    shape = g.shapes.get(node)
    if shape is None:
        return None
    small = g.small.get(node) if g.small else None
    if len(shape) == 4:
        # a square input gives square maps: (N, C, H, H) or (N, H, H, C). Anything else is not a map, e.g. MaxViT's
        # windows (N, windows, 49 positions, C), which are cut points inside its blocks
        if shape[2] != shape[3] and shape[1] != shape[2]:
            return None
        h_axis = 2 if shape[2] == shape[3] else 1
        if small is not None and small[h_axis] == shape[h_axis]:
            return None  # does not scale with the input: pooled
        if shape[h_axis] <= 1 and small is None:
            return None
        layout = "nchw" if h_axis == 2 else "nhwc"
        return layout, shape[1] if layout == "nchw" else shape[3], max(1, round(g.size / shape[h_axis]))
    if len(shape) == 3 and shape[1] >= 4:  # (N, tokens, width): prefix tokens + a square patch grid
        side = int((shape[1]) ** 0.5)
        if small is not None and small[1] == shape[1]:
            return None
        return "tokens", shape[2], max(1, round(g.size / side))
    return None


def _module_names(g: Graph, cuts: dict) -> dict:
    """Each cut point's name: the shortest module path that ends at it and holds no cut point of another
    stride (``layer1`` for ``layer1.1.relu_1``; ``features.30``, not the whole ``features``)."""
    strides = [(g.pos[n], info[2]) for n, info in cuts.items()]
    out = {}
    for n, info in cuts.items():
        out[n] = g.names[n]
        for prefix in prefixes(g.names[n]):
            first, last = g.spans[prefix]
            if last == g.pos[n] and all(s == info[2] for p, s in strides if first <= p <= last):
                out[n] = prefix
                break
    return out


def graph_taps(g: Graph) -> tuple[Tap, ...]:
    cuts = {n: info for n in g.cuts if (info := _spatial(g, n))}
    if not cuts:
        raise FeatcacheError("no feature map found in the graph")
    names = _module_names(g, cuts)
    if list(cuts.values())[-1][0] == "tokens":
        chosen = _block_outputs(g, [n for n, info in cuts.items() if info[0] == "tokens"], names)
        word = "block"
    else:
        chosen = _stage_ends(g, cuts, names)
        word = "stage"
    return tuple(Tap(f"{word}{i + 1}", cuts[n][1], cuts[n][2], module=names[n], layout=cuts[n][0])
                 for i, n in enumerate(chosen))


def _is_pool(g: Graph, node) -> bool:
    """A parameter-free downsampling (max / average pooling): it closes the stage before it."""
    return g.kinds[node] in POOL_OPS


def _stage_ends(g: Graph, cuts: dict, names: dict) -> list:
    """Per stride the last cut point at the outermost module depth (a pool opening the next stride closes
    the stage instead), the final map, and the last stage's own output when a 1x1 channel expansion
    (a different width at the same stride) follows it."""
    depth = {n: names[n].count(".") for n in cuts}
    groups: list[list] = []
    for n, (_, _, stride) in cuts.items():
        if groups and cuts[groups[-1][0]][2] == stride:
            groups[-1].append(n)
        else:
            groups.append([n])

    def outer(group):
        top = min(depth[n] for n in group)
        return [n for n in group if depth[n] == top]

    ends: dict[int, object] = {}
    for k, group in enumerate(groups[:-1]):
        end = groups[k + 1][0] if _is_pool(g, groups[k + 1][0]) else outer(group)[-1]
        ends[cuts[end][2]] = end  # one per output stride: the last
    final = groups[-1][-1]
    _, final_ch, final_stride = cuts[final]
    start = g.spans[names[final]][0]
    before = [n for n in cuts if g.pos[n] < start]
    if before and cuts[before[-1]][2] == final_stride and cuts[before[-1]][1] != final_ch:
        ends[final_stride] = before[-1]  # the last stage's own output, ahead of a 1x1 channel expansion
    else:
        ends.pop(final_stride, None)
    return sorted(ends.values(), key=g.pos.__getitem__) + [final]


def _block_outputs(g: Graph, tokens: list, names: dict) -> list:
    """One tap per block of the longest run of numbered siblings (``encoder.layers.encoder_layer_K``)."""
    by_parent: dict[str, list] = {}
    for n in tokens:
        numbered = [p for p in prefixes(g.names[n]) if g.spans[p][1] == g.pos[n] and p[-1:].isdigit()]
        if numbered:
            names[n] = numbered[0]
            parent = numbered[0].rpartition(".")[0]
            by_parent.setdefault(parent, []).append(n)
    if not by_parent:
        return [tokens[-1]]
    return max(by_parent.values(), key=len)


def stage_modules(g: Graph, model, tap_nodes: list[str]) -> list[tuple[str, ...]]:
    """Per stage (input .. tap 1, tap 1 .. tap 2, ..., after the last tap), the module prefixes that hold
    its parameters: the units of ``--unfreeze last-N``, the last one the classifier."""
    ends = [g.spans[name][1] for name in tap_nodes]
    owners: list[set[str]] = [set() for _ in range(len(ends) + 1)]
    for n in g.nodes:
        if n.op in ("call_module", "get_attr"):
            stage = next((k for k, e in enumerate(ends) if g.pos[n] <= e), len(ends))
            owners[stage].add(str(n.target))
    params = [name for name, _ in model.named_parameters()]
    return [_compressed(s, params) for s in owners]


def _compressed(modules: set[str], params: list[str]) -> tuple[str, ...]:
    """Module paths merged upward while a parent's parameters all belong to the set."""
    own = [p for p in params if any(p == m or p.startswith(m + ".") for m in modules)]
    owned = set(own)
    out: list[str] = []
    for p in own:
        parts = p.split(".")
        best = p
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            under = [q for q in params if q.startswith(prefix + ".")]
            if all(q in owned for q in under):
                best = prefix
                break
        if best not in out:
            out.append(best)
    return tuple(out)
