"""Command line: one command per stage, its options made from the stage's request; each body only prints.

Above everything (requests -> pipeline.stages -> **cli**); nothing imports it. User errors
(:class:`~featcache.errors.FeatcacheError`) become one ``Error: ...`` line on stderr and exit
status 2; an interrupted extraction, sweep or fine-tune says how to resume. Stage modules are
imported when a command runs, so ``featcache --help`` and a typo do not wait for torch.
"""

from __future__ import annotations

import sys
import time

import click

from featcache.cli import browse  # noqa: F401  registers backbones, info and runs
from featcache.cli.generate import request_command
from featcache.cli.group import cli
from featcache.pipeline.request import PipelineRequest
from featcache.pipeline.stages import STAGES


def stage(name: str, **settings):
    """Decorator: register ``featcache NAME`` with its request's fields as options; the function gets the
    request and prints what the stage did."""

    def decorate(body):
        cli.add_command(request_command(name, STAGES[name].request, body, **settings))
        return body

    return decorate


def _interrupted(hint: str):
    click.echo(f"interrupted: {hint}", err=True)
    sys.exit(130)


@stage("extract")
def extract(request):
    """Run frozen backbones once and cache every tap's pooled features in HDF5.

    An identical request is served from the cache; an interrupted one resumes.
    """
    started = time.perf_counter()
    try:
        outcome = STAGES["extract"].run(request, lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        _interrupted("run the same command again to resume where it stopped")
    from featcache.torchrun import current

    if not current().main:  # under torchrun, rank 0 speaks for the job
        return
    results = outcome.result
    say = click.echo
    for r in results:
        if r.status == "cached":
            say(f"{r.backbone}: already cached at {r.path} (served in {r.seconds:.2f} s)")
        else:
            rate = r.images / r.seconds if r.seconds else 0.0
            left_out = f" ({len(r.skipped)} more unreadable, left out)" if r.skipped else ""
            say(f"{r.backbone}: {r.status} {r.images - len(r.skipped)} images{left_out} into {r.path} in "
                f"{r.seconds:.1f} s ({rate:.1f} img/s, {r.precision})")
    say(f"done in {time.perf_counter() - started:.1f} s; inspect with: featcache info {results[-1].path}")


@stage("fuse-train")
def fuse_train(request):
    """Fuse cached taps and train heads; hyper-parameters are chosen on validation, test is scored once.

    Every --taps value x every --head is trained from one load of the caches, and each
    writes a run folder with its record and trained head. A combination already trained
    with identical options on identical caches is served from its run (--force trains again).
    """
    from featcache.runs.records import run_folders

    before = set(run_folders(request.runs_dir))
    say = click.echo
    runs = STAGES["fuse-train"].run(request, say).runs  # the stage's own way, --taps auto included
    written = len([r for r in runs if r not in before])
    served = f", {len(runs) - written} served from existing runs" if written < len(runs) else ""
    say(f"{written} run{'s' if written != 1 else ''} written to {request.runs_dir}{served}; compare them with: "
        f"featcache runs --runs-dir {request.runs_dir}")


@stage("sweep")
def sweep(request):
    """Evaluate every tap, pair or combination of the cached taps with every head, at once.

    Hyper-parameters are chosen on a validation split of train; the chosen model of each
    (combination, head) is scored on test once. Linear heads are solved in torch on the
    device; k-NN votes over cosine neighbours. Writes RUNS/sweeps/NAME/table.csv; an
    interrupted sweep resumes where it stopped.
    """
    try:
        STAGES["sweep"].run(request, click.echo)
    except KeyboardInterrupt:
        _interrupted("run the same command again: the sweep resumes from the rows it finished")


@stage("rank")
def rank(request):
    """Which pretrained model, which layer? Score every tap of many backbones, training nothing.

    --backbone takes names and glob patterns ('resnet*', 'timm:convnext*'). Models are extracted a few at a
    time in one shared pass, every tap scored from one Gram matrix (LogME, H-score ...); a model that fails is
    recorded with its reason and the ranking goes on. Runs again resume where they stopped. --confirm K
    checks the scores against the logreg probe on this data (Kendall tau per score).
    """
    try:
        STAGES["rank"].run(request, click.echo)
    except KeyboardInterrupt:
        _interrupted("run the same command again: the finished models are kept")


@stage("similarity")
def similarity(request):
    """How much do two taps say the same thing? Linear CKA between every pair of cached taps.

    Within and across backbones, on every training image (each tap standardised as the probes see it):
    1 for taps equal up to a rotation and scale, near 0 for unrelated ones. Pairs that are each good alone
    but unlike each other are the ones worth fusing. Writes RUNS/similarity/NAME/cka.csv and pairs.csv.
    """
    STAGES["similarity"].run(request, click.echo)


@stage("choose")
def choose(request):
    """Which model, which taps, which head? One answer, how sure, and at what cost.

    Screens every tap of the --backbone patterns' models with the scores and cheap baselines (as rank), confirms
    the survivors with the batched probes by successive halving (with fused pairs), and decides from paired
    out-of-fold predictions: the recommendation with its accuracy interval and P(best), the candidates tied with
    it, the fastest of those, and how far each score can be trusted on this data. Test is scored once, for the
    recommendation alone.
    """
    try:
        STAGES["choose"].run(request, click.echo)
    except KeyboardInterrupt:
        _interrupted("run the same command again: the screen's finished models are kept")


@stage("finetune")
def finetune(request):
    """Train unfrozen variants end to end: backbones -> taps -> pooling -> normalisation -> head.

    Writes the same run record as fuse-train, so featcache runs lists both side by side.
    """
    try:
        [run] = STAGES["finetune"].run(request, click.echo).runs
    except KeyboardInterrupt:
        _interrupted("run the same command with --resume to continue from the last epoch")
    click.echo(f"run written to {run}")


@stage("report")
def report(request):
    """Write one self-contained HTML page comparing runs: table, curves, confusion matrices,
    per-class scores, predictions, Grad-CAM, architecture and where time went."""
    STAGES["report"].run(request, lambda m: click.echo(m, err=True))


@stage("predict")
def predict(request):
    """Classify images with a run's backbones, preprocessing and head.

    Each IMAGE is a file, a folder (every image inside, recursively) or a quoted glob
    pattern such as 'photos/**/*.jpg'. Prints one tab-separated line per image: file, label,
    probability (with --top-k K, the K most probable labels each with its probability);
    --output FILE also writes them as CSV or Parquet.
    """
    for line in STAGES["predict"].run(request, click.echo).outputs:
        click.echo(line)
    if request.output is not None:
        click.echo(f"written {request.output}", err=True)


RUN_HELP = """Run a study's pipeline file (TOML) stage by stage: extract, sweep, fuse-train, finetune, report.

    Caches and runs that already exist are reused; a summary says what ran and what was
    reused. Each stage table holds its command's options, e.g. image-size = 128.

    A quick trial of a study before the real run (small subsets, one epoch, no download
    of weights):
    \b
      featcache run pipelines/mobilenetv2_early_late.toml --set weights=random \\
          --set limit-train=500 --set limit-test=100 --set epochs=1
    """


def run_command(request):
    from featcache.pipeline.files import load_pipeline, parse_override, run_pipeline, stage_options, summary

    overrides = dict(parse_override(text) for text in request.set)
    pipeline = load_pipeline(request.pipeline, overrides)
    for key, text in pipeline.info.items():
        click.echo(f"{key}: {text}")
    if overrides:
        click.echo("overrides: " + ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                             for k, v in overrides.items()))
    if request.dry_run:
        for item in pipeline.stages:
            click.echo(f"{item.kind} #{item.index}")
            for line in stage_options(item):
                click.echo(f"  {line}")
        click.echo("(dry run: nothing ran; options at their defaults are not listed)")
        return
    results = run_pipeline(pipeline, log=lambda m: click.echo(m, err=True))
    click.echo(summary(results))


run_command.__doc__ = RUN_HELP
cli.add_command(request_command("run", PipelineRequest, run_command))


def main():
    cli(prog_name="featcache")
