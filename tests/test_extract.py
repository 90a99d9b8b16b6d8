import dataclasses

import numpy as np
import pytest
import tiny
import torch
from conftest import tiny_config

from featcache.backbones.registry import BACKBONES
from featcache.data.datasets import DataRequest, dataset_key, load_dataset
from featcache.data.images import load_image
from featcache.data.preprocess import PreprocessConfig, to_input
from featcache.errors import FeatcacheError
from featcache.extraction import run as extract_module
from featcache.extraction.config import fingerprint
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.extraction.store import cache_file


def read_all(path):
    with FeatureCache(path) as cache:
        return {
            (split, tap): cache.read(split, tap) for split in cache.splits for tap in cache.taps(split)
        } | {(split, "labels"): cache.labels(split) for split in cache.splits}


def test_extract_writes_every_tap_of_every_split(tmp_path):
    cfg = tiny_config(tmp_path)
    [result] = extract(cfg, progress=False)
    assert result.status == "extracted" and result.images == 160
    assert result.path.parent == tmp_path / "cache" / "digits" and result.path.name.startswith("tiny-")
    with FeatureCache(result.path) as cache:
        assert cache.complete and sorted(cache.splits) == ["test", "train"]
        assert cache.taps("train") == {"stage1": (120, 8), "stage2": (120, 12), "stage3": (120, 16)}
        assert cache.read("train", "stage3").dtype == np.float16
        assert cache.fingerprint["backbone"] == "tiny" and cache.classes[0] == "0"
        data = load_dataset(cfg.data)
        assert np.array_equal(cache.labels("test"), data.splits["test"].labels)
        assert np.array_equal(cache.index("test"), data.splits["test"].index)


def test_stored_features_equal_a_plain_forward_pass(tmp_path):
    """The cache holds exactly what the unfused network computes (up to float16)."""
    cfg = tiny_config(tmp_path, dtype="float32", pooling="avgmax")
    [result] = extract(cfg, progress=False)
    from featcache.backbones.weights import build_backbone

    net = build_backbone(BACKBONES["tiny"], "random", 0)
    images = torch.from_numpy(load_dataset(cfg.data).splits["test"].images[:5])
    x = to_input(images, cfg.preprocess)
    with torch.inference_mode():
        stage1 = net.stage1(net.stem(x))
    expected = torch.cat([stage1.mean((2, 3)), stage1.amax((2, 3))], 1).numpy()
    with FeatureCache(result.path) as cache:
        got = cache.read("test", "stage1")[:5]
        assert cache.taps("test")["stage1"] == (40, 16)  # avg and max side by side
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_identical_request_is_served_from_the_cache(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    [first] = extract(cfg, progress=False)

    def no_forward(*args, **kwargs):
        raise AssertionError("the backbone ran on a cache hit")

    monkeypatch.setattr(extract_module, "tap_model", no_forward)
    monkeypatch.setattr(extract_module, "load_dataset", no_forward)
    [second] = extract(cfg, progress=False)
    assert second.status == "cached" and second.path == first.path


CHANGES = {
    "weights seed": dict(data=DataRequest(name="digits", limit_train=120, limit_test=40, seed=1)),
    "image size": dict(preprocess=PreprocessConfig(image_size=40)),
    "resize rule": dict(preprocess=PreprocessConfig(image_size=32, resize="stretch")),
    "mean/std": dict(preprocess=PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5))),
    "pooling": dict(pooling="max"),
    "precision": dict(precision="bf16"),
    "dtype": dict(dtype="float32"),
    "limits": dict(data=DataRequest(name="digits", limit_train=100, limit_test=40)),
    "dataset": dict(data=DataRequest(name="digits", limit_train=120, limit_test=40, test_fraction=0.3)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_numeric_change_is_a_different_cache(tmp_path, change):
    base = tiny_config(tmp_path)
    other = tiny_config(tmp_path, **CHANGES[change])
    spec = BACKBONES["tiny"]
    paths = {cache_file(c.cache_dir, dataset_key(c.data), "tiny", fingerprint(c, spec, c.precision)) for c in (base, other)}
    assert len(paths) == 2


def test_speed_settings_share_a_cache(tmp_path):
    base = tiny_config(tmp_path)
    faster = dataclasses.replace(base, batch_size=64, num_workers=2, compile=True)
    spec = BACKBONES["tiny"]
    assert fingerprint(base, spec, "fp32") == fingerprint(faster, spec, "fp32")


def test_a_changed_request_recomputes_rather_than_reusing(tmp_path):
    [a] = extract(tiny_config(tmp_path), progress=False)
    [b] = extract(tiny_config(tmp_path, pooling="max"), progress=False)
    assert b.status == "extracted" and b.path != a.path
    assert not np.array_equal(read_all(a.path)[("test", "stage3")], read_all(b.path)[("test", "stage3")])


def test_several_backbones_in_one_command(tmp_path):
    cfg = tiny_config(tmp_path, backbones=("tiny", "resnet18"), preprocess=PreprocessConfig(image_size=32),
                      data=DataRequest(name="digits", limit_train=20, limit_test=10))
    results = extract(cfg, progress=False)
    assert [r.backbone for r in results] == ["tiny", "resnet18"]
    with FeatureCache(results[1].path) as cache:
        assert cache.taps("train")["layer4"] == (20, 512)


def test_several_backbones_share_one_decode_of_each_image_and_equal_separate_runs(tmp_path, image_folder, monkeypatch):
    from featcache.data import images

    decoded = []
    real = images._torchvision_rgb  # the first step of every decode (PIL follows only where it declines)
    monkeypatch.setattr(images, "_torchvision_rgb", lambda path: decoded.append(path) or real(path))
    data = DataRequest(name="folder", data_dir=image_folder)
    together = extract(tiny_config(tmp_path / "together", data=data, backbones=("tiny", "tiny2"), batch_size=5),
                       progress=False)
    assert len(decoded) == 12 and len(set(decoded)) == 12  # each file once, for both backbones
    for name, result in zip(("tiny", "tiny2"), together):
        [alone] = extract(tiny_config(tmp_path / name, data=data, backbones=(name,), batch_size=5), progress=False)
        assert result.path.name == alone.path.name and result.path.read_bytes() == alone.path.read_bytes()


def test_folder_images_are_decoded_by_workers(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, data=DataRequest(name="folder", data_dir=image_folder), num_workers=2, batch_size=4)
    [result] = extract(cfg, progress=False)
    assert result.path.parent.name == "folder-photos"
    feats = read_all(result.path)
    assert feats[("train", "stage3")].shape[0] + feats[("test", "stage3")].shape[0] == 12


def test_device_resize_matches_pil_resize_closely():
    """In-memory images are resized on the device; files by PIL. Both give the same picture."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pre = PreprocessConfig(image_size=64)
    device = to_input(torch.from_numpy(small[None]), pre)[0]
    pil = Image.fromarray(small).resize((64, 64), Image.BILINEAR)
    via_pil = to_input(torch.from_numpy(np.asarray(pil).copy()[None]), pre)[0]
    assert (device - via_pil).abs().mean() < 0.05


@pytest.mark.parametrize("size, interpolation, crop", [(40, "bilinear", 1.0), (40, "bicubic", 1.0), (12, "bicubic", 0.875),
                                                      (16, "bilinear", 0.875)])
def test_normalising_before_or_after_the_resize_gives_the_same_input(size, interpolation, crop):
    """to_input normalises on the smaller side (before an upsampling, after a downsampling): the same
    values as resizing the [0, 1] pixels, clipping bicubic's overshoot to them, then normalising."""
    from featcache.data.preprocess import resized

    pre = PreprocessConfig(image_size=size, interpolation=interpolation, crop_pct=crop)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8))
    x = to_input(images, pre)
    plain = resized(images, pre)
    if interpolation == "bicubic":
        assert plain.min() == 0.0 and plain.max() == 1.0  # noise overshoots: the clipping is tested too
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    assert x.shape == (3, 3, size, size) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, (plain - mean) / std, atol=1e-5, rtol=0)


def test_center_crop_keeps_the_middle(tmp_path):
    from PIL import Image

    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, 20:40] = 255  # white middle third
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    pre = PreprocessConfig(image_size=20)
    assert load_image(tmp_path / "wide.png", pre).min() > 200
    stretched = load_image(tmp_path / "wide.png", PreprocessConfig(image_size=20, resize="stretch"))
    assert stretched.min() == 0
    device = to_input(torch.from_numpy(pixels[None]), pre)
    assert device.min() > 1.5  # white after ImageNet normalisation


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FeatcacheError, match="--device cuda was asked for but torch sees no CUDA GPU"):
        extract(tiny_config(tmp_path, device="cuda"), progress=False)


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_is_half_autocast_on_a_gpu(monkeypatch, bf16, expected):
    from featcache.device import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_multiplies_bf16_natively(monkeypatch, native):
    from featcache import device as rules

    cpu = torch.device("cpu")
    monkeypatch.setattr(rules, "cpu_has_native_bf16", tiny.NATIVE_BF16_CHECK)  # the suite pins fp32 (tests/tiny.py)
    # torch's own answer (AVX512-BF16 or AMX) ...
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(rules, "cpu_flags", lambda: pytest.fail("torch answered; the flags are not read"))
    assert rules.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert rules.resolve_precision("fp32", cpu) == "fp32"  # forcing fp32 still works
    # ... and the CPU flags where torch has no such query (x86 avx512_bf16 / amx_bf16, Arm bf16)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    for flags in ({"avx2", "avx512_bf16"}, {"asimd", "bf16"}, {"amx_bf16"}):
        monkeypatch.setattr(rules, "cpu_flags", lambda flags=flags: flags if native else {"avx2", "fma"})
        assert rules.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    # oneDNN capped below its bf16 kernels emulates bf16: fp32, whatever the CPU has
    monkeypatch.setattr(rules, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    for name, value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("DNNL_MAX_CPU_ISA", "avx512_core")):
        with monkeypatch.context() as capped:
            capped.setenv(name, value)
            assert rules.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap above bf16 changes nothing
    assert rules.resolve_precision("auto", cpu) == "bf16"


def test_bf16_taps_stay_faithful_to_fp32_on_held_out_photos(tmp_path, image_folder):
    """Per-image cosine >= 0.999 between bf16- and fp32-extracted taps, every tap of the four study backbones.

    resnet18 and mobilenet_v2 load a state dict saved to a file (the --weights PATH path); resnet50
    and vgg16 use seeded random weights, to keep 600 MB of state dicts out of the suite.
    """
    from featcache.backbones.weights import build_backbone

    data = DataRequest(name="folder", data_dir=image_folder, test_fraction=0.34)
    for name in ("resnet18", "mobilenet_v2", "resnet50", "vgg16"):
        weights = "random"
        if name in ("resnet18", "mobilenet_v2"):
            weights = str(tmp_path / f"{name}.pt")
            torch.save(build_backbone(BACKBONES[name], "random", 7).state_dict(), weights)
        caches = {}
        for precision in ("fp32", "bf16"):
            cfg = tiny_config(tmp_path / precision, data=data, backbones=(name,), weights=weights, dtype="float32",
                              precision=precision, preprocess=PreprocessConfig(image_size=32))
            [caches[precision]] = extract(cfg, progress=False, log=lambda m: None)
            assert caches[precision].precision == precision
        exact, half = read_all(caches["fp32"].path), read_all(caches["bf16"].path)
        for key, x in exact.items():
            if key[1] == "labels":
                continue
            y = half[key]
            cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
            assert cos.min() >= 0.999, (name, key, float(cos.min()))


@pytest.mark.parametrize("native", [True, False])
def test_a_forced_half_precision_that_is_emulated_warns_once_with_its_cost(tmp_path, monkeypatch, native):
    from featcache import device as rules

    monkeypatch.setattr(rules, "cpu_has_native_bf16", lambda: native)
    said = []
    extract(tiny_config(tmp_path, precision="bf16"), progress=False, log=said.append)
    warnings = [m for m in said if "emulated" in m]
    assert len(warnings) == (0 if native else 1)
    if warnings:
        assert "resnet50 ran 4x slower than fp32" in warnings[0] and "--precision auto picks fp32" in warnings[0]
    assert rules.emulated("fp16", torch.device("cpu")) and not rules.emulated("auto", torch.device("cpu"))
    assert not rules.emulated("bf16", torch.device("cuda"))
