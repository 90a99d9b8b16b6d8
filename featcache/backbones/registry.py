"""Backbone registry: how to build each frozen network and its taps.

Stage 2 (data -> **backbones** -> extraction). Taps are data, as in
timm's ``feature_info``: each backbone lists its stage outputs in order with the module
(graph node) name, channel count and stride, plus the aliases ``early`` (end of the stride-8
stage), ``mid`` (end of the stride-16 stage) and ``late`` (the final feature map). The four
study backbones are declared here by hand; any other torchvision model or ``timm:NAME`` gets
the same data from :mod:`featcache.backbones.discovery` when first looked up.
``tests/test_backbones.py`` checks every declaration against a real forward pass.
"""

from __future__ import annotations

from featcache.backbones.sources import MODEL_SOURCES
from featcache.backbones.spec import ALIASES, LAYOUTS, BackboneSpec, InputConfig, Tap, stage_aliases
from featcache.errors import FeatcacheError
from featcache.registry import Registry

__all__ = ["BACKBONES", "BackboneSpec", "InputConfig", "Tap", "register_backbone", "stage_aliases"]

class BackboneRegistry(Registry):
    """The declared backbones; a lookup of any other name discovers it (torchvision or ``timm:NAME``)."""

    def lookup(self, name: str) -> BackboneSpec:
        if name in self:
            return self[name]
        from featcache.backbones.discovery import discover

        return discover(name, tuple(self))

    def get(self, name, default=None):
        """A declared or discoverable backbone, or ``default`` (never raises)."""
        try:
            return self.lookup(name)
        except FeatcacheError:
            return default


BACKBONES = BackboneRegistry("--backbone")


def listing(pattern: str = "*") -> list[tuple[str, str]]:
    """(name, source) of every usable backbone matching ``pattern``: the declared ones, then each source's
    (what ``featcache backbones --all`` and ``featcache.backbones()`` list)."""
    import fnmatch

    from featcache.backbones.sources import every_name

    rows = [(n, "declared") for n in sorted(BACKBONES) if fnmatch.fnmatch(n, pattern)]
    return rows + [(n, source) for n, source in every_name(pattern) if n not in BACKBONES]


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


def _resnet(name: str, widths: tuple[int, int, int, int]) -> BackboneSpec:
    layers = tuple(Tap(f"layer{i + 1}", w, 4 * 2**i) for i, w in enumerate(widths))
    return BackboneSpec(
        name=name,
        build=MODEL_SOURCES["declared"].builder(name),
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
        build=MODEL_SOURCES["declared"].builder("mobilenet_v2"),
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
        build=MODEL_SOURCES["declared"].builder("vgg16"),
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


