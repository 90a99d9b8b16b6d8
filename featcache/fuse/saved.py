"""What a run folder stores beside ``record.json``, in formats that cannot run code when read.

Inside fuse, the one interface through which heads save and load themselves: fuse-train and
finetune write a run's model files through :func:`save_head` (handed to
:func:`featcache.runs.records.save_run`), predict, the report and ``--init-head`` read them
with :func:`load_head`. Run folders are shared, so nothing here is a pickle:

- ``normalizer.safetensors``: each tap's mean and scale (metadata: method, widths);
- ``head.safetensors`` + ``head.json``: a torch head's weights, and its parameters, classes
  and training history as JSON;
- ``head.skops``: a scikit-learn head, read back with skops and an explicit list of the
  types featcache's heads are made of (anything else is refused);
- ``model.safetensors``: a fine-tuned model's weights.

Run folders of featcache 0.1 hold pickles (``head.joblib``, ``fusion.joblib``, ``head.pt``),
which can run code when loaded: they are read only inside :func:`trusting_pickles`
(``--trust-pickles``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.fuse.fusion import TapNormalizer
from featcache.fuse.torch_head import TorchClassifier

# Types a scikit-learn head may hold beyond what skops trusts by default (calibrated SVMs).
SKOPS_TRUSTED = ["sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
                 "sklearn.calibration._IsotonicCalibration", "featcache.fuse.svm.NewtonLinearSVC"]
LEGACY = ("head.joblib", "fusion.joblib", "head.pt", "model.pt")
_trust = contextvars.ContextVar("trust_pickles", default=False)


@contextlib.contextmanager
def trusting_pickles():
    """Within this block, run folders written by featcache 0.1 (pickles) may be loaded."""
    token = _trust.set(True)
    try:
        yield
    finally:
        _trust.reset(token)


def trusting(trust_pickles: bool):
    """``--trust-pickles``: the block may load featcache 0.1 run folders (pickles); otherwise nothing changes."""
    return trusting_pickles() if trust_pickles else contextlib.nullcontext()


def save_head(folder: Path, normalizer: TapNormalizer, head) -> None:
    """Write the normaliser and the head (a fitted estimator, or a fine-tuned model's state dict)."""
    from safetensors.numpy import save_file

    _save_normalizer(folder / "normalizer.safetensors", normalizer)
    if isinstance(head, dict):  # a fine-tuned model's state dict
        save_file({k: v.detach().cpu().contiguous().numpy() for k, v in head.items()}, folder / "model.safetensors")
    elif isinstance(head, TorchClassifier):
        state = head.to_state()
        save_file({k: v.detach().cpu().contiguous().numpy() for k, v in state.pop("state").items()},
                  folder / "head.safetensors")
        state["classes"] = np.asarray(state["classes"]).tolist()
        (folder / "head.json").write_text(json.dumps(state, indent=1, default=_plain))
    else:
        import skops.io

        skops.io.dump(head, folder / "head.skops")


def load_head(folder: Path):
    """(normalizer, fitted head) of a run folder; for a fine-tuned run, (normalizer, model state dict).

    A file that is damaged, or not what its name says (a pickle renamed normalizer.safetensors, a
    head.json of other keys), is one :class:`FeatcacheError` naming it.
    """
    folder = Path(folder)
    if not (folder / "normalizer.safetensors").is_file():
        return _load_legacy(folder)
    normalizer = _readable(folder / "normalizer.safetensors", _load_normalizer)
    if (folder / "model.safetensors").is_file():
        return normalizer, _readable(folder / "model.safetensors", _tensors)
    if (folder / "head.safetensors").is_file():
        state = _readable(folder / "head.safetensors", _tensors)
        return normalizer, _readable(folder / "head.json", lambda path: _torch_head(path, state))
    return normalizer, _readable(folder / "head.skops", _load_skops)


def _readable(path: Path, load):
    """``load(path)``, with anything a damaged or foreign file raises worded as one line naming it."""
    try:
        return load(path)
    except FeatcacheError:
        raise
    except Exception as exc:  # safetensors, skops, json and the head's own checks each raise their own kinds
        raise FeatcacheError(f"{path} is damaged or not a file featcache wrote ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}): train the run "
                             f"again, or ask for the folder again") from None


def _torch_head(path: Path, state: dict):
    saved = json.loads(path.read_text())
    saved["classes"] = np.asarray(saved["classes"])
    if saved["classes"].ndim != 1:
        raise ValueError(f"classes must be a list. Got {saved['classes']!r} instead")
    saved["params"]["hidden"] = tuple(saved["params"]["hidden"])
    return TorchClassifier.from_state({**saved, "state": state})


def _load_skops(path: Path):
    import skops.io

    untrusted = [t for t in skops.io.get_untrusted_types(file=path) if t not in SKOPS_TRUSTED]
    if untrusted:
        raise FeatcacheError(f"{path} holds types featcache's heads are not made of ({', '.join(untrusted)}): "
                             f"it was not written by featcache, so it is not loaded")
    return skops.io.load(path, trusted=SKOPS_TRUSTED)


def _save_normalizer(path: Path, normalizer: TapNormalizer) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    if normalizer.method == "standard":
        for i in range(len(normalizer.dims_)):
            tensors[f"mean{i}"], tensors[f"scale{i}"] = normalizer.statistics(i)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, path,
              metadata={"method": normalizer.method, "dims": json.dumps(list(map(int, normalizer.dims_)))})


def _load_normalizer(path: Path) -> TapNormalizer:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata()
        normalizer = TapNormalizer(meta["method"])
        normalizer.dims_ = json.loads(meta["dims"])
        if normalizer.method == "standard":
            normalizer.mean_ = [f.get_tensor(f"mean{i}") for i in range(len(normalizer.dims_))]
            normalizer.scale_ = [f.get_tensor(f"scale{i}") for i in range(len(normalizer.dims_))]
    return normalizer


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _load_legacy(folder: Path):
    """A featcache 0.1 run folder: pickles, loaded only when the user said they trust it."""
    found = [name for name in LEGACY if (folder / name).is_file()]
    if not found:
        raise FeatcacheError(f"{folder} holds no trained head (normalizer.safetensors is missing): "
                             f"train the run again")
    if not _trust.get():
        raise FeatcacheError(f"{folder} was written by featcache 0.1 and stores its head as pickles "
                             f"({', '.join(found)}), which can run code when loaded: pass --trust-pickles only "
                             f"if you trust where the folder came from")
    import joblib
    import torch

    if (folder / "model.pt").is_file():
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        return joblib.load(folder / "fusion.joblib")["normalizer"], state
    if (folder / "head.pt").is_file():
        head = TorchClassifier.from_state(torch.load(folder / "head.pt", map_location="cpu", weights_only=False))
        return joblib.load(folder / "fusion.joblib")["normalizer"], head
    saved = joblib.load(folder / "head.joblib")
    return saved["normalizer"], saved["head"]


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in head.json")
