import urllib.error

import pytest
import torch

from featcache.backbones.registry import ALIASES, BACKBONES
from featcache.backbones.taps import tap_model
from featcache.backbones.weights import build_backbone, weights_identity
from featcache.errors import FeatcacheError


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_declared_taps_match_a_real_forward_pass(name):
    spec = BACKBONES[name]
    model = tap_model(spec, "random", seed=0, pooling="avg", device=torch.device("cpu"))
    from torchvision.models.feature_extraction import create_feature_extractor

    maps = create_feature_extractor(build_backbone(spec, "random", 0), {t.node: t.node for t in spec.taps})(
        torch.zeros(1, 3, 64, 64)
    )
    with torch.inference_mode():
        pooled = model(torch.zeros(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert list(pooled) == list(spec.tap_names)  # forward order
    for tap in spec.taps:
        assert maps[tap.node].shape[1] == tap.channels, tap.node
        assert 64 // maps[tap.node].shape[-1] == tap.stride, tap.node
        assert pooled[tap.node].shape == (1, tap.channels)
    assert set(spec.aliases) == set(ALIASES)


def test_mobilenet_v2_late_is_the_1280_channel_output():
    spec = BACKBONES["mobilenet_v2"]
    assert spec.tap("late").channels == 1280
    assert spec.tap("late").channels + BACKBONES["resnet50"].tap("late").channels == 3328  # the study's head input


def test_unknown_tap_names_the_closest():
    with pytest.raises(FeatcacheError, match=r"Got 'lat' instead; did you mean 'late'\?"):
        BACKBONES["resnet18"].tap("lat")


def test_unknown_backbone_names_the_closest():
    with pytest.raises(FeatcacheError, match=r"unknown backbone 'resnet05'.*did you mean 'resnet50' or 'timm:resnet50'?.*featcache backbones --all"):
        BACKBONES.lookup("resnet05")


def test_random_weights_are_reproducible_per_seed():
    spec = BACKBONES["tiny"]
    a, b, c = (build_backbone(spec, "random", s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_local_state_dict_is_loaded_ignoring_the_classifier(tmp_path):
    spec = BACKBONES["tiny"]
    source = build_backbone(spec, "random", 7)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state["fc.weight"] = torch.zeros(2, 16)  # a fine-tuned two-class head is fine
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    loaded = build_backbone(spec, str(path), 0)
    assert torch.equal(loaded.stage3[0].weight, source.stage3[0].weight)
    assert weights_identity(spec, str(path), 0)["kind"] == "file"


def test_state_dict_with_wrong_keys_or_shapes_is_refused(tmp_path):
    spec = BACKBONES["tiny"]
    state = build_backbone(spec, "random", 0).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("stage3")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(FeatcacheError, match=r"does not fit tiny: \d+ missing keys \(stage3"):
        build_backbone(spec, str(tmp_path / "missing.pt"), 0)
    wrong = dict(state, **{"stem.0.weight": torch.zeros(4, 3, 5, 5)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(FeatcacheError, match=r"shape of stem.0.weight is \(4, 3, 5, 5\) in the file"):
        build_backbone(spec, str(tmp_path / "wrong.pt"), 0)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatcacheError, match="cannot read weights file .*junk.pt"):
        build_backbone(spec, str(tmp_path / "junk.pt"), 0)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FeatcacheError, match="--weights must be imagenet, random, a weights tag or the path"):
        build_backbone(BACKBONES["tiny"], str(tmp_path / "nope.pt"), 0)


def test_imagenet_without_network_names_both_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FeatcacheError) as err:
        build_backbone(BACKBONES["resnet18"], "imagenet", 0)
    message = str(err.value)
    assert "\n" not in message
    assert "--weights random" in message and "--weights PATH" in message
    assert str(tmp_path) in message


def test_imagenet_identity_names_the_torchvision_weights():
    ident = weights_identity(BACKBONES["resnet50"], "imagenet", 0)
    assert ident["id"].startswith("ResNet50_Weights.") and ident["url"].endswith(".pth")


def test_backbone_without_pretrained_weights_says_so():
    with pytest.raises(FeatcacheError, match="tiny has no imagenet weights"):
        weights_identity(BACKBONES["tiny"], "imagenet", 0)


def test_an_unknown_tap_lists_every_name_a_tap_answers_to():
    """`featcache backbones` prints stageN first; the error for a wrong tap lists those names too."""
    with pytest.raises(FeatcacheError, match=r"\{early, late, layer1, layer2, layer3, layer4, mid, stage1, stage2, "
                                             r"stage3, stage4\}. Got 'stage9' instead; did you mean 'stage4'\?"):
        BACKBONES["resnet18"].tap("stage9")
