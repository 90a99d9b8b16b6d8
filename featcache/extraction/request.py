"""``ExtractRequest``: what ``featcache extract`` (and its API function and pipeline table) asks for.

Inside extraction (request -> config -> run). :class:`FeatureFields` are the fields every request
that reads a cache shares (the backbones, the dataset, weights and preprocessing: what picks
a cache file); each stage's request adds its own. :meth:`FeatureFields.features` is the one
place those fields become an :class:`~featcache.extraction.config.ExtractConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from featcache.data.preprocess import INTERPOLATIONS, RESIZES, PreprocessConfig
from featcache.data.request import DataFields
from featcache.extraction.config import DTYPES, POOLINGS, PRECISIONS, ExtractConfig, available_cores
from featcache.requests import at_least, carried, device_option, option, quiet_option


@dataclass(frozen=True)
class FeatureFields(DataFields):
    """The backbones, dataset, weights and preprocessing: everything that picks a cache file."""

    backbone: tuple[str, ...] = option(("resnet50",), metavar="NAME",
                                       help="Backbone; repeat for several (featcache backbones lists them; any "
                                            "torchvision model, or timm:NAME).")
    weights: str = option("imagenet", help="imagenet (torchvision's default weights / timm's default tag), a weights "
                                           "tag (IMAGENET1K_V2, a1_in1k ...: featcache backbones NAME lists them), "
                                           "random, or the path of a local state dict.")
    image_size: int | None = option(None, help="Input size in pixels (square) [default: the backbone's: 224 for the "
                                               "study backbones, what the weights were trained at for any other].")
    resize: str | None = option(None, choices=RESIZES,
                                help="center-crop: shorter side to --image-size / --crop-pct, then centre crop; "
                                     "stretch: resize to a square [default: the weights' own: center-crop, stretch "
                                     "for a Hugging Face model whose processor resizes to a square].")
    crop_pct: float | None = option(None, help="Share of the resized image the centre crop keeps [default: the "
                                               "weights' own; 1 for the study backbones].")
    interpolation: str | None = option(None, choices=INTERPOLATIONS,
                                       help="Resize interpolation [default: the weights' own; bilinear for the study "
                                            "backbones].")
    mean: tuple[float, float, float] | None = option(None, metavar="R,G,B",
                                                     help="Normalisation mean [default: the weights' own].")
    std: tuple[float, float, float] | None = option(None, metavar="R,G,B",
                                                    help="Normalisation std [default: the weights' own].")
    pooling: str = option("avg", choices=POOLINGS,
                          help="Global pooling of each tap: avg, max, both side by side (avgmax); a transformer's "
                               "class token (cls), or it beside the patch tokens' mean (cls+avg). A transformer's "
                               "avg and max leave its class and register tokens out.")
    precision: str = option("auto", choices=PRECISIONS,
                            help="auto: bf16/fp16 autocast on a GPU; on a CPU bf16 where it multiplies bf16 "
                                 "natively, else fp32.")
    dtype: str = option("float16", choices=DTYPES, help="Storage dtype of the cached taps.")
    logits: bool = option(False, help="Also cache the source classifier's output as a tap, logits (one score per "
                                      "source class, not pooled): what --score leep,nce read. A cache of its own.")
    modules: tuple[str, ...] = option((), flag="module", split=True, metavar="NAME",
                                      help="Also cache the output of this module as a tap of its own (called by "
                                           "the module's name, e.g. layer3.1 or blocks.6.attn; repeat for "
                                           "several): featcache backbones NAME --modules lists every module with "
                                           "its output shape. Maps and tokens pool as --pooling says, or as "
                                           "NAME:cls (:avg, :max, :avgmax, :cls+avg) says for that tap; a vector "
                                           "is kept whole, and so is any output of NAME:flatten (at most 65,536 "
                                           "values); NAME@NORM passes it through module NORM first (a final "
                                           "layer norm: tap NAME@NORM). A cache of its own.")
    cache_dir: Path = option(Path("cache"), writes=True, help="Where cache files live.")

    def preprocess(self) -> PreprocessConfig:
        """The preprocessing flags; those not given stay None (the backbone's own)."""
        return PreprocessConfig.from_model(image_size=self.image_size, resize=self.resize, crop_pct=self.crop_pct,
                                           interpolation=self.interpolation, mean=self.mean, std=self.std)

    def features(self, device: str, **speed) -> ExtractConfig:
        """The ExtractConfig these fields describe; ``speed``: batch size, workers, ... (no effect on numbers),
        given or the extraction's defaults: a stage's own --batch-size is its own loop's, never the extraction's."""
        defaults = {f.name: f.default for f in dataclasses.fields(ExtractConfig) if f.name in SPEED}
        return carried(ExtractConfig, self, data=self.data_request(), backbones=self.backbone,
                       preprocess=self.preprocess(), device=device, **{**defaults, **speed})


SPEED = ("batch_size", "num_workers", "compile", "skip_bad_images")  # ExtractConfig's fields that change no number

SKIP_BAD_IMAGES = "Leave out image files that cannot be read (listed, and recorded in the cache) instead of stopping."


@dataclass(frozen=True)
class ExtractRequest(FeatureFields):
    """``featcache extract``: run frozen backbones once and cache every tap's pooled features."""

    device: str = device_option("Where the backbones run.")
    batch_size: int = option(64, **at_least(1), help="Images per forward pass.")
    num_workers: int | None = option(None, **at_least(0),
                                     help=f"Processes decoding image files [default: on a GPU run every core this "
                                          f"machine gives featcache ({available_cores()}); on a CPU run 0, since the "
                                          f"network already uses every core].")
    compile: bool = option(False, help="torch.compile the backbone (pays off on large datasets).")
    skip_bad_images: bool = option(False, help=SKIP_BAD_IMAGES)
    quiet: bool = quiet_option()

    def config(self) -> ExtractConfig:
        return self.features(self.device, batch_size=self.batch_size, num_workers=self.num_workers,
                             compile=self.compile, skip_bad_images=self.skip_bad_images)
