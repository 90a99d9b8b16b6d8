"""What featcache knows about a backbone, as data: its taps, aliases, blocks and input defaults.

Inside backbones, below the registry and discovery (spec -> registry / discovery / graph /
weights): each backbone lists its stage outputs in order with the module (graph node) name,
channel count and stride, as timm's ``feature_info`` does, and the aliases ``early`` (end of the
stride-8 stage), ``mid`` (end of the stride-16 stage) and ``late`` (the final feature map).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from featcache.errors import unknown

ALIASES = ("early", "mid", "late")
LAYOUTS = ("nchw", "nhwc", "tokens")  # the layouts a declared backbone's taps may have
FLAT = ("logits", "embedding", "flatten")  # one row per image, cached as they are (flatten: any output, flattened)
WHOLE = "whole"  # a fingerprint's mark of a tap cached as it is (logits are known by their name)
POOLINGS = ("avg", "max", "avgmax", "cls", "cls+avg")  # --pooling, and a --module tap's own (NAME:cls)


@dataclass(frozen=True)
class Tap:
    """One stage output.

    Attributes:
        node: the tap's name in the cache (a declared backbone's module name, else ``stageN`` / ``blockN``).
        channels: channels of the map (the token width for a transformer).
        stride: input pixels per map cell (the patch size for a transformer).
        module: the network's own module or graph-node name, where it differs from ``node``.
        layout: ``nchw`` maps, ``nhwc`` maps (torchvision's Swin), ``tokens`` (N, T, D) with the
            prefix (class) tokens first, or ``logits``: the source classifier's output (N, classes), stored
            as it is (``--logits``: what LEEP and NCE read).
        pooling: the tap's own pooling (a ``--module NAME:cls`` tap), where it is not the request's.
        norm: a module of the network its output passes through before pooling (``--module NAME@NORM``: a
            transformer's final norm on an earlier block, as dinov2's ``get_intermediate_layers(norm=True)``).
    """

    node: str
    channels: int
    stride: int
    module: str = ""
    layout: str = "nchw"
    pooling: str = ""
    norm: str = ""

    @property
    def graph_node(self) -> str:
        """What the network calls this output (``create_feature_extractor``'s return node)."""
        return self.module or self.node

    def width(self, pooling: str) -> int:
        """Columns of the tap as cached: its channels pooled (by its own pooling where it has one); logits and an
        embedding as they are."""
        return self.channels if self.layout in FLAT else pooled_dim(self.channels, self.pooling or pooling)


LOGITS = "logits"  # the tap name of a source classifier's output


def pooled_dim(channels: int, pooling: str) -> int:
    """Columns of a map of ``channels`` pooled by ``pooling`` (two side by side, ``avgmax`` and ``cls+avg``:
    twice)."""
    return 2 * channels if pooling in ("avgmax", "cls+avg") else channels


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
        model_source: its entry in ``MODEL_SOURCES``: ``declared``, ``torchvision`` or ``timm`` (discovered).
        input: the preprocessing the weights expect; None for the declared four, whose fixed
            defaults (224 px, ImageNet mean/std, bilinear, no crop margin) their caches were made with.
        prefix_tokens: class/register tokens ahead of the patch tokens (transformers).
        versions: library versions that define the network, part of a discovered model's fingerprint.
        modules: the taps ``--module`` added (named by their module), after the model's own.
    """

    name: str
    build: Callable
    taps: tuple[Tap, ...]
    aliases: dict[str, str]
    weights_name: str | None = None
    head_prefixes: tuple[str, ...] = field(default_factory=tuple)
    blocks: tuple[str, ...] = field(default_factory=tuple)
    last_block: tuple[str, ...] = field(default_factory=tuple)
    model_source: str = "declared"
    input: InputConfig | None = None
    prefix_tokens: int = 0
    versions: dict = field(default_factory=dict)
    modules: tuple[str, ...] = ()

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.node for t in self.taps)

    @property
    def uniform_names(self) -> tuple[str, ...]:
        """``stage1..N`` (``block1..N`` for a transformer's blocks): the same names for every model (a tap that
        is one row per image already, ``logits`` or ``embedding``, and a ``--module`` tap keep their own)."""
        word = "block" if self.taps and self.taps[0].layout == "tokens" else "stage"
        return tuple(tap.node if tap.layout in FLAT or tap.node in self.modules else f"{word}{i + 1}"
                     for i, tap in enumerate(self.taps))  # logits, an embedding, a --module tap: their own name

    def tap(self, name: str) -> Tap:
        """The tap called ``name``: its cache name, alias, uniform ``stageN`` name or module name."""
        node = self.aliases.get(name, name)
        for uniform, tap in zip(self.uniform_names, self.taps):
            if node in (tap.node, uniform, tap.module):
                return tap
        names = dict.fromkeys([*self.uniform_names, *self.aliases, *self.tap_names,
                               *(t.module for t in self.taps if t.module)])  # every name a tap answers to
        raise unknown(f"--taps of {self.name}", name, names)

    def alias_of(self, node: str) -> str:
        """``early`` / ``mid`` / ``late`` for a tap that has one, else its name."""
        return {n: a for a, n in self.aliases.items()}.get(node, node)


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
