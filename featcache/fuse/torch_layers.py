"""Layers of the torch heads that torch does not have: imported when a head is built.

Inside fuse (heads -> **torch_layers**). Kept apart from :mod:`featcache.fuse.torch_head` so
that importing the heads' registry does not load torch.
"""

from __future__ import annotations

import torch


class SeededDropout(torch.nn.Module):
    """Dropout whose masks come from ``generator`` (the head sets it while it trains), else torch's RNG.

    Holds no parameters, like ``torch.nn.Dropout``: state dicts load either way. Drawing
    from the head's own generator makes a head's result depend on its ``random_state``
    alone, also when several heads train at once in threads.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator = None

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
