"""The command line, driven with click's CliRunner (the tiny backbone is registered)."""

import json

import pytest
import torch
from click.testing import CliRunner

from featcache.cli.commands import cli

FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu",
        "--limit-train", "60", "--limit-test", "20", "-q"]


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_extract_then_info(tmp_path):
    first = run("extract", *FAST, "--cache-dir", str(tmp_path))
    assert first.exit_code == 0, first.output
    assert "tiny: extracted 80 images into" in first.output and "featcache info" in first.output
    again = run("extract", *FAST, "--cache-dir", str(tmp_path))
    assert "tiny: already cached at" in again.output
    [path] = (tmp_path / "digits").glob("tiny-*.h5")
    info = run("info", str(path))
    assert info.exit_code == 0
    for text in ("state: complete", "train: 60/60 rows, dtype float16", "stage3", "60 x 16", "pooling     avg",
                 "weights     kind=random, seed=0", "--json"):
        assert text in info.output
    assert info.output.index("stage1") < info.output.index("stage2") < info.output.index("stage3")
    full = json.loads(run("info", "--json", str(path)).output)
    assert full["fingerprint"]["pooling"] == "avg" and full["splits"]["train"]["taps"]["stage3"] == [60, 16]


def test_backbones_lists_taps_aliases_and_dimensions():
    result = run("backbones")
    assert result.exit_code == 0
    for text in ("resnet50", "mobilenet_v2", "vgg16", "resnet18", "features.18", "1280 channels", "= late", "layer4"):
        assert text in result.output


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["extract", "--backbone", "resnet05"], r"unknown backbone 'resnet05'.*did you mean 'resnet50'"),
        (["extract", "--dataset", "cifar"], r"Got 'cifar' instead; did you mean 'cifar10'\?"),
        (["extract", *FAST, "--pooling", "mean"], r"'--pooling' option must be one of \{avg, avgmax, cls, cls\+avg, max\}"),
        (["extract", *FAST, "--dataset", "folder", "--data-dir", "/no/such/dir"], "data directory /no/such/dir does not exist"),
        (["extract", *FAST, "--weights", "/no/such/weights.pt"], "--weights must be imagenet, random, a weights tag or the path"),
        (["extract", *FAST, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["info", "/no/such/cache.h5"], "no cache file at /no/such/cache.h5"),
        # one flag, one value: not a sentence about four flags (issue 12)
        (["fuse-train", *FAST[:-1], "--dropout", "1.5"], r"^Error: --dropout must lie in \[0, 1\)\. Got 1\.5 instead\.$"),
        (["finetune", *FAST[:-1], "--dropout", "1.5"], r"^Error: --dropout must lie in \[0, 1\)\. Got 1\.5 instead\.$"),
        (["fuse-train", *FAST[:-1], "--taps", "resnet18:late"],
         r"--taps resnet18:late names resnet18, which is not among the backbones \(tiny\): add --backbone resnet18"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(args, pattern):
    one_line_error(run(*args), pattern)


def test_bad_weights_file_is_named(tmp_path):
    state = {"stem.0.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "w.pt")
    one_line_error(run("extract", *FAST, "--weights", str(tmp_path / "w.pt"), "--cache-dir", str(tmp_path / "cache")),
                   r"weights file .*w.pt does not fit tiny")
    assert not (tmp_path / "cache").exists()  # weights are checked before anything is written


def test_corrupt_image_is_named_and_nothing_is_left_behind(tmp_path, image_folder):
    bad = image_folder / "dog" / "dog_3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cache = tmp_path / "cache"
    result = run("extract", *FAST, "--dataset", "folder", "--data-dir", str(image_folder), "--cache-dir", str(cache),
                 "--num-workers", "0", "--batch-size", "2")
    one_line_error(result, r"cannot read image .*dog_3.png: ")
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_float16_overflow_says_use_float32_and_leaves_no_cache(tmp_path, monkeypatch):
    """Values beyond float16's range after the tap's storage scale (chosen on the first batch, with 2^11 of
    headroom: a later batch that outgrows it) are refused in one line. Stood in for by a scale of 1 on a tap near
    1e6 x its usual values."""
    from featcache.backbones.registry import BACKBONES
    from featcache.backbones.weights import build_backbone
    from featcache.extraction import store

    monkeypatch.setattr(store, "storage_scale", lambda largest: 1.0)

    state = build_backbone(BACKBONES["tiny"], "random", 0).state_dict()
    state["stage3.0.weight"] = state["stage3.0.weight"] * 1e6  # features far beyond float16's 65504
    torch.save(state, tmp_path / "loud.pt")
    cache = tmp_path / "cache"
    result = run("extract", *FAST, "--weights", str(tmp_path / "loud.pt"), "--cache-dir", str(cache))
    one_line_error(result, r"features of tiny/stage3 overflow float16: use --dtype float32")
    assert [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
    ok = run("extract", *FAST, "--weights", str(tmp_path / "loud.pt"), "--cache-dir", str(cache), "--dtype", "float32")
    assert ok.exit_code == 0, ok.output


def test_num_workers_defaults_to_the_cores_the_machine_gives_and_help_says_so(monkeypatch):
    import os

    from featcache.extraction.config import available_cores, workers_for

    shown = " ".join(CliRunner().invoke(cli, ["extract", "--help"]).output.split())
    assert f"on a GPU run every core this machine gives featcache ({available_cores()}); on a CPU run 0" in shown
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 7}, raising=False)
    assert available_cores() == 5 and workers_for(torch.device("cuda"), None) == 5
    assert workers_for(torch.device("cpu"), None) == 0 and workers_for(torch.device("cpu"), 3) == 3
