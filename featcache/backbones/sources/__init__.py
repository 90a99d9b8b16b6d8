"""Model sources: the one place a backbone's library (torchvision, timm ...) is asked anything.

Stage 2, below weights, taps and discovery (spec -> **sources** -> weights / taps / discovery).
A spec's ``model_source`` names its entry in ``MODEL_SOURCES``: ``declared`` and ``torchvision`` share
torchvision's (the declared four are torchvision models whose taps are written by hand), ``timm``
is timm's. An entry answers everything that differs between the libraries: which names it offers (and the
prefix they carry: ``timm:``), how a name becomes a spec with its taps, which pretrained weights a model has,
what a weights name means, how those weights are identified (for the fingerprint) and fed (the preprocessing
defaults), where a download is kept, how the network is cut at its taps, whether BatchNorm may be folded, and
the prefix its parameters carry inside the cut. Adding a library is one module here, a :class:`ModelSource`
and its registration: discovery, ``rank``'s patterns and ``featcache backbones`` ask every entry.
"""

from __future__ import annotations

import difflib

from featcache.backbones.spec import LOGITS, BackboneSpec, Tap
from featcache.errors import FeatcacheError, closest
from featcache.registry import Registry


class ModelSource:
    """What featcache asks of a model library. ``prefix`` is how its names start on the command line
    (``timm:``); the library without one (torchvision) answers to bare names."""

    prefix = ""
    keep_specs = True  # discovery may keep a spec once found (False: the source's specs change in a process)
    cuts_modules = False  # its extractor cuts --module taps itself (else a forward hook catches each)
    param_prefix = ""  # what the cut's parameter names carry before the network's own
    fold_batchnorm = False

    def names(self) -> list[str]:
        """Every model name this source offers, as the command line spells it (prefix included)."""
        return []

    def owns(self, name: str) -> bool:
        """Whether ``name`` is this source's to discover."""
        return name.startswith(self.prefix) if self.prefix else name in self.names()

    def discover(self, name: str) -> BackboneSpec:
        """The spec of model ``name``, its taps found from the model (on the meta device: nothing downloaded)."""
        raise NotImplementedError

    def has_weights(self, name: str) -> bool:
        """Whether model ``name`` has pretrained weights to load, from its name alone (nothing built)."""
        return False

    def size(self, name: str) -> tuple[int | None, int | None]:
        """(parameters, input size in pixels) of model ``name``, built on the meta device (nothing allocated,
        nothing downloaded); None where the source cannot say."""
        return None, None

    def top1(self, name: str) -> float | None:
        """The ImageNet-1k top-1 accuracy (%) its default pretrained weights report in their metadata, or None
        (``choose`` ranks by it as a baseline)."""
        return None

    @staticmethod
    def logits_of(output):
        """The classifier's scores in what the whole network returns (a tensor here; a Hugging Face model's
        output object holds them as ``logits``)."""
        return output


MODEL_SOURCES: Registry = Registry("model source")


def sources() -> list[ModelSource]:
    """Each registered source once (``declared`` and ``torchvision`` are one), in registration order."""
    return [source for _, source in _named_sources()]


def _named_sources() -> list[tuple[str, ModelSource]]:
    """(its last registered name, source) for each source once: ``torchvision`` for the entry it shares."""
    return list({id(source): (key, source) for key, source in MODEL_SOURCES.items()}.values())


def source_of(spec: BackboneSpec) -> ModelSource:
    """The model source that answers for ``spec``."""
    return MODEL_SOURCES.lookup(spec.model_source)


def owner(name: str) -> ModelSource | None:
    """The source that discovers ``name``, or None."""
    return next((s for s in sources() if s.owns(name)), None)


def every_name(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, source) for every model every source offers; with ``pattern``, those it matches (a pattern
    without a source's prefix matches the bare names, and a prefixed source's names after its prefix too)."""
    import fnmatch

    out = []
    for key, source in _named_sources():
        for name in source.names():
            if pattern is None or fnmatch.fnmatch(name, pattern) or (
                    source.prefix and fnmatch.fnmatch(name, source.prefix + pattern)):
                out.append((name, key))
    return out


def size_of(name: str) -> tuple[int | None, int | None]:
    """(parameters, input size) of model ``name`` from its source (a declared name: torchvision's)."""
    return (owner(name) or MODEL_SOURCES["torchvision"]).size(name)


def top1_of(name: str) -> float | None:
    """The ImageNet top-1 (%) the default weights of model ``name`` report, where its source says."""
    return (owner(name) or MODEL_SOURCES["torchvision"]).top1(name)


def unknown_backbone(name: str, declared: tuple[str, ...] = ()) -> FeatcacheError:
    """One line naming the closest names: of the declared and bare names, and of each prefixed source's."""
    bare = name
    for source in sources():
        if source.prefix and name.startswith(source.prefix):
            bare = name[len(source.prefix):]
    guesses = [closest(name, list(declared) + [n for s in sources() if not s.prefix for n in s.names()])]
    guesses += [closest(s.prefix + bare, s.names()) for s in sources() if s.prefix]
    # another source's name only where it is close (a zoo of unlike names matches anything at difflib's 0.5)
    guesses = [g for g in guesses if g and (g.startswith(name.split(":")[0] + ":") or
                                            difflib.SequenceMatcher(None, bare, g.split(":")[-1]).ratio() >= 0.75)]
    hint = f"; did you mean {' or '.join(repr(g) for g in guesses)}?" if guesses else "."
    prefixed = [f"{s.prefix}NAME" for s in sources() if s.prefix]
    kinds = ", ".join(["a declared backbone", "a torchvision classification model", *prefixed[:-1]])
    return FeatcacheError(f"unknown backbone {name!r} (not {kinds} or {prefixed[-1]}){hint} "
                          f"featcache backbones --all lists every name")


def no_such_weights(spec: BackboneSpec, weights: str, known: list[str]) -> FeatcacheError:
    listed = ", ".join(known) if known else "none"
    return FeatcacheError(f"--weights {weights}: {spec.name} has no such weights (its pretrained weights: {listed}); "
                          f"or use imagenet, random or the path of a state-dict file")


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



def first_tensor(output):
    """The tensor a module returns, or the first of a tuple / list it returns (a transformer layer's hidden
    state beside its attention weights); None where there is none."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # a Hugging Face model's output object: its first field (last_hidden_state)
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def with_logits(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` with its source classifier's output as one more tap, ``logits`` (``--logits``: what LEEP and NCE
    read); one line where the model has none."""
    import dataclasses

    if any(t.layout == "logits" for t in spec.taps):
        return spec
    key = (spec.model_source, spec.name)
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
            out = source_of(spec).logits_of(model(torch.empty(1, 3, size, size, device="meta")))
    except Exception as exc:  # noqa: BLE001 - any failure of the meta pass: the model cannot be asked
        raise FeatcacheError(f"{spec.name}: cannot find its source classifier's output ({type(exc).__name__}); "
                             f"LEEP and NCE need one: drop --logits and those scores") from exc
    if where is None or getattr(out, "ndim", 0) != 2 or out.shape[1] < 2:
        raise FeatcacheError(f"{spec.name} has no source classifier (its output is not one score per source class): "
                             f"LEEP and NCE need one; drop --logits and those scores, or use a classification model")
    return Tap(LOGITS, int(out.shape[1]), spec.taps[-1].stride, module=where, layout="logits")



from featcache.backbones.sources import hf_models, openclip_models, own_models, timm_models, torchvision_models  # noqa: E402,F401  (each registers)
