"""Any named module as a tap: ``--module NAME`` caches that module's output beside the model's own taps.

Stage 2 (data -> **backbones** -> extraction), beside taps. Every module's output shape comes from one pass on
the meta device with a forward hook on each module (nothing downloaded, nothing allocated): what
``featcache backbones NAME --modules`` lists and what :func:`with_modules` reads to add a tap of the module's own
name. Its layout follows its shape: (N, C, H, W) a map (N, H, W, C where the model's own taps are), (N, T, D)
tokens (the model's class and register tokens, where it has them, left out of ``avg`` and ``max``), (N, D) a
vector cached whole; ``NAME:flatten`` keeps any small output whole, every value a column. The cut runs the
module inside the same forward pass as the other taps: the last graph node inside the module in torchvision's
cut (its source's own), a forward hook for every other source; either copied where it is made (an in-place op
may follow).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from featcache.backbones.sources import first_tensor, on_meta, source_of
from featcache.backbones.spec import FLAT, POOLINGS, BackboneSpec, Tap
from featcache.errors import FeatcacheError, closest

FLATTEN = "flatten"  # --module NAME:flatten: the output kept whole, every value a column
MAX_FLAT = 65536  # values per image of an output kept whole (a 256 x 16 x 16 map)


@functools.lru_cache(maxsize=16)
def _shapes(name: str, size: int, build) -> tuple:
    import torch

    model = on_meta(build)
    shapes, handles = {}, []
    for module_name, module in model.named_modules():
        if not module_name:
            continue

        def hook(_, __, output, key=module_name):
            tensor = first_tensor(output)
            shapes.setdefault(key, tuple(tensor.shape) if tensor is not None else None)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - the meta pass failed: say so once, in one line
        raise FeatcacheError(f"{name}: one pass on the meta device failed ({type(exc).__name__}), so featcache "
                             f"cannot list its modules' outputs") from None
    finally:
        for handle in handles:
            handle.remove()
    order = [n for n, _ in model.named_modules() if n]
    return tuple((n, shapes.get(n, "not run")) for n in order)


def module_shapes(spec: BackboneSpec, size: int | None = None) -> list[tuple[str, tuple | str | None]]:
    """(module name, its output shape for one image of ``size`` pixels [default: the model's input size]) for
    every module, in the model's order: None where it returns no tensor, "not run" where the forward pass never
    calls it."""
    size = size or (spec.input.image_size if spec.input is not None else 224)
    return list(_shapes(spec.name, size, spec.build))


def layout_of(spec: BackboneSpec, shape, shapes: dict) -> str | None:
    """How a module output of ``shape`` is pooled; None: featcache cannot tell how. A vector is kept whole. A
    transformer's (N, T, D) output pools as tokens where T is its own taps' token count (the class and register
    tokens where they sit); a CNN's square (N, C, S, S) as a map, (N, S, S, C) as an NHWC one. Anything else (a
    transformer's per-head (N, heads, T, d), its patch embedding without the class token) is refused."""
    if not isinstance(shape, tuple):
        return None
    if len(shape) == 2:
        return "embedding"
    tokens = spec.taps[0].layout == "tokens"
    if len(shape) == 3 and tokens:
        own = shapes.get(spec.taps[0].graph_node)
        return "tokens" if not isinstance(own, tuple) or len(own) != 3 or own[1] == shape[1] else None
    if len(shape) == 4 and not tokens:
        return "nchw" if shape[2] == shape[3] else "nhwc" if shape[1] == shape[2] else None
    return None


def parse_module(asked: str) -> tuple[str, str, str]:
    """``NAME[@NORM][:HOW]`` -> (module, norm, how): the module whose output is cached, a module of the network
    it passes through first (empty: none), and ``flatten`` or a pooling of its own (empty: the request's)."""
    text, _, how = asked.partition(":")
    name, at, norm = text.partition("@")
    if how not in ("", FLATTEN, *POOLINGS):
        raise FeatcacheError(f"--module {asked}: after the module's name only :{FLATTEN} (its output kept whole) or "
                             f"a pooling of its own ({', '.join(':' + p for p in POOLINGS)}) may follow")
    if not name or "@" in norm or (at and not norm):
        raise FeatcacheError(f"--module {asked}: write NAME, NAME@NORM (the output of NAME passed through module "
                             f"NORM, e.g. a transformer's final norm) and optionally :{FLATTEN} or :POOLING after it")
    return name, norm, how


def _no_module(spec: BackboneSpec, name: str, shapes: dict) -> FeatcacheError:
    guess = closest(name, list(shapes))
    return FeatcacheError(f"--module {name}: {spec.name} has no module of that name"
                          f"{f'; did you mean {guess!r}?' if guess else ''} (featcache backbones {spec.name} "
                          f"--modules lists its {len(shapes)} modules)")


def with_modules(spec: BackboneSpec, names: tuple[str, ...], size: int | None = None) -> BackboneSpec:
    """``spec`` with each asked module's output as one more tap, for images of ``size`` pixels (what a kept-whole
    output's width depends on). A tap is called by its module's name (``NAME@NORM`` where it passes through a norm
    first); ``:cls`` and the other poolings after it pool that tap its own way. One line for a name the model has
    not (the closest names), a module that is already a tap, a tap asked twice, or an output that cannot be
    pooled so."""
    if not names:
        return spec
    size = size or (spec.input.image_size if spec.input is not None else 224)
    shapes = dict(module_shapes(spec, size))
    taps, added = list(spec.taps), []
    for asked in names:
        name, norm, how = parse_module(asked)
        node = f"{name}@{norm}" if norm else name
        for module in (name, norm) if norm else (name,):
            if module not in shapes:
                raise _no_module(spec, module, shapes)
        if node in added:
            raise FeatcacheError(f"--module {asked}: module {node} is asked twice: one tap per module (and norm)")
        if not norm and any(name in (t.node, t.module) for t in spec.taps):
            raise FeatcacheError(f"--module {name}: it is already a tap of {spec.name} "
                                 f"({spec.tap(name).node}): drop --module {name}")
        shape = shapes[name]
        if norm and shapes[norm] != shape:
            raise FeatcacheError(f"--module {asked}: {norm} returns {_shown(shapes[norm])}, not the "
                                 f"{_shown(shape)} of {name}: @NORM takes a module that keeps its input's shape "
                                 f"(a layer norm)")
        added.append(node)
        if how == FLATTEN and isinstance(shape, tuple):
            values = int(np.prod(shape[1:]))
            if values > MAX_FLAT:
                raise FeatcacheError(f"--module {asked}: its output is {'x'.join(map(str, shape[1:]))} = {values:,} "
                                     f"values per image, over featcache's {MAX_FLAT:,} for one kept whole: pool it "
                                     f"(drop :{FLATTEN}) or choose a smaller module")
            taps.append(Tap(node, values, spec.taps[-1].stride, module=name, layout=FLATTEN, norm=norm))
            continue
        layout = layout_of(spec, shape, shapes)
        if layout is None:
            what = "is never run by the forward pass" if shape == "not run" else \
                "returns no tensor" if shape is None else f"returns {_shown(shape)} per image"
            raise FeatcacheError(f"--module {name} of {spec.name} {what}, which featcache cannot pool (a CNN's "
                                 f"maps, a transformer's tokens as its taps hold them, or a vector): choose another "
                                 f"module (featcache backbones {spec.name} --modules)")
        if how and layout in FLAT:
            raise FeatcacheError(f"--module {asked}: {name} returns a vector, kept whole: drop :{how}")
        if how.startswith("cls") and (layout != "tokens" or spec.prefix_tokens == 0):
            raise FeatcacheError(f"--module {asked}: :{how} takes a transformer's class token; {name} of {spec.name} "
                                 f"has none: use :avg, :max or :avgmax")
        channels = shape[-1] if layout in ("nhwc", "tokens", "embedding") else shape[1]
        stride = max(1, size // shape[2]) if layout == "nhwc" else max(1, size // shape[-1]) \
            if layout == "nchw" else spec.taps[0].stride
        taps.append(Tap(node, int(channels), stride, module=name, layout=layout, pooling=how, norm=norm))
    return dataclasses.replace(spec, taps=tuple(taps), modules=tuple(added))


def _shown(shape) -> str:
    return "x".join(map(str, shape[1:])) if isinstance(shape, tuple) else str(shape)


def hooked_extractor(spec: BackboneSpec, backbone, taps):
    """The source's cut for the model's own taps, plus a forward hook on each module tap among ``taps`` (a
    source whose cut takes modules itself, ``cuts_modules``: torchvision's graph, gets them all); a ``@NORM``
    tap's output then passes through that module of the network."""
    source = source_of(spec)
    wanted = [t for t in taps if t in spec.modules]
    if not wanted or source.cuts_modules:
        cut = source.extractor(spec, backbone, taps)
    else:
        cut = _hooked_class()(source.extractor(spec, backbone, [t for t in taps if t not in wanted]),
                              source.param_prefix, {t: spec.tap(t).graph_node for t in wanted})
    norms = {t: spec.tap(t).norm for t in wanted if spec.tap(t).norm}
    if not norms:
        return cut
    return _normed_class()(cut, {t: backbone.get_submodule(norm) for t, norm in norms.items()})


@functools.lru_cache(maxsize=1)
def _hooked_class():
    import torch

    class Hooked(torch.nn.Module):
        """A source's cut with forward hooks that catch the named modules' outputs in the same pass."""

        def __init__(self, inner, prefix, modules: dict):
            super().__init__()
            self.inner, self.names, self._caught = inner, tuple(modules), {}
            for name, module in modules.items():
                inner.get_submodule(prefix + module).register_forward_hook(self._catch(name))

        def _catch(self, name):
            def hook(_, __, output):
                tensor = first_tensor(output)  # copied: the network may change its output in place afterwards
                self._caught[name] = tensor.clone() if tensor is not None else None

            return hook

        def forward(self, x):
            self._caught.clear()
            result = dict(self.inner(x))
            missing = [n for n in self.names if n not in self._caught]
            if missing:
                raise FeatcacheError(f"--module {missing[0]} did not run in the forward pass of the cut network")
            result.update({n: self._caught[n] for n in self.names})
            self._caught.clear()
            return result

    return Hooked


@functools.lru_cache(maxsize=1)
def _normed_class():
    import torch

    class Normed(torch.nn.Module):
        """A cut whose ``NAME@NORM`` taps pass through their norm module (the network's own, shared) after the
        pass: the module hooks of the cut have all fired by then, so a norm that is a tap itself keeps its own."""

        def __init__(self, inner, norms: dict):
            super().__init__()
            self.inner, self.norms = inner, torch.nn.ModuleDict({str(i): m for i, m in enumerate(norms.values())})
            self.names = tuple(norms)

        def forward(self, x):
            result = dict(self.inner(x))
            for i, name in enumerate(self.names):
                result[name] = self.norms[str(i)](result[name])
            return result

    return Normed
