"""Weights: which numbers a backbone runs with, and how its weights want images fed.

Stage 2 (data -> **backbones** -> extraction). ``--weights`` is ``imagenet`` (torchvision's
default weights or timm's default pretrained tag), a named tag (a torchvision weights enum
member such as ``IMAGENET1K_V2``, a timm tag such as ``a1_in1k``), ``random`` (seeded), or the
path of a local state-dict file. :func:`weights_identity` is what the cache fingerprint
records; :func:`input_defaults` the preprocessing those weights were trained with.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from featcache.backbones.sources import source_of
from featcache.backbones.spec import BackboneSpec
from featcache.data.preprocess import LEGACY
from featcache.errors import FeatcacheError
from featcache.files import file_sha256

WEIGHT_KEYWORDS = ("imagenet", "random")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


def is_path(weights: str) -> bool:
    return Path(weights).is_file() or os.sep in weights or weights.endswith(WEIGHT_SUFFIXES)


def check_weights(weights: str) -> None:
    """Reject a ``--weights`` value that names a file that is not there (tags are checked per backbone)."""
    if weights not in WEIGHT_KEYWORDS and is_path(weights) and not Path(weights).is_file():
        raise FeatcacheError(f"--weights must be imagenet, random, a weights tag or the path of a state-dict "
                             f"file; no file at {weights}")


def tags(spec: BackboneSpec) -> list[str]:
    """The pretrained weights a backbone has: torchvision enum members or timm tags (no download)."""
    return source_of(spec).tags(spec)


def pretrained(spec: BackboneSpec, weights: str):
    """The torchvision weights enum member, or the timm tag, that ``weights`` names; None for random / a file."""
    if weights == "random" or is_path(weights):
        return None
    return source_of(spec).named(spec, weights)


def weights_identity(spec: BackboneSpec, weights: str, seed: int) -> dict:
    """What identifies the numbers the weights produce, for the cache fingerprint.

    Cheap: it never loads the network (a local file is hashed, not unpickled).
    """
    check_weights(weights)
    if weights == "random":
        return {"kind": "random", "seed": seed}
    if is_path(weights):
        return {"kind": "file", "sha256": file_sha256(Path(weights))}
    return source_of(spec).identity(spec, pretrained(spec, weights), "imagenet" if weights == "imagenet" else "tag")


def input_defaults(spec: BackboneSpec, weights: str) -> dict:
    """How the chosen weights were fed (size, mean/std, interpolation, crop fraction): the defaults that a
    request's unset preprocessing fields take. Random or file weights take the model's default weights'
    (how the architecture is fed); the declared four keep the fixed ``LEGACY`` values."""
    if spec.input is None:
        return dict(LEGACY)
    return source_of(spec).input_defaults(spec, pretrained(spec, weights))


_OFFLINE = []  # non-empty while offline_weights() holds: no download is tried


class _Offline(Exception):
    pass


@contextlib.contextmanager
def offline_weights(offline: bool = True):
    """Pretrained weights come from the local caches alone while this holds: the Hugging Face hub is put in
    offline mode (no retries with back-off) and torch.hub's downloader refuses, so a missing checkpoint fails at
    once with one line naming --download. ``rank`` works this way unless ``--download``."""
    if not offline:
        yield
        return
    import torch.hub

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_download = torch.hub.download_url_to_file
    constants = None
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as constants
    saved_constant = getattr(constants, "HF_HUB_OFFLINE", None)

    def refuse(url, *args, **kwargs):
        raise _Offline(url)

    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    torch.hub.download_url_to_file = refuse
    _OFFLINE.append(True)
    try:
        yield
    finally:
        _OFFLINE.pop()
        torch.hub.download_url_to_file = saved_download
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def build_backbone(spec: BackboneSpec, weights: str, seed: int):
    """The backbone in eval mode with the requested weights, all parameters frozen."""
    import torch

    check_weights(weights)
    w = pretrained(spec, weights)
    if w is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()) if _OFFLINE else contextlib.nullcontext():
                model = spec.build(w)  # offline, torch.hub's "Downloading: ..." would announce what never happens
        except Exception as exc:  # no network: URLError, OSError, huggingface_hub's errors, RuntimeError ...
            if _OFFLINE:
                raise FeatcacheError(f"the {weights} weights of {spec.name} are not cached locally"
                                     f"{source_of(spec).where(spec, w)}: nothing is downloaded without --download "
                                     f"(or use --weights random)") from None
            raise FeatcacheError(f"cannot get the {weights} weights of {spec.name} ({type(exc).__name__}: no network "
                                 f"and no cached copy{source_of(spec).where(spec, w)}): use --weights random, or --weights PATH "
                                 f"with a local state-dict file") from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build(None)
        if weights != "random":
            load_state_dict_file(model, Path(weights), spec)
    return model.eval().requires_grad_(False)


def load_state_dict_file(model, path: Path, spec: BackboneSpec) -> None:
    """Load a local state dict, ignoring the classifier; wrong keys or shapes raise."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatcacheError(f"cannot read weights file {path}: it is not a torch state dict") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatcacheError(f"weights file {path} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}

    own = model.state_dict()
    needed = {k for k in own if not k.startswith(spec.head_prefixes)}
    missing = sorted(needed - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in {spec.name}"
        for k in sorted(needed & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if mismatched:
        problems.append(f"shape of {mismatched[0]}" + (f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""))
    if problems:
        raise FeatcacheError(f"weights file {path} does not fit {spec.name}: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in needed}, strict=False)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
