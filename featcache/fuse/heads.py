"""Heads: interchangeable classifiers on fused features, all scikit-learn estimators.

Flow: fusion -> **heads** -> evaluate -> records. ``logreg`` and ``svm`` are scikit-learn's
own; ``linear`` and ``mlp`` are :class:`TorchClassifier`, a PyTorch softmax regression or
Linear -> ReLU -> Dropout -> Linear network that follows the estimator contract
(keyword-only ``__init__`` that only stores, ``fit`` returns self, learned state in
``name_`` attributes), so every head works in ``Pipeline`` and ``GridSearchCV``.

Each registry entry pairs a factory with the hyper-parameter candidates that
:mod:`featcache.fuse.evaluate` compares on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from featcache.errors import require, unknown
from featcache.fuse.torch_head import OPTIMIZERS, TorchClassifier
from featcache.registry import Registry

# --- the registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeadOptions:
    """Head flags of ``fuse-train``: what the torch heads use, and the seed."""

    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 30
    batch_size: int = 128
    patience: int | None = 5
    device: str = "cpu"
    precision: str = "fp32"  # torch heads' autocast: --precision, resolved as for extraction
    seed: int = 0
    grid: dict = field(default_factory=dict)  # name -> candidates, overriding the defaults

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise unknown("--optimizer", self.optimizer, OPTIMIZERS)
        require(self.epochs >= 1, "--epochs", self.epochs, "be at least 1")
        require(self.batch_size >= 1, "--batch-size", self.batch_size, "be at least 1")
        require(0 <= self.dropout < 1, "--dropout", self.dropout, "lie in [0, 1)")
        require(self.lr > 0, "--lr", self.lr, "be positive")


@dataclass(frozen=True)
class HeadEntry:
    """A head: ``make(options, **params)`` builds it; ``candidates(options, n_rows)`` lists
    the hyper-parameters compared on validation. With ``final``, candidates are compared
    as ``make`` builds them and only the chosen parameters are refitted as
    ``final(options, **params)`` (the SVM: calibrating every candidate would fit each four
    times)."""

    make: Callable
    candidates: Callable
    torch: bool = False
    final: Callable | None = None


HEADS = Registry("--head")
C_GRID = (0.01, 0.1, 1.0, 10.0)
SVM_C_GRID = (0.001, 0.01, 0.1, 1.0)  # linear SVMs on standardised features rarely want more; C=10 took minutes


def _logreg(o: HeadOptions, C=1.0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=o.seed)


def _svm(o: HeadOptions, C=1.0, kernel="linear"):
    """LinearSVC; RBF SVC on small data, where it is affordable. No probabilities."""
    from sklearn.svm import SVC, LinearSVC

    return SVC(C=C, kernel="rbf") if kernel == "rbf" else LinearSVC(C=C, max_iter=2000, random_state=o.seed)


def _calibrated_svm(o: HeadOptions, **params):
    """The chosen SVM with probabilities calibrated by 3-fold cross-validation."""
    from sklearn.calibration import CalibratedClassifierCV

    return CalibratedClassifierCV(_svm(o, **params), cv=3, ensemble=False)


def _torch(o: HeadOptions, hidden, **params):
    settings = dict(hidden=hidden, dropout=o.dropout if hidden else 0.0, optimizer=o.optimizer, lr=o.lr,
                    epochs=o.epochs, batch_size=o.batch_size, patience=o.patience, device=o.device,
                    precision=o.precision, random_state=o.seed)
    return TorchClassifier(**{**settings, **params})


SMALL_DATA = 2000  # rows below which the RBF SVM joins the svm candidates

HEADS.register("logreg")(HeadEntry(_logreg, lambda o, n: [{"C": c} for c in o.grid.get("C", C_GRID)]))
HEADS.register("svm")(HeadEntry(
    _svm,
    lambda o, n: [{"C": c, "kernel": k}
                  for k in o.grid.get("kernel", ("linear", "rbf") if n < SMALL_DATA else ("linear",))
                  for c in o.grid.get("C", SVM_C_GRID)],
    final=_calibrated_svm,
))
HEADS.register("linear")(HeadEntry(
    lambda o, **p: _torch(o, (), **p),
    lambda o, n: [{"weight_decay": w} for w in o.grid.get("weight_decay", (0.0, 1e-4, 1e-2))],
    torch=True,
))
HEADS.register("mlp")(HeadEntry(
    lambda o, **p: _torch(o, o.hidden, **p),
    lambda o, n: [{"weight_decay": w} for w in o.grid.get("weight_decay", (0.0, 1e-2))],
    torch=True,
))
