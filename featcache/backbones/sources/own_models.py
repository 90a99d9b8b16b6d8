"""A network a user holds in Python as a model source: ``own:NAME``, registered by :func:`own_backbone`.

Inside backbones/sources. From Python only (a network object cannot come from a command line or a shared file,
and featcache imports no code to make one): ``featcache.own_backbone(net, taps=[...], image_size=..., mean=...,
std=...)`` registers the module for this process under ``own:NAME`` and returns that name, which every stage
then takes like any backbone (``featcache.extract(model=net, ...)`` does both). Its taps are the named modules,
caught by forward hooks in one pass; the preprocessing is the one given (there is no weights' config to read).
The fingerprint holds the network's class, a SHA-256 of its state dict and the ``version`` given: weights that
change make a new cache, but a change to the forward code alone does not, so such a change needs a new
``version`` (or name).
"""

from __future__ import annotations

import copy
import functools
import hashlib

from featcache.backbones.sources import MODEL_SOURCES, ModelSource, first_tensor
from featcache.backbones.spec import BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError

OWN = "own:"
GIVEN = "given"  # the weights the network holds (--weights imagenet, the default, means these)
_HELD: dict[str, tuple] = {}  # own:NAME -> (spec, network)


class OwnSource(ModelSource):
    """Networks registered from Python: their own weights, forward hooks at the named modules."""

    prefix = OWN
    keep_specs = False  # registered again with new weights: a new spec
    param_prefix = "net."
    fold_batchnorm = False

    def names(self) -> list[str]:
        return sorted(_HELD)

    def discover(self, name: str) -> BackboneSpec:
        if name not in _HELD:
            raise FeatcacheError(f"{name} is not registered in this process: own:NAME backbones come from "
                                 f"featcache.own_backbone(net, ...) (or featcache.extract(model=net, ...)) in Python")
        return _HELD[name][0]

    def has_weights(self, name: str) -> bool:
        return name in _HELD

    def builder(self, name: str):
        """``build(tag)``: a copy of the registered network (the user's object is never changed); it has no
        random initialisation of its own to offer: ``build(None)`` on the meta device (``on_meta``: the
        ``--module`` shapes) is its structure there, anywhere else an error."""

        def build(tag):
            import torch

            if tag is None and torch.empty(0).device.type != "meta":
                raise FeatcacheError(f"{name} holds the weights it was given: use --weights imagenet (the default), "
                                     f"not random or a state-dict file; load other weights into the network first")
            net = copy.deepcopy(_HELD[name][1])
            return net if tag is not None else net.to("meta")

        return build

    def tags(self, spec: BackboneSpec) -> list[str]:
        return [GIVEN]

    def named(self, spec: BackboneSpec, weights: str):
        if weights not in ("imagenet", GIVEN):
            raise FeatcacheError(f"{spec.name} holds the weights it was given: use --weights imagenet (the default)")
        return GIVEN

    def identity(self, spec: BackboneSpec, w, kind: str) -> dict:
        return {"kind": "own", **spec.versions}

    def input_defaults(self, spec: BackboneSpec, w) -> dict:
        i = spec.input
        return {"image_size": i.image_size, "mean": i.mean, "std": i.std, "interpolation": i.interpolation,
                "crop_pct": i.crop_pct}

    def where(self, spec: BackboneSpec, w) -> str:
        return " in this Python process"

    @staticmethod
    def classifier_output(model) -> str | None:
        return None

    def extractor(self, spec: BackboneSpec, backbone, taps):
        return _own_taps_class()(backbone, [spec.tap(t).module for t in taps], list(taps))


def state_hash(net) -> str:
    """SHA-256 of a network's state dict: every tensor's name, dtype, shape and bytes, in order."""
    import torch

    digest = hashlib.sha256()
    for key, value in net.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def own_backbone(model, taps, image_size: int, mean, std, name: str | None = None, version: str = "",
                 interpolation: str = "bilinear", crop_pct: float = 1.0, prefix_tokens: int = 0) -> str:
    """Register ``model`` (a ``torch.nn.Module``) as backbone ``own:NAME`` for this process and return that name.

    Args:
        model: the network, with the weights it should run with (it is copied, never changed).
        taps: module names whose outputs become its taps, in forward order (``featcache backbones own:NAME
            --modules`` lists every module once registered).
        image_size, mean, std, interpolation, crop_pct: how images are fed to it (nothing to read them from).
        name: the name after ``own:`` [default: the network's class name].
        version: anything that identifies its forward code: the fingerprint holds the class name and a hash of
            the weights, so a change to the code alone needs a new ``version`` to make a new cache.
        prefix_tokens: class/register tokens ahead of the patch tokens, where its taps are (N, T, D) tokens.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise FeatcacheError(f"model must be a torch.nn.Module. Got {type(model).__name__} instead.")
    taps = [taps] if isinstance(taps, str) else list(taps or ())
    if not taps:
        raise FeatcacheError("own_backbone needs taps: the names of the modules whose outputs to cache")
    full = OWN + (name or type(model).__name__)
    shapes = _shapes(model, taps, image_size)
    found = []
    for module, shape in zip(taps, shapes):
        layout = {3: "tokens", 2: "embedding"}.get(len(shape))
        if len(shape) == 4:
            layout = "nchw" if shape[2] == shape[3] else "nhwc" if shape[1] == shape[2] else None
        if layout is None:
            raise FeatcacheError(f"taps: module {module} returns {'x'.join(map(str, shape[1:]))} per image, which "
                                 f"featcache cannot pool (a square map, tokens or a vector)")
        channels = shape[1] if layout == "nchw" else shape[-1]
        stride = max(1, image_size // shape[2]) if layout in ("nchw", "nhwc") else 1
        found.append(Tap(module, int(channels), stride, module=module, layout=layout))  # named by its module
    spec = BackboneSpec(
        name=full, build=MODEL_SOURCES["own"].builder(full), taps=tuple(found), aliases=stage_aliases(tuple(found)),
        weights_name=full, model_source="own", prefix_tokens=prefix_tokens,
        input=InputConfig(image_size=image_size, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                          crop_pct=crop_pct, fixed_size=True),
        versions={"class": f"{type(model).__module__}.{type(model).__qualname__}", "sha256": state_hash(model),
                  "version": version, "torch": torch.__version__.split("+")[0]},
    )
    _HELD[full] = (spec, model)
    return full


def _shapes(model, taps: list[str], size: int) -> list[tuple]:
    """Each named module's output shape on one real image (the user's network may not run on the meta device)."""
    import torch

    names = dict(model.named_modules())
    caught, handles = {}, []
    for module in taps:
        if module not in names:
            from featcache.errors import closest

            guess = closest(module, list(names))
            raise FeatcacheError(f"taps: the network has no module {module!r}"
                                 f"{f'; did you mean {guess!r}?' if guess else ''}")
        handles.append(names[module].register_forward_hook(
            lambda _, __, out, key=module: caught.setdefault(key, first_tensor(out))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters(), torch.zeros(0)).device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [t for t in taps if caught.get(t) is None]
    if missing:
        raise FeatcacheError(f"taps: module {missing[0]} returned no tensor in a forward pass (or never ran)")
    return [tuple(caught[t].shape) for t in taps]


@functools.lru_cache(maxsize=1)
def _own_taps_class():
    import torch

    class OwnTaps(torch.nn.Module):
        """The user's network run whole, its named modules' outputs caught by forward hooks (copied: the
        network may change them in place later)."""

        def __init__(self, net, modules, names):
            super().__init__()
            self.net, self.names, self._caught = net, tuple(names), {}
            for module, name in zip(modules, names):
                net.get_submodule(module).register_forward_hook(self._catch(name))

        def _catch(self, name):
            def hook(_, __, output):
                self._caught[name] = first_tensor(output).clone()

            return hook

        def forward(self, x):
            self._caught.clear()
            self.net(x)
            result = {n: self._caught[n] for n in self.names}
            self._caught.clear()
            return result

    return OwnTaps


MODEL_SOURCES.register("own")(OwnSource())
