"""Command line: each command declares its flags (click), builds its config through the stage table, and calls one stage.

User errors (:class:`~featcache.errors.FeatcacheError`) become one ``Error: ...`` line on
stderr and exit status 2; an interrupted extraction says how to resume. Each command imports
its stage modules when it runs, so ``featcache --help`` and a typo do not wait for torch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from featcache.cli import browse, sweeping  # noqa: F401  register backbones, info, runs, predict and sweep
from featcache.cli.group import cli, trusting
from featcache.cli.options import data_options, feature_options, skip_bad_images_option
from featcache.cli.stages import STAGES
from featcache.extraction.config import available_cores


@cli.command()
@click.option("--backbone", "backbone_names", multiple=True, default=("resnet50",), show_default=True,
              help="Backbone to extract; repeat for several (see featcache backbones).")
@data_options
@feature_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--num-workers", type=int, default=None,
              help=f"Processes decoding image files [default: on a GPU run every core this machine gives featcache "
                   f"({available_cores()}); on a CPU run 0, since the network already uses every core].")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone (pays off on large datasets).")
@skip_bad_images_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(quiet, **params):
    """Run frozen backbones once and cache every tap's pooled features in HDF5.

    An identical request is served from the cache; an interrupted one resumes.
    """
    from featcache.extraction.run import extract as run_extract

    cfg = STAGES["extract"].build(params)
    started = time.perf_counter()
    try:
        results = run_extract(cfg, progress=not quiet, log=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume where it stopped", err=True)
        sys.exit(130)
    from featcache.extraction.distributed import ranks

    if not ranks().main:  # under torchrun, rank 0 speaks for the job
        return
    for r in results:
        if r.status == "cached":
            click.echo(f"{r.backbone}: already cached at {r.path} (served in {r.seconds:.2f} s)")
        else:
            rate = r.images / r.seconds if r.seconds else 0.0
            click.echo(f"{r.backbone}: {r.status} {r.images} images into {r.path} in {r.seconds:.1f} s ({rate:.1f} img/s, {r.precision})")
    click.echo(f"done in {time.perf_counter() - started:.1f} s; inspect with: featcache info {results[-1].path}")


@cli.command("fuse-train")
@click.option("--backbone", "backbone_names", multiple=True, default=("resnet50",), show_default=True,
              help="Backbone whose cache to read; repeat to fuse across backbones.")
@click.option("--taps", "taps", multiple=True, default=("late",), show_default=True,
              help="Taps to concatenate: aliases (early, mid, late) or node names, for every backbone, or "
                   "qualified as resnet50:late. Repeat for several fusions. auto: chosen on validation by greedy "
                   "forward selection over every tap of the backbones (a logistic-regression probe).")
@click.option("--head", "heads", multiple=True, default=("logreg",), show_default=True,
              help="logreg, svm, linear or mlp; comma-separated or repeated to train several.")
@click.option("--tap-norm", default="standard", show_default=True,
              help="Per-tap normalisation before concatenation, fitted on train: standard, l2 or none.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Stratified share of train held out to choose hyper-parameters and MLP epochs.")
@data_options
@feature_options
@click.option("--hidden", default="512", show_default=True, help="mlp hidden widths, e.g. 512 or 512,256.")
@click.option("--C", "c_grid", default=None,
              help="Values of C compared on validation (logreg, svm), e.g. 0.01,0.1,1,10 [default: logreg "
                   "0.01,0.1,1,10; svm 0.001,0.01,0.1,1].")
@click.option("--weight-decay", "wd_grid", default=None,
              help="Weight decays compared on validation (linear, mlp), e.g. 0,1e-4,1e-2 [default: linear "
                   "0,1e-4,0.01; mlp 0,0.01].")
@click.option("--dropout", type=float, default=0.2, show_default=True)
@click.option("--optimizer", default="adam", show_default=True, help="adam, adamw or sgd (torch heads).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True, help="Maximum epochs (torch heads).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Head training batch size.")
@click.option("--patience", type=int, default=5, show_default=True, help="Early-stopping patience on validation loss.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--extract", "run_extract", is_flag=True, help="Extract missing caches first.")
@skip_bad_images_option
@click.option("--out-of-core", is_flag=True,
              help="Stream row chunks from the caches instead of loading them (torch heads: linear, mlp).")
@click.option("--force", is_flag=True, help="Train again even where an identical request already has a run.")
@click.option("--allow-dead-taps", is_flag=True,
              help="Train on taps whose stored values are constant or mostly below float16's range (refused otherwise).")
def fuse_train(**params):
    """Fuse cached taps and train heads; hyper-parameters are chosen on validation, test is scored once.

    Every --taps value x every --head is trained from one load of the caches, and each
    writes a run folder with its record and trained head. A combination already trained
    with identical options on identical caches is served from its run (--force trains again).
    """
    from featcache.records import run_folders

    stage = STAGES["fuse-train"]
    cfg = stage.build(params)
    runs_dir = cfg.runs_dir
    before = set(run_folders(runs_dir))
    runs = stage.run(cfg, params, click.echo).runs  # the stage's own way, --taps auto included, as pipelines run it
    written = len([r for r in runs if r not in before])
    served = f", {len(runs) - written} served from existing runs" if written < len(runs) else ""
    click.echo(f"{written} run{'s' if written != 1 else ''} written to {runs_dir}{served}; compare them with: "
               f"featcache runs --runs-dir {runs_dir}")


@cli.command()
@click.option("--backbone", "backbone_names", multiple=True, default=("resnet50",), show_default=True,
              help="Backbone to fine-tune; repeat to fuse several.")
@click.option("--taps", default="late", show_default=True, help="Taps to fuse (as in fuse-train), e.g. late or early,late.")
@click.option("--head", default="mlp", show_default=True,
              help="mlp, linear, or resblocks (trainable residual blocks on one backbone's feature map, then an MLP).")
@click.option("--hidden", default="512", show_default=True, help="Head hidden widths, e.g. 512 or 512,256.")
@click.option("--dropout", type=float, default=0.2, show_default=True)
@click.option("--res-blocks", type=int, default=2, show_default=True, help="Residual blocks of --head resblocks.")
@click.option("--tap-norm", default="standard", show_default=True, help="standard, l2 or none (fitted on train).")
@click.option("--unfreeze", default="last-block", show_default=True,
              help="Phase 2 trainable backbone part: none, last-block, last-N (blocks) or all.")
@click.option("--head-epochs", type=int, default=0, show_default=True, help="Phase 1: epochs training only the head.")
@click.option("--epochs", type=int, default=6, show_default=True, help="Phase 2: epochs with the unfreeze policy.")
@click.option("--optimizer", default="adamw", show_default=True, help="adam, adamw or sgd.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Head learning rate.")
@click.option("--backbone-lr-scale", type=float, default=0.1, show_default=True,
              help="Backbone learning rate = --lr x this, in phase 2.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--augment", default="none", show_default=True,
              help="none; basic (resize, random crop, flip); heavy (rotation 20, flip, RandomResizedCrop, affine 20).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--patience", type=int, default=None, help="Early stopping after N epochs without a better val loss.")
@click.option("--init-head", type=click.Path(path_type=Path), help="A fuse-train run whose head is phase 1.")
@data_options
@feature_options
@click.option("--device", default="auto", show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command from its last epoch.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--trust-pickles", is_flag=True,
              help="Also load run folders written by featcache 0.1, whose pickled heads can run code. "
                   "Only for folders you trust.")
def finetune(quiet, trust_pickles, **params):
    """Train unfrozen variants end to end: backbones -> taps -> pooling -> normalisation -> head.

    Writes the same run record as fuse-train, so featcache runs lists both side by side.
    """
    from featcache.finetuning.run import finetune as run

    cfg = STAGES["finetune"].build(params)
    try:
        with trusting(trust_pickles):
            path = run(cfg, log=click.echo, progress=not quiet)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command with --resume to continue from the last epoch", err=True)
        sys.exit(130)
    click.echo(f"run written to {path}")


@cli.command()
@click.argument("run_names", nargs=-1, metavar="[RUN]...")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where runs live; without RUN arguments every run in it is reported.")
@click.option("--pipeline", default=None, help="Only the runs of this pipeline (the folder --runs-dir/NAME).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("reports/report.html"), show_default=True,
              help="The HTML file; the table is also written beside it as .csv.")
@click.option("--title", default="featcache report", show_default=True)
@click.option("--grid-images", type=int, default=12, show_default=True, help="Test images in each prediction grid.")
@click.option("--gradcam-images", type=int, default=4, show_default=True, help="Images per Grad-CAM grid; 0: none.")
@click.option("--device", default="cpu", show_default=True, help="Where Grad-CAM runs: cpu or cuda.")
@click.option("--trust-pickles", is_flag=True,
              help="Also load run folders written by featcache 0.1, whose pickled heads can run code. "
                   "Only for folders you trust.")
def report(trust_pickles, **params):
    """Write one self-contained HTML page comparing runs: table, curves, confusion matrices,
    per-class scores, predictions, Grad-CAM, architecture and where time went."""
    from featcache.reporting.page import write_report

    with trusting(trust_pickles):
        write_report(STAGES["report"].build(params), log=lambda m: click.echo(m, err=True))


@cli.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(path_type=Path))
@click.option("--set", "settings", metavar="KEY=VALUE", multiple=True,
              help="Override an option in every stage that takes it, e.g. --set epochs=1 --set weights=random; "
                   "repeat for several.")
@click.option("--dry-run", is_flag=True, help="Check the file and list its stages with their options, running nothing.")
def run_command(pipeline_file, settings, dry_run):
    """Run a study's pipeline file (TOML) stage by stage: extract, sweep, fuse-train, finetune, report.

    Caches and runs that already exist are reused; a summary says what ran and what was
    reused. Each stage table holds its command's flags, e.g. image-size = 128.

    A quick trial of a study before the real run (small subsets, one epoch, no download
    of weights):
    \b
      featcache run pipelines/mobilenetv2_early_late.toml --set weights=random \\
          --set limit-train=500 --set limit-test=100 --set epochs=1
    """
    from featcache.cli.pipeline import load_pipeline, parse_override, run_pipeline, stage_options, summary

    overrides = dict(parse_override(text) for text in settings)
    pipeline = load_pipeline(pipeline_file, cli.commands, overrides)
    for key, text in pipeline.info.items():
        click.echo(f"{key}: {text}")
    if overrides:
        click.echo("overrides: " + ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                             for k, v in overrides.items()))
    if dry_run:
        for stage in pipeline.stages:
            click.echo(f"{stage.kind} #{stage.index}")
            for line in stage_options(stage, cli.commands[stage.kind]):
                click.echo(f"  {line}")
        click.echo("(dry run: nothing ran; options at their defaults are not listed)")
        return
    results = run_pipeline(pipeline, log=lambda m: click.echo(m, err=True))
    click.echo(summary(results))


def main():
    cli(prog_name="featcache")
