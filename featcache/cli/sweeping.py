"""``featcache sweep``: which taps, which fusion, which head, from the caches at once.

Registered on the ``featcache`` group (cli.group); imports the sweep when it runs, so
``featcache --help`` does not load torch.
"""

from __future__ import annotations

from pathlib import Path

import click

from featcache.cli.group import cli
from featcache.cli.options import data_options, feature_options, skip_bad_images_option


@cli.command()
@click.option("--backbone", "backbone_names", multiple=True, default=("resnet50",), show_default=True,
              help="Backbone whose cache to read; repeat to sweep taps across backbones.")
@click.option("--combos", default="pairs", show_default=True,
              help="singles: every tap alone; pairs: every tap and every pair (within and across backbones); "
                   "N: every combination of up to N taps; 0: only the --taps given.")
@click.option("--taps", "taps", multiple=True,
              help="An explicit combination to add, e.g. early,late or resnet50:late,mobilenet_v2:late; repeat for several.")
@click.option("--head", "heads", multiple=True, default=("logreg,svm,linear,knn",), show_default=True,
              help="logreg, svm, linear, knn, mlp; comma-separated or repeated.")
@click.option("--seeds", default=None, metavar="0,1,2",
              help="Repeat everything random (validation split, torch heads, few-shot draws) per seed; the table "
                   "shows the mean and a 95% interval [default: --seed].")
@click.option("--shots", default=None, metavar="1,5,10",
              help="Few-shot: also train on K images per class, --repeats draws each (logreg, svm, knn).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Few-shot draws per number of shots.")
@click.option("--keep", type=int, default=3, show_default=True,
              help="Train the best K (combination, head) by validation accuracy as ordinary runs (knn excluded).")
@click.option("--max-combos", type=int, default=2000, show_default=True,
              help="Refuse a search with more combinations than this.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Stratified share of train that chooses every hyper-parameter.")
@data_options
@feature_options
@click.option("--C", "c_grid", default=None, help="Values of C for logreg and svm [default: as fuse-train].")
@click.option("--weight-decay", "wd_grid", default=None, help="Weight decays for linear and mlp [default: as fuse-train].")
@click.option("--hidden", default="512", show_default=True, help="mlp hidden widths.")
@click.option("--dropout", type=float, default=0.2, show_default=True)
@click.option("--optimizer", default="adam", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True, help="Maximum epochs (torch heads).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Torch heads' batch size.")
@click.option("--patience", type=int, default=5, show_default=True)
@click.option("--device", default="auto", show_default=True, help="Where the probes are solved: auto, cpu or cuda.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--extract", "run_extract", is_flag=True, help="Extract missing caches first.")
@skip_bad_images_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def sweep(quiet, **params):
    """Evaluate every tap, pair or combination of the cached taps with every head, at once.

    Hyper-parameters are chosen on a validation split of train; the chosen model of each
    (combination, head) is scored on test once. Linear heads are solved in torch on the
    device; k-NN votes over cosine neighbours. Writes RUNS/sweeps/NAME/table.csv; an
    interrupted sweep resumes where it stopped.
    """
    from featcache.cli.stages import STAGES

    stage = STAGES["sweep"]  # the stage's own way, as a pipeline's [[sweep]] runs it
    stage.run(stage.build(params), {**params, "quiet": quiet}, click.echo)
