"""Backbones whose taps are built to a known answer, for ``featcache choose``'s tests (importable on its own).

Images of four classes differ only in their mean colour (:func:`colour_folder`). A tap's pooled output is:

- ``signal``: the image itself, so its mean colour: every class apart;
- ``red`` / ``blue``: one channel's mean: classes 0 and 1 differ in red, 2 and 3 in blue, so each tap tells
  apart half the classes and their fused pair all of them;
- ``noise``: the high-pass of the image (each pixel less its neighbours' mean), whose mean is pixel noise: the
  same for every class.

``known_fast`` and ``known_slow`` hold the same ``signal`` and ``noise``; ``known_slow`` also runs a wide
convolution stack that changes no tap (slower, more parameters). ``known_halves`` holds red, blue and noise.
"""

import numpy as np
import torch
from torch import nn

from featcache.backbones.registry import BACKBONES, BackboneSpec, Tap, register_backbone

COLOURS = ((60, 128, 128), (200, 128, 128), (128, 128, 60), (128, 128, 200))  # RGB per class


def _channel(c):
    conv = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, c] = 1.0
    return conv


def _high_pass():
    """Each channel less its 3x3 mean, reflected at the border (no colour leaks in there)."""
    conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect", groups=3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(-1 / 9)
        conv.weight[:, 0, 1, 1] += 1.0
    return conv


class Known(nn.Module):
    def __init__(self, taps, slow=False):
        super().__init__()
        for name in taps:
            setattr(self, name, {"signal": nn.Identity(), "red": _channel(0), "blue": _channel(2),
                                 "noise": _high_pass()}[name])
        self.taps = taps
        self.heavy = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                                   nn.Conv2d(64, 64, 3, padding=1)) if slow else None
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if self.heavy is not None:  # on the taps' path, so the cut network runs it too; adds nothing
            x = x + 0 * self.heavy(x)[:, :3]
        outs = [getattr(self, t)(x) for t in self.taps]  # each tap a leaf module: a node of the traced graph
        return self.fc(outs[0].mean((2, 3))[:, :1].repeat(1, 3))


def _spec(name, taps, slow=False):
    widths = {"signal": 3, "red": 1, "blue": 1, "noise": 3}
    return BackboneSpec(name=name, build=lambda weights: Known(taps, slow).eval(),
                        taps=tuple(Tap(t, widths[t], 1) for t in taps), weights_name=None,
                        aliases={"early": taps[0], "mid": taps[len(taps) // 2], "late": taps[-1]},
                        head_prefixes=("fc.",), blocks=tuple(taps), last_block=(taps[-1],))


for _name, _taps, _slow in (("known_fast", ("signal", "noise"), False), ("known_slow", ("signal", "noise"), True),
                            ("known_halves", ("red", "blue", "noise"), False)):
    if _name not in BACKBONES:
        register_backbone(_spec(_name, _taps, _slow))


def colour_folder(root, per_class=30, size=24, seed=0, signal=True, shuffle_test=False):
    """root/train/<class>/ and root/test/<class>/ of generated photos: each class its mean colour (``signal``),
    or all one colour (no signal); ``shuffle_test``: the test photos under shuffled class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    test_labels = np.repeat(np.arange(4), per_class // 3)
    if shuffle_test:
        test_labels = np.random.default_rng(seed + 1).permutation(test_labels)
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for k in range(4):
            for i in range(n):
                base = np.array(COLOURS[k] if signal else COLOURS[0], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
                label = k if split == "train" else test_labels[k * n + i]
                folder = root / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{k}_{i}.png")
    return root
