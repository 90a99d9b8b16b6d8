"""The cache file names of a fixed request, pinned: every cache on users' disks stays valid.

Moving code, renaming modules or adding backbones must not change the fingerprint of an
existing request; a deliberate change of the cache format bumps FORMAT and updates these.
"""

import pytest

from featcache.backbones.registry import BACKBONES
from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig, fingerprint
from featcache.extraction.store import fingerprint_hash

PINNED = {  # (weights, backbone, precision) -> fingerprint hash[:12], as in cache/<dataset>/<backbone>-<hash>.h5
    ("random", "resnet18", "fp32"): "1f9b550d1f11", ("random", "resnet18", "bf16"): "d56588d57674",
    ("random", "resnet50", "fp32"): "cff43baed587", ("random", "resnet50", "bf16"): "a3e2e87210c5",
    ("random", "mobilenet_v2", "fp32"): "d62512dac78e", ("random", "mobilenet_v2", "bf16"): "12454377982c",
    ("random", "vgg16", "fp32"): "854a96c0feec", ("random", "vgg16", "bf16"): "fc82c1b451cd",
    ("imagenet", "resnet18", "fp32"): "b306aa0fac0b", ("imagenet", "resnet18", "bf16"): "0c17e1501d78",
    ("imagenet", "resnet50", "fp32"): "50fca841e5a5", ("imagenet", "resnet50", "bf16"): "9f17b9c362f6",
    ("imagenet", "mobilenet_v2", "fp32"): "c0aa3f5fc267", ("imagenet", "mobilenet_v2", "bf16"): "9e1dcbce7015",
    ("imagenet", "vgg16", "fp32"): "5f7ecf9c2040", ("imagenet", "vgg16", "bf16"): "44977d874d6a",
}


@pytest.mark.parametrize(("weights", "backbone", "precision"), sorted(PINNED))
def test_the_fingerprint_of_a_fixed_request_is_pinned(weights, backbone, precision):
    cfg = ExtractConfig(data=DataRequest(name="digits", limit_train=100, limit_test=20), backbones=(backbone,),
                        weights=weights, preprocess=PreprocessConfig(image_size=64))
    got = fingerprint_hash(fingerprint(cfg, BACKBONES[backbone], precision))[:12]
    assert got == PINNED[weights, backbone, precision]
