"""Every dataset source, each built locally in its real on-disk format (no network, no download checksums)."""

import json
import pickle

import numpy as np
import pytest
import source_fixtures as fx
from conftest import tiny_config

from featcache.data.datasets import DATASETS, DataRequest, dataset_identity, load_dataset
from featcache.errors import FeatcacheError


def load(name, root, **kwargs):
    return load_dataset(DataRequest(name=name, data_dir=root, **kwargs))


# --- torchvision datasets by name -------------------------------------------------------------------------


def test_cifar100_reads_the_python_format_without_its_checksums(tmp_path):
    fx.cifar100(tmp_path)
    data = load("cifar100", tmp_path)
    assert len(data.classes) == 100 and data.classes[3] == "fine3"
    assert data.splits["train"].images.shape == (40, 32, 32, 3) and len(data.splits["test"]) == 20
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        first = pickle.load(f)
    assert np.array_equal(data.splits["train"].images[1], first["data"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert list(data.splits["train"].labels[:5]) == first["fine_labels"][:5]
    assert data.splits["train"].official_val is None  # no validation split of its own: carved later


def test_stl10_binary_and_svhn_mat_are_held_in_memory_as_hwc(tmp_path):
    fx.stl10(tmp_path)
    stl = load("stl10", tmp_path)
    raw = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    assert stl.splits["train"].images.shape == (20, 96, 96, 3)
    assert np.array_equal(stl.splits["train"].images[0], raw[0].transpose(2, 1, 0))  # column-major on disk
    assert stl.classes[0] == "airplane" and list(stl.splits["train"].labels[:3]) == [0, 1, 2]
    fx.svhn(tmp_path / "svhn")
    svhn = load("svhn", tmp_path / "svhn")
    assert svhn.splits["train"].images.shape == (20, 32, 32, 3) and svhn.classes == tuple("0123456789")
    assert list(svhn.splits["train"].labels[:10]) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 10 is the digit 0


def test_flowers102_uses_its_official_validation_split(tmp_path):
    fx.flowers102(tmp_path)
    data = load("flowers102", tmp_path)
    train = data.splits["train"]
    assert len(train) == 12 and len(data.splits["test"]) == 6
    assert list(train.official_val) == [False] * 6 + [True] * 6  # trnid, then valid
    assert train.files[0].name == "image_00001.jpg" and train.files[6].name == "image_00007.jpg"
    assert list(train.labels[:3]) == [0, 1, 2] and "own validation split (6 images)" in data.validation


def test_the_reports_data_facts_say_where_validation_comes_from(tmp_path):
    from featcache.reporting.page import _facts

    fx.flowers102(tmp_path)
    facts = _facts(load("flowers102", tmp_path), record=None)
    assert facts[:3] == ["source: torchvision.datasets.Flowers102", "6 train, 6 validation, 6 test images",
                         "validation: the dataset's own validation split (6 images)"]


def test_dtd_and_pets_take_their_classification_labels(tmp_path):
    fx.dtd(tmp_path)
    dtd = load("dtd", tmp_path)
    assert dtd.classes == ("banded", "dotted", "striped")
    assert int(dtd.splits["train"].official_val.sum()) == 6 and len(dtd.splits["test"]) == 6
    fx.oxford_pets(tmp_path)
    pets = load("oxfordiiitpet", tmp_path)
    assert pets.classes == ("Abyssinian", "Basset Hound", "Bengal")
    assert list(pets.splits["train"].labels) == [0, 0, 1, 1, 2, 2] and len(pets.splits["test"]) == 6
    assert pets.splits["train"].official_val is None


def test_eurosat_has_no_split_and_imagenette_maps_val_to_test(tmp_path):
    fx.eurosat(tmp_path)
    euro = load("eurosat", tmp_path, test_fraction=0.25)
    assert euro.classes == ("Forest", "River", "SeaLake")
    assert len(euro.splits["train"]) == 9 and list(np.bincount(euro.splits["test"].labels)) == [1, 1, 1]
    fx.imagenette(tmp_path)
    nette = load("imagenette", tmp_path)
    assert len(nette.classes) == 3 and nette.classes[0].startswith("tench")
    assert len(nette.splits["train"]) == 6 and all("/val/" in str(f) for f in nette.splits["test"].files)


def test_a_torchvision_dataset_in_the_wrong_format_names_what_it_expects(tmp_path):
    (tmp_path / "flowers-102").mkdir()
    with pytest.raises(FeatcacheError, match=r"flowers102 not found or not in torchvision's Flowers102 format .*"
                                             r"--data-dir must hold flowers-102/ \(or pass --download\)"):
        load("flowers102", tmp_path)
    with pytest.raises(FeatcacheError, match="did you mean 'flowers102'"):
        load("flowers", tmp_path)


def test_the_identity_follows_the_files_and_needs_no_checksum(tmp_path):
    fx.dtd(tmp_path)
    request = DataRequest(name="dtd", data_dir=tmp_path)
    before = dataset_identity(request)
    assert dataset_identity(request) == before
    image = next((tmp_path / "dtd" / "dtd" / "images" / "banded").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert dataset_identity(request) != before


def test_featcache_datasets_lists_every_source_and_describes_one():
    from click.testing import CliRunner

    from featcache.cli.commands import cli

    def run_cli(args):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return result.output

    out = run_cli(["datasets"])
    for name in ("cifar100", "flowers102", "food101", "oxfordiiitpet", "hf", "manifest", "webdataset", "folder"):
        assert name in out
    pets = run_cli(["datasets", "oxfordiiitpet"])
    assert "target_types='category'" in pets and "37 classes" in pets and "carved from train" in pets
    assert "the dataset's own validation split" in run_cli(["datasets", "flowers102"])


# --- Hugging Face, manifests, WebDataset: the same images through every source ----------------------------


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("same")
    items = fx.sample_images()
    folder = fx.as_folder(root / "folder", items)
    hf = fx.hf_dataset(items)
    hf.save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    for split, ds in hf.items():
        ds.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    return {"folder": ("folder", folder, {}),
            "csv": ("manifest", fx.as_manifest(root / "labels.csv", folder, items), {}),
            "parquet manifest": ("manifest", fx.as_manifest(root / "labels.parquet", folder, items, parquet=True), {}),
            "save_to_disk": ("hf", root / "saved", {}),
            "hf parquet": ("hf", root / "parquet", {}),
            "shards": ("webdataset", fx.as_shards(root / "shards", items), {}),
            "json shards": ("webdataset", fx.as_shards(root / "jshards", items, label="json"),
                            {"label_column": "label"})}


SOURCES = ["csv", "parquet manifest", "save_to_disk", "hf parquet", "shards", "json shards"]


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_gives_the_folders_classes_labels_and_pixels(same_images, source):
    from featcache.data.images import decode_rgb

    reference = load(*same_images["folder"][:2])
    name, where, options = same_images[source]
    data = load(name, where, **options)
    assert data.classes == reference.classes == ("ant", "bee") or data.classes == ("0", "1")
    for split in ("train", "test"):
        assert np.array_equal(data.splits[split].labels, reference.splits[split].labels)
        got = [decode_rgb(f) for f in data.splits[split].files]
        want = [decode_rgb(f) for f in reference.splits[split].files]
        assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)


def test_the_same_images_through_four_sources_give_identical_features(same_images, tmp_path):
    from featcache.extraction.reader import FeatureCache
    from featcache.extraction.run import extract

    features = {}
    for source in ("folder", "csv", "save_to_disk", "shards"):
        name, where, options = same_images[source]
        cfg = tiny_config(tmp_path, data=DataRequest(name=name, data_dir=where, **options))
        [result] = extract(cfg, progress=False, log=lambda m: None)
        with FeatureCache(result.path) as cache:
            features[source] = {(s, t): cache.read(s, t) for s in ("train", "test") for t in cache.tap_names(s)}
    for source in ("csv", "save_to_disk", "shards"):
        assert features[source].keys() == features["folder"].keys()
        assert all(np.array_equal(features[source][k], features["folder"][k]) for k in features["folder"]), source


def test_hf_finds_columns_and_splits_and_says_which_are_missing(same_images, tmp_path):
    import datasets

    data = load("hf", same_images["save_to_disk"][1])
    assert data.about["columns"] == {"image": "img", "label": "kind"} and data.classes == ("ant", "bee")
    plain = datasets.Dataset.from_dict({"a": [1, 2], "b": ["x", "y"]})
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(FeatcacheError, match="the dataset has no Image column: name the column with --image-column; "
                                             "its columns are a, b"):
        load("hf", tmp_path / "plain")
    with pytest.raises(FeatcacheError, match="--label-column nope: the dataset has no such column"):
        load("hf", same_images["save_to_disk"][1], label_column="nope")
    with pytest.raises(FeatcacheError, match="cannot load Hugging Face dataset 'nobody/nothing' from the local cache "
                                             r"\(nothing is downloaded without --download\)"):
        load_dataset(DataRequest(name="hf", hf_name="nobody/nothing"))


def test_hf_with_a_validation_split_uses_it_and_reads_string_labels(tmp_path):
    import datasets

    items = fx.sample_images(per_class=9)
    rows = {"train": items[:4] + items[9:13], "validation": items[4:6] + items[13:15], "test": items[6:9] + items[15:]}
    ds = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for _, _, d in part], "species": [c for _, c, _ in part]},
        features=datasets.Features({"image": datasets.Image(), "species": datasets.Value("string")}))
        for split, part in rows.items()})
    ds.save_to_disk(str(tmp_path / "dd"))
    data = load("hf", tmp_path / "dd", label_column="species")
    assert data.classes == ("ant", "bee") and int(data.splits["train"].official_val.sum()) == 4
    assert len(data.splits["test"]) == 6
    chosen = load("hf", tmp_path / "dd", label_column="species", hf_splits="train=test,test=train")
    assert len(chosen.splits["train"]) == 6 and len(chosen.splits["test"]) == 8  # named splits, no validation
    assert chosen.splits["train"].official_val is None
    with pytest.raises(FeatcacheError, match="--hf-splits val=dev: the dataset has no split 'dev' "
                                             r"\(its splits: train, validation, test\)"):
        load("hf", tmp_path / "dd", label_column="species", hf_splits="train=train,val=dev")
    with pytest.raises(FeatcacheError, match="hf_splits must map train"):
        from featcache.data.request import DataFields
        from featcache.requests import API, build

        build(DataFields, {"hf_splits": "val=validation"}, API)


def test_a_manifest_counts_missing_files_as_bad_images_and_refuses_empty_labels(tmp_path, same_images):
    from featcache.extraction.run import extract

    items = fx.sample_images()
    folder = fx.as_folder(tmp_path / "f", items)
    manifest = fx.as_manifest(tmp_path / "m.csv", folder, items)
    next((folder / "train" / "ant").iterdir()).unlink()
    cfg = tiny_config(tmp_path, data=DataRequest(name="manifest", data_dir=manifest))
    with pytest.raises(FeatcacheError, match=r"image .*000.png is missing"):
        extract(cfg, progress=False, log=lambda m: None)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".h5", ".partial")]  # nothing written
    [result] = extract(tiny_config(tmp_path, data=cfg.data, skip_bad_images=True), progress=False, log=lambda m: None)
    assert len(result.skipped) == 1 and result.skipped[0]["file"].endswith("000.png")
    text = manifest.read_text().splitlines()
    (tmp_path / "e.csv").write_text("\n".join([text[0], text[1].rsplit(",", 2)[0] + ",,train", *text[2:]]))
    with pytest.raises(FeatcacheError, match=r"1 row\(s\) of manifest .*e.csv \(column 'label'\) have no label .*first: row 2\)"):
        load("manifest", tmp_path / "e.csv")
    with pytest.raises(FeatcacheError, match="has no 'file' column .*its columns are path, label, split"):
        load("manifest", manifest, image_column="file")


def test_shards_written_by_the_webdataset_library_load(tmp_path):
    wds = pytest.importorskip("webdataset")
    (tmp_path / "w").mkdir()
    for split in ("train", "test"):
        with wds.TarWriter(str(tmp_path / "w" / f"{split}-000000.tar")) as sink:
            for k in range(4):
                sink.write({"__key__": f"s{k:04d}", "jpg": fx.encoded(fx.pattern(k), "JPEG"), "cls": k % 2})
    data = load("webdataset", tmp_path / "w")
    assert data.classes == ("0", "1") and list(data.splits["train"].labels) == [0, 1, 0, 1]
    from featcache.data.images import decode_rgb

    assert decode_rgb(data.splits["test"].files[1]).shape == (12, 12, 3)


def test_a_shard_with_a_non_image_payload_is_named_or_skipped(tmp_path):
    import io
    import tarfile

    from featcache.extraction.run import extract

    root = fx.as_shards(tmp_path / "s", fx.sample_images())
    with tarfile.open(root / "train-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for member, payload in members:
            payload = b"not an image" if member.name == "sample00001.png" else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    cfg = tiny_config(tmp_path, data=DataRequest(name="webdataset", data_dir=root))
    with pytest.raises(FeatcacheError, match=r"cannot read image .*train-000000.tar:sample00001.png"):
        extract(cfg, progress=False, log=lambda m: None)
    [result] = extract(tiny_config(tmp_path, data=cfg.data, skip_bad_images=True), progress=False, log=lambda m: None)
    assert [s["file"].rsplit(":", 1)[1] for s in result.skipped] == ["sample00001.png"]


def test_every_source_is_a_registry_entry_with_a_line_about_it():
    for name in ("hf", "manifest", "webdataset", "flowers102", "digits", "folder"):
        assert DATASETS.lookup(name).about, name
    assert json.dumps(sorted(DATASETS))  # plain names


def test_worker_processes_read_arrow_cells_and_shard_members_as_the_main_process_does(same_images, tmp_path):
    """The readers travel to DataLoader workers (pickled): the features are those read in the process."""
    from featcache.extraction.reader import FeatureCache
    from featcache.extraction.run import extract

    for source in ("hf parquet", "shards"):
        name, where, options = same_images[source]
        data = DataRequest(name=name, data_dir=where, **options)
        got = []
        for workers in (0, 1):
            cfg = tiny_config(tmp_path / f"{source}-{workers}", data=data, num_workers=workers)
            [result] = extract(cfg, progress=False, log=lambda m: None)
            with FeatureCache(result.path) as cache:
                got.append(cache.read("train", "stage3"))
        assert np.array_equal(*got), source


def test_a_finetune_reads_its_images_from_shards(same_images, tmp_path):
    from test_finetune import ft_config

    from featcache.finetuning.run import finetune
    from featcache.runs.records import load_record

    name, where, options = same_images["shards"]
    features = tiny_config(tmp_path, data=DataRequest(name=name, data_dir=where), dtype="float32")
    run = finetune(ft_config(tmp_path, features=features, epochs=1, num_workers=1), log=lambda m: None, progress=False)
    record = load_record(run)
    assert record.config["dataset"] == "webdataset" and record.classes == ["0", "1"]
    assert record.rows["test"] == 4


def test_predict_classifies_a_manifest_a_shard_and_a_saved_hf_dataset_like_their_files(same_images, tmp_path):
    import featcache.fuse.predict  # noqa: F401  registers the frozen runs' predictor
    from featcache.data.datasets import image_entries
    from featcache.fuse.train import FuseTrainConfig, fuse_train
    from featcache.runs.predict import predict_files

    cfg = tiny_config(tmp_path, data=DataRequest(name="folder", data_dir=same_images["folder"][1]))
    [run] = fuse_train(FuseTrainConfig(features=cfg, taps=("late",), heads=("logreg",), runs_dir=tmp_path / "runs",
                                       run_extract=True), log=lambda m: None)
    files = image_entries([same_images["folder"][1]])
    want = [(label, round(p, 6)) for _, label, p in predict_files(run, files, device="cpu")]
    for source in ("csv", "save_to_disk"):
        got = predict_files(run, image_entries([same_images[source][1]]), device="cpu")
        assert sorted((label, round(p, 6)) for _, label, p in got) == sorted(want), source
    shards = sorted(same_images["shards"][1].glob("*.tar"))
    got = predict_files(run, image_entries(shards), device="cpu")
    assert len(got) == len(want) and str(got[0][0]).endswith("-000000.tar:sample00000.png")


def test_an_empty_split_and_a_missing_extra_are_one_line_each(tmp_path, monkeypatch):
    from featcache.data.source import Split, official_splits

    items = fx.sample_images()
    manifest = fx.as_manifest(tmp_path / "m.csv", fx.as_folder(tmp_path / "f", items), items)

    empty = Split(labels=np.zeros(0, np.int64), index=np.zeros(0, np.int64), files=())
    with pytest.raises(FeatcacheError, match="the test split holds no images: check --data-dir"):
        official_splits({"train": load("manifest", manifest).splits["train"], "test": empty}, DataRequest())
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (None: import raises ImportError)
    with pytest.raises(FeatcacheError, match=r"--dataset hf needs the datasets package: pip install 'featcache\[hub\]'"):
        load_dataset(DataRequest(name="hf", hf_name="some/name"))


def test_nothing_is_downloaded_without_download_even_where_torchvision_would(tmp_path, monkeypatch):
    """SEMEION's class downloads by default; without --download featcache never asks it to."""
    import torchvision.datasets.semeion as semeion

    monkeypatch.setattr(semeion, "download_url", lambda *a, **k: pytest.fail("a download was attempted"))
    with pytest.raises(FeatcacheError, match="semeion not found .*--data-dir must hold semeion.data"):
        load("semeion", tmp_path)


def test_webdataset_brace_patterns_name_the_shards_as_webdataset_takes_them(tmp_path):
    from featcache.data.shards import braces

    assert braces("s/train-{000..002}.tar") == ["s/train-000.tar", "s/train-001.tar", "s/train-002.tar"]
    assert braces("{train,test}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "test-0.tar", "test-1.tar"]
    items = fx.sample_images(per_class=6)
    root = fx.as_shards(tmp_path / "s", items, per_shard=3)  # train-000000..000002, test-000000..000001
    whole = load_dataset(DataRequest(name="webdataset", data_dir=root))
    both = root / "{train-{000000..000002},test-{000000..000001}}.tar"
    pattern = load_dataset(DataRequest(name="webdataset", data_dir=both))
    assert pattern.classes == whole.classes
    for split in ("train", "test"):
        assert list(pattern.splits[split].labels) == list(whole.splits[split].labels)
    from featcache.data.datasets import infer_source

    assert infer_source(root / "train-{000000..000002}.tar") == "webdataset"
    with pytest.raises(FeatcacheError, match=r"names 4 shards; 1 are missing \(first: .*train-000003.tar\)"):
        load_dataset(DataRequest(name="webdataset", data_dir=root / "train-{000000..000003}.tar"))
