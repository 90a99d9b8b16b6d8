"""finetune on the CPU with the tiny backbone and small images."""

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TESTS_DIR, tiny_config
from safetensors.torch import load_file

from featcache.backbones.registry import BACKBONES
from featcache.backbones.weights import build_backbone
from featcache.cli.commands import cli
from featcache.data.augment import augmentation
from featcache.data.datasets import DataRequest
from featcache.errors import FeatcacheError
from featcache.extraction.run import extract
from featcache.finetuning.config import FinetuneConfig, partial_dir
from featcache.finetuning.loop import evaluate_rows
from featcache.finetuning.model import apply_unfreeze, build_net
from featcache.finetuning.run import finetune
from featcache.finetuning.saved import init_from_run
from featcache.fuse.fusion import TapRef
from featcache.fuse.heads import HeadOptions
from featcache.fuse.saved import load_head
from featcache.fuse.train import FuseTrainConfig, fuse_train, load_features, locate_caches
from featcache.runs.comparison import runs_table
from featcache.runs.records import load_record

DATA = DataRequest(name="digits", limit_train=200, limit_test=60)


def ft_config(tmp_path, **kw):
    features = kw.pop("features", None) or tiny_config(tmp_path, data=kw.pop("data", DATA), dtype="float32")
    settings = dict(features=features, taps="late", head="mlp", hidden=(16,), epochs=2, lr=1e-3, batch_size=16,
                    runs_dir=tmp_path / "runs", num_workers=0)
    settings.update(kw)
    return FinetuneConfig(**settings)


def extractor(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    spec = BACKBONES[name]
    return spec, create_feature_extractor(build_backbone(spec, "random", 0), {spec.tap_names[-1]: spec.tap_names[-1]})


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_unfreeze_policies_train_exactly_the_declared_blocks(name):
    spec, ext = extractor(name)
    every = [n for n, _ in ext.named_parameters()]
    assert apply_unfreeze(ext, spec, "none") == []
    assert not any(p.requires_grad for p in ext.parameters())
    last = apply_unfreeze(ext, spec, "last-block")
    assert last and all(any(n.startswith(b + ".") for b in spec.last_block) for n in last)
    assert set(last) == {n for n in every if any(n.startswith(b + ".") for b in spec.last_block)}
    assert [n for n, p in ext.named_parameters() if p.requires_grad] == last
    two = apply_unfreeze(ext, spec, "last-2")
    assert set(two) == {n for n in every if any(n.startswith(b + ".") for b in spec.blocks[-2:])}
    assert apply_unfreeze(ext, spec, "all") == every


def test_resnet50_last_block_is_layer4():
    spec, ext = extractor("resnet50")
    names = apply_unfreeze(ext, spec, "last-block")
    assert {n.split(".")[0] for n in names} == {"layer4"}


def test_bad_policies(tmp_path):
    with pytest.raises(FeatcacheError, match="none, last-block, last-N"):
        ft_config(tmp_path, unfreeze="last-two")
    with pytest.raises(FeatcacheError, match="tiny declares 4 blocks; --unfreeze last-9 asks for more"):
        finetune(ft_config(tmp_path, unfreeze="last-9"), log=lambda m: None)


@pytest.fixture
def frozen_run(tmp_path):
    cfg = tiny_config(tmp_path, data=DATA, dtype="float32")
    extract(cfg, progress=False)
    train = FuseTrainConfig(features=cfg, taps=("late",), heads=("mlp",), runs_dir=tmp_path / "runs",
                            options=HeadOptions(hidden=(16,), epochs=10))
    [run] = fuse_train(train, log=lambda m: None)
    return run, cfg


def test_init_head_starts_where_the_frozen_run_ended(tmp_path, frozen_run):
    run, feat_cfg = frozen_run
    cfg = ft_config(tmp_path, init_head=run)
    refs = [TapRef("tiny", "stage3")]
    normalizer, state, classes = init_from_run(run, refs, cfg)
    assert classes == [str(i) for i in range(10)]
    net = build_net(cfg, refs, normalizer, 10, torch.device("cpu"))
    net.head.load_state_dict(state)
    from featcache.data.datasets import load_dataset

    test = load_dataset(DATA).splits["test"]
    _, _, proba = evaluate_rows(net, test, np.arange(len(test)), cfg, torch.device("cpu"), "fp32")
    cached = load_features(locate_caches(feat_cfg), set(refs))
    norm, head = load_head(run)
    frozen = head.predict_proba(norm.transform([cached.taps[("test", refs[0])]]))
    assert np.array_equal(proba.argmax(1), frozen.argmax(1))
    np.testing.assert_allclose(proba, frozen, atol=1e-4)  # the cache's BatchNorm is folded: rounding only


def test_init_head_with_other_taps_is_refused(tmp_path, frozen_run):
    run, _ = frozen_run
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "tiny", "--weights", "random", "--taps", "early",
                                      "--init-head", str(run), "--device", "cpu"])
    assert result.exit_code == 2
    assert "was trained on taps tiny:stage3, not tiny:stage1: pass the same --backbone and --taps" in result.output


def test_finetune_writes_a_run_like_fuse_train(tmp_path, frozen_run):
    run, _ = frozen_run
    cfg = ft_config(tmp_path, init_head=run, unfreeze="last-block", epochs=2)
    out = finetune(cfg, log=lambda m: None, progress=False)
    record = load_record(out)
    assert record["kind"] == "finetuned" and record["taps"] == ["tiny:stage3"]
    assert record["config"]["trainable_parameters"] == {"tiny": 3}  # stage3: conv weight, BN weight and bias
    assert len(record["curves"]["val_acc"]) == 2 and record["curves"]["phase"] == ["finetune", "finetune"]
    assert np.sum(record["metrics"]["confusion_matrix"]) == 60 and "macro_f1" in record["metrics"]
    assert (out / "model.safetensors").exists() and not partial_dir(cfg).exists()
    table = runs_table(tmp_path / "runs")
    assert len(table) == 2


def test_two_phases_and_all_policy(tmp_path):
    cfg = ft_config(tmp_path, head_epochs=1, epochs=1, unfreeze="all", backbone_lr_scale=0.5)
    record = load_record(finetune(cfg, log=lambda m: None, progress=False))
    assert record["curves"]["phase"] == ["head", "finetune"]
    assert record["config"]["trainable_parameters"]["tiny"] == len(list(build_backbone(BACKBONES["tiny"], "random", 0)
                                                                        .named_parameters())) - 2  # all but fc


ARGS = ["finetune", "--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu",
        "--limit-train", "600", "--limit-test", "60", "--hidden", "16", "--epochs", "4", "--batch-size", "8",
        "--num-workers", "0", "--unfreeze", "last-2", "--augment", "basic", "--lr", "1e-3", "-q"]


def cli_cmd(runs_dir, *extra):
    return [sys.executable, str(TESTS_DIR / "run_cli.py"), *ARGS, "--runs-dir", str(runs_dir), *extra]


def final_weights(runs_dir):
    [run] = [p for p in runs_dir.iterdir() if not p.name.startswith(".")]
    return load_file(run / "model.safetensors"), load_record(run)


def test_resblocks_batch_size_one_heavy_augmentation_and_predict(tmp_path, image_folder):
    data = DataRequest(name="folder", data_dir=image_folder, test_fraction=0.34)
    cfg = ft_config(tmp_path, data=data, head="resblocks", res_blocks=2, hidden=(16,), dropout=0.5, unfreeze="none",
                    epochs=2, batch_size=1, augment="heavy", lr=1e-3)
    record = load_record(run := finetune(cfg, log=lambda m: None, progress=False))
    assert record["head"] == "resblocks" and record["rows"]["test"] == 4
    assert record["config"]["trainable_parameters"] == {"tiny": 0}
    files = sorted(image_folder.rglob("*.png"))[:3]
    result = CliRunner().invoke(cli, ["predict", "--run", str(run), "--device", "cpu", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert all(line.split("\t")[1] in ("cat", "dog") for line in result.output.strip().splitlines())


def test_frozen_backbone_maps_are_computed_once(tmp_path, monkeypatch):
    from featcache.finetuning import run as module

    calls = []
    real = module.frozen_maps
    monkeypatch.setattr(module, "frozen_maps", lambda *a: calls.append(1) or real(*a))
    messages = []
    cfg = ft_config(tmp_path, head="resblocks", unfreeze="none", epochs=3, augment="none")
    finetune(cfg, log=messages.append, progress=False)
    assert len(calls) == 2  # train and validation rows, once for all three epochs
    assert any("computed once" in m for m in messages)


def test_augmentations_give_the_input_size():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    assert augmentation("none", 24, "center-crop") is None  # the extraction path
    for name in ("basic", "heavy"):
        out = augmentation(name, 24, "center-crop")(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


@pytest.mark.parametrize("classes", [2, 4])
def test_logreg_run_warm_starts_a_linear_head(classes):
    from sklearn.linear_model import LogisticRegression

    from featcache.finetuning.saved import head_state

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = rng.integers(0, classes, 80)
    logreg = LogisticRegression().fit(X, y)
    cfg = FinetuneConfig(head="linear", epochs=1)
    state = head_state(logreg, {"classes": [str(c) for c in range(classes)], "head": "logreg"}, cfg)
    linear = torch.nn.Sequential(torch.nn.Linear(5, classes))
    linear.load_state_dict(state)
    with torch.no_grad():
        proba = torch.softmax(linear(torch.from_numpy(X)), 1).numpy()
    np.testing.assert_allclose(proba, logreg.predict_proba(X), atol=1e-5)


def test_patience_stops_early_and_keeps_the_best_epoch(tmp_path, monkeypatch):
    from featcache.finetuning import run as module

    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    real = module.evaluate_rows

    def scripted(net, split, rows, cfg, device, precision):
        loss, acc, proba = real(net, split, rows, cfg, device, precision)
        return (next(losses), acc, proba) if len(rows) < 60 else (loss, acc, proba)  # validation rows only

    monkeypatch.setattr(module, "evaluate_rows", scripted)
    cfg = ft_config(tmp_path, epochs=8, patience=2, augment="basic")
    record = load_record(finetune(cfg, log=lambda m: None, progress=False))
    assert record["curves"]["val_loss"] == [1.0, 0.5, 0.6, 0.7]
    assert record["selection"]["best_epoch"] == 2


def test_policy_the_backbone_does_not_declare_is_exit_2(monkeypatch):
    import dataclasses

    import tiny

    flat = dataclasses.replace(tiny.TINY, name="flat", blocks=(), last_block=())
    monkeypatch.setitem(BACKBONES, "flat", flat)
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "flat", "--weights", "random", "--device", "cpu",
                                      "--unfreeze", "last-block"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "backbone flat declares no last block: use --unfreeze last-N or all" in result.output


def test_autocast_training_path_runs_in_bf16_on_the_cpu(tmp_path):
    """The mixed-precision path (autocast around the forward) exercised where no GPU is."""
    cfg = ft_config(tmp_path, epochs=1, augment="basic",
                    features=tiny_config(tmp_path, data=DATA, precision="bf16"))
    record = load_record(finetune(cfg, log=lambda m: None, progress=False))
    assert np.isfinite(record["curves"]["train_loss"][0])


def test_fp16_scales_the_loss_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """fp16 autocast with a GradScaler, on the CPU: the scaler's state is checkpointed and restored."""
    import featcache.finetuning.run as ft

    def config(runs, resume=False):
        return ft_config(tmp_path, epochs=2, unfreeze="all", augment="basic", runs_dir=tmp_path / runs, resume=resume,
                         features=tiny_config(tmp_path, data=DATA, precision="fp16"))

    reference = finetune(config("ref"), log=lambda m: None, progress=False)
    real, saved = ft.save_checkpoint, []

    def crash_after_first_epoch(folder, state):
        real(folder, state)
        saved.append(state["scaler"])
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune(config("cut"), log=lambda m: None, progress=False)
    monkeypatch.setattr(ft, "save_checkpoint", real)
    resumed = finetune(config("cut", resume=True), log=lambda m: None, progress=False)

    assert saved[0]["scale"] > 1  # an enabled scaler; a disabled one saves an empty state
    ref, got = (load_file(run / "model.safetensors") for run in (reference, resumed))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert load_record(resumed)["curves"]["val_loss"] == load_record(reference)["curves"]["val_loss"]
    assert np.isfinite(load_record(resumed)["curves"]["train_loss"]).all()


def test_resblocks_on_a_one_pixel_map_with_a_batch_of_one_is_exit_2(tmp_path, image_folder):
    """The footwear recipe (batch size 1) at an image size where the late map is 1x1: one line, not a traceback."""
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "tiny", "--weights", "random", "--device", "cpu",
                                      "--dataset", "folder", "--data-dir", str(image_folder), "--head", "resblocks",
                                      "--taps", "late", "--batch-size", "1", "--image-size", "16",
                                      "--runs-dir", str(tmp_path / "runs"), "--num-workers", "0"])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert "tiny:stage3 is 1x1 at --image-size 16 and --batch-size 1 holds one image" in line
    assert "use --image-size 32 or more" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_backbone_without_chosen_taps_is_not_built(tmp_path, monkeypatch):
    """--backbone tiny --backbone resnet18 --taps tiny:late: resnet18 would run every batch for nothing."""
    import featcache.finetuning.model
    from featcache.fuse.fusion import TapNormalizer

    real, calls = featcache.finetuning.model.build_backbone, []
    monkeypatch.setattr(featcache.finetuning.model, "build_backbone", lambda *a: calls.append(a[0].name) or real(*a))
    cfg = ft_config(tmp_path, features=tiny_config(tmp_path, backbones=("tiny", "resnet18")), taps="tiny:late")
    norm = TapNormalizer("none").fit([np.zeros((1, 16), np.float32)])
    net = build_net(cfg, [TapRef("tiny", "stage3")], norm, 10, torch.device("cpu"))
    assert calls == ["tiny"] and net.names == ["tiny"]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resume_after_a_worse_epoch_keeps_the_best_weights_from_the_checkpoint(tmp_path, monkeypatch):
    """Killed after epoch 3 (worse than epoch 2): the checkpoint carries epoch 2's weights, and the
    resumed run ends with the same best model as an uninterrupted one."""
    import featcache.finetuning.run as ft

    real_eval, real_save = ft.evaluate_rows, ft.save_checkpoint
    script = {"losses": None}

    def scripted(net, split, rows, cfg, device, precision):
        loss, acc, proba = real_eval(net, split, rows, cfg, device, precision)
        return (next(script["losses"]), acc, proba) if len(rows) < 60 else (loss, acc, proba)

    monkeypatch.setattr(ft, "evaluate_rows", scripted)

    def run(runs, losses, resume=False):
        script["losses"] = iter(losses)
        cfg = ft_config(tmp_path, epochs=4, augment="basic", runs_dir=tmp_path / runs, resume=resume)
        return finetune(cfg, log=lambda m: None, progress=False)

    reference = run("ref", [1.0, 0.5, 0.6, 0.7])
    saved = []

    def crash_after_third(folder, state):
        real_save(folder, state)
        saved.append(state["best_model"] is None)
        if len(saved) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", crash_after_third)
    with pytest.raises(KeyboardInterrupt):
        run("cut", [1.0, 0.5, 0.6])
    assert saved == [True, True, False]  # improving epochs store the model once; a worse one keeps the best apart
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    resumed = run("cut", [0.7], resume=True)
    ref, got = (load_file(r / "model.safetensors") for r in (reference, resumed))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert load_record(resumed)["selection"]["best_epoch"] == 2


def test_finetune_ends_with_the_same_result_line_as_fuse_train(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                      "--device", "cpu", "--limit-train", "120", "--limit-test", "40", "--hidden", "8",
                                      "--epochs", "1", "--num-workers", "0", "-q", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [run] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    record = load_record(run)
    assert (f"{run.name}: val acc {record.selection['val_accuracy']:.4f}  test acc {record.metrics['accuracy']:.4f}  "
            f"macro-F1 {record.metrics['macro_f1']:.4f}  fit ") in result.output


def test_a_bf16_fine_tune_epoch_on_the_cpu_reaches_the_fp32_loss(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = ft_config(tmp_path / precision, epochs=1, unfreeze="last-block", augment="none",
                        features=tiny_config(tmp_path / precision, data=DATA, dtype="float32", precision=precision))
        record = load_record(finetune(cfg, log=lambda m: None, progress=False))
        losses[precision] = record.curves["train_loss"][0], record.curves["val_loss"][0]
    for exact, half in zip(losses["fp32"], losses["bf16"]):
        assert abs(half - exact) <= 0.02 * exact, losses
