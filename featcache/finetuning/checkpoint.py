"""The fine-tune's checkpoint: written after every epoch, atomically, and what a resumed run reads back.

Flow: finetuning/run -> **checkpoint** (the partial run folder). A checkpoint holds the weights, the
optimizer, the curves so far and the best epoch's weights; it is loaded with ``weights_only`` so a
planted file cannot run code.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

from featcache.files import atomic_write


@dataclass
class Progress:
    """What a checkpoint holds besides the weights: curves, the best epoch so far, where to go on."""

    history: dict
    best: dict
    best_state: dict  # the best epoch's weights: they travel inside the checkpoint, never beside it
    done: int = 0
    stopped: bool = False


def save_checkpoint(folder: Path, state: dict) -> None:
    import torch

    atomic_write(folder / "checkpoint.pt", lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint


def open_checkpoint(folder: Path, resume: bool, net, device, log):
    """(work folder, checkpoint or None): a resumed run loads its weights, a new one starts an empty folder."""
    import torch

    if resume and (folder / "checkpoint.pt").exists():
        # weights_only: tensors and plain values only, so a planted checkpoint cannot run code
        ckpt = torch.load(folder / "checkpoint.pt", map_location=device, weights_only=True)
        net.load_state_dict(ckpt["model"])
        log(f"resuming {folder} after {ckpt['phase']} epoch {ckpt['epoch']}")
        return folder, ckpt
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder, None


def progress_from(ckpt, net) -> Progress:
    """The curves, best epoch and next step of a resumed run, or fresh ones."""
    if ckpt is None:
        keys = ("phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s")
        return Progress({k: [] for k in keys}, {"val_loss": float("inf"), "val_acc": None, "epoch": 0, "phase": None},
                         copy.deepcopy(net.state_dict()))
    best_state = copy.deepcopy(net.state_dict()) if ckpt["best_model"] is None else ckpt["best_model"]
    return Progress(ckpt["history"], ckpt["best"], best_state, ckpt["step"] + 1, bool(ckpt["stopped"]))
