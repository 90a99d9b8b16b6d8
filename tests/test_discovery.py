"""Discovered backbones: torchvision graph taps and timm feature_info, checked against real forward passes.

Random weights and small images throughout; nothing is downloaded.
"""

import sys

import numpy as np
import pytest
import torch

from featcache.backbones.discovery import discover
from featcache.backbones.sources.torchvision_models import _torchvision_spec
from featcache.backbones.registry import BACKBONES
from featcache.backbones.taps import as_grid, from_grid, map_extractor, pool
from featcache.backbones.weights import build_backbone, input_defaults
from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig, fingerprint, preprocess_for

FAMILIES = ["resnet34", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121", "convnext_tiny",
            "vit_b_16", "swin_t", "timm:resnet18", "timm:convnext_atto", "timm:vit_tiny_patch16_224",
            "timm:efficientnet_b0"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg16"])
def test_discovery_finds_the_declared_taps_of_the_study_backbones(name):
    declared, found = BACKBONES[name], _torchvision_spec(name)
    assert [(t.graph_node, t.channels, t.stride) for t in found.taps] == [(t.node, t.channels, t.stride) for t in declared.taps]
    assert [found.tap(a).graph_node for a in ("early", "mid", "late")] == [declared.aliases[a] for a in ("early", "mid", "late")]


@pytest.mark.parametrize("name", FAMILIES)
def test_discovered_channels_and_strides_equal_a_real_forward_pass(name):
    spec = BACKBONES.lookup(name)
    size = spec.input.image_size if spec.input.fixed_size else 64
    net = map_extractor(spec, build_backbone(spec, "random", 0), spec.tap_names)
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size))
    for tap in spec.taps:
        x = out[tap.node]
        if tap.layout == "tokens":
            side = int((x.shape[1] - spec.prefix_tokens) ** 0.5)
            assert (x.shape[2], size // side) == (tap.channels, tap.stride), tap
        else:
            h_axis, c_axis = (1, 3) if tap.layout == "nhwc" else (2, 1)
            assert x.shape[c_axis] == tap.channels, tap
            assert abs(size / x.shape[h_axis] - tap.stride) <= tap.stride / 4, tap  # odd sizes round
        assert pool(x, "avgmax", tap.layout, spec.prefix_tokens).shape == (1, 2 * tap.channels)
    assert len(set(spec.uniform_names)) == len(spec.taps) and spec.tap("late") == spec.taps[-1]


def test_uniform_names_module_names_and_aliases_reach_the_same_tap():
    assert BACKBONES["resnet18"].tap("stage4") == BACKBONES["resnet18"].tap("layer4") == BACKBONES["resnet18"].tap("late")
    spec = BACKBONES.lookup("timm:vit_tiny_patch16_224")
    assert spec.tap("block12") == spec.tap("blocks.11") == spec.tap("late")
    assert (spec.aliases["early"], spec.aliases["mid"]) == ("block4", "block8")  # thirds: every block is at stride 16
    with pytest.raises(FeatcacheError, match=r"--taps of timm:vit_tiny_patch16_224.*block1, block10"):
        spec.tap("stage9")


def test_transformer_taps_pool_as_class_token_or_patch_mean():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class token + a 2x2 grid
    assert torch.equal(pool(tokens, "cls", "tokens", 1), tokens[:, 0])
    assert torch.equal(pool(tokens, "avg", "tokens", 1), tokens[:, 1:].mean(1))
    grid = as_grid(tokens, "tokens", 1)  # Grad-CAM's view: the patch tokens on their 2x2 grid
    assert grid.shape == (2, 3, 2, 2) and torch.equal(grid[0, :, 0, 1], tokens[0, 2])
    assert torch.equal(from_grid(grid, tokens, "tokens", 1), tokens)
    nhwc = torch.randn(2, 4, 4, 3)
    assert torch.equal(from_grid(as_grid(nhwc, "nhwc"), nhwc, "nhwc"), nhwc)


def _cfg(tmp_path, name, **kw):
    kw = {"weights": "random", **kw}
    return ExtractConfig(data=DataRequest(name="digits", limit_train=40, limit_test=20), backbones=(name,),
                         cache_dir=tmp_path / "cache", device="cpu", **kw)


def test_each_model_is_fed_its_weights_input_config_unless_told_otherwise(tmp_path):
    spec = BACKBONES.lookup("efficientnet_b0")
    d = input_defaults(spec, "imagenet")
    assert (d["image_size"], d["interpolation"], d["crop_pct"]) == (224, "bicubic", 0.875)
    pre = preprocess_for(_cfg(tmp_path, "efficientnet_b0", preprocess=PreprocessConfig.from_model(image_size=64)), spec)
    assert (pre.image_size, pre.interpolation, pre.crop_pct) == (64, "bicubic", 0.875)
    timm_pre = preprocess_for(_cfg(tmp_path, "timm:vit_tiny_patch16_224"), BACKBONES.lookup("timm:vit_tiny_patch16_224"))
    assert (timm_pre.mean, timm_pre.crop_pct) == ((0.5, 0.5, 0.5), 0.9)
    fp = fingerprint(_cfg(tmp_path, "timm:vit_tiny_patch16_224"), BACKBONES.lookup("timm:vit_tiny_patch16_224"), "fp32")
    assert fp["preprocess"]["interpolation"] == "bicubic" and "timm" in fp["versions"]
    declared = fingerprint(_cfg(tmp_path, "resnet18"), BACKBONES["resnet18"], "fp32")
    assert "versions" not in declared and "crop_pct" not in declared["preprocess"]  # the study caches keep their names


@pytest.mark.parametrize(("name", "kw", "message"), [
    ("efficientnet_b9", {}, r"unknown backbone 'efficientnet_b9'.*did you mean 'efficientnet_b\d' or 'timm:efficientnet_b"),
    ("vit_b_16", {"preprocess": PreprocessConfig.from_model(image_size=64)},
     r"vit_b_16 takes 224 x 224 images only .*use --image-size 224"),
    ("convnext_tiny", {"preprocess": PreprocessConfig.from_model(image_size=16)},
     r"--image-size 16 is too small for convnext_tiny, whose last stage reduces by 32: use --image-size 32"),
    ("convnext_tiny", {"pooling": "cls"}, r"--pooling cls takes a transformer's class token; convnext_tiny has none"),
    ("convnext_tiny", {"weights": "IMAGENET1K_V9"}, r"--weights IMAGENET1K_V9: convnext_tiny has no such weights "
                                                    r"\(its pretrained weights: IMAGENET1K_V1\)"),
    ("timm:convnext_atto", {"weights": "nope_in1k"}, r"--weights nope_in1k: timm:convnext_atto has no such weights .*d2_in1k"),
])
def test_bad_backbone_requests_are_one_line_and_write_nothing(tmp_path, name, kw, message):
    from featcache.extraction.run import extract

    with pytest.raises(FeatcacheError, match=message):
        extract(_cfg(tmp_path, name, **kw), progress=False, log=lambda m: None)
    assert not (tmp_path / "cache").exists()


def test_timm_names_without_timm_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    discover.cache_clear()
    try:
        with pytest.raises(FeatcacheError, match=r"timm:resnet18 needs timm, which is not importable here: pip install timm"):
            discover("timm:resnet18")
    finally:
        discover.cache_clear()


def test_timm_imagenet_weights_offline_name_both_alternatives(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable is too late
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(FeatcacheError, match=r"cannot get the imagenet weights of timm:convnext_atto .*"
                                             r"use --weights random, or --weights PATH"):
        build_backbone(BACKBONES.lookup("timm:convnext_atto"), "imagenet", 0)


def test_a_local_state_dict_loads_into_a_timm_model(tmp_path):
    spec = BACKBONES.lookup("timm:convnext_atto")
    source = build_backbone(spec, "random", 1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_backbone(spec, str(tmp_path / "w.pt"), 0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert np.allclose(source.forward_features(x).numpy(), loaded.forward_features(x).numpy())


def test_two_discovered_backbones_go_through_every_stage(tmp_path):
    """extract -> fuse-train -> finetune last-block -> predict -> report, on a torchvision and a timm model."""
    from click.testing import CliRunner
    from PIL import Image

    from featcache.cli.commands import cli

    common = ["--backbone", "mobilenet_v3_small", "--backbone", "timm:convnext_atto", "--weights", "random",
              "--image-size", "32", "--interpolation", "bicubic", "--device", "cpu", "--limit-train", "60", "--limit-test", "20",
              "--cache-dir", str(tmp_path / "cache")]
    runs = ["--runs-dir", str(tmp_path / "runs")]

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    out = run("extract", *common, "-q")
    assert "mobilenet_v3_small: extracted 80 images" in out and "timm:convnext_atto: extracted 80 images" in out
    [cache] = [p for p in (tmp_path / "cache" / "digits").glob("*.h5") if "convnext_atto" in p.name]
    info = run("info", cache)
    assert "stage4" in info and "bicubic" in info and "timm=" in info
    run("fuse-train", *common, *runs, "--taps", "timm:convnext_atto:late,mobilenet_v3_small:stage3", "--head", "linear",
        "--epochs", "2")
    run("finetune", *common, *runs, "--taps", "timm:convnext_atto:late,mobilenet_v3_small:stage3", "--head", "linear",
        "--unfreeze", "last-block", "--epochs", "1")
    files = []
    for k in range(2):
        files.append(tmp_path / f"im{k}.png")
        Image.fromarray(np.full((20, 24, 3), 60 * k, np.uint8)).save(files[-1])
    from featcache.runs.records import run_folders

    folders = run_folders(tmp_path / "runs")
    assert len(folders) == 2
    for folder in folders:
        predicted = run("predict", "--run", folder, "--device", "cpu", *files)
        assert "im0.png" in predicted and "im1.png" in predicted
    run("report", *runs, "-o", tmp_path / "report.html", "--device", "cpu")
    assert "convnext_atto" in (tmp_path / "report.html").read_text()


def _taps_of(name: str):
    """(name, (tap strides) or the one-line reason discovery refused it), in a worker process."""
    import tiny  # noqa: F401  (the suite's CPU rules, as in every test process)

    from featcache.backbones.sources.torchvision_models import _torchvision_spec
    from featcache.errors import FeatcacheError

    try:
        return name, tuple(t.stride for t in _torchvision_spec(name).taps)
    except FeatcacheError as exc:
        return name, str(exc)


def test_every_torchvision_classification_model_has_its_taps_found_on_the_meta_device():
    """All of torchvision's classification models (80 in 0.2x, maxvit_t included: its window tensors are not maps),
    traced on the meta device in two worker processes: each has taps, in network order of non-decreasing stride,
    the last the deepest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from featcache.backbones.sources.torchvision_models import torchvision_names

    names = torchvision_names()
    assert len(names) >= 80 and "maxvit_t" in names
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = dict(pool.map(_taps_of, names, chunksize=1))  # one at a time: the big models spread over both
    refused = {name: why for name, why in found.items() if isinstance(why, str)}
    assert not refused, refused
    for name, strides in found.items():
        assert len(strides) >= 3 and list(strides) == sorted(strides) and strides[-1] >= 14, (name, strides)


def test_a_model_source_registered_in_one_place_is_extracted_ranked_and_listed(tmp_path, monkeypatch):
    """Adding a library is one ModelSource and its registration: discovery, rank's patterns and
    `featcache backbones --all` all ask the registry, nothing else names the source."""
    import dataclasses

    from click.testing import CliRunner
    from tiny import TINY

    from featcache.backbones.sources import MODEL_SOURCES
    from featcache.backbones.sources.torchvision_models import TorchvisionSource
    from featcache.cli.commands import cli

    class ToySource(TorchvisionSource):  # a torch module cut as torchvision's are; its own names and specs
        prefix = "toy:"

        def names(self):
            return ["toy:small", "toy:large"]

        def discover(self, name):
            if name not in self.names():  # as timm's entry does for a name timm does not know
                from featcache.backbones.sources import unknown_backbone

                raise unknown_backbone(name)
            return dataclasses.replace(TINY, name=name, model_source="toy", weights_name=None)

    monkeypatch.setitem(MODEL_SOURCES, "toy", ToySource())
    discover.cache_clear()
    listed = CliRunner().invoke(cli, ["backbones", "--all", "toy:*"])
    assert listed.exit_code == 0 and listed.stdout.split() == ["toy:small", "toy", "toy:large", "toy"]
    common = ["--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train", "60", "--limit-test",
              "20", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"), "-q"]
    done = CliRunner().invoke(cli, ["extract", "--backbone", "toy:small", *common])
    assert done.exit_code == 0, done.output
    ranked = CliRunner().invoke(cli, ["rank", "--backbone", "toy:*", *common, "--score", "hscore",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert ranked.exit_code == 0, ranked.output
    [table] = (tmp_path / "runs" / "ranks").glob("*/table.csv")
    assert set(__import__("pandas").read_csv(table)["model"]) == {"toy:small", "toy:large"}
    wrong = CliRunner().invoke(cli, ["extract", "--backbone", "toy:smal", *common])
    assert wrong.exit_code == 2 and "did you mean" in wrong.output and "toy:small" in wrong.output
    discover.cache_clear()


def test_backbones_all_shows_sizes_from_the_meta_device_and_sorts_by_them():
    from click.testing import CliRunner

    from featcache.cli.commands import cli

    shown = CliRunner().invoke(cli, ["backbones", "--all", "mobilenet_v*", "--sort", "params"])
    assert shown.exit_code == 0, shown.output
    rows = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["mobilenet_v3_small", "mobilenet_v2", "mobilenet_v3_large"]
    assert [r[2] for r in rows] == ["2.5M", "3.5M", "5.5M"] and {r[3] for r in rows} == {"224"}
    wide = CliRunner().invoke(cli, ["backbones", "--all", "--sizes"])
    assert wide.exit_code == 2 and "sizes are built for at most 300: narrow the pattern" in wide.output
