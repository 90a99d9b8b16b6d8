"""``FuseRequest``: what ``featcache fuse-train`` (its API function and pipeline table) asks for.

Inside fuse (request -> train). :class:`HeadFields` are the torch heads' flags and the candidate
grids, shared with the sweep's request; :meth:`HeadFields.head_options` is the one place they
become :class:`~featcache.fuse.heads.HeadOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.extraction.request import SKIP_BAD_IMAGES, FeatureFields
from featcache.fuse.fusion import TAP_NORMS
from featcache.fuse.heads import HeadOptions, heads_for, heads_help
from featcache.fuse.options import OPTIMIZERS
from featcache.requests import carried, device_option, option, quiet_option, runs_dir_option


def _positive_all(values) -> bool:
    return all(v > 0 for v in values)


def _widths(values) -> bool:
    return values == (0,) or all(v >= 1 for v in values)


@dataclass(frozen=True)
class HeadFields:
    """The torch heads' settings and the hyper-parameter grids compared on validation."""

    hidden: tuple[int, ...] = option((512,), metavar="W[,W]", check=_widths, rule="be widths of 1 or more (0: none)",
                                     help="mlp hidden widths, e.g. 512 or 512,256.")
    C: tuple[float, ...] | None = option(None, metavar="0.01,0.1,1", check=_positive_all, rule="be positive",
                                         help="Values of C compared on validation (logreg, svm) [default: logreg "
                                              "0.01,0.1,1,10; svm 0.001,0.01,0.1,1].")
    weight_decay: tuple[float, ...] | None = option(None, metavar="0,1e-4", check=lambda v: all(x >= 0 for x in v),
                                                    rule="be 0 or more",
                                                    help="Weight decays compared on validation (linear, mlp) "
                                                         "[default: linear 0,1e-4,0.01; mlp 0,0.01].")
    dropout: float = option(0.2, help="Dropout of the mlp's hidden layers.")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="The torch heads' optimizer.")
    lr: float = option(1e-3, help="The torch heads' learning rate.")
    epochs: int = option(30, help="Maximum epochs (torch heads).")
    batch_size: int = option(128, help="Head training batch size.")
    patience: int | None = option(5, help="Early-stopping patience on validation loss (torch heads).")

    def head_options(self, device: str, precision: str, seed: int) -> HeadOptions:
        """The heads' options; ``device`` and ``precision`` as the request gave them (resolved here)."""
        from featcache.device import resolve_device, resolve_precision

        dev = resolve_device(device)
        grid = {name: values for name, values in (("C", self.C), ("weight_decay", self.weight_decay)) if values}
        return HeadOptions(hidden=tuple(w for w in self.hidden if w), dropout=self.dropout, optimizer=self.optimizer,
                           lr=self.lr, epochs=self.epochs, batch_size=self.batch_size, patience=self.patience,
                           device=dev.type, precision=resolve_precision(precision, dev), seed=seed, grid=grid)


def cv_option():
    """``--cv K``, the same flag in fuse-train and the sweep (a new field each: a dataclass owns its fields)."""
    return option(0, metavar="K", check=lambda k: k == 0 or k >= 2, rule="be 0 (off) or a number of folds of 2 or more",
                  help="Stratified K-fold cross-validation over the training rows instead of one validation split: "
                       "every candidate is fitted on each fold, the best mean over the folds chosen (then fitted on "
                       "every training row); for small data, where a validation split would hold few images per "
                       "class. The test split is untouched. 0: off.")


TAPS_HELP = ("Taps to concatenate: aliases (early, mid, late) or node names, for every backbone, or qualified as "
             "resnet50:late. Repeat for several fusions.")


@dataclass(frozen=True)
class FuseRequest(HeadFields, FeatureFields):
    """``featcache fuse-train``: fuse cached taps and train heads."""

    taps: tuple[str, ...] = option(("late",), metavar="TAPS",
                                   help=TAPS_HELP + " auto: chosen on validation by greedy forward selection over "
                                                    "every tap of the backbones (a logistic-regression probe).")
    head: tuple[str, ...] = option(("logreg",), split=True, metavar="NAME[,NAME]", choices=lambda: heads_for("fuse-train"),
                                   help=lambda: "Comma-separated or repeated to train several. " + heads_help("fuse-train"))
    tap_norm: str = option("standard", choices=TAP_NORMS,
                           help="Per-tap normalisation before concatenation, fitted on train.")
    val_fraction: float = option(0.1, help="Stratified share of train held out to choose hyper-parameters and "
                                           "MLP epochs.")
    cv: int = cv_option()
    device: str = device_option("Where the torch heads train.")
    runs_dir: Path = runs_dir_option("Where run folders are written.")
    extract: bool = option(False, help="Extract missing caches first.")
    skip_bad_images: bool = option(False, help=SKIP_BAD_IMAGES)
    out_of_core: bool = option(False, help="Stream row chunks from the caches instead of loading them (torch "
                                           "heads: linear, mlp).")
    force: bool = option(False, help="Train again even where an identical request already has a run.")
    allow_dead_taps: bool = option(False, help="Train on taps whose stored values are constant or mostly below "
                                               "float16's range (refused otherwise).")
    quiet: bool = quiet_option()

    def config(self):
        from featcache.fuse.train import FuseTrainConfig

        return carried(FuseTrainConfig, self, features=self.features(self.device, skip_bad_images=self.skip_bad_images),
                       heads=self.head, options=self.head_options(self.device, self.precision, self.seed),
                       run_extract=self.extract)
