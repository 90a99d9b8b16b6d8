"""Backbone registry: how to build each frozen network and its taps.

Second box of the flow (dataset -> **backbone** -> extract -> store). Taps are data, as in
timm's ``feature_info``: each backbone lists its stage outputs in order with the module
(graph node) name, channel count and stride, plus the aliases ``early`` (end of the stride-8
stage), ``mid`` (end of the stride-16 stage) and ``late`` (the final feature map). The four
study backbones are declared here by hand; any other torchvision model or ``timm:NAME`` gets
the same data from :mod:`featcache.backbones.discovery` when first looked up.
``tests/test_backbones.py`` checks every declaration against a real forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from featcache.errors import FeatcacheError, unknown
from featcache.registry import Registry

ALIASES = ("early", "mid", "late")
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class Tap:
    """One stage output.

    Attributes:
        node: the tap's name in the cache (a declared backbone's module name, else ``stageN`` / ``blockN``).
        channels: channels of the map (the token width for a transformer).
        stride: input pixels per map cell (the patch size for a transformer).
        module: the network's own module or graph-node name, where it differs from ``node``.
        layout: ``nchw`` maps, ``nhwc`` maps (torchvision's Swin) or ``tokens`` (N, T, D) with the
            prefix (class) tokens first.
    """

    node: str
    channels: int
    stride: int
    module: str = ""
    layout: str = "nchw"

    @property
    def graph_node(self) -> str:
        """What the network calls this output (``create_feature_extractor``'s return node)."""
        return self.module or self.node


@dataclass(frozen=True)
class InputConfig:
    """How a model's pretrained weights were fed: the defaults of its preprocessing."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    fixed_size: bool = False  # position embeddings for this size only (most ViTs)


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
        source: ``declared``, ``torchvision`` or ``timm`` (discovered).
        input: the preprocessing the weights expect; None for the declared four, whose fixed
            defaults (224 px, ImageNet mean/std, bilinear, no crop margin) their caches were made with.
        prefix_tokens: class/register tokens ahead of the patch tokens (transformers).
        versions: library versions that define the network, part of a discovered model's fingerprint.
    """

    name: str
    build: Callable
    taps: tuple[Tap, ...]
    aliases: dict[str, str]
    weights_name: str | None = None
    head_prefixes: tuple[str, ...] = field(default_factory=tuple)
    blocks: tuple[str, ...] = field(default_factory=tuple)
    last_block: tuple[str, ...] = field(default_factory=tuple)
    source: str = "declared"
    input: InputConfig | None = None
    prefix_tokens: int = 0
    versions: dict = field(default_factory=dict)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.node for t in self.taps)

    @property
    def uniform_names(self) -> tuple[str, ...]:
        """``stage1..N`` (``block1..N`` for a transformer's blocks): the same names for every model."""
        word = "block" if self.taps and self.taps[0].layout == "tokens" else "stage"
        return tuple(f"{word}{i + 1}" for i in range(len(self.taps)))

    def tap(self, name: str) -> Tap:
        """The tap called ``name``: its cache name, alias, uniform ``stageN`` name or module name."""
        node = self.aliases.get(name, name)
        for uniform, tap in zip(self.uniform_names, self.taps):
            if node in (tap.node, uniform, tap.module):
                return tap
        raise unknown(f"--taps of {self.name}", name, (*self.tap_names, *self.aliases))

    def alias_of(self, node: str) -> str:
        """``early`` / ``mid`` / ``late`` for a tap that has one, else its name."""
        return {n: a for a, n in self.aliases.items()}.get(node, node)


class BackboneRegistry(Registry):
    """The declared backbones; a lookup of any other name discovers it (torchvision or ``timm:NAME``)."""

    def lookup(self, name: str) -> BackboneSpec:
        if name in self:
            return self[name]
        from featcache.backbones.discovery import discover

        return discover(name)

    def get(self, name, default=None):
        """A declared or discoverable backbone, or ``default`` (never raises)."""
        try:
            return self.lookup(name)
        except FeatcacheError:
            return default


BACKBONES = BackboneRegistry("--backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (tests register a tiny backbone this way)."""
    missing = set(ALIASES) - set(spec.aliases)
    if missing or not set(spec.aliases.values()) <= set(spec.tap_names):
        raise ValueError(f"backbone {spec.name}: aliases must map {ALIASES} to declared taps")
    if not set(spec.last_block) <= set(spec.blocks):
        raise ValueError(f"backbone {spec.name}: last_block must be among its blocks")
    strides = [t.stride for t in spec.taps]
    if strides != sorted(strides) or any(t.layout not in LAYOUTS for t in spec.taps):
        raise ValueError(f"backbone {spec.name}: strides must never decrease and layouts be among {LAYOUTS}")
    return BACKBONES.register(spec.name)(spec)


def stage_aliases(taps: tuple[Tap, ...]) -> dict[str, str]:
    """``early``: the last stride-8 tap, ``mid``: the last stride-16 tap, ``late``: the final one.

    A model without those strides (a plain ViT: every block at stride 16) takes the ends of the
    first and second thirds of its taps instead.
    """
    names = [t.node for t in taps]
    last_at = {t.stride: t.node for t in taps[:-1]}
    if 8 in last_at and 16 in last_at:
        return {"early": last_at[8], "mid": last_at[16], "late": names[-1]}
    n = len(names)
    return {"early": names[max(0, n // 3 - 1)], "mid": names[max(0, 2 * n // 3 - 1)], "late": names[-1]}


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


