"""WebDataset shards: tar files of samples, each an image (jpg / jpeg / png / webp ...) and a label (cls or json).

Stage 1 (data: the ``webdataset`` source of ``source.DATASETS``). ``--data-dir`` is a folder of shards named
by split (``train-000000.tar``, ``val-*.tar``, ``test-*.tar``, or ``train/*.tar`` ...), one shard, or a brace
pattern as webdataset takes it (``shards/train-{000000..000099}.tar``, ``shards/{train,test}-{0..3}.tar``). The
shards are never unpacked: one pass over the tar headers finds every sample's image (its offset and size) and
reads its small label member; the DataLoader workers then read each image's bytes at its offset. Reading by
offset, rather than streaming the tar with the webdataset library, is what lets the extraction resume after a
kill at the row it reached and split the rows across torchrun ranks exactly as it splits a folder's, so several
processes write the same cache as one (a test checks shards written by the webdataset library load).

A sample's key is its member name up to the first dot of the file name (WebDataset's rule); its label is the
value in ``<key>.cls`` (or ``.label``, ``.target``), or a field of ``<key>.json`` named by ``--label-column``;
the classes are the labels present (``labels.label_classes``). A shard without its end-of-archive marker (cut
short, even at a member boundary) is refused rather than read as a shorter archive.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np

from featcache.data.images import BadImage, Blob
from featcache.data.labels import label_classes
from featcache.data.safe import MAX_LABEL_BYTES, regular_size
from featcache.data.source import DATASETS, Dataset, DatasetEntry, DataRequest, Rows, Split, official_splits, \
    stat_identity
from featcache.errors import FeatcacheError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
LABEL_KEYS = ("cls", "label", "target", "class", "cls2")
MAX_SHARD_BYTES = 1 << 40  # a shard is read by offset, never whole: the limit only keeps out absurd sizes
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


def braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns, as webdataset and CLIP_benchmark take them: ``{000000..000099}`` a range of
    zero-padded numbers, ``{a,b}`` alternatives, several per pattern (``{train,val}-{0..3}.tar``)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = int(numbers[1]), int(numbers[2])
        if last < first or last - first > 1_000_000:
            raise FeatcacheError(f"--data-dir {pattern}: the range {{{body}}} must count up, over at most a million "
                                 f"shards")
        width = len(numbers[1]) if numbers[1].startswith("0") else 0
        options = [str(k).zfill(width) for k in range(first, last + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in braces(head + option + tail)]


def _pattern_shards(pattern: str) -> list[Path]:
    found = [Path(p) for p in braces(pattern)]
    missing = [p for p in found if not p.is_file()]
    if missing:
        raise FeatcacheError(f"--data-dir {pattern} names {len(found)} shards; {len(missing)} are missing (first: "
                             f"{missing[0]})")
    for shard in found:
        regular_size(shard, "shard", MAX_SHARD_BYTES)
    return found


def _shards(request: DataRequest) -> dict[str, list[Path]]:
    """Our split -> its shards, in name order."""
    if request.data_dir is None:
        raise FeatcacheError("--dataset webdataset needs --data-dir (a folder of .tar shards named train-*, test-* ...)")
    if "{" in str(request.data_dir):  # a brace pattern: the shards it names, split by their names as in a folder
        return _by_split({shard: shard.name for shard in _pattern_shards(str(request.data_dir))})
    root = Path(request.data_dir)
    if root.is_file():
        if root.suffix != ".tar":
            raise FeatcacheError(f"{root} is not a WebDataset shard (.tar)")
        regular_size(root, "shard", MAX_SHARD_BYTES)
        return {"train": [root]}
    if not root.is_dir():
        raise FeatcacheError(f"{root} does not exist: --data-dir must be a folder of .tar shards")
    found = sorted(root.rglob("*.tar"))
    for shard in found:
        regular_size(shard, "shard", MAX_SHARD_BYTES)  # a FIFO or device named .tar is refused, not opened
    if not found:
        raise FeatcacheError(f"{root} holds no .tar shards: name them train-000000.tar, test-000000.tar ...")
    names = {}
    for shard in found:
        relative = shard.relative_to(root).parts
        names[shard] = relative[0] if len(relative) > 1 else shard.name
    return _by_split(names)


def _by_split(names: dict[Path, str]) -> dict[str, list[Path]]:
    """Shards grouped by the split their (folder's) name starts with; none named by split: all are train."""
    heads = {shard: re.split(r"[-_.]", name)[0].lower() for shard, name in names.items()}
    named = any(head in SPLIT_NAMES for head in heads.values())
    out: dict[str, list[Path]] = {}
    for shard, head in heads.items():  # shards named by split; none named: all are train (test is carved)
        out.setdefault(SPLIT_NAMES.get(head, head) if named else "train", []).append(shard)
    return out


def _key_and_ext(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class ShardImages:
    """Reads one sample's image bytes from its shard by offset (picklable: the DataLoader workers read)."""

    def __init__(self, index: list[tuple[str, str, int, int]]):
        self.index = index  # per sample: (shard, member name, offset, size); offset -1: no image in the sample

    def blob(self, position: int) -> Blob:
        return _Member(self, position)


class _Member(Blob):
    def __init__(self, images: ShardImages, position: int):
        self.images, self.position = images, position

    def read(self):
        shard, name, offset, size = self.images.index[self.position]
        if offset < 0:
            raise BadImage(f"cannot read image {self}: the sample has no image ({', '.join(IMAGE_KEYS)})")
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadImage(f"cannot read image {self}: the shard ends inside it (truncated)")
        return data

    def __str__(self):
        shard, name, _, _ = self.images.index[self.position]
        return f"{shard}:{name}"


def _label(value: bytes, ext: str, field: str | None, where: str):
    if ext == "json":
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            raise FeatcacheError(f"{where} is not JSON: fix the shard or name another label with --label-column") \
                from None
        if not isinstance(data, dict) or field not in data:
            keys = ", ".join(data) if isinstance(data, dict) else type(data).__name__
            raise FeatcacheError(f"{where} has no {field!r} field (its fields: {keys}): name one with --label-column")
        return data[field]
    text = value.decode("utf-8", "replace").strip()
    if not text:
        raise FeatcacheError(f"{where} is empty: every sample needs a label")
    return text  # integers are told apart from names, and compared as numbers, by labels.label_classes


def _index(shards: list[Path], request: DataRequest) -> tuple[list, list]:
    """(per sample: (shard, image member, offset, size), per sample: its label), in shard and member order."""
    wanted = request.label_column
    samples, labels = [], []
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:
                current, image, label = None, None, None
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _key_and_ext(member.name)
                    if key != current:
                        if current is not None:
                            _add(samples, labels, shard, current, image, label)
                        current, image, label = key, None, None
                    if ext in IMAGE_KEYS and image is None:
                        image = (member.name, member.offset_data, member.size)
                    elif (wanted is None and ext in LABEL_KEYS and label is None) or \
                            (ext == "json" and wanted is not None) or (wanted is not None and ext == wanted):
                        if member.size > MAX_LABEL_BYTES:
                            raise FeatcacheError(f"{shard}:{member.name} is a label of {member.size:,} bytes: a label "
                                                 f"member holds one class (at most {MAX_LABEL_BYTES:,} bytes)")
                        data = tar.extractfile(member).read()
                        label = _label(data, ext, wanted if ext == "json" else None, f"{shard}:{member.name}")
                if current is not None:
                    _add(samples, labels, shard, current, image, label)
                _complete(shard, tar)
        except (tarfile.TarError, OSError) as exc:
            raise FeatcacheError(f"{shard} is not a readable tar shard: {exc}") from None
    return samples, labels


def _complete(shard: Path, tar: tarfile.TarFile) -> None:
    """A tar ends with two zero blocks after its last member; a shard cut at a member boundary lacks them and
    reads as a shorter, valid-looking archive: refused, so no sample is lost without a word."""
    end = tar.offset  # just past the last member's data, once every member was read
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise FeatcacheError(f"{shard} is truncated: it stops after {end:,} of its bytes without the end-of-archive "
                             f"marker ({size:,} bytes on disk), so samples after that are lost; copy the shard again")
    for member in tar.getmembers():
        if member.isfile() and member.offset_data + member.size > size:
            raise FeatcacheError(f"{shard} is truncated inside {member.name}: copy the shard again")


def _add(samples: list, labels: list, shard: Path, key: str, image, label) -> None:
    if label is None:
        raise FeatcacheError(f"sample {key} in {shard} has no label ({', '.join(f'.{k}' for k in LABEL_KEYS)}, or a "
                             f".json field named by --label-column)")
    name, offset, size = image if image is not None else (key, -1, 0)
    samples.append((str(shard), name, offset, size))
    labels.append(label)


def _load(request: DataRequest) -> Dataset:
    found = _shards(request)
    unknown = sorted(set(found) - {"train", "val", "test"})
    if unknown:
        raise FeatcacheError(f"shards of split(s) {', '.join(unknown)} in {request.data_dir}: name them train-*, "
                             f"val-* or test-*")
    if "train" not in found:
        raise FeatcacheError(f"no train shards in {request.data_dir}: name them train-000000.tar ...")
    indexed = {part: _index(shards, request) for part, shards in found.items()}
    names, numbers, notes = label_classes({part: values for part, (_, values) in indexed.items()},
                                          f"the shards in {request.data_dir}")
    parts = {}
    for part, (samples, values) in indexed.items():
        labels = numbers[part]
        index = np.arange(len(labels), dtype=np.int64)
        parts[part] = Split(labels=labels, index=index, files=Rows([(ShardImages(samples), index)]))
    about = {"source": "WebDataset shards", "shards": {part: len(s) for part, s in found.items()}}
    return Dataset(_key(request), tuple(names), official_splits(parts, request), about, tuple(notes))


def _key(request: DataRequest) -> str:
    root = Path(request.data_dir) if request.data_dir is not None else Path("none")
    if "{" in str(root):  # a pattern: named by its folder
        return "webdataset-" + root.parent.resolve().name
    return "webdataset-" + (root.resolve().stem if root.exists() else root.name)


def _identity(request: DataRequest) -> dict:
    return {"source": "webdataset", "label_column": request.label_column, "test_fraction": request.test_fraction,
            "shards": {part: stat_identity(shards) for part, shards in sorted(_shards(request).items())}}


DATASETS.register("webdataset")(DatasetEntry(
    key=_key, identity=_identity, load=_load,
    about="WebDataset .tar shards: --data-dir a folder of train-*.tar, val-*.tar, test-*.tar",
))


def image_members(shard: Path) -> list[Blob]:
    """Every sample's image in a shard, labelled or not: what ``featcache predict shard.tar`` classifies."""
    samples = []
    try:
        with tarfile.open(shard, "r:") as tar:
            seen = set()
            for member in tar:
                key, ext = _key_and_ext(member.name)
                if member.isfile() and ext in IMAGE_KEYS and key not in seen:
                    seen.add(key)
                    samples.append((str(shard), member.name, member.offset_data, member.size))
    except (tarfile.TarError, OSError) as exc:
        raise FeatcacheError(f"{shard} is not a readable tar shard: {exc}") from None
    images = ShardImages(samples)
    return [images.blob(k) for k in range(len(samples))]
