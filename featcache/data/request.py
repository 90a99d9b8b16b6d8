"""The dataset fields every request that reads a dataset shares (extract, fuse-train, sweep, finetune).

Stage 1 (data): declared once with :func:`featcache.requests.option`, so each
command, pipeline key and API keyword spells them the same way; :meth:`DataFields.data_request`
is the one place they become a :class:`~featcache.data.datasets.DataRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.data.datasets import DATASETS, DataRequest
from featcache.requests import FRACTION, at_least, carried, option


def _split_map(value: str) -> bool:
    pairs = [part.split("=", 1) for part in value.split(",")]
    ours = [p[0].strip() for p in pairs]
    return all(len(p) == 2 and p[1].strip() for p in pairs) and "train" in ours and \
        set(ours) <= {"train", "val", "test"} and len(ours) == len(set(ours))


def dataset_label(name: str, data_dir) -> str:
    """A dataset as a person names it: ``folder photos``, ``cifar10``, ``manifest labels.csv`` (a source read
    from a path by the path's own name)."""
    if data_dir and name in ("folder", "manifest", "hf", "webdataset"):
        return f"{name} {Path(data_dir).name}"
    return name


@dataclass(frozen=True)
class DataFields:
    """Which images, which subsets, which seed."""

    dataset: str | None = option(None, help="The dataset source [default: what --data-dir holds (class folders, a "
                                             "manifest, shards, a saved Hugging Face dataset, a torchvision dataset's "
                                             "folder); digits without --data-dir: scikit-learn's bundled 8x8 "
                                             "digits, offline].", choices=lambda: sorted(DATASETS))
    data_dir: Path | None = option(None, help="Where the data lives: a torchvision dataset's root (cifar10: holds "
                                              "cifar-10-batches-py/; featcache datasets NAME says what), a folder "
                                              "(one sub-folder per class, optionally under train/ and test/), a "
                                              "manifest file, a folder of WebDataset shards, or a Hugging Face "
                                              "save_to_disk folder / Parquet files.")
    download: bool = option(False, help="torchvision datasets and --hf-name: download the data if missing "
                                        "(checksums verified after the download); rank and choose: also pretrained "
                                        "weights missing from the local caches (without it, they try no network).")
    hf_name: str | None = option(None, help="hf: a Hugging Face dataset name, read from the local cache (fetched "
                                            "only with --download).", metavar="NAME")
    hf_config: str | None = option(None, help="hf: the dataset's configuration (subset) name.", metavar="NAME")
    hf_splits: str | None = option(None, metavar="train=A[,val=B][,test=C]", check=_split_map,
                                   rule="map train (and optionally val, test) to the dataset's split names, "
                                        "e.g. train=training,test=evaluation",
                                   help="hf: which of the dataset's splits are train, validation and test [default: "
                                        "train; validation, valid, val or dev; test]; a split left out is carved.")
    image_column: str | None = option(None, help="hf and manifest: the image column (found automatically for hf; "
                                                 "'path' for a manifest).", metavar="COLUMN")
    label_column: str | None = option(None, help="hf, manifest and webdataset: the label column (hf: the ClassLabel "
                                                 "one; manifest: 'label'; webdataset: .cls, or this field of the "
                                                 ".json).", metavar="COLUMN")
    limit_train: int | None = option(None, help="Stratified subset of N training images.", metavar="N",
                                     **at_least(1, "be a positive number of images"))
    limit_test: int | None = option(None, help="Stratified subset of M test images.", metavar="M",
                                    **at_least(1, "be a positive number of images"))
    test_fraction: float = option(0.2, help="Datasets without a test split (digits, folders without train/test, "
                                            "...): share of images held out for test.",
                                  **FRACTION)
    seed: int = option(0, help="Seed for splits, subsets and random weights.")

    def dataset_label(self) -> str:
        """The dataset as a person names it (:func:`dataset_label`)."""
        return dataset_label(self.data_request().name, self.data_dir)

    def data_request(self) -> DataRequest:
        from featcache.data.datasets import infer_source

        name = self.dataset or ("digits" if self.data_dir is None else infer_source(self.data_dir))
        return carried(DataRequest, self, name=name)
