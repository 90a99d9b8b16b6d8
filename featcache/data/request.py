"""The dataset fields every request that reads a dataset shares (extract, fuse-train, sweep, finetune).

Stage 1 (data): declared once with :func:`featcache.requests.option`, so each
command, pipeline key and API keyword spells them the same way; :meth:`DataFields.data_request`
is the one place they become a :class:`~featcache.data.datasets.DataRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.data.datasets import DATASETS, DataRequest
from featcache.requests import option


def _positive(value) -> bool:
    return value >= 1


def _fraction(value) -> bool:
    return 0 < value < 1


@dataclass(frozen=True)
class DataFields:
    """Which images, which subsets, which seed."""

    dataset: str = option("digits", help="The dataset source; digits is scikit-learn's bundled 8x8 digits (offline).",
                          choices=lambda: sorted(DATASETS))
    data_dir: Path | None = option(None, help="Where the data lives (cifar10: holds cifar-10-batches-py/; folder: one "
                                              "sub-folder per class, optionally under train/ and test/).")
    download: bool = option(False, help="cifar10: download the data into --data-dir if missing.")
    limit_train: int | None = option(None, help="Stratified subset of N training images.", metavar="N",
                                     check=_positive, rule="be a positive number of images")
    limit_test: int | None = option(None, help="Stratified subset of M test images.", metavar="M",
                                    check=_positive, rule="be a positive number of images")
    test_fraction: float = option(0.2, help="digits and folders without train/test: share of images held out for test.",
                                  check=_fraction, rule="lie between 0 and 1")
    seed: int = option(0, help="Seed for splits, subsets and random weights.")

    def data_request(self) -> DataRequest:
        return DataRequest(name=self.dataset, data_dir=self.data_dir, download=self.download,
                           limit_train=self.limit_train, limit_test=self.limit_test,
                           test_fraction=self.test_fraction, seed=self.seed)
