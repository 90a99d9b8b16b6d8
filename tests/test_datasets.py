import pickle
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import CLASSES, write_cifar10

from featcache.data.datasets import DataRequest, dataset_identity, dataset_key, load_dataset
from featcache.errors import FeatcacheError


def test_digits_is_offline_rgb_uint8_with_a_stratified_split():
    data = load_dataset(DataRequest(name="digits"))
    train, test = data.splits["train"], data.splits["test"]
    assert data.classes == tuple(str(i) for i in range(10))
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 3)
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.2) < 0.01
    assert not set(train.index) & set(test.index)
    assert np.ptp(np.bincount(test.labels)) <= 2  # stratified
    assert train.images.max() == 255


def test_limits_take_stratified_subsets_in_source_order():
    data = load_dataset(DataRequest(name="digits", limit_train=100, limit_test=50, seed=3))
    train = data.splits["train"]
    assert len(train) == 100 and len(data.splits["test"]) == 50
    assert np.all(np.diff(train.index) > 0)
    assert set(np.bincount(train.labels)) <= {9, 10, 11}
    again = load_dataset(DataRequest(name="digits", limit_train=100, limit_test=50, seed=3))
    assert np.array_equal(again.splits["train"].index, train.index)


def test_bad_limits_are_refused():
    with pytest.raises(FeatcacheError, match="--limit-train must be a positive number"):
        DataRequest(limit_train=0)


def test_cifar10_reads_the_real_python_format_through_torchvision(tmp_path):
    write_cifar10(tmp_path / "data")  # its md5 sums are not torchvision's: the files load as they are
    root = tmp_path / "data"
    data = load_dataset(DataRequest(name="cifar10", data_dir=root))
    train, test = data.splits["train"], data.splits["test"]
    assert data.classes == tuple(CLASSES) and dataset_key(DataRequest(name="cifar10")) == "cifar10"
    assert train.images.shape == (100, 32, 32, 3) and len(test) == 30
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    # CHW rows in the file -> HWC images, in file order
    assert np.array_equal(train.images[0], first["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert list(train.labels[:20]) == first["labels"]


def test_a_changed_cifar10_file_changes_the_identity_and_a_broken_one_is_refused(tmp_path):
    root = tmp_path / "data"
    write_cifar10(root)
    before = dataset_identity(DataRequest(name="cifar10", data_dir=root))
    with open(root / "cifar-10-batches-py" / "test_batch", "r+b") as f:
        f.truncate(100)
    assert dataset_identity(DataRequest(name="cifar10", data_dir=root)) != before
    with pytest.raises(FeatcacheError, match="cifar10 not found or not in torchvision's CIFAR10 format in .*"
                                             "cifar-10-batches-py .*--data-dir must hold cifar-10-batches-py/"):
        load_dataset(DataRequest(name="cifar10", data_dir=root))


def test_a_failed_cifar10_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.cifar as cifar

    def no_network(url, download_root, *args, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    with pytest.raises(FeatcacheError, match=r"cannot download cifar10 into .*no network"):
        load_dataset(DataRequest(name="cifar10", data_dir=tmp_path / "data" / "cifar10", download=True))
    assert list(tmp_path.iterdir()) == []  # neither data/ nor data/cifar10/ was there before


def test_cifar10_missing_directory_says_how_to_fix(tmp_path):
    with pytest.raises(FeatcacheError, match=r"cifar10 not found .*--data-dir must hold cifar-10-batches-py/"):
        load_dataset(DataRequest(name="cifar10", data_dir=tmp_path / "nothing"))


def test_folder_without_train_test_is_split_stratified(image_folder):
    data = load_dataset(DataRequest(name="folder", data_dir=image_folder, test_fraction=0.34, seed=1))
    assert data.classes == ("cat", "dog") and data.key == "folder-photos"
    test = data.splits["test"]
    assert len(test) == 4 and list(np.bincount(test.labels)) == [2, 2]
    assert all(p.suffix == ".png" for p in test.files)


def test_folder_with_train_and_test_subfolders(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "shoes" / "train", classes=("sapatos", "tsinelas"), per_class=3)
    write_image_folder(tmp_path / "shoes" / "test", classes=("sapatos", "tsinelas"), per_class=2)
    data = load_dataset(DataRequest(name="folder", data_dir=tmp_path / "shoes"))
    assert len(data.splits["train"]) == 6 and len(data.splits["test"]) == 4
    assert list(data.splits["test"].labels) == [0, 0, 1, 1]


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(FeatcacheError, match="needs --data-dir"):
        load_dataset(DataRequest(name="folder"))
    with pytest.raises(FeatcacheError, match="does not exist: check --data-dir"):
        load_dataset(DataRequest(name="folder", data_dir=tmp_path / "missing"))
    (image_folder / "empty").mkdir()
    with pytest.raises(FeatcacheError, match="class folder .*empty holds no images"):
        load_dataset(DataRequest(name="folder", data_dir=image_folder))


def test_folder_identity_follows_the_files(image_folder):
    request = DataRequest(name="folder", data_dir=image_folder)
    before = dataset_identity(request)
    (image_folder / "cat" / "cat_0.png").write_bytes((image_folder / "cat" / "cat_1.png").read_bytes() + b"\0")
    assert dataset_identity(request) != before


def test_unknown_dataset_names_the_closest():
    with pytest.raises(FeatcacheError, match="did you mean 'cifar10'"):
        load_dataset(DataRequest(name="cifar-10"))


def test_hidden_files_and_folders_in_a_photo_folder_are_ignored(image_folder):
    (image_folder / "cat" / "._cat_0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (image_folder / "dog" / ".thumbnails").mkdir()
    (image_folder / "dog" / ".thumbnails" / "dog_0.png").write_bytes(b"not a photo either")
    data = load_dataset(DataRequest(name="folder", data_dir=image_folder))
    files = [f for split in data.splits.values() for f in split.files]
    assert len(files) == 12 and not any(part.startswith(".") for f in files for part in f.relative_to(image_folder).parts)


def test_the_folder_walk_lists_what_pathlib_lists_in_its_order(tmp_path):
    """files_under replaces rglob + sort for speed: the same files, the same order, so cache rows and
    folder fingerprints stay what they were."""
    import hashlib
    import json

    from featcache.data.images import IMAGE_SUFFIXES, files_under, images_in

    names = ["a/x.png", "a-b/x.png", "a.b/y.JPG", "a/b/c/z.jpeg", "a/b/c.png", "A/q.png", "z.txt", "a/.hidden.png",
             ".cache/a.png", "a/ü.png", "a b/x.png", "top.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "a" / "link.png").symlink_to(tmp_path / "top.png")  # a symlinked file counts
    (tmp_path / "linked").symlink_to(tmp_path / "a", target_is_directory=True)  # a symlinked folder is not entered
    reference = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    walked = files_under(tmp_path)
    assert [Path(entry.path) for _, entry in walked] == reference
    assert ["/".join(parts) for parts, _ in walked] == [str(p.relative_to(tmp_path)) for p in reference]
    assert images_in(tmp_path) == [p for p in reference if p.suffix.lower() in IMAGE_SUFFIXES
                                   and not any(part.startswith(".") for part in p.relative_to(tmp_path).parts)]
    digest = hashlib.sha256()  # the folder identity as it was computed before files_under
    for path in reference:
        stat = path.stat()
        digest.update(json.dumps([str(path.relative_to(tmp_path)), stat.st_size, stat.st_mtime_ns]).encode())
    assert dataset_identity(DataRequest(name="folder", data_dir=tmp_path))["files"] == digest.hexdigest()
