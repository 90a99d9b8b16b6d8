"""OpenCLIP's image towers as a model source: ``openclip:ARCH`` or ``openclip:ARCH/PRETRAINED``.

Inside backbones/sources. The network is the CLIP model's ``visual`` tower; its taps are OpenCLIP's own
``forward_intermediates``: ``blockN`` (a ViT's tokens, class token first) or ``stageN`` (a ResNet's or a timm
trunk's maps), plus ``embedding``, the image embedding the tower returns (after its pooling and projection: what
CLIP's linear probe reads), cached as it is. Its preprocessing is the pretrained tag's (mean, std, interpolation,
resize mode) at the tower's input size. The weights are a pretrained tag of OpenCLIP's table (``--weights TAG``
or the name's ``/PRETRAINED``; ``imagenet``: the name's tag, else the architecture's first), loaded by OpenCLIP
with ``weights_only`` (no pickle runs code), from the local caches unless ``--download``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

from featcache.backbones.sources import MODEL_SOURCES, ModelSource, no_such_weights, unknown_backbone
from featcache.backbones.spec import BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError, closest, need

OPENCLIP = "openclip:"
EMBEDDING = "embedding"  # the tap of the tower's image embedding


def open_clip_module():
    """``open_clip``, or one line naming the extra that installs it."""
    return need("open_clip", "an openclip: model", "openclip")


def split(name: str) -> tuple[str, str | None]:
    """``openclip:ARCH/TAG`` -> (ARCH, TAG or None)."""
    arch, _, tag = name[len(OPENCLIP):].partition("/")
    return arch, tag or None


class OpenCLIPSource(ModelSource):
    """OpenCLIP's image towers: pretrained tags, ``forward_intermediates``, the image embedding as a tap."""

    prefix = OPENCLIP
    param_prefix = "net."
    fold_batchnorm = False

    def names(self) -> list[str]:
        """OpenCLIP's architectures: its package's model configs, read without importing it (an import takes
        about 5 s, and every unknown name or pattern asks every source); once imported, its own list (configs
        added with ``open_clip.add_model_config`` too)."""
        import importlib.util
        import sys

        if "open_clip" in sys.modules:
            return [OPENCLIP + n for n in sys.modules["open_clip"].list_models()]
        found = importlib.util.find_spec("open_clip")
        if found is None or not found.submodule_search_locations:
            return []
        configs = [p for folder in found.submodule_search_locations for p in Path(folder, "model_configs").glob("*.json")]
        return sorted((OPENCLIP + p.stem for p in configs), key=lambda n: n.lower())

    def discover(self, name: str) -> BackboneSpec:
        return _openclip_spec(name)

    def has_weights(self, name: str) -> bool:
        arch, _ = split(name)
        return bool(_tags(arch))

    def size(self, name: str) -> tuple[int | None, int | None]:
        arch, _ = split(name)
        try:
            visual = _meta_visual(arch)
        except Exception:  # noqa: BLE001 - a model that cannot be built has no size to show
            return None, None
        return int(sum(p.numel() for p in visual.parameters())), _image_size(visual)

    def builder(self, arch: str):
        """``build(tag)``: the image tower with the pretrained tag's weights, or None for random weights."""

        def build(tag):
            with _quiet():
                model = open_clip_module().create_model(arch, pretrained=tag, weights_only=True,
                                                        require_pretrained=tag is not None)
            return model.visual

        return build

    def tags(self, spec: BackboneSpec) -> list[str]:
        return _tags(spec.weights_name)

    def named(self, spec: BackboneSpec, weights: str):
        """The OpenCLIP tag ``weights`` names (``imagenet``: the name's own tag, else the first listed)."""
        known = self.tags(spec)
        _, own = split(spec.name)
        tag = (own or (known[0] if known else None)) if weights == "imagenet" else weights
        if tag not in known:
            raise no_such_weights(spec, weights, known)
        return tag

    def identity(self, spec: BackboneSpec, w, kind: str) -> dict:
        cfg = open_clip_module().get_pretrained_cfg(spec.weights_name, w)
        return {"kind": kind, "id": f"openclip/{spec.weights_name}/{w}", "hub": cfg.get("hf_hub") or cfg.get("url")}

    def input_defaults(self, spec: BackboneSpec, w) -> dict:
        _, own = split(spec.name)
        tag = w or own or next(iter(_tags(spec.weights_name)), None)
        cfg = open_clip_module().get_pretrained_cfg(spec.weights_name, tag) if tag else {}
        return openclip_input(spec.name, {**(_meta_visual(spec.weights_name).preprocess_cfg or {}), **cfg},
                              spec.input.image_size)

    def where(self, spec: BackboneSpec, w) -> str:
        return " in the Hugging Face cache (or OpenCLIP's)"

    @staticmethod
    def classifier_output(model) -> str | None:
        return None  # an image embedding, not one score per class

    def extractor(self, spec: BackboneSpec, backbone, taps):
        return _openclip_taps_class()(spec, backbone, taps)


def _tags(arch: str) -> list[str]:
    open_clip = open_clip_module()
    return [tag for a, tag in open_clip.list_pretrained() if a == arch]


def openclip_input(name: str, cfg: dict, size: int) -> dict:
    """A pretrained tag's preprocessing in featcache's terms: ``shortest`` is a centre crop of the whole shorter
    side, ``squash`` a stretch; ``longest`` (a letterbox) featcache does not draw."""
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise FeatcacheError(f"{name}: its weights were fed with resize mode {mode!r} (padded to a square), which "
                             f"featcache does not do: choose another tag or model")
    interpolation = cfg.get("interpolation", "bicubic")
    return {"image_size": size, "mean": tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            "std": tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
            "crop_pct": 1.0, "resize": "center-crop" if mode == "shortest" else "stretch"}


@contextlib.contextmanager
def _quiet():
    """OpenCLIP without its root-logger warning for random weights ("No pretrained weights loaded": asked for)
    and its prints."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=8)
def _meta_visual(arch: str):
    import torch

    open_clip = open_clip_module()
    if arch not in open_clip.list_models():
        raise unknown_backbone(OPENCLIP + arch)
    with torch.device("meta"), _quiet():
        return open_clip.create_model(arch, pretrained=None, device="meta").visual.eval()


def _image_size(visual) -> int:
    size = getattr(visual, "image_size", None) or (visual.preprocess_cfg or {}).get("size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _is_vit(visual) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks")


def _openclip_spec(name: str) -> BackboneSpec:
    import torch

    open_clip = open_clip_module()
    arch, tag = split(name)
    visual = _meta_visual(arch)
    if tag is not None and tag not in _tags(arch):
        known = _tags(arch)
        guess = closest(tag, known)
        raise FeatcacheError(f"{name}: OpenCLIP has no pretrained tag {tag!r} for {arch}"
                             f"{f'; did you mean {guess!r}?' if guess else ''} (its tags: "
                             f"{', '.join(known[:8]) or 'none'}{' ...' if len(known) > 8 else ''})")
    if not hasattr(visual, "forward_intermediates"):
        raise FeatcacheError(f"{name}: its image tower ({type(visual).__name__}) has no forward_intermediates, so "
                             f"featcache cannot find its taps: choose another model")
    size = _image_size(visual)
    vit = _is_vit(visual)
    with torch.no_grad():
        out = visual.forward_intermediates(torch.empty(1, 3, size, size, device="meta"), intermediates_only=False,
                                           **({"output_fmt": "NLC"} if vit else {}))
    maps, embedding = out["image_intermediates"], out["image_features"]
    if vit:
        patch = visual.patch_size[0]
        blocks = [f"transformer.resblocks.{i}" for i in range(len(maps))]
        taps = [Tap(f"block{i + 1}", m.shape[-1], patch, module=blocks[i], layout="tokens") for i, m in enumerate(maps)]
    else:
        blocks = [n for n, _ in visual.named_children() if n.startswith(("layer", "stages"))]
        blocks = blocks if len(blocks) == len(maps) else [""] * (len(maps) - len(blocks)) + blocks
        taps = [Tap(f"stage{i + 1}", m.shape[1], max(1, size // m.shape[-1]), module=blocks[i])
                for i, m in enumerate(maps)]
    aliases = stage_aliases(tuple(taps))  # early, mid, late: of the blocks; the embedding is a tap of its own
    taps.append(Tap(EMBEDDING, int(embedding.shape[-1]), taps[-1].stride, layout="embedding"))
    blocks = [b for b in blocks if b]
    tag = tag or next(iter(_tags(arch)), None)
    fed = openclip_input(name, {**(visual.preprocess_cfg or {}),
                                **(open_clip.get_pretrained_cfg(arch, tag) if tag else {})}, size)
    return BackboneSpec(
        name=name, build=MODEL_SOURCES["openclip"].builder(arch), taps=tuple(taps), aliases=aliases,
        weights_name=arch, blocks=tuple(blocks), last_block=tuple(blocks[-1:]), model_source="openclip",
        input=InputConfig(**{k: v for k, v in fed.items() if k != "resize"}, fixed_size=vit),
        prefix_tokens=1 if vit else 0,
        versions={"open_clip": open_clip.__version__, "torch": torch.__version__.split("+")[0]},
    )


@functools.lru_cache(maxsize=1)
def _openclip_taps_class():
    import torch

    class OpenCLIPTaps(torch.nn.Module):
        """OpenCLIP's ``forward_intermediates`` as ``{tap: output}``: a ViT's tokens (N, T, D) with the class token
        first, a CNN's maps, and ``embedding`` where asked."""

        def __init__(self, spec, net, taps):
            super().__init__()
            self.net = net
            self.embedding = EMBEDDING in taps
            self.names = tuple(t for t in taps if t != EMBEDDING)
            self.indices = [spec.tap_names.index(spec.tap(t).node) for t in self.names]
            self.vit = spec.taps[0].layout == "tokens"
            self.whole = bool(spec.modules)  # a --module tap may sit past the last tap asked for

        def forward(self, x):
            order = sorted(set(self.indices))
            extra = {"output_fmt": "NLC", "output_extra_tokens": True} if self.vit else {}
            out = self.net.forward_intermediates(x, indices=order or [0], intermediates_only=not self.embedding,
                                                 stop_early=not (self.embedding or self.whole), **extra)
            maps = out["image_intermediates"]
            if self.vit:
                maps = [torch.cat([prefix, tokens], dim=1)
                        for prefix, tokens in zip(out["image_intermediates_prefix"], maps)]
            by_index = dict(zip(order, maps))
            result = {name: by_index[i] for name, i in zip(self.names, self.indices)}
            if self.embedding:
                result[EMBEDDING] = out["image_features"]
            return result

    return OpenCLIPTaps


MODEL_SOURCES.register("openclip")(OpenCLIPSource())
