"""Backbone registry: how to build each frozen network, its weights and its taps.

Second box of the flow (dataset -> **backbone** -> extract -> store). Taps are declared
data, as in timm's ``feature_info``: each backbone lists its stage outputs in order with
the torchvision node name, channel count and stride, plus the aliases ``early`` (end of
the stride-8 stage), ``mid`` (end of the stride-16 stage) and ``late`` (the final feature
map). ``tests/test_backbones.py`` checks every declaration against a real forward pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import FeatcacheError, unknown
from featcache.registry import Registry

ALIASES = ("early", "mid", "late")
WEIGHT_KEYWORDS = ("imagenet", "random")


@dataclass(frozen=True)
class Tap:
    """One stage output: ``node`` is the torchvision module name, ``stride`` its reduction."""

    node: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """Everything featcache knows about one backbone.

    Attributes:
        name: registry key, e.g. ``resnet50``.
        build: ``build(weights)`` returns the torchvision model; ``weights`` is a
            torchvision weights enum member or None for random initialisation.
        taps: stage outputs in forward order.
        aliases: ``early``/``mid``/``late`` -> tap node.
        weights_name: torchvision weights enum name (``get_model_weights`` key) or None
            when no pretrained weights exist.
        head_prefixes: state-dict prefixes of the classifier, ignored when loading a
            local state dict (a fine-tuned classifier may have any number of classes).
        blocks: module-name prefixes of the trainable blocks in forward order, the units
            of ``--unfreeze last-N``.
        last_block: the modules ``--unfreeze last-block`` makes trainable.
    """

    name: str
    build: Callable
    taps: tuple[Tap, ...]
    aliases: dict[str, str]
    weights_name: str | None = None
    head_prefixes: tuple[str, ...] = field(default_factory=tuple)
    blocks: tuple[str, ...] = field(default_factory=tuple)
    last_block: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.node for t in self.taps)

    def tap(self, name: str) -> Tap:
        """The tap called ``name`` or aliased ``name``; unknown names raise."""
        node = self.aliases.get(name, name)
        for tap in self.taps:
            if tap.node == node:
                return tap
        raise unknown("--taps", name, (*self.tap_names, *self.aliases))


BACKBONES = Registry("--backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (tests register a tiny backbone this way)."""
    missing = set(ALIASES) - set(spec.aliases)
    if missing or not set(spec.aliases.values()) <= set(spec.tap_names):
        raise ValueError(f"backbone {spec.name}: aliases must map {ALIASES} to declared taps")
    if not set(spec.last_block) <= set(spec.blocks):
        raise ValueError(f"backbone {spec.name}: last_block must be among its blocks")
    return BACKBONES.register(spec.name)(spec)


def _torchvision(name: str) -> Callable:
    def build(weights):
        import torchvision

        return torchvision.models.get_model(name, weights=weights)

    return build


def _resnet(name: str, widths: tuple[int, int, int, int]) -> BackboneSpec:
    layers = tuple(Tap(f"layer{i + 1}", w, 4 * 2**i) for i, w in enumerate(widths))
    return BackboneSpec(
        name=name,
        build=_torchvision(name),
        taps=layers,
        aliases={"early": "layer2", "mid": "layer3", "late": "layer4"},
        weights_name=name,
        head_prefixes=("fc.",),
        blocks=("layer1", "layer2", "layer3", "layer4"),
        last_block=("layer4",),
    )


register_backbone(_resnet("resnet18", (64, 128, 256, 512)))
register_backbone(_resnet("resnet50", (256, 512, 1024, 2048)))
register_backbone(
    BackboneSpec(
        name="mobilenet_v2",
        build=_torchvision("mobilenet_v2"),
        taps=(
            Tap("features.1", 16, 2),
            Tap("features.3", 24, 4),
            Tap("features.6", 32, 8),
            Tap("features.13", 96, 16),
            Tap("features.17", 320, 32),
            Tap("features.18", 1280, 32),
        ),
        aliases={"early": "features.6", "mid": "features.13", "late": "features.18"},
        weights_name="mobilenet_v2",
        head_prefixes=("classifier.",),
        blocks=tuple(f"features.{i}" for i in range(19)),
        last_block=("features.17", "features.18"),  # the last inverted residual and the 1x1 conv to 1280
    )
)
register_backbone(
    BackboneSpec(
        name="vgg16",
        build=_torchvision("vgg16"),
        taps=(
            Tap("features.4", 64, 2),
            Tap("features.9", 128, 4),
            Tap("features.16", 256, 8),
            Tap("features.23", 512, 16),
            Tap("features.30", 512, 32),
        ),
        aliases={"early": "features.16", "mid": "features.23", "late": "features.30"},
        weights_name="vgg16",
        head_prefixes=("classifier.",),
        blocks=tuple(f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),  # the convolutions
        last_block=("features.24", "features.26", "features.28"),  # conv block 5
    )
)


# --- weights ---------------------------------------------------------------------------


def _imagenet_weights(spec: BackboneSpec):
    if spec.weights_name is None:
        raise FeatcacheError(
            f"backbone {spec.name} has no imagenet weights: use --weights random or --weights PATH"
        )
    import torchvision

    return torchvision.models.get_model_weights(spec.weights_name).DEFAULT


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(weights: str) -> None:
    """Reject a ``--weights`` value that is neither a keyword nor an existing file."""
    if weights not in WEIGHT_KEYWORDS and not Path(weights).is_file():
        raise FeatcacheError(
            f"--weights must be imagenet, random or the path of a state-dict file; "
            f"no file at {weights}"
        )


def weights_identity(spec: BackboneSpec, weights: str, seed: int) -> dict:
    """What identifies the numbers the weights produce, for the cache fingerprint.

    Cheap: it never loads the network (a local file is hashed, not unpickled).
    """
    check_weights(weights)
    if weights == "imagenet":
        w = _imagenet_weights(spec)
        return {"kind": "imagenet", "id": str(w), "url": w.url}
    if weights == "random":
        return {"kind": "random", "seed": seed}
    return {"kind": "file", "sha256": _sha256(Path(weights))}


def build_backbone(spec: BackboneSpec, weights: str, seed: int):
    """The backbone in eval mode with the requested weights, all parameters frozen."""
    import torch

    check_weights(weights)
    if weights == "imagenet":
        w = _imagenet_weights(spec)
        try:
            model = spec.build(w)
        except Exception as exc:  # no network: URLError, OSError, RuntimeError, ...
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
            raise FeatcacheError(
                f"cannot get imagenet weights for {spec.name} ({type(exc).__name__}: no network "
                f"and no cached copy at {cached}): use --weights random, or --weights PATH "
                f"with a local state-dict file"
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build(None)
        if weights != "random":
            load_state_dict_file(model, Path(weights), spec)
    return model.eval().requires_grad_(False)


def load_state_dict_file(model, path: Path, spec: BackboneSpec) -> None:
    """Load a local state dict, ignoring the classifier; wrong keys or shapes raise."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatcacheError(f"cannot read weights file {path}: it is not a torch state dict") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatcacheError(f"weights file {path} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}

    own = model.state_dict()
    needed = {k for k in own if not k.startswith(spec.head_prefixes)}
    missing = sorted(needed - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in {spec.name}"
        for k in sorted(needed & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if mismatched:
        problems.append(f"shape of {mismatched[0]}" + (f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""))
    if problems:
        raise FeatcacheError(f"weights file {path} does not fit {spec.name}: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in needed}, strict=False)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
