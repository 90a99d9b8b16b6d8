"""Hostile and careless data (issue 38's classes): what a shared dataset folder, manifest, shard or Hugging Face
folder holds never runs code, never hangs or reads without bound, never becomes classes the user did not mean,
never leaks test images into training unsaid, and bad input is one line (exit 2), never a traceback."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import source_fixtures as fx
from click.testing import CliRunner
from conftest import tiny_config

from featcache.cli.commands import cli
from featcache.data.datasets import DataRequest, load_dataset
from featcache.data.images import BadImage, decode_rgb
from featcache.errors import FeatcacheError

SMALL = ["--backbone", "tiny", "--weights", "random", "--image-size", "16", "--device", "cpu", "--dtype", "float32",
         "--num-workers", "0", "-q"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(result, pattern):
    import re

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and re.search(pattern, lines[0]), result.output


class _Planted:
    """Unpickling this creates the file it names: what a crafted batch would do with any other call."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# --- no code from data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_crafted_cifar_batch_runs_no_code_and_is_one_line(tmp_path, name):
    from cifar_fixture import write_cifar10

    root = tmp_path / "data"
    if name == "cifar10":
        write_cifar10(root, per_batch=4, n_test=4)
        batch = root / "cifar-10-batches-py" / "data_batch_3"
    else:
        fx.cifar100(root, n_train=8, n_test=4)
        batch = root / "cifar-100-python" / "train"
    marker = tmp_path / "planted"
    with open(batch, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["labels" if name == "cifar10" else "fine_labels"] = _Planted(marker)
    with open(batch, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with open(batch, "rb") as f:  # the payload is live: plain pickle runs it (and hands back the file it opened)
        pickle.load(f, encoding="latin1")["labels" if name == "cifar10" else "fine_labels"].close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(FeatcacheError, match=r"is not a plain pickle of arrays and lists \(the pickle asks for "
                                             r"io.open\): featcache does not run code from data"):
        load_dataset(DataRequest(name=name, data_dir=root))
    assert not marker.exists()
    one_line(invoke("extract", *SMALL, "--dataset", name, "--data-dir", root, "--cache-dir", tmp_path / "c"),
             "does not run code from data")
    assert not marker.exists() and not list((tmp_path / "c").rglob("*.partial"))


def test_the_restricted_loader_reads_numpy_pickles_of_every_protocol(tmp_path):
    from featcache.data.safe import restricted_load

    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2], "name": "x", "raw": b"\x00\xff"}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        loaded = restricted_load(io.BytesIO(pickle.dumps(value, protocol=protocol)))
        assert np.array_equal(loaded[b"data"], value[b"data"]) and loaded["labels"] == [1, 2]
        assert loaded["raw"] == b"\x00\xff"
    with pytest.raises(FeatcacheError, match="array of Python objects"):
        restricted_load(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)))


# --- bounded reads -----------------------------------------------------------------------------------------


def test_devices_fifos_and_oversized_files_are_refused_before_they_are_read(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opened for reading, a FIFO with no writer blocks for ever
    link = tmp_path / "random.jpg"
    link.symlink_to("/dev/urandom")
    for path, kind in ((fifo, "a FIFO"), (link, "a device"), ("/dev/zero", "a device")):
        with pytest.raises(BadImage, match=f"it is {kind}, not a regular file"):
            decode_rgb(path)
    import featcache.data.safe as safe

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(2048 + 1)  # sparse: nothing written
    monkeypatch.setattr(safe, "MAX_FILE_BYTES", 2048)
    with pytest.raises(FeatcacheError, match=r"2.0 KiB is over featcache's limit of 2.0 KiB for one image"):
        safe.read_regular(big, "image", safe.MAX_FILE_BYTES)


def test_a_manifest_naming_devices_and_fifos_extracts_the_rest_or_stops_in_one_line(tmp_path):
    items = fx.sample_images(per_class=4)
    folder = fx.as_folder(tmp_path / "f", items)
    manifest = fx.as_manifest(tmp_path / "m.csv", folder, items)
    os.mkfifo(tmp_path / "pipe.png")
    lines = manifest.read_text().splitlines()
    lines += ["/dev/zero,ant,train", f"{tmp_path / 'pipe.png'},bee,train", "/dev/urandom,bee,train"]
    manifest.write_text("\n".join(lines) + "\n")
    args = ["extract", *SMALL, "--data-dir", manifest, "--cache-dir", tmp_path / "c"]
    one_line(invoke(*args), r"cannot read image /dev/zero: it is a device, not a regular file")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.suffix in (".h5", ".partial")]
    done = invoke(*args[:-1], tmp_path / "c", "--skip-bad-images")
    assert done.exit_code == 0 and "skipped 3 unreadable image(s)" in done.output, done.output


def test_a_hugging_face_image_cell_naming_a_fifo_is_a_bad_image_not_a_hang(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.mkfifo(tmp_path / "pipe.png")
    good = [{"bytes": fx.encoded(fx.pattern(k)), "path": None} for k in range(6)]
    cells = good + [{"bytes": None, "path": str(tmp_path / "pipe.png")}]
    table = pa.table({"image": cells, "label": ["a", "b"] * 3 + ["a"]})
    pq.write_table(table, tmp_path / "train.parquet")
    cfg = tiny_config(tmp_path, data=DataRequest(name="hf", data_dir=tmp_path / "train.parquet",
                                                 label_column="label", test_fraction=0.3), skip_bad_images=True)
    from featcache.extraction.run import extract

    [result] = extract(cfg, progress=False, log=lambda m: None)
    assert [s["error"] for s in result.skipped] == [f"cannot read image {tmp_path / 'pipe.png'}: it is a FIFO, not "
                                                    f"a regular file"]


# --- labels are what the user meant ------------------------------------------------------------------------


def _manifest(tmp_path, labels, name="m.csv", parquet=False):
    import pandas as pd

    paths = [fx.save(tmp_path / "img" / f"{k}.png", fx.pattern(k)).name for k in range(len(labels))]
    table = pd.DataFrame({"path": [f"img/{p}" for p in paths], "label": labels})
    path = tmp_path / name
    table.to_parquet(path) if parquet else table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("labels", [["cat", "dog", "NA", "cat", "dog", "null"], ["cat", "dog", "", "nan", "dog", "cat"]])
def test_missing_labels_in_any_spelling_are_refused_with_their_count(tmp_path, labels):
    with pytest.raises(FeatcacheError, match=r"2 row\(s\) of manifest .* have no label \(empty, NA, NaN, null"):
        load_dataset(DataRequest(name="manifest", data_dir=_manifest(tmp_path, labels)))


def test_a_parquet_nan_label_is_missing_and_numbers_compare_as_numbers(tmp_path):
    with pytest.raises(FeatcacheError, match=r"1 row\(s\) of manifest .* have no label .*first: row 4\)"):
        load_dataset(DataRequest(name="manifest", data_dir=_manifest(tmp_path, [0.0, 1.0, np.nan, 1.0, 0.0, 1.0],
                                                                      "p.parquet", parquet=True)))
    data = load_dataset(DataRequest(name="manifest", data_dir=_manifest(tmp_path, ["1", "01", "2", "02", "1", "2"])))
    assert data.classes == ("1", "2")
    written = _manifest(tmp_path, ["3", "4", "5+", "4", "3", "5+"], "w.csv")  # names that only partly read as numbers
    assert load_dataset(DataRequest(name="manifest", data_dir=written)).classes == ("3", "4", "5+")


def test_shard_labels_are_the_classes_present_and_the_gap_is_said(tmp_path):
    items = fx.sample_images(classes=("a", "b", "c"), per_class=3)
    root = fx.as_shards(tmp_path / "s", items, per_shard=20, classes=("a", "b", "c"))
    for shard in root.glob("*.tar"):  # class numbers 0, 1, 7 instead of 0, 1, 2
        _rewrite_labels(shard, {"2": "7"})
    data = load_dataset(DataRequest(name="webdataset", data_dir=root))
    assert data.classes == ("0", "1", "7")
    assert any("3 integer labels present (0, 1, 7); 5 integer(s) between them have no image (2, 3, 4, 5, 6)" in n
               for n in data.notes)
    for shard in root.glob("train*.tar"):
        _rewrite_labels(shard, {"7": "100000000"})
    for shard in root.glob("test*.tar"):
        _rewrite_labels(shard, {"7": "100000000"})
    with pytest.raises(FeatcacheError, match=r"labels run from 0 to 100,000,000 with 3 present"):
        load_dataset(DataRequest(name="webdataset", data_dir=root))


def _rewrite_labels(shard, mapping):
    _rewrite(shard, lambda name, data: mapping.get(data.decode(), data.decode()).encode() if name.endswith(".cls")
             else data)


def _rewrite(shard, change):
    """The shard written again, each member's bytes through ``change(name, data)``."""
    with tarfile.open(shard) as tar:
        members = [(m.name, change(m.name, tar.extractfile(m).read())) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_shard_cut_at_a_member_boundary_is_refused_not_read_short(tmp_path):
    items = fx.sample_images(per_class=6)
    root = fx.as_shards(tmp_path / "s", items, per_shard=20)
    shard = root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2].offset  # the header of a later sample: every member before it is whole
    with open(shard, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(FeatcacheError, match=r"train-000000.tar is truncated: it stops after .* without the "
                                             r"end-of-archive marker"):
        load_dataset(DataRequest(name="webdataset", data_dir=root))


def test_classlabel_values_beyond_the_names_and_stl10_counts_that_disagree_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"img": {"_type": "Image"}, "kind": {"_type": "ClassLabel", "names": ["ant", "bee"]}}
    table = pa.table({"img": [{"bytes": fx.encoded(fx.pattern(k)), "path": None} for k in range(6)],
                      "kind": [0, 1, 0, 1, 5, 1]})  # 5 in a two-name ClassLabel, as a hand-made file can hold
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}),
                   tmp_path / "train.parquet")
    with pytest.raises(FeatcacheError, match=r"has label 5, outside its 2 classes \(0 to 1\)"):
        load_dataset(DataRequest(name="hf", data_dir=tmp_path / "train.parquet"))

    fx.stl10(tmp_path / "stl", n_train=6, n_test=4)
    np.asarray([1 + i % 10 for i in range(9)], dtype=np.uint8).tofile(tmp_path / "stl" / "stl10_binary" / "train_y.bin")
    with pytest.raises(FeatcacheError, match=r"STL10 .* holds 6 images and 9 labels: the files disagree"):
        load_dataset(DataRequest(name="stl10", data_dir=tmp_path / "stl"))


# --- leakage said out loud ---------------------------------------------------------------------------------


def test_a_manifest_naming_an_image_twice_is_refused_and_copies_across_splits_are_said(tmp_path):
    items = fx.sample_images(per_class=6)
    folder = fx.as_folder(tmp_path / "f", items)
    manifest = fx.as_manifest(tmp_path / "m.csv", folder, items)
    lines = manifest.read_text().splitlines()
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join(lines + [lines[1].replace(",train", ",test")]) + "\n")
    with pytest.raises(FeatcacheError, match=r"names 1 image\(s\) more than once \(first: .* in rows 2 and 14\)"):
        load_dataset(DataRequest(name="manifest", data_dir=twice))
    [(split, c, path), *_] = [f for f in fx.folder_files(folder, items) if f[0] == "train"]
    test_dir = folder / "test" / c
    (test_dir / "copy.png").write_bytes(path.read_bytes())  # a copy of a training image under test/
    data = load_dataset(DataRequest(name="folder", data_dir=folder))
    assert any(n.startswith("1 of the 5 test images also stand in train (the same files or identical bytes)")
               for n in data.notes), data.notes
    done = invoke("extract", *SMALL[:-1], "--data-dir", folder, "--cache-dir", tmp_path / "c")
    assert done.exit_code == 0 and "warning: 1 of the 5 test images also stand in train" in done.output


# --- one line, never a traceback ---------------------------------------------------------------------------


def test_hugging_face_folders_that_lie_are_one_line(tmp_path):
    saved = tmp_path / "hf"
    fx.hf_dataset(fx.sample_images(per_class=3)).save_to_disk(saved)
    request = DataRequest(name="hf", data_dir=saved)
    state = saved / "train" / "state.json"
    original = state.read_text()
    for change, message in (
            (lambda s: {**s, "_data_files": []}, "lists no data files"),
            (lambda s: {**s, "_data_files": [{"filename": "../../outside.arrow"}]}, "outside its folder"),
            (lambda s: {**s, "_data_files": [{"filename": "lost.arrow"}]}, r"lost.arrow is missing")):
        state.write_text(json.dumps(change(json.loads(original))))
        with pytest.raises(FeatcacheError, match=message):
            load_dataset(request)
    state.write_text(original)
    [arrow] = (saved / "train").glob("*.arrow")
    arrow.write_bytes(os.urandom(512))
    with pytest.raises(FeatcacheError, match=r"is not a readable Arrow file .*save the dataset again"):
        load_dataset(request)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": [0, 1]}))
    with pytest.raises(FeatcacheError, match=r"names its splits \[0, 1\]"):
        load_dataset(request)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "train.parquet").symlink_to(tmp_path / "nowhere.parquet")
    with pytest.raises(FeatcacheError, match=r"train.parquet is missing \(a broken link\?\)"):
        load_dataset(DataRequest(name="hf", data_dir=tmp_path / "links"))
    (tmp_path / "r.parquet").write_bytes(os.urandom(300))
    with pytest.raises(FeatcacheError, match=r"r.parquet is not a readable Parquet file"):
        load_dataset(DataRequest(name="hf", data_dir=tmp_path / "r.parquet"))


def test_odd_labels_and_names_are_one_line_or_read_as_meant(tmp_path):
    items = fx.sample_images(per_class=3)
    root = fx.as_shards(tmp_path / "s", items, per_shard=20, label="json")
    deep = "[" * 30_000 + "]" * 30_000  # 60 KB, 30,000 levels: past any recursion limit
    for label, message in ((b'{"label": [1, 2]}', r"has label list: a label is one class name or integer"),
                           (deep.encode(), r"is not JSON"),
                           (b'{"label": "cat"}', r"mixes integer labels \(0 in train\) with text labels \('cat' in test\)")):
        for shard in root.glob("test*.tar"):
            _rewrite_json(shard, label)
        with pytest.raises(FeatcacheError, match=message):
            load_dataset(DataRequest(name="webdataset", data_dir=root, label_column="label"))
    one_line(invoke("extract", *SMALL, "--data-dir", root, "--label-column", "label", "--cache-dir", tmp_path / "c"),
             "mixes integer labels")
    # a label spelled --1 is a class name like any other; a 300-character file name is a bad image, not a crash
    manifest = _manifest(tmp_path, ["--1", "cat", "--1", "cat", "--1", "cat"])
    assert load_dataset(DataRequest(name="manifest", data_dir=manifest)).classes == ("--1", "cat")
    manifest.write_text(manifest.read_text() + "x" * 300 + ".png,cat\n")
    args = ["extract", *SMALL, "--data-dir", manifest, "--test-fraction", "0.3", "--cache-dir", tmp_path / "c2"]
    one_line(invoke(*args), "File name too long")
    assert invoke(*args, "--skip-bad-images").exit_code == 0


def _rewrite_json(shard, payload):
    _rewrite(shard, lambda name, data: payload if name.endswith(".json") else data)


def test_bad_output_places_and_empty_scores_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line(invoke("rank", "--backbone", "tiny", "--weights", "random", "--score", "", "--runs-dir", tmp_path / "r"),
             r"--score needs at least one score")
    one_line(invoke("rank", "--backbone", "tiny", "--weights", "random", "--runs-dir", tmp_path / "afile"),
             r"--runs-dir .*afile is a file, not a folder")
    one_line(invoke("sweep", "--backbone", "tiny", "--runs-dir", tmp_path / "afile"), r"is a file, not a folder")
    assert not (tmp_path / "r").exists()
    one_line(invoke("rank", *SMALL, "--limit-train", "1", "--cache-dir", tmp_path / "c", "--runs-dir", tmp_path / "r"),
             r"the training split holds 1 image\(s\): too few to hold out a validation share")  # not every model's



# --- a new user's --data-dir -------------------------------------------------------------------------------


def test_data_dir_without_dataset_reads_what_is_there_and_never_the_digits(tmp_path):
    from featcache.data.datasets import infer_source

    items = fx.sample_images(per_class=3)
    folder = fx.as_folder(tmp_path / "photos", items)
    assert infer_source(folder) == "folder"
    assert infer_source(fx.as_manifest(tmp_path / "m.csv", folder, items)) == "manifest"
    assert infer_source(fx.as_shards(tmp_path / "s", items)) == "webdataset"
    fx.hf_dataset(items).save_to_disk(tmp_path / "hf")
    assert infer_source(tmp_path / "hf") == "hf"
    fx.stl10(tmp_path / "tv")
    assert infer_source(tmp_path / "tv") == "stl10"
    (tmp_path / "empty").mkdir()
    one_line(invoke("extract", *SMALL, "--data-dir", tmp_path / "empty", "--cache-dir", tmp_path / "c"),
             r"cannot tell what --data-dir .*empty holds")
    done = invoke("extract", *SMALL[:-1], "--data-dir", folder, "--cache-dir", tmp_path / "c")
    assert done.exit_code == 0, done.output
    assert [p.parent.name for p in (tmp_path / "c").rglob("*.h5")] == ["folder-photos"]
