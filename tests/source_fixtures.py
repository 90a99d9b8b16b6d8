"""Small datasets written in each source's real on-disk format (torchvision's, Hugging Face's, WebDataset's).

Nothing here matches torchvision's download checksums: the point is that a directory in the right structure
loads as it is. Every image is a deterministic pattern, so two sources holding the same image can be compared.
"""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np


def pattern(k: int, size: int = 12) -> np.ndarray:
    """A distinct RGB uint8 image per k."""
    rng = np.random.default_rng(k)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def save(path: Path, pixels: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(pixels, fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")))
    return path


def cifar100(root: Path, n_train: int = 40, n_test: int = 20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                         "coarse_labels": [i % 20 for i in fine], "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f)


def stl10(root: Path, n_train: int = 20, n_test: int = 10):
    """stl10_binary/*.bin: uint8 images stored column-major (3, 96, 96), labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{name}_X.bin")
        np.asarray([1 + i % 10 for i in range(n)], dtype=np.uint8).tofile(folder / f"{name}_y.bin")
    (folder / "unlabeled_X.bin").write_bytes(b"")  # listed by torchvision's file table; never read here
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")


def svhn(root: Path, n_train: int = 20, n_test: int = 10):
    """{split}_32x32.mat: X (32, 32, 3, N), y (N, 1) with 10 meaning the digit 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        y = np.asarray([[1 + i % 10] for i in range(n)], dtype=np.uint8)
        savemat(root / f"{name}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})


def flowers102(root: Path, per_split: int = 6):
    """flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat (1-based labels), setid.mat (trnid / valid / tstid)."""
    from scipy.io import savemat

    folder = root / "flowers-102"
    n = 3 * per_split
    for k in range(1, n + 1):
        save(folder / "jpg" / f"image_{k:05d}.jpg", pattern(k))
    savemat(folder / "imagelabels.mat", {"labels": np.asarray([[1 + (k % 3) for k in range(n)]])})
    ids = np.arange(1, n + 1)
    savemat(folder / "setid.mat", {"trnid": ids[:per_split][None], "valid": ids[per_split:2 * per_split][None],
                                   "tstid": ids[2 * per_split:][None]})


def dtd(root: Path, classes=("banded", "dotted", "striped"), per_class: int = 2):
    """dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt."""
    folder = root / "dtd" / "dtd"
    k = 0
    for split in ("train", "val", "test"):
        lines = []
        for c in classes:
            for i in range(per_class):
                name = f"{c}/{c}_{split}_{i}.jpg"
                save(folder / "images" / name, pattern(k := k + 1))
                lines.append(name)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def oxford_pets(root: Path, breeds=("Abyssinian", "basset_hound", "Bengal"), per_breed: int = 2):
    """oxford-iiit-pet/images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt (id, class, species, breed)."""
    folder = root / "oxford-iiit-pet"
    (folder / "annotations").mkdir(parents=True)
    k = 0
    for split in ("trainval", "test"):
        lines = []
        for label, breed in enumerate(breeds, start=1):
            for _ in range(per_breed):
                k += 1
                save(folder / "images" / f"{breed}_{k}.jpg", pattern(k))
                lines.append(f"{breed}_{k} {label} {1 if breed[0].isupper() else 2} {label}")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def eurosat(root: Path, classes=("Forest", "River", "SeaLake"), per_class: int = 4):
    for c in classes:
        for i in range(per_class):
            save(root / "eurosat" / "2750" / c / f"{c}_{i + 1}.jpg", pattern(hash(c) % 1000 + i))


IMAGENETTE = ("n01440764", "n02102040", "n02979186")


def imagenette(root: Path, per_class: int = 2):
    k = 0
    for split in ("train", "val"):
        for wnid in IMAGENETTE:
            for i in range(per_class):
                save(root / "imagenette2" / split / wnid / f"{wnid}_{split}_{i}.JPEG", pattern(k := k + 1), "JPEG")


# --- the same images through other sources --------------------------------------------------------------


def sample_images(classes=("ant", "bee"), per_class: int = 6) -> list[tuple[str, str, bytes]]:
    """(split, class, PNG bytes): two thirds train, one third test, per class."""
    out = []
    for c_i, c in enumerate(classes):
        for i in range(per_class):
            out.append(("test" if i % 3 == 2 else "train", c, encoded(pattern(100 * c_i + i))))
    return out


def as_folder(root: Path, items) -> Path:
    for k, (split, c, data) in enumerate(items):
        path = root / split / c / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def folder_files(root: Path, items) -> list[tuple[str, str, Path]]:
    return [(split, c, root / split / c / f"{k:03d}.png") for k, (split, c, _) in enumerate(items)]


def as_manifest(path: Path, folder: Path, items, parquet: bool = False) -> Path:
    import pandas as pd

    rows = [{"path": str(p.relative_to(path.parent)), "label": c, "split": split}
            for split, c, p in folder_files(folder, items)]
    table = pd.DataFrame(rows)
    if parquet:
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False)
    return path


def hf_dataset(items, classes=("ant", "bee")):
    """A datasets.DatasetDict with an Image and a ClassLabel column, train and test in folder order."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=list(classes)),
                                  "note": datasets.Value("string")})
    out = {}
    for split in ("train", "test"):
        rows = [(c, data) for s, c, data in items if s == split]
        rows.sort(key=lambda r: classes.index(r[0]))  # a folder lists class by class
        out[split] = datasets.Dataset.from_dict(
            {"img": [{"bytes": data, "path": None} for _, data in rows], "kind": [classes.index(c) for c, _ in rows],
             "note": ["x"] * len(rows)}, features=features)
    return datasets.DatasetDict(out)


def as_shards(root: Path, items, per_shard: int = 3, classes=("ant", "bee"), label: str = "cls") -> Path:
    """train-00000N.tar / test-00000N.tar with <key>.png and <key>.cls (or <key>.json {"label": ...})."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [(c, data) for s, c, data in items if s == split]
        rows.sort(key=lambda r: classes.index(r[0]))
        for start in range(0, len(rows), per_shard):
            with tarfile.open(root / f"{split}-{start // per_shard:06d}.tar", "w") as tar:
                for k, (c, data) in enumerate(rows[start:start + per_shard], start=start):
                    members = {"png": data}
                    if label == "cls":
                        members["cls"] = str(classes.index(c)).encode()
                    else:
                        members["json"] = json.dumps({"label": classes.index(c), "name": c}).encode()
                    for ext, payload in members.items():
                        info = tarfile.TarInfo(f"sample{k:05d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return root
