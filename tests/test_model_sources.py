"""The hf: and openclip: model sources, offline: transformers models saved from small configs, OpenCLIP towers
from a tiny registered config with random weights. Each source's taps equal the library's own intermediate
outputs, its preprocessing equals the library's own processor, and nothing a checkpoint folder brings runs."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache.backbones.discovery import discover
from featcache.backbones.registry import BACKBONES
from featcache.backbones.sources import with_logits
from featcache.backbones.taps import tap_model
from featcache.cli.commands import cli
from featcache.data.images import fit
from featcache.data.preprocess import PreprocessConfig, to_input
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig, preprocess_for

transformers = pytest.importorskip("transformers")  # in [dev]: CI always has it
open_clip = pytest.importorskip("open_clip")

VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """save_pretrained folders: a ViT image classifier (its processor stretches to a square), a DINOv2 with
    register tokens, a CLIP checkpoint (its processor: shortest edge, centre crop) and a ResNet."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=5))
    vit.save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        num_register_tokens=2)).save_pretrained(root / "dinov2reg")
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=VIT, projection_dim=16, text_config=dict(hidden_size=16, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               vocab_size=49408)))
    clip.save_pretrained(root / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(root / "clip")
    transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                                       depths=[1, 1, 1, 1])).save_pretrained(root / "resnet")
    return root


def _images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _taps(name, pooling="avg", weights="imagenet", logits=False):
    spec = BACKBONES.lookup(name)
    spec = with_logits(spec) if logits else spec
    return spec, tap_model(spec, weights, 0, pooling, torch.device("cpu"))


def test_hf_vit_taps_are_its_hidden_states_and_logits(checkpoints):
    spec, net = _taps(f"hf:{checkpoints / 'vit'}", "cls+avg", logits=True)
    assert [t.node for t in spec.taps] == ["block1", "block2", "block3", "logits"]
    assert spec.prefix_tokens == 1 and spec.taps[0].layout == "tokens" and spec.taps[0].stride == 8
    own = transformers.ViTForImageClassification.from_pretrained(checkpoints / "vit").eval()
    x = _images()
    with torch.no_grad():
        got, out = net(x), own(pixel_values=x, output_hidden_states=True)
    for i, name in enumerate(["block1", "block2", "block3"]):
        state = out.hidden_states[i + 1]
        manual = torch.cat([state[:, 0], state[:, 1:].mean(dim=1)], dim=1)  # cls+avg: the class token, patch mean
        torch.testing.assert_close(got[name], manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], out.logits, rtol=1e-5, atol=1e-5)
    assert spec.head_prefixes == ("classifier.",)


def test_hf_register_tokens_are_left_out_of_the_mean(checkpoints):
    spec, net = _taps(f"hf:{checkpoints / 'dinov2reg'}", "avg")
    assert spec.prefix_tokens == 3  # the class token and two registers
    own = transformers.Dinov2WithRegistersModel.from_pretrained(checkpoints / "dinov2reg").eval()
    x = _images()
    with torch.no_grad():
        got, out = net(x), own(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(got["block2"], out.hidden_states[2][:, 3:].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_hf_clip_checkpoint_gives_its_vision_tower_and_cnn_stages(checkpoints):
    spec, net = _taps(f"hf:{checkpoints / 'clip'}", "cls")
    tower = transformers.CLIPVisionModel.from_pretrained(checkpoints / "clip").eval()
    x = _images()
    with torch.no_grad():
        got, out = net(x), tower(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(got["block3"], out.hidden_states[3][:, 0], rtol=1e-5, atol=1e-5)

    spec, net = _taps(f"hf:{checkpoints / 'resnet'}", "max")
    assert [(t.node, t.channels, t.stride, t.layout) for t in spec.taps] == [
        ("stage1", 8, 4, "nchw"), ("stage2", 16, 8, "nchw"), ("stage3", 32, 16, "nchw"), ("stage4", 64, 32, "nchw")]
    own = transformers.ResNetModel.from_pretrained(checkpoints / "resnet").eval()
    x = _images(size=64)
    with torch.no_grad():
        got, out = net(x), own(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(got["stage3"], out.hidden_states[3].amax(dim=(2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("folder, processor", [("vit", "ViTImageProcessor"), ("clip", "CLIPImageProcessor")])
def test_hf_preprocessing_equals_its_processor(checkpoints, folder, processor):
    """A non-square photo through featcache's file path (PIL resize, crop, normalise) and through the
    checkpoint's own processor: the ViT's stretches, CLIP's crops the shorter side's middle."""
    from PIL import Image

    spec = BACKBONES.lookup(f"hf:{checkpoints / folder}")
    cfg = ExtractConfig(backbones=(spec.name,), preprocess=PreprocessConfig.from_model(), device="cpu")
    pre = preprocess_for(cfg, spec)
    assert pre.resize == ("stretch" if folder == "vit" else "center-crop")
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 60, (50, 80, 3)), 0, 255).astype(np.uint8)
    ours = to_input(torch.from_numpy(fit(photo, pre))[None], pre).float()
    own = getattr(transformers, processor).from_pretrained(checkpoints / folder)
    theirs = own(images=Image.fromarray(photo), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02  # both resize with PIL's filters; rounding to uint8 differs


def test_hf_folder_with_code_is_never_run(tmp_path):
    """A checkpoint that brings its own modelling code (auto_map) is refused before anything is imported."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({"auto_map": {"AutoImageProcessor": "x.y"}}))
    result = CliRunner().invoke(cli, ["backbones", f"hf:{folder}"])
    assert result.exit_code == 2 and "custom code" in result.output and "trust_remote_code" in result.output
    assert not marker.exists()


def test_hf_pickled_weights_refused_random_allowed_hub_miss_is_one_line(checkpoints, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints / "resnet" / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    spec = BACKBONES.lookup(f"hf:{folder}")
    with pytest.raises(FeatcacheError, match="pytorch_model.bin, a pickle featcache does not load"):
        tap_model(spec, "imagenet", 0, "avg", torch.device("cpu"))
    tap_model(spec, "random", 0, "avg", torch.device("cpu"))  # the architecture alone needs no weights file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(cli, ["backbones", "hf:someone/not-cached-vit"])
    assert result.exit_code == 2
    assert "not in the local Hugging Face cache: nothing is fetched without --download" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cls_pooling_needs_a_class_token(checkpoints):
    with pytest.raises(FeatcacheError, match="--pooling cls\\+avg takes a transformer's class token"):
        ExtractConfig(backbones=(f"hf:{checkpoints / 'resnet'}",), pooling="cls+avg")


def test_hf_extract_end_to_end_names_its_cache_without_folders(checkpoints, tmp_path):
    from featcache.data.datasets import DataRequest
    from featcache.extraction.reader import FeatureCache
    from featcache.extraction.run import extract

    cfg = ExtractConfig(backbones=(f"hf:{checkpoints / 'vit'}",), weights="imagenet", device="cpu",
                        preprocess=PreprocessConfig.from_model(), cache_dir=tmp_path / "cache",
                        data=DataRequest(limit_train=40, limit_test=20))
    [result] = extract(cfg, progress=False, log=lambda *a: None)
    assert result.path.parent == tmp_path / "cache" / "digits" and result.path.name.startswith("hf-")
    with FeatureCache(result.path) as cache:
        assert cache.taps("train")["block3"] == (40, 32)
        assert cache.fingerprint["weights"]["sha256"]  # a local folder's weights: hashed


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openclip")
    (folder / "featcache-test-vit.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(folder)
    return "openclip:featcache-test-vit"


def test_openclip_taps_and_embedding_are_its_own(tiny_clip):
    spec, net = _taps(tiny_clip, "cls", weights="random")
    assert [t.node for t in spec.taps] == ["block1", "block2", "block3", "embedding"]
    visual = spec.build(None).eval()
    visual.load_state_dict(net.extractor.net.state_dict())
    x = _images()
    with torch.no_grad():
        got = net(x)
        own = visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC",
                                           output_extra_tokens=True)
        embedding = visual(x)
    torch.testing.assert_close(got["block2"], own["image_intermediates_prefix"][0][:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["embedding"], embedding, rtol=1e-5, atol=1e-5)


def test_openclip_preprocessing_equals_its_transform(tiny_clip):
    from PIL import Image

    spec = BACKBONES.lookup(tiny_clip)
    pre = preprocess_for(ExtractConfig(backbones=(tiny_clip,), weights="random",
                                       preprocess=PreprocessConfig.from_model(), device="cpu"), spec)
    transform = open_clip.image_transform(32, is_train=False, mean=spec.input.mean, std=spec.input.std,
                                          interpolation="bicubic", resize_mode="shortest")
    photo = np.clip(np.random.default_rng(1).normal(128, 60, (45, 70, 3)), 0, 255).astype(np.uint8)
    ours = to_input(torch.from_numpy(fit(photo, pre))[None], pre).float()
    theirs = transform(Image.fromarray(photo))[None]
    assert (ours - theirs).abs().mean() < 0.02


def test_unknown_openclip_tag_names_the_closest(tiny_clip):
    with pytest.raises(FeatcacheError, match="did you mean 'laion2b_s34b_b79k'"):
        discover("openclip:ViT-B-32/laion2b_s34b_b7")


def _hooked(model, module, x):
    """The output of ``module`` of ``model`` on ``x``, caught by a plain forward hook (copied, and the hook
    returns nothing: torchvision's BasicBlock adds the shortcut to its last BatchNorm's output in place)."""
    caught = {}

    def hook(_, __, out):
        caught["out"] = out.clone() if isinstance(out, torch.Tensor) else out

    handle = model.get_submodule(module).register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    out = caught["out"]
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name, module, pooling, reduce", [
    ("resnet18", "layer3.1.conv2", "avg", lambda t: t.mean(dim=(2, 3))),  # torchvision: a node of its cut
    ("resnet18", "layer3.1.bn1", "max", lambda t: t.amax(dim=(2, 3))),  # folded; an in-place ReLU follows it
    ("resnet18", "layer3.1", "avg", lambda t: t.mean(dim=(2, 3))),  # a block: its output is after its last ReLU
    ("resnet18", "fc", "avg", lambda t: t),  # a vector: kept whole
    ("resnet18", "layer4.1:flatten", "avg", lambda t: t.flatten(1)),  # a small map kept whole
    ("timm:vit_tiny_patch16_224", "blocks.11.mlp.fc1", "cls", lambda t: t[:, 0]),  # past the last tap asked
])
def test_a_module_tap_equals_a_forward_hooks_output(name, module, pooling, reduce, tmp_path):
    """Weights from a file whose BatchNorm statistics are not the identity: a conv's own output differs from
    what the cut would give with the BatchNorm after it folded in."""
    spec = ExtractConfig(backbones=(name,), weights="random", modules=(module,)).spec(name)
    module = module.split(":")[0]
    assert spec.taps[-1].node == module
    torch.manual_seed(0)
    own = spec.build(None).eval()
    state = {k: (v.uniform_(0.5, 2.0) if k.endswith(("running_var", "running_mean")) else v)
             for k, v in own.state_dict().items()}
    own.load_state_dict(state)
    torch.save(own.state_dict(), tmp_path / "weights.pt")
    net = tap_model(spec, str(tmp_path / "weights.pt"), 0, pooling, torch.device("cpu"))
    x = _images(2, size=spec.input.image_size if spec.input else 64)
    with torch.no_grad():
        got = net(x)[module]
    torch.testing.assert_close(got, reduce(_hooked(own, module, x)), rtol=1e-4, atol=1e-4)


def test_module_taps_of_hf_and_openclip_and_bad_modules(checkpoints, tiny_clip):
    spec = ExtractConfig(backbones=(f"hf:{checkpoints / 'vit'}",), modules=("vit.layers.1.mlp.fc1",)).spec(
        f"hf:{checkpoints / 'vit'}")
    net = tap_model(spec, "imagenet", 0, "avg", torch.device("cpu"))
    own = transformers.ViTForImageClassification.from_pretrained(checkpoints / "vit").eval()
    x = _images()
    with torch.no_grad():
        got = net(x)["vit.layers.1.mlp.fc1"]
    torch.testing.assert_close(got, _hooked(own, "vit.layers.1.mlp.fc1", x)[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-5)

    spec = ExtractConfig(backbones=(tiny_clip,), weights="random", modules=("ln_post",)).spec(tiny_clip)
    net = tap_model(spec, "random", 0, "cls", torch.device("cpu"))
    with torch.no_grad():
        got = net(x)["ln_post"]
    assert got.shape == (3, 32)

    for module, message in [("layer9", "resnet18 has no module of that name; did you mean 'layer4'"),
                            ("layer3", "it is already a tap of resnet18"),
                            ("layer1.0:flatten", "over featcache's 65,536 for one kept whole"),
                            ("layer1.0:whole", "only :flatten \\(its output kept whole\\) or a pooling of its own"),
                            ("avgpool", None)]:
        if message is None:
            assert ExtractConfig(backbones=("resnet18",), weights="random", modules=(module,)).spec(
                "resnet18").taps[-1].layout == "nchw"  # a 1x1 map pools to itself
            continue
        with pytest.raises(FeatcacheError, match=message):
            ExtractConfig(backbones=("resnet18",), weights="random", modules=(module,))
    result = CliRunner().invoke(cli, ["extract", "--backbone", "timm:vit_tiny_patch16_224", "--weights", "random",
                                      "--module", "blocks.0.attn.q_norm"])
    assert result.exit_code == 2 and "which featcache cannot pool" in result.output


def test_backbones_modules_lists_every_module_with_its_shape():
    result = CliRunner().invoke(cli, ["backbones", "resnet18", "--modules"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line.strip()}
    assert lines["layer3.1.conv2"][0] == "256x14x14" and lines["layer4"][1:] == ["tap", "layer4"]
    assert lines["fc"] == ["1000", "vector,", "kept", "whole"]


FOUR_BLOCKS = ("encoder.layer.0@layernorm:cls", "encoder.layer.1@layernorm:cls", "encoder.layer.2@layernorm:cls",
               "layernorm:cls+avg")  # pipelines/dinov2_linear.toml's modules, for a 4-block model


def test_dinov2_linear_protocol_features(checkpoints, tmp_path):
    """pipelines/dinov2_linear.toml's features are dinov2's create_linear_input(n_last_blocks=4, avgpool=True):
    get_intermediate_layers(n=4, norm=True)'s class tokens beside the mean of the last block's normalised patch
    tokens (registers left out), whatever the request's own --pooling; cached, read back and parsed by --taps."""
    from featcache.data.datasets import DataRequest
    from featcache.extraction.reader import FeatureCache
    from featcache.extraction.run import extract
    from featcache.fuse.fusion import parse_taps

    name = f"hf:{checkpoints / 'dinov2reg'}"
    cfg = ExtractConfig(backbones=(name,), modules=FOUR_BLOCKS, pooling="avg", device="cpu",
                        preprocess=PreprocessConfig.from_model(), cache_dir=tmp_path,
                        data=DataRequest(limit_train=12, limit_test=6))
    spec = cfg.spec(name)
    net = tap_model(spec, "imagenet", 0, "avg", torch.device("cpu"))
    own = transformers.Dinov2WithRegistersModel.from_pretrained(checkpoints / "dinov2reg").eval()
    x = _images()
    with torch.no_grad():
        got = net(x)
        blocks = [own.layernorm(h) for h in own(pixel_values=x, output_hidden_states=True).hidden_states[-4:]]
    want = torch.cat([b[:, 0] for b in blocks] + [blocks[-1][:, 3:].mean(dim=1)], dim=1)
    torch.testing.assert_close(torch.cat([got[t] for t in spec.modules], dim=1), want, rtol=1e-5, atol=1e-5)
    assert got["block4"].shape == (3, 32)  # the model's own taps keep the request's pooling

    [result] = extract(cfg, progress=False, log=lambda *a: None)
    with FeatureCache(result.path) as cache:
        assert cache.taps("train")["layernorm"] == (12, 64) and cache.taps("train")["encoder.layer.0@layernorm"] == (
            12, 32)
    taps = "module:encoder.layer.0@layernorm,encoder.layer.1@layernorm,encoder.layer.2@layernorm,layernorm"
    assert [r.tap for r in parse_taps(taps, cfg)] == list(spec.modules)
    with pytest.raises(FeatcacheError, match="not among the --module taps of the request: add --module block2"):
        parse_taps("module:block2", cfg)


def test_module_norm_and_own_pooling_bad_input(checkpoints):
    """@NORM on torchvision's graph cut (the norm module after the tapped one, as the network runs it), a
    module of an own: network, and one line for what cannot be asked."""
    spec = ExtractConfig(backbones=("resnet18",), weights="random",
                         modules=("layer3.0.conv1@layer3.0.bn1", "layer3.0.conv1:max")).spec("resnet18")
    torch.manual_seed(0)
    own = spec.build(None).eval()
    net = tap_model(spec, "random", 0, "avg", torch.device("cpu"))
    x = _images(2, size=64)
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got["layer3.0.conv1@layer3.0.bn1"], _hooked(own, "layer3.0.bn1", x).mean(dim=(2, 3)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["layer3.0.conv1"], _hooked(own, "layer3.0.conv1", x).amax(dim=(2, 3)),
                               rtol=1e-4, atol=1e-4)
    for modules, message in [(("layer3.0.conv1@layer4.0.bn1",), "returns 512x7x7, not the 256x14x14 of layer3.0.conv1"),
                             (("layer3.0.conv1:cls",), ":cls takes a transformer's class token"),
                             (("fc:avg",), "returns a vector, kept whole: drop :avg"),
                             (("layer3.0.conv1", "layer3.0.conv1:max"), "asked twice"),
                             (("layer3.0.conv1@nothing",), "resnet18 has no module of that name"),
                             (("layer3.0.conv1@",), "write NAME, NAME@NORM")]:
        with pytest.raises(FeatcacheError, match=message):
            ExtractConfig(backbones=("resnet18",), weights="random", modules=modules)


class _Own(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True))
        self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True))
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


def test_own_network_from_python(tmp_path):
    """featcache.extract(model=net, taps=[...]) caches the named modules' outputs; the fingerprint holds the class
    and a hash of the weights (new weights, a new cache); the user's network is left as it was."""
    import featcache
    from featcache.extraction.reader import FeatureCache

    torch.manual_seed(0)
    net = _Own().train()
    common = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), limit_train=30, limit_test=10,
                  cache_dir=tmp_path, quiet=True)
    path = featcache.extract(model=net, taps=["a", "b", "head"], **common)
    assert net.training and all(p.requires_grad for p in net.parameters())  # untouched
    with FeatureCache(path) as cache:
        fp = cache.fingerprint
        assert fp["weights"]["class"].endswith("_Own") and len(fp["weights"]["sha256"]) == 64
        assert cache.taps("train")["head"] == (30, 5)  # a vector: kept whole
        assert cache.taps("train")["b"] == (30, 16)
    spec = BACKBONES.lookup("own:_Own")
    tapped = tap_model(spec, "imagenet", 0, "avg", torch.device("cpu"))
    x = _images(size=32)
    net.eval()
    with torch.no_grad():
        got = tapped(x)
        torch.testing.assert_close(got["b"], net.b(net.a(x)).mean(dim=(2, 3)))
        torch.testing.assert_close(got["head"], net(x))
    with torch.no_grad():
        net.head.bias.add_(1.0)
    again = featcache.extract(model=net, taps=["a", "b", "head"], **common)
    assert again != path  # new weights, a new cache
    with pytest.raises(FeatcacheError, match="holds the weights it was given"):
        featcache.extract(backbone=["own:_Own"], weights="random", **common)
    with pytest.raises(FeatcacheError, match="needs taps"):
        featcache.extract(model=net, **common)
    spec = ExtractConfig(backbones=("own:_Own",), modules=("b.0",)).spec("own:_Own")  # shapes from a meta copy
    with torch.no_grad():
        got = tap_model(spec, "imagenet", 0, "max", torch.device("cpu"))(x)["b.0"]
        torch.testing.assert_close(got, net.b[0](net.a(x)).amax(dim=(2, 3)))


def test_rank_and_sweep_take_an_hf_folder(checkpoints, tmp_path):
    """A backbone named by a folder: rank scores its taps, and the sweep's folder is one folder (no path
    separators from the name)."""
    import featcache

    name = f"hf:{checkpoints / 'vit'}"
    common = dict(backbone=[name], limit_train=60, limit_test=20, cache_dir=tmp_path / "cache",
                  runs_dir=tmp_path / "runs", quiet=True)
    ranked = featcache.rank(score=["hscore"], **common)
    assert sorted(ranked["tap"]) == ["block1", "block2", "block3"]
    table = featcache.sweep(combos="singles", head=["knn"], keep=0, **common)
    assert table.attrs["folder"].parent == tmp_path / "runs" / "sweeps"


def test_hf_hub_model_from_the_local_cache_and_missing_extras(checkpoints, tmp_path, monkeypatch):
    """hf:ORG/NAME reads the snapshot the local Hugging Face cache holds (its commit in the fingerprint), with no
    network; a missing extra is one line naming its install command."""
    import shutil
    import sys

    import huggingface_hub.constants

    from featcache.backbones.sources import hf_models
    from featcache.backbones.weights import weights_identity

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoints / "vit", cache / "models--someone--tiny-vit" / "snapshots" / commit)
    (cache / "models--someone--tiny-vit" / "refs").mkdir()
    (cache / "models--someone--tiny-vit" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = discover("hf:someone/tiny-vit")
    assert [t.node for t in spec.taps] == ["block1", "block2", "block3"]
    assert weights_identity(spec, "imagenet", 0) == {"kind": "imagenet", "id": "hf/someone/tiny-vit",
                                                     "revision": commit}
    hf_models._checkpoint.cache_clear()

    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[hf\]'"):
        hf_models.transformers_module()
    monkeypatch.setitem(sys.modules, "open_clip", None)
    from featcache.backbones.sources.openclip_models import open_clip_module

    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[openclip\]'"):
        open_clip_module()


def test_a_tap_cached_whole_is_not_widened_by_the_pooling(tiny_clip, tmp_path):
    """With --pooling avgmax (two columns per channel) an embedding and a vector --module stay as wide as they
    are: the fingerprint marks them whole, and the reader checks the cache against it."""
    import featcache
    from featcache.extraction.reader import FeatureCache

    common = dict(weights="random", pooling="avgmax", limit_train=40, limit_test=20, cache_dir=tmp_path, quiet=True)
    path = featcache.extract(backbone=[tiny_clip], **common)
    with FeatureCache(path) as cache:
        assert cache.taps("train")["embedding"] == (40, 16) and cache.taps("train")["block1"] == (40, 64)
        assert ["embedding", 16, "whole"] in cache.fingerprint["taps"]
        assert cache.tap_names("train")[-1] == "embedding" and "embedding      40 x 16" in cache.describe()  # info
    path = featcache.extract(backbone=["resnet18"], modules=["fc"], image_size=32, **common)
    with FeatureCache(path) as cache:
        assert cache.taps("train")["fc"] == (40, 1000) and cache.taps("train")["layer4"] == (40, 1024)
