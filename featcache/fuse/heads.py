"""Heads: interchangeable classifiers on fused features, all scikit-learn estimators.

Flow: fusion -> **heads** -> evaluate -> records. ``logreg`` and ``svm`` are scikit-learn's
own (solved by featcache's solvers where they apply: :mod:`featcache.fuse.logreg`, :mod:`featcache.fuse.svm`);
``linear`` and ``mlp`` are :class:`TorchClassifier`, a PyTorch softmax regression or
Linear -> ReLU -> Dropout -> Linear network that follows the estimator contract
(keyword-only ``__init__`` that only stores, ``fit`` returns self, learned state in
``name_`` attributes), so every head works in ``Pipeline`` and ``GridSearchCV``.

Each registry entry pairs a factory with the hyper-parameter candidates that
:mod:`featcache.fuse.evaluate` compares on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from featcache.fuse.options import HeadOptions
from featcache.registry import Registry

# --- the registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeadEntry:
    """A head and what it can do: the one place fuse-train, the sweep, finetune and ``--help`` learn of it.

    Args:
        make: ``make(options, **params)`` builds the estimator (None: the sweep solves it itself, as k-NN).
        candidates: ``candidates(options, n_rows)`` lists the hyper-parameters compared on validation.
        torch: a :class:`TorchClassifier` (trains on the device, streams with --out-of-core, saved as
            safetensors); else a scikit-learn estimator, saved with skops.
        final: with it, candidates are compared as ``make`` builds them and only the chosen parameters are
            refitted as ``final(options, **params)`` (the SVM: calibrating every candidate would fit each
            four times).
        stages: the commands that offer it (``fuse-train``, ``sweep``, ``finetune``).
        sweep: how the sweep solves it: ``batched`` (every C of many combinations in one solve), ``path``
            (one combination's C path), ``neighbours`` (k-NN on the standardised rows) or ``fit`` (its
            candidates fitted side by side as fuse-train fits them).
        fewshot: the sweep's few-shot draws use it (cheap enough to fit many times).
        keep: the sweep may keep it as an ordinary run (k-NN stores no model to keep).
        help: one line for ``--help``.
    """

    make: Callable | None
    candidates: Callable | None
    torch: bool = False
    final: Callable | None = None
    stages: frozenset = frozenset({"fuse-train", "sweep"})
    sweep: str = "fit"
    fewshot: bool = False
    keep: bool = True
    help: str = ""

    def __post_init__(self):
        if self.sweep not in SWEEP_WAYS:
            raise ValueError(f"a head's sweep must be one of {SWEEP_WAYS}. Got {self.sweep!r} instead")
        if self.make is None and "fuse-train" in self.stages:
            raise ValueError("fuse-train fits a head with its make: give one")


SWEEP_WAYS = ("batched", "path", "neighbours", "fit")


def heads_for(stage: str) -> list[str]:
    """The heads ``stage`` (fuse-train, sweep, finetune) offers, in registration order."""
    return [name for name, entry in HEADS.items() if stage in entry.stages]


def heads_help(stage: str) -> str:
    """``--head``'s choices for ``stage``, each with its line, read from the registry when help is shown."""
    return "; ".join(f"{name}: {HEADS[name].help}" for name in heads_for(stage))


HEADS = Registry("--head")
C_GRID = (0.01, 0.1, 1.0, 10.0)
SVM_C_GRID = (0.001, 0.01, 0.1, 1.0)  # linear SVMs on standardised features rarely want more; C=10 took minutes


def _logreg(o: HeadOptions, C=1.0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=o.seed)


def _svm(o: HeadOptions, C=1.0, kernel="linear"):
    """LinearSVC (solved by :mod:`featcache.fuse.svm`); RBF SVC on small data, where it is affordable. No
    probabilities."""
    from sklearn.svm import SVC

    from featcache.fuse.svm import newton_class  # LinearSVC, fitted by featcache's exact Newton solver

    return SVC(C=C, kernel="rbf") if kernel == "rbf" else newton_class()(C=C, max_iter=2000, random_state=o.seed)


def _calibrated_svm(o: HeadOptions, **params):
    """The chosen SVM with probabilities calibrated by 3-fold cross-validation."""
    from sklearn.calibration import CalibratedClassifierCV

    return CalibratedClassifierCV(_svm(o, **params), cv=3, ensemble=False)


def _torch(o: HeadOptions, hidden, **params):
    from featcache.fuse.torch_head import TorchClassifier  # loads torch and scikit-learn: when a head is built

    settings = dict(hidden=hidden, dropout=o.dropout if hidden else 0.0, optimizer=o.optimizer, lr=o.lr,
                    epochs=o.epochs, batch_size=o.batch_size, patience=o.patience, device=o.device,
                    precision=o.precision, random_state=o.seed)
    return TorchClassifier(**{**settings, **params})


SMALL_DATA = 2000  # rows below which the RBF SVM joins the svm candidates

FROZEN = frozenset({"fuse-train", "sweep"})
HEADS.register("logreg")(HeadEntry(
    _logreg, lambda o, n: [{"C": c} for c in o.grid.get("C", C_GRID)], sweep="batched", fewshot=True,
    help="logistic regression over a C grid"))
HEADS.register("svm")(HeadEntry(
    _svm,
    lambda o, n: [{"C": c, "kernel": k}
                  for k in o.grid.get("kernel", ("linear", "rbf") if n < SMALL_DATA else ("linear",))
                  for c in o.grid.get("C", SVM_C_GRID)],
    final=_calibrated_svm, sweep="path", fewshot=True, help="linear SVM (RBF too on small data), calibrated",
))
HEADS.register("linear")(HeadEntry(
    lambda o, **p: _torch(o, (), **p),
    lambda o, n: [{"weight_decay": w} for w in o.grid.get("weight_decay", (0.0, 1e-4, 1e-2))],
    torch=True, stages=FROZEN | {"finetune"}, help="softmax regression in torch",
))
HEADS.register("mlp")(HeadEntry(
    lambda o, **p: _torch(o, o.hidden, **p),
    lambda o, n: [{"weight_decay": w} for w in o.grid.get("weight_decay", (0.0, 1e-2))],
    torch=True, stages=FROZEN | {"finetune"}, help="--hidden layers, ReLU and dropout, in torch",
))
HEADS.register("knn")(HeadEntry(None, None, stages=frozenset({"sweep"}), sweep="neighbours", fewshot=True, keep=False,
                                 help="cosine k-nearest neighbours (k chosen on validation)"))
HEADS.register("resblocks")(HeadEntry(
    None, None, stages=frozenset({"finetune"}),
    help="trainable residual blocks on one backbone's feature map, then an MLP"))
