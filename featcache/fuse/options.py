"""The heads' options: what the torch heads use, the candidate grids and the seed.

Inside fuse, below heads and torch_head: importing it loads neither torch nor scikit-learn, so the
command line can describe the heads without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featcache.errors import require, unknown

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class HeadOptions:
    """Head flags of ``fuse-train``: what the torch heads use, and the seed."""

    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 30
    batch_size: int = 128
    patience: int | None = 5
    device: str = "cpu"
    precision: str = "fp32"  # torch heads' autocast: --precision, resolved as for extraction
    seed: int = 0
    grid: dict = field(default_factory=dict)  # name -> candidates, overriding the defaults

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise unknown("--optimizer", self.optimizer, OPTIMIZERS)
        require(self.epochs >= 1, "--epochs", self.epochs, "be at least 1")
        require(self.batch_size >= 1, "--batch-size", self.batch_size, "be at least 1")
        require(0 <= self.dropout < 1, "--dropout", self.dropout, "lie in [0, 1)")
        require(self.lr > 0, "--lr", self.lr, "be positive")
