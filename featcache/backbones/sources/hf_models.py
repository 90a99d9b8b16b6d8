"""Hugging Face ``transformers`` vision models as a model source: ``hf:ORG/NAME`` or ``hf:FOLDER``.

Inside backbones/sources. A name is a Hub repository in the local Hugging Face cache, or a folder that holds a
``save_pretrained`` checkpoint. Its taps are the model's own ``hidden_states`` (``reshaped_hidden_states`` where
a hierarchical transformer gives maps): ``blockN`` for a transformer's tokens, ``stageN`` for a CNN's or Swin's
maps, found by one pass on the meta device; ``logits`` where the checkpoint is an image classifier. CLIP and
SigLIP checkpoints give their vision tower. The preprocessing is read from ``preprocessor_config.json`` (as
JSON: no processor class is built) and lands in the fingerprint like any other.

Data is data: a checkpoint someone shares is read without running anything it holds. Its ``config.json`` must
name a model type ``transformers`` ships (``auto_map``: custom code, refused; ``trust_remote_code`` is never
set), and weights load from ``.safetensors`` only (``pytorch_model.bin`` is a pickle). Nothing is fetched from
the Hub unless the request says ``--download``: a model missing from the local cache is one line at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path

from featcache.backbones.sources import LOGITS, MODEL_SOURCES, ModelSource, no_such_weights
from featcache.backbones.spec import BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError, need
from featcache.files import file_sha256

HF = "hf:"
PRETRAINED = "pretrained"  # the checkpoint's own weights (--weights imagenet or pretrained)
MAX_CONFIG_BYTES = 4 << 20  # a config.json or preprocessor_config.json
_DOWNLOADS: list = []  # non-empty once a request in this process said --download


def allow_downloads(allowed: bool = True) -> None:
    """Let ``hf:`` models missing from the local cache be fetched from the Hub (a request's ``--download``)."""
    _DOWNLOADS[:] = [True] if allowed else []


def transformers_module():
    """``transformers``, or one line naming the extra that installs it."""
    return need("transformers", "an hf: model", "hf")


class HFSource(ModelSource):
    """``transformers`` vision models: ``hidden_states`` as taps, the checkpoint's processor config as input."""

    prefix = HF
    param_prefix = "net."
    fold_batchnorm = False

    def names(self) -> list[str]:
        """The model repositories in the local Hugging Face cache (nothing fetched)."""
        try:
            from huggingface_hub import scan_cache_dir

            return sorted(HF + r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
        except Exception:  # noqa: BLE001 - no cache yet, or huggingface_hub missing: nothing cached to offer
            return []

    def discover(self, name: str) -> BackboneSpec:
        return _hf_spec(name)

    def size(self, name: str) -> tuple[int | None, int | None]:
        try:
            spec = _hf_spec(name)
            model = _meta_model(spec.weights_name)
        except FeatcacheError:
            return None, None
        return int(sum(p.numel() for p in model.parameters())), spec.input.image_size

    def has_weights(self, name: str) -> bool:
        try:
            return bool(_checkpoint(name[len(HF):]).weights)
        except FeatcacheError:
            return False

    def builder(self, ref: str):
        """``build(tag)``: the model with the checkpoint's weights (``pretrained``), or None: random weights."""

        def build(tag):
            checkpoint = _checkpoint(ref)
            cls, config = _model_class(checkpoint)
            if tag is None:
                return cls(config)
            if not checkpoint.weights:
                raise no_weights(ref, checkpoint)
            with _quiet():  # no progress bar of its own, no load report (a CLIP checkpoint's text tower is unused)
                return cls.from_pretrained(str(checkpoint.folder), local_files_only=True, use_safetensors=True,
                                           trust_remote_code=False)

        return build

    def tags(self, spec: BackboneSpec) -> list[str]:
        return [PRETRAINED] if _checkpoint(spec.weights_name).weights else []

    def named(self, spec: BackboneSpec, weights: str):
        """``imagenet`` (featcache's word for a model's default weights) and ``pretrained``: the checkpoint's."""
        if weights not in ("imagenet", PRETRAINED):
            raise no_such_weights(spec, weights, self.tags(spec))
        checkpoint = _checkpoint(spec.weights_name)
        if not checkpoint.weights:
            raise no_weights(spec.weights_name, checkpoint)
        return PRETRAINED

    def identity(self, spec: BackboneSpec, w, kind: str) -> dict:
        checkpoint = _checkpoint(spec.weights_name)
        if checkpoint.revision:
            return {"kind": kind, "id": f"hf/{spec.weights_name}", "revision": checkpoint.revision}
        digest = hashlib.sha256()
        for path in checkpoint.weights:
            digest.update(file_sha256(path).encode())
        return {"kind": kind, "id": f"hf/{checkpoint.folder.name}", "sha256": digest.hexdigest()}

    def input_defaults(self, spec: BackboneSpec, w) -> dict:
        return dict(_checkpoint(spec.weights_name).input)

    def where(self, spec: BackboneSpec, w) -> str:
        checkpoint = _checkpoint(spec.weights_name)
        return " in the Hugging Face cache" if checkpoint.revision else f" in {checkpoint.folder}"

    @staticmethod
    def classifier_output(model) -> str | None:
        """``logits``, where the checkpoint is an image classifier (``...ForImageClassification``)."""
        return LOGITS if type(model).__name__.endswith("ForImageClassification") else None

    @staticmethod
    def logits_of(output):
        return getattr(output, "logits", None)

    def extractor(self, spec: BackboneSpec, backbone, taps):
        return _hf_taps_class()(spec, backbone, taps)


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def no_weights(ref: str, checkpoint) -> FeatcacheError:
    pickled = [p.name for p in checkpoint.folder.glob("*.bin")] + [p.name for p in checkpoint.folder.glob("*.pt*")]
    why = (f"it holds only {pickled[0]}, a pickle featcache does not load (a shared file must not run code): "
           f"save it with save_pretrained(..., safe_serialization=True)" if pickled else "it holds no .safetensors file")
    return FeatcacheError(f"hf:{ref} has no weights featcache can load ({why}); or use --weights random")


class _Checkpoint:
    """A checkpoint's folder (a local folder, or its snapshot in the Hugging Face cache), its config as JSON,
    its safetensors files, its input defaults and, for a Hub repository, the commit it was cached at."""

    def __init__(self, ref: str):
        self.ref = ref
        local = Path(ref).expanduser()
        if local.is_dir():
            self.folder, self.revision = local, None
        else:
            self.folder = _hub_folder(ref)
            self.revision = self.folder.name  # snapshots/<commit>
        self.config = _json(self.folder / "config.json", ref, required=True)
        if "auto_map" in self.config or not isinstance(self.config.get("model_type"), str):
            raise FeatcacheError(f"hf:{ref} asks for custom code (its config.json has auto_map or no model_type): "
                                 f"featcache never runs code a checkpoint brings (no trust_remote_code)")
        self.weights = sorted(self.folder.glob("*.safetensors"))
        self.input = hf_input(_json(self.folder / "preprocessor_config.json", ref, required=False), self.config)


@functools.lru_cache(maxsize=32)
def _checkpoint(ref: str) -> _Checkpoint:
    return _Checkpoint(ref)


def _hub_folder(ref: str) -> Path:
    """The snapshot folder of Hub repository ``ref`` in the local cache (fetched first where --download)."""
    if ref.count("/") != 1 or not all(ref.split("/")):
        raise FeatcacheError(f"hf:{ref}: name a Hub repository as hf:ORG/NAME, or a folder that holds a "
                             f"save_pretrained checkpoint (config.json); no such folder")
    huggingface_hub = need("huggingface_hub", "an hf: model", "hf")
    patterns = ["*.json", "*.safetensors"]  # never a pickle, never code
    try:  # the local cache first, even with --download: a cached model needs no network
        return Path(huggingface_hub.snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not all of it)
        pass
    try:
        folder = huggingface_hub.snapshot_download(ref, allow_patterns=patterns, local_files_only=not _DOWNLOADS)
    except Exception as exc:  # noqa: BLE001 - offline misses, gated and unknown repositories come as many types
        if not _DOWNLOADS:
            raise FeatcacheError(f"hf:{ref} is not in the local Hugging Face cache: nothing is fetched without "
                                 f"--download (or name a folder holding a save_pretrained checkpoint)") from None
        raise FeatcacheError(f"cannot fetch hf:{ref} from the Hugging Face Hub ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else 'no message'})") from None
    return Path(folder)


def _json(path: Path, ref: str, required: bool) -> dict:
    from featcache.data.safe import read_regular

    try:
        data = json.loads(read_regular(path, "config file", MAX_CONFIG_BYTES))
    except FileNotFoundError:
        if required:
            raise FeatcacheError(f"hf:{ref}: {path} is missing: a save_pretrained checkpoint holds config.json") from None
        return {}
    except ValueError as exc:
        raise FeatcacheError(f"hf:{ref}: {path.name} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FeatcacheError(f"hf:{ref}: {path.name} does not hold a JSON object")
    return data


_RESAMPLE = {2: "bilinear", 3: "bicubic", 1: "bicubic", 0: "bilinear"}  # PIL's codes: lanczos as bicubic


def hf_input(processor: dict, config: dict) -> dict:
    """An image-processor config's preprocessing in featcache's terms (what the processor does, step by step:
    a resize to ``size``, an optional centre crop to ``crop_size``, rescale and normalise)."""
    from featcache.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

    vision = config.get("vision_config") or {}
    fallback = int(vision.get("image_size") or config.get("image_size") or 224)
    size = processor.get("size") if processor.get("do_resize", True) else None
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    mean = processor.get("image_mean", IMAGENET_MEAN) if processor.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = processor.get("image_std", IMAGENET_STD) if processor.get("do_normalize", True) else (1.0, 1.0, 1.0)
    out = {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std),
           "interpolation": _RESAMPLE.get(processor.get("resample"), "bilinear"), "crop_pct": 1.0,
           "resize": "center-crop", "image_size": fallback}
    if isinstance(size, dict) and "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if crop:
            out.update(image_size=int(crop["height"]), crop_pct=round(int(crop["height"]) / short, 4))
        elif "crop_pct" in processor and short < 384:  # ConvNeXt's rule: resize to size / crop_pct, then crop
            out.update(image_size=short, crop_pct=float(processor["crop_pct"]))
        else:
            out.update(image_size=short)
    elif isinstance(size, dict) and "height" in size:
        out.update(image_size=int(size["height"]), resize="stretch")
        if crop:
            out.update(image_size=int(crop["height"]), resize="center-crop", crop_pct=round(
                int(crop["height"]) / int(size["height"]), 4))
    return out


def _model_class(checkpoint: _Checkpoint):
    """(class, config) that build the checkpoint's vision network: its image classifier, a CLIP/SigLIP
    checkpoint's vision tower, else the base model."""
    transformers = transformers_module()
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    try:
        config = transformers.AutoConfig.from_pretrained(str(checkpoint.folder), local_files_only=True,
                                                         trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise FeatcacheError(f"hf:{checkpoint.ref}: transformers {transformers.__version__} cannot read its "
                             f"config.json ({str(exc).splitlines()[0][:160]})") from None
    vision = getattr(config, "vision_config", None)
    if vision is not None:  # CLIP, SigLIP ...: the image tower alone
        config = vision
    kind = config.model_type
    names = MODEL_MAPPING_NAMES
    if vision is None and any(a.endswith("ForImageClassification") for a in (config.architectures or ())):
        names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if kind not in names:
        raise FeatcacheError(f"hf:{checkpoint.ref}: transformers has no vision model for model type {kind!r}")
    return getattr(transformers, names[kind]), config


def _meta_model(ref: str):
    import torch

    cls, config = _model_class(_checkpoint(ref))
    with torch.device("meta"):
        return cls(config).eval()


def _meta_states(model, size: int, **extra):
    """The hidden states' shapes of one pass on the meta device at ``size`` pixels, or None where it cannot run."""
    import torch

    try:
        with torch.no_grad():
            out = model(pixel_values=torch.empty(1, 3, size, size, device="meta"), output_hidden_states=True, **extra)
    except Exception:  # noqa: BLE001 - the model takes no input of this size
        return None
    states = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
    return [tuple(s.shape) for s in states]


def _hf_spec(name: str) -> BackboneSpec:
    import torch

    transformers = transformers_module()
    ref = name[len(HF):]
    checkpoint = _checkpoint(ref)
    model = _meta_model(ref)
    size = checkpoint.input["image_size"]
    shapes = _meta_states(model, size)
    if shapes is None or len(shapes) < 2:
        raise FeatcacheError(f"{name}: one pass at {size} px gives no hidden_states, so featcache cannot find its "
                             f"taps (is it a vision model?)")
    config = model.config
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    taps, prefix = [], 0
    blocks = _block_modules(model, len(shapes) - 1)
    for i, shape in enumerate(shapes[1:]):  # the first is the embedding, before any block
        module = blocks[i] if blocks else ""
        if len(shape) == 4:
            taps.append(Tap(f"stage{i + 1}", shape[1], max(1, size // shape[-1]), module=module))
        elif len(shape) == 3 and patch:
            prefix = shape[1] - (size // patch) ** 2
            if prefix < 0:
                raise FeatcacheError(f"{name}: its tokens do not form a {patch}-pixel patch grid: featcache cannot "
                                     f"pool them")
            taps.append(Tap(f"block{i + 1}", shape[2], patch, module=module, layout="tokens"))
        else:
            raise FeatcacheError(f"{name}: its hidden states are {shape}, neither maps nor patch tokens")
    taps = tuple(taps)
    other = size + 2 * (patch or 32)  # a second size: a ViT takes it only with its position embeddings stretched
    stretch = {"interpolate_pos_encoding": True} if _takes(model, "interpolate_pos_encoding") else {}
    fixed = _meta_states(model, other) is None and _meta_states(model, other, **stretch) is None
    head = type(model).__name__.endswith("ForImageClassification")
    base = getattr(model, "base_model_prefix", "")
    heads = sorted({n.split(".")[0] + "." for n, _ in model.named_parameters() if head and not n.startswith(base + ".")})
    return BackboneSpec(
        name=name, build=MODEL_SOURCES["hf"].builder(ref), taps=taps, aliases=stage_aliases(taps), weights_name=ref,
        head_prefixes=tuple(heads), blocks=tuple(blocks), last_block=(blocks[-1],) if blocks else (),
        model_source="hf", input=InputConfig(**{k: v for k, v in checkpoint.input.items() if k != "resize"},
                                             fixed_size=fixed),
        prefix_tokens=prefix,
        versions={"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                  "config": hashlib.sha256(json.dumps(checkpoint.config, sort_keys=True).encode()).hexdigest()[:16]},
    )


def _block_modules(model, count: int) -> list[str]:
    """The names of the blocks whose outputs are the hidden states: the ModuleList of ``count`` members
    (``encoder.layer``, ``encoder.stages``), or none found."""
    import torch

    lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return [f"{lists[0]}.{i}" for i in range(count)] if lists else []


@functools.lru_cache(maxsize=1)
def _hf_taps_class():
    import torch

    class HFTaps(torch.nn.Module):
        """A ``transformers`` model as ``{tap: output}``: its ``hidden_states`` (maps where it has reshaped
        ones), and ``logits`` where asked."""

        def __init__(self, spec, net, taps):
            super().__init__()
            self.net = net
            self.logits = LOGITS in taps
            self.names = tuple(t for t in taps if t != LOGITS)
            self.indices = [spec.tap_names.index(spec.tap(t).node) + 1 for t in self.names]  # [0]: the embedding
            self.maps = spec.taps[0].layout == "nchw"
            self.stretch = {"interpolate_pos_encoding": True} if not spec.input.fixed_size and \
                spec.taps[0].layout == "tokens" and _takes(net, "interpolate_pos_encoding") else {}

        def forward(self, x):
            out = self.net(pixel_values=x, output_hidden_states=True, **self.stretch)
            states = (getattr(out, "reshaped_hidden_states", None) if self.maps else None) or out.hidden_states
            result = {name: states[i] for name, i in zip(self.names, self.indices)}
            if self.logits:
                result[LOGITS] = out.logits
            return result

    return HFTaps


def _takes(net, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(net.forward).parameters


MODEL_SOURCES.register("hf")(HFSource())
