"""Messy photo folders: every odd or broken file is converted to RGB or reported in one line naming it."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli.commands import cli
from featcache.data.images import BadImage, load_image
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.reader import FeatureCache

PRE = PreprocessConfig(image_size=32)
FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--num-workers", "0",
        "-q", "--dataset", "folder"]


def photo(size=(40, 30), value=128, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(value + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def odd_images(folder):
    """Files that are odd but valid: each must load as RGB uint8 of the requested size."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.dstack([photo(), np.full((30, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(photo()[..., 0], "L").save(folder / "gray.png")
    Image.fromarray(photo()).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png", transparency=0)
    Image.fromarray(photo()).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((photo()[..., 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    Image.fromarray(photo((1, 1))).save(folder / "tiny1x1.png")
    Image.fromarray(np.tile(photo((400, 300)), (10, 10, 1))).save(folder / "large.jpg", quality=90)  # 12 megapixels
    Image.fromarray(photo()).save(folder / "фото-ü.png")
    Image.fromarray(photo()[..., 0].astype(np.float32) / 255, "F").save(folder / "float.tif")
    return folder


def bad_images(folder):
    """Files that cannot be read: truncated JPEG, empty file, a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo((200, 150))).save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    return folder


@pytest.fixture
def odd(tmp_path):
    return odd_images(tmp_path / "odd")


@pytest.fixture(scope="module")
def odd_read_only(tmp_path_factory):
    """The odd files made once for the tests that only read them (the 12-megapixel JPEG takes a second)."""
    return odd_images(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("name", ["alpha.png", "gray.png", "palette.png", "cmyk.jpg", "deep16.png", "tiny1x1.png",
                                  "large.jpg", "фото-ü.png", "float.tif"])
def test_each_odd_image_loads_as_rgb(odd_read_only, name):
    image = load_image(odd_read_only / name, PRE)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    if name in ("deep16.png", "float.tif"):  # scaled to 8 bits, not clipped to white or black
        assert 90 < image.mean() < 170
    if name == "cmyk.jpg":
        assert abs(float(image.mean()) - 128) < 20


def test_the_fast_decoder_gives_pils_pixels_for_every_odd_and_plain_file(odd, monkeypatch):
    """JPEG and PNG go through torchvision's decoders; each file reads exactly as PIL reads it."""
    from featcache.data import images

    Image.fromarray(photo((64, 48))).save(odd / "plain.jpg", quality=85)
    Image.fromarray(photo((64, 48))[..., 0], "L").save(odd / "gray.jpg")
    Image.fromarray(photo((64, 48))).save(odd / "progressive.jpg", progressive=True)
    fast = []
    real = images._torchvision_rgb

    def counted(path):
        out = real(path)
        if out is not None:
            fast.append(path.name)
        return out

    monkeypatch.setattr(images, "_torchvision_rgb", counted)
    for path in sorted(odd.iterdir()):
        assert np.array_equal(images.decode_rgb(path), np.asarray(images.open_rgb(path))), path.name
    # the plain JPEGs and 8-bit PNGs took the fast path; CMYK, 16-bit and TIFF went to PIL
    assert {"plain.jpg", "gray.jpg", "progressive.jpg", "alpha.png", "gray.png", "palette.png", "large.jpg"} <= set(fast)
    assert not {"cmyk.jpg", "deep16.png", "float.tif"} & set(fast)


def test_an_image_over_pillows_bomb_limit_is_reported_not_crashed(tmp_path, monkeypatch):
    Image.fromarray(photo((100, 100))).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 10,000 pixels > 2 x the limit: Pillow refuses
    with pytest.raises(BadImage, match=r"cannot read image .*bomb.png: DecompressionBombError"):
        load_image(tmp_path / "bomb.png", PRE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # above the limit but under twice it: loads, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "bomb.png", PRE).shape == (32, 32, 3)


@pytest.mark.parametrize("name, reason", [("truncated.jpg", "OSError: image file is truncated"),
                                          ("empty.png", "empty file"),
                                          ("notes.jpg", "UnidentifiedImageError")])
def test_each_unreadable_file_is_named(tmp_path, name, reason):
    folder = bad_images(tmp_path / "bad")
    with pytest.raises(BadImage, match=re.escape(f"cannot read image {folder / name}: ") + ".*" + re.escape(reason)):
        load_image(folder / name, PRE)


def messy_folder(root):
    for k, cls in enumerate(("boots", "sandals")):
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(photo(value=60 + 120 * k, seed=i)).save(folder / f"{cls}{i}.png")
    odd_images(root / "boots")
    bad_images(root / "sandals")
    return root


def test_extract_stops_at_a_bad_image_in_one_line_and_leaves_nothing(tmp_path):
    root = messy_folder(tmp_path / "photos")
    result = CliRunner().invoke(cli, ["extract", *FAST, "--data-dir", str(root), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert re.fullmatch(r"Error: cannot read image .*photos/sandals/(empty.png|notes.jpg|truncated.jpg): .*"
                        r"fix or remove the file, or pass --skip-bad-images to leave unreadable images out", line)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.suffix in (".h5", ".partial")]


def test_skip_bad_images_carries_on_lists_and_records_them(tmp_path):
    root = messy_folder(tmp_path / "photos")
    args = ["extract", *FAST, "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"), "--skip-bad-images",
            "--test-fraction", "0.3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable image(s), recorded in the cache" in result.output
    assert "extracted 21 images (3 more unreadable, left out) into" in result.output  # not "24 images"
    for name in ("truncated.jpg", "empty.png", "notes.jpg"):
        assert name in result.output
    [path] = (tmp_path / "c").rglob("*.h5")
    with FeatureCache(path) as cache:
        skipped = cache.skipped
        assert sorted(s["file"].rsplit("/", 1)[1] for s in skipped) == ["empty.png", "notes.jpg", "truncated.jpg"]
        assert json.loads(cache.file.attrs["skipped_images"]) == skipped
        total = sum(len(cache.file[s]["labels"]) for s in cache.splits)
        served = sum(len(cache.labels(s)) for s in cache.splits)
        assert served == total - 3 == 12 + 9  # 12 plain photos and 9 odd ones served; the 3 bad left out
        for split in cache.splits:
            assert len(cache.read(split, "stage3")) == len(cache.labels(split)) == len(cache.index(split))
    again = CliRunner().invoke(cli, args)  # a cache hit still says what was left out
    assert "already cached" in again.output and "skipped 3 unreadable image(s)" in again.output
    info = CliRunner().invoke(cli, ["info", str(path)])
    assert "skipped as unreadable (3):" in info.output and "truncated.jpg" in info.output


@pytest.mark.parametrize("command", [["fuse-train", "--head", "logreg"],
                                     ["sweep", "--combos", "singles", "--head", "logreg", "--keep", "0"]])
def test_the_commands_that_extract_first_take_skip_bad_images_as_the_error_says(tmp_path, command):
    root = messy_folder(tmp_path / "photos")
    args = [*command, "--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu",
            "--dataset", "folder", "--data-dir", str(root), "--test-fraction", "0.3", "--extract",
            "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "runs")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "or pass --skip-bad-images to leave unreadable images out" in refused.output
    result = CliRunner().invoke(cli, [*args, "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable image(s), recorded in the cache" in result.output


@pytest.mark.parametrize("workers", ["0", "2"])
def test_device_jpeg_decode_takes_the_whole_messy_folder_like_the_cpu_path(tmp_path, monkeypatch, workers):
    """The GPU path (JPEG bytes from the workers, batched decode_jpeg and resize on the device), run on
    the CPU: the same files skipped with the same reasons, and each image's features close to the CPU path's."""
    from featcache.extraction import passes

    root = messy_folder(tmp_path / "photos")
    for i in range(3):  # plain JPEGs of other sizes: decoded and resized by the device path
        Image.fromarray(photo((50 + 10 * i, 40), seed=i)).save(root / "boots" / f"j{i}.jpg", quality=90)
    import torchvision.io

    batches, real = [], torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: batches.append(
        len(data) if isinstance(data, list) else 1) or real(data, **kw))
    caches = {}
    for mode in (False, True):
        monkeypatch.setattr(passes, "DEVICE_JPEG_DECODE", mode)
        flags = [workers if previous == "--num-workers" else flag for previous, flag in zip(["", *FAST], FAST)]
        args = ["extract", *flags, "--data-dir", str(root), "--skip-bad-images", "--cache-dir", str(tmp_path / f"c{mode}")]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        [caches[mode]] = (tmp_path / f"c{mode}").rglob("*.h5")
        assert bool(batches) == mode and (not mode or max(batches) > 1)  # the device path decodes JPEGs in batches
    with FeatureCache(caches[False]) as cpu, FeatureCache(caches[True]) as device:
        assert [s["error"] for s in cpu.skipped] == [s["error"] for s in device.skipped] and len(cpu.skipped) == 3
        for split in ("train", "test"):
            a, b = cpu.read(split, "stage3").astype(np.float32), device.read(split, "stage3").astype(np.float32)
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cosine.min() > 0.99, cosine.min()


def test_a_cache_with_skipped_images_trains_and_reports(tmp_path):
    from featcache.reporting.page import ReportConfig, write_report

    root = messy_folder(tmp_path / "photos")
    common = [*FAST, "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"), "--test-fraction", "0.3"]
    assert CliRunner().invoke(cli, ["extract", *common, "--skip-bad-images"]).exit_code == 0
    common = [c for c in common if c not in ("-q", "--num-workers", "0")]
    trained = CliRunner().invoke(cli, ["fuse-train", *common, "--head", "logreg", "--runs-dir", str(tmp_path / "r")])
    assert trained.exit_code == 0, trained.output
    page = write_report(ReportConfig(runs_dir=tmp_path / "r", out=tmp_path / "r.html", gradcam_images=2),
                        log=lambda m: None).read_text()
    assert '<figure class="predictions">' in page and '<figure class="gradcam">' in page
    assert "images unavailable" not in page


@pytest.mark.parametrize("layout, message", [
    ({"boots": 3, "sandals": 0}, r"class folder .*sandals holds no images"),
    ({"boots": 4}, r"holds one class folder \(boots\): a classifier needs at least two"),
])
def test_empty_class_folder_and_single_class_dataset_are_one_line(tmp_path, layout, message):
    for cls, n in layout.items():
        (tmp_path / "p" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(photo(seed=i)).save(tmp_path / "p" / cls / f"{i}.png")
    result = CliRunner().invoke(cli, ["extract", *FAST, "--data-dir", str(tmp_path / "p"),
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert re.search(message, line), line


def test_fine_tuning_names_an_unreadable_image_in_one_line(tmp_path):
    root = messy_folder(tmp_path / "photos")
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                      "--device", "cpu", "--num-workers", "0", "-q", "--dataset", "folder",
                                      "--data-dir", str(root), "--epochs", "1", "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    # the small folder's validation split is warned about first (issue 12); then the error, in one line
    [line] = [text for text in result.output.strip().splitlines() if not text.startswith("warning: the validation")]
    assert re.match(r"Error: cannot read image .*: .*fix or remove the file \(fine-tuning reads every image\)", line)
