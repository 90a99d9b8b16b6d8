"""A tiny registered backbone so the whole suite runs on two CPU cores in minutes.

Importable on its own (``import tiny``) so subprocesses in the tests can register it too.
"""

import dataclasses

import torch
from torch import nn

from featcache import device
from featcache.backbones.registry import BACKBONES, BackboneSpec, Tap, register_backbone

# The suite compares paths exactly (stored features against a plain forward pass, a resumed
# run against an uninterrupted one ...), so --precision auto means fp32 in every test process,
# whichever CPU runs it; a processor with native bf16 would otherwise pick bf16. The bf16 rule
# is tested with the detection mocked (test_extract.py), and bf16 itself with precision="bf16".
NATIVE_BF16_CHECK = device.cpu_has_native_bf16  # the real detection, for the tests of it
device.cpu_has_native_bf16 = lambda: False


def _stage(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _stage(3, 4)  # stride 2
        self.stage1 = _stage(4, 8)  # stride 4
        self.stage2 = _stage(8, 12)  # stride 8
        self.stage3 = _stage(12, 16)  # stride 16
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_tiny(weights):
    return TinyNet()


TINY = BackboneSpec(
    name="tiny",
    build=build_tiny,
    taps=(Tap("stage1", 8, 4), Tap("stage2", 12, 8), Tap("stage3", 16, 16)),
    aliases={"early": "stage1", "mid": "stage2", "late": "stage3"},
    weights_name=None,
    head_prefixes=("fc.",),
    blocks=("stem", "stage1", "stage2", "stage3"),
    last_block=("stage3",),
)

if "tiny" not in BACKBONES:
    register_backbone(TINY)

# A second small backbone, for runs that extract several backbones in one pass.
TINY2 = BackboneSpec(
    name="tiny2",
    build=lambda weights: TinyNet(num_classes=3),
    taps=TINY.taps,
    aliases=TINY.aliases,
    weights_name=None,
    head_prefixes=("fc.",),
    blocks=TINY.blocks,
    last_block=TINY.last_block,
)

if "tiny2" not in BACKBONES:
    register_backbone(TINY2)

# A third, whose last tap is 1,024 wide: the streaming tests' synthetic caches hold features that wide, and
# a cache's tap must be as wide as its backbone declares.
WIDE = 1024


class WideNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.stage3 = _stage(12, WIDE)
        self.fc = nn.Linear(WIDE, 10)


TINYWIDE = dataclasses.replace(TINY, name="tinywide", build=lambda weights: WideNet(),
                               taps=(*TINY.taps[:2], Tap("stage3", WIDE, 16)))

if "tinywide" not in BACKBONES:
    register_backbone(TINYWIDE)
