"""Every dataset source on the same JPEGs, side by side in one run: is any slower than a folder?

(f) folder        ``--dataset folder``: one sub-folder per class, files decoded by the extraction's fast path
(m) manifest      ``--dataset manifest``: a CSV of the same files' paths and labels
(h) hf            ``--dataset hf``: the same JPEG bytes in a Hugging Face ``save_to_disk`` folder (Arrow,
                  memory-mapped), read one image's bytes at a time
(p) hf parquet    the same dataset written as Parquet files (read a row group at a time)
(w) webdataset    ``--dataset webdataset``: the same bytes in tar shards of 256 samples, read by offset

Each is a full ``featcache extract`` (a new cache folder each time: nothing is served), one backbone, the
same flags. The sources run ``--repeats`` times in rotation (a shared 2-core machine has slow spells; each
round puts every source in the same spell); printed: images/s per source per round, and the median ratio of
each source to the folder (target >= 0.9).

    python benchmarks/source_throughput.py                         # 2,048 JPEGs, resnet18 at 112 px, CPU
    python benchmarks/source_throughput.py --device cuda --images 8192 --image-size 224 --backbone resnet50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from extract_throughput import cpu_name
from folder_throughput import write_folder

from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract


def write_sources(root: Path, n: int, size: int) -> dict[str, DataRequest]:
    """The same ``n`` JPEGs as a folder (train/ and test/), a CSV manifest, an HF dataset (Arrow and Parquet)
    and WebDataset shards."""
    import io
    import tarfile

    import datasets
    import pandas as pd

    staged = write_folder(root / "staged", n, size, "jpg")
    files = sorted(staged.rglob("*.jpg"))
    rows = [("test" if k % 5 == 0 else "train", f.parent.name, f) for k, f in enumerate(files)]
    for split, label, f in rows:
        (root / "folder" / split / label).mkdir(parents=True, exist_ok=True)
        f.rename(root / "folder" / split / label / f.name)
    rows = [(s, c, root / "folder" / s / c / f.name) for s, c, f in rows]
    rows.sort(key=lambda r: (r[0], r[1], r[2].name))  # the folder's own order
    pd.DataFrame([{"path": str(p.relative_to(root)), "label": c, "split": s} for s, c, p in rows]).to_csv(
        root / "labels.csv", index=False)
    classes = sorted({c for _, c, _ in rows})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    hf = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": None} for s, _, p in rows if s == split],
         "label": [classes.index(c) for s, c, _ in rows if s == split]}, features=features)
        for split in ("train", "test")})
    hf.save_to_disk(str(root / "hf"))
    (root / "parquet").mkdir()
    for split, ds in hf.items():
        ds.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    (root / "shards").mkdir()
    for split in ("train", "test"):
        mine = [(c, p) for s, c, p in rows if s == split]
        for start in range(0, len(mine), 256):
            with tarfile.open(root / "shards" / f"{split}-{start // 256:06d}.tar", "w") as tar:
                for k, (c, p) in enumerate(mine[start:start + 256], start=start):
                    for ext, payload in (("jpg", p.read_bytes()), ("cls", str(classes.index(c)).encode())):
                        info = tarfile.TarInfo(f"{k:07d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return {"folder": DataRequest(name="folder", data_dir=root / "folder"),
            "manifest": DataRequest(name="manifest", data_dir=root / "labels.csv"),
            "hf": DataRequest(name="hf", data_dir=root / "hf"),
            "hf parquet": DataRequest(name="hf", data_dir=root / "parquet"),
            "webdataset": DataRequest(name="webdataset", data_dir=root / "shards")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--source-size", type=int, default=160, help="side of the JPEGs written")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.images < 10 or args.repeats < 1:
        parser.error("--images must be at least 10 and --repeats at least 1")
    print(f"CPU: {cpu_name()}; device {args.device}; {args.images} JPEGs of {args.source_size} px -> "
          f"{args.backbone} at {args.image_size} px, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tick = time.perf_counter()
        requests = write_sources(root, args.images, args.source_size)
        print(f"wrote the five sources in {time.perf_counter() - tick:.1f} s")
        def run(name: str, folder: str) -> float:
            cfg = ExtractConfig(data=requests[name], backbones=(args.backbone,), weights="random", device=args.device,
                                preprocess=PreprocessConfig(image_size=args.image_size), batch_size=args.batch_size,
                                num_workers=args.num_workers, cache_dir=root / "cache" / folder)
            tick = time.perf_counter()
            [result] = extract(cfg, progress=False, log=lambda m: None)
            return result.images / (time.perf_counter() - tick)

        run("folder", "warm-up")  # one-off costs (kernel choice, first imports) are no source's
        rates: dict[str, list[float]] = {name: [] for name in requests}
        names = list(requests)
        for round_ in range(args.repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each round starts elsewhere
                rates[name].append(run(name, f"{round_}-{name}"))
            print(f"round {round_ + 1}: " + " · ".join(f"{n} {r[-1]:,.0f} img/s" for n, r in rates.items()))
        report("extraction", rates)
        # The data path alone (read, decode, resize: what differs between the sources), without the network that
        # dominates the rates above on a CPU; each source read once first (imports, page cache), then timed.
        decode: dict[str, list[float]] = {name: [] for name in requests}
        for name in requests:
            data_rate(requests[name], args.image_size)
        for round_ in range(args.repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                decode[name].append(data_rate(requests[name], args.image_size))
        report("data path alone (decode + resize in this process)", decode)


def data_rate(request: DataRequest, size: int) -> float:
    """Images/s of the extraction's own reader (``FileImages``: read, decode, resize) over every split."""
    from featcache.data.datasets import load_dataset
    from featcache.data.images import FileImages

    data = load_dataset(request)
    tick, count = time.perf_counter(), 0
    for split in data.splits.values():
        images = FileImages(split.files, PreprocessConfig(image_size=size))
        for i in range(len(images)):
            images[i]
        count += len(images)
    return count / (time.perf_counter() - tick)


def report(what: str, rates: dict[str, list[float]]) -> None:
    print(f"\n{what}: median images/s, and the median of each round's ratio to the folder (target >= 0.9):")
    for name, values in rates.items():
        ratios = [v / f for v, f in zip(values, rates["folder"])]
        print(f"  {name:<11} {statistics.median(values):8,.0f} img/s   x{statistics.median(ratios):.2f} of folder"
              f"   (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    assert np.isfinite([v for r in rates.values() for v in r]).all()


if __name__ == "__main__":
    main()
