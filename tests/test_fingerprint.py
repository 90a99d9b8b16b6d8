"""The cache file names of a fixed request, pinned: every cache on users' disks stays valid.

Moving code, renaming modules or adding backbones must not change the fingerprint of an
existing request; a deliberate change of the cache format bumps FORMAT and updates these (December 2026:
the centre crop floors the longer side as torchvision, timm and Hugging Face do: `long_side` in every centre-crop
fingerprint).
"""

import pytest

from featcache.backbones.registry import BACKBONES
from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig, fingerprint
from featcache.extraction.store import fingerprint_hash

PINNED = {  # (weights, backbone, precision) -> fingerprint hash[:12], as in cache/<dataset>/<backbone>-<hash>.h5
    ("random", "resnet18", "fp32"): "c185cd15b776", ("random", "resnet18", "bf16"): "5005266a4f00",
    ("random", "resnet50", "fp32"): "0db6b23d1b10", ("random", "resnet50", "bf16"): "36b79c82cf52",
    ("random", "mobilenet_v2", "fp32"): "284a3656d136", ("random", "mobilenet_v2", "bf16"): "95ac1796c3fb",
    ("random", "vgg16", "fp32"): "5198efaaa55f", ("random", "vgg16", "bf16"): "59208a7677eb",
    ("imagenet", "resnet18", "fp32"): "8de0512c91d9", ("imagenet", "resnet18", "bf16"): "df72cc91b7d4",
    ("imagenet", "resnet50", "fp32"): "efedaabd5c78", ("imagenet", "resnet50", "bf16"): "a9940834e42d",
    ("imagenet", "mobilenet_v2", "fp32"): "a4ebc1ec852f", ("imagenet", "mobilenet_v2", "bf16"): "8347edd8f0b6",
    ("imagenet", "vgg16", "fp32"): "1fc6cd693d1d", ("imagenet", "vgg16", "bf16"): "d9d3b06a2419",
}


@pytest.mark.parametrize(("weights", "backbone", "precision"), sorted(PINNED))
def test_the_fingerprint_of_a_fixed_request_is_pinned(weights, backbone, precision):
    cfg = ExtractConfig(data=DataRequest(name="digits", limit_train=100, limit_test=20), backbones=(backbone,),
                        weights=weights, preprocess=PreprocessConfig(image_size=64))
    got = fingerprint_hash(fingerprint(cfg, BACKBONES[backbone], precision))[:12]
    assert got == PINNED[weights, backbone, precision]
