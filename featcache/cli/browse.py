"""Commands that look rather than train: the datasets, the backbones, a cache file, the runs.

Registered on the ``featcache`` group (cli.group); each imports its stage module when run,
so ``featcache --help`` does not load torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from featcache.cli.group import cli
from featcache.errors import FeatcacheError


@cli.command()
@click.argument("name", required=False)
def datasets(name):
    """List the dataset sources (--dataset NAME); NAME shows one: what it reads, its splits, its label type.

    torchvision's datasets load from a local directory in their own format (--data-dir; --download where
    torchvision can), with their official splits: a dataset's own validation split is the validation split,
    elsewhere validation is carved from train. hf, manifest and webdataset read Hugging Face datasets, CSV /
    Parquet manifests and WebDataset shards.
    """
    from featcache.data.datasets import DATASETS

    if name:
        entry = DATASETS.lookup(name)
        lines = entry.describe(name) if entry.describe else [f"{name}: {entry.about}"]
        click.echo("\n".join(lines))
        return
    for key in sorted(DATASETS):
        click.echo(f"{key:<14} {DATASETS[key].about}")


@cli.command()
@click.argument("name", required=False)
@click.option("--all", "show_all", is_flag=True,
              help="List every usable name (torchvision classification models, and timm:NAME when timm is "
                   "installed); NAME is then a pattern such as 'convnext*'.")
@click.option("--sizes", is_flag=True,
              help="With --all: each model's parameters and input size, from a build on the meta device (nothing "
                   "downloaded; at most 300 models: narrow the pattern).")
@click.option("--sort", type=click.Choice(["name", "params", "input"]), default=None,
              help="With --all: order by name, parameters or input size (implies --sizes).")
@click.option("--modules", "modules", is_flag=True,
              help="With NAME: every module of the model with its output shape for one image (from a pass on the "
                   "meta device: nothing downloaded) and how it would be pooled as a --module tap.")
@click.option("--download", is_flag=True,
              help="hf:ORG/NAME: fetch the model's config and weights into the Hugging Face cache if missing "
                   "(without it, nothing is fetched).")
def backbones(name, show_all, sizes, sort, modules, download):
    """List the declared backbones with their taps; NAME shows any backbone's taps (nothing is downloaded).

    Any torchvision classification model, any timm model (timm:NAME), a Hugging Face transformers vision model
    (hf:ORG/NAME from the local cache, or hf:FOLDER) and an OpenCLIP image tower (openclip:ARCH[/TAG]) can be
    extracted; their taps are found from the model: the output of each stage where the stride changes, or a
    transformer's blocks, named stage1..N / block1..N with the aliases early, mid and late. Any other module is
    a tap with --module NAME (--modules lists them).
    """
    from featcache.backbones.registry import BACKBONES, listing
    from featcache.backbones.sources.hf_models import allow_downloads

    allow_downloads(download)
    if (sizes or sort) and not show_all:
        raise FeatcacheError("--sizes and --sort go with --all: featcache backbones --all 'resnet*' --sort params")
    if modules:
        if not name or show_all:
            raise FeatcacheError("--modules lists one model's modules: featcache backbones NAME --modules")
        _show_modules(BACKBONES.lookup(name))
        return
    if show_all:
        pattern = name or "*"
        rows = listing(pattern)
        if not rows:
            raise FeatcacheError(f"no backbone matches {pattern!r}: featcache backbones --all lists every name")
        if not (sizes or sort):
            for n, source in rows:
                click.echo(f"{n:<48} {source}")
            click.echo(f"{len(rows)} backbones", err=True)
            return
        _sized(rows, sort or "name", pattern)
        return
    for spec in [BACKBONES.lookup(name)] if name else [BACKBONES[n] for n in sorted(BACKBONES)]:
        _show_backbone(spec)


MOST_SIZED = 300  # each size is a build on the meta device: about 0.05-0.5 s a model


def _sized(rows: list[tuple[str, str]], sort: str, pattern: str) -> None:
    """The listing with each model's parameters and input size, ordered by ``sort``."""
    from tqdm.auto import tqdm

    from featcache.backbones.sources import size_of

    if len(rows) > MOST_SIZED:
        raise FeatcacheError(f"{pattern!r} matches {len(rows)} models; sizes are built for at most {MOST_SIZED}: "
                             f"narrow the pattern (e.g. 'timm:convnext*')")
    table = []
    for n, source in tqdm(rows, desc="sizes", unit="model", leave=False, disable=len(rows) < 20):
        params, size = size_of(n)
        table.append((n, source, params, size))
    key = {"name": lambda r: r[0], "params": lambda r: (r[2] is None, r[2] or 0),
           "input": lambda r: (r[3] is None, r[3] or 0)}[sort]
    click.echo(f"{'backbone':<48} {'source':<12} {'params':>9} {'input':>6}")
    for n, source, params, size in sorted(table, key=key):
        shown = f"{params / 1e6:.1f}M" if params is not None else "?"
        click.echo(f"{n:<48} {source:<12} {shown:>9} {size or '?':>6}")
    click.echo(f"{len(table)} backbones (parameters and input size from a build on the meta device)", err=True)


def _show_backbone(spec) -> None:
    from featcache.backbones.weights import input_defaults, tags

    known = tags(spec)
    pretrained = f"weights: {', '.join(known[:6])}{' ...' if len(known) > 6 else ''}" if known else "no pretrained weights"
    click.echo(f"{spec.name}  ({spec.model_source}; {pretrained})")
    if spec.input is not None:
        d = input_defaults(spec, "imagenet" if known else "random")
        resize = ", stretched" if d.get("resize") == "stretch" else ""
        click.echo(f"  input {d['image_size']} px{' (fixed)' if spec.input.fixed_size else ''}{resize}, "
                   f"{d['interpolation']}, crop {d['crop_pct']:g}, mean {_triple(d['mean'])}, std {_triple(d['std'])}")
    for uniform, tap in zip(spec.uniform_names, spec.taps):  # its one name (the cache's, every table's) first
        names = list(dict.fromkeys([tap.node, uniform, spec.alias_of(tap.node)]))
        unit = "width" if tap.layout in ("tokens", "embedding") else "channels"
        click.echo(f"  {' = '.join(names):<16} {tap.channels:>5} {unit:<8}  stride {tap.stride:>2}  {tap.graph_node}")


def _show_modules(spec) -> None:
    """Every module with its output shape and what ``--module`` would make of it."""
    from featcache.backbones.modules import layout_of, module_shapes

    taps = {t.graph_node: t.node for t in spec.taps}
    rows = module_shapes(spec)
    shapes = dict(rows)
    width = min(60, max(len(n) for n, _ in rows))
    what = {"nchw": "map", "nhwc": "map (NHWC)", "tokens": "tokens", "embedding": "vector, kept whole"}
    for module, shape in rows:
        layout = layout_of(spec, shape, shapes)
        shown = "x".join(str(d) for d in shape[1:]) if isinstance(shape, tuple) else shape or "no tensor"
        note = f"tap {taps[module]}" if module in taps else what.get(layout, "cannot be pooled")
        click.echo(f"{module:<{width}}  {shown:<16} {note}")
    click.echo(f"{len(rows)} modules of {spec.name}; cache one with --module NAME (NAME:cls and the other poolings "
               f"pool it its own way, NAME@NORM passes it through module NORM first)", err=True)


def _triple(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Everything as JSON, the whole fingerprint included.")
def info(path, as_json):
    """Show a cache file's splits, taps (in network order, dead ones flagged), shapes, dtype and fingerprint.

    PATH may be a folder: every cache file in it (and below) is shown.
    """
    import json

    from featcache.extraction.reader import FeatureCache

    files = sorted(p for p in path.rglob("*") if p.suffix in (".h5", ".partial")) if path.is_dir() else [path]
    if not files:
        raise FeatcacheError(f"no cache files in {path}: run featcache extract first")
    summaries = []
    for file in files:
        with FeatureCache(file, allow_partial=True) as cache:
            if as_json:
                summaries.append(cache.summary())
            else:
                click.echo(cache.describe())
    if as_json:
        click.echo(json.dumps(summaries if path.is_dir() else summaries[0], indent=2, sort_keys=True))


@cli.command()
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--pipeline", default=None, help="Only the runs of this pipeline (the folder --runs-dir/NAME).")
@click.option("--sort", default=None, metavar="COLUMN",
              help="Sort by a column: accuracies best first, fit_s fastest first, text A to Z (e.g. test_acc).")
@click.option("--columns", default=None, metavar="A,B,C",
              help="Columns to show, of: run, label, dataset, backbones, weights, taps, fusion, head, chosen, variant, "
                   "val_acc, test_acc, macro_f1, fit_s, warnings [default: label, chosen, the scores, fit_s, warnings, run].")
@click.option("--width", type=int, default=None,
              help="Fit the table in this many characters [default: the terminal's width, 100 when unknown].")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Also write the whole table as CSV here.")
def runs(runs_dir, pipeline, sort, columns, width, csv_path):
    """Print the comparison table of every run: a short label, what validation chose, val and test accuracy,
    macro-F1, fit seconds, warnings, and the run folder.

    Runs are found in --runs-dir and one folder down, where `featcache run` keeps a pipeline's runs.
    A label gains the settings that tell two runs apart, and the time only when nothing else does.
    """
    import shutil

    from featcache.runs.comparison import as_text, pick, runs_table
    from featcache.runs.records import no_runs, pipeline_runs

    runs_dir = pipeline_runs(runs_dir, pipeline)
    unreadable: list = []
    table = runs_table(runs_dir, unreadable)
    for folder, why in unreadable:
        click.echo(f"warning: {folder} left out: {why}", err=True)
    if table.empty:
        raise no_runs(runs_dir, "train some with featcache fuse-train")
    shown = pick(table, columns, sort)
    # a terminal's own width; 100 where there is none (a pipe, a file: COLUMNS from a shell is not the reader's)
    click.echo(as_text(shown, width or (shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100)))
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"written {csv_path}")


@cli.group()
def cache():
    """List the cache files of a folder, what uses them, and remove the ones you name.

    \b
    featcache cache list                         every cache: size, age, the runs and sweeps that read it
    featcache cache prune --unused --dry-run     what --unused would remove, removing nothing
    featcache cache prune --older-than 30d --larger-than 1G
    """


_CACHE_DIR = click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
                          help="The folder featcache extract writes caches to.")
_RUNS_DIR = click.option("--runs-dir", "runs_dirs", type=click.Path(path_type=Path), multiple=True,
                         default=(Path("runs"),), show_default=True,
                         help="Runs folders whose runs, sweeps and rankings count as users of a cache; repeat for "
                              "several.")


@cache.command("list")
@_CACHE_DIR
@_RUNS_DIR
@click.option("--json", "as_json", is_flag=True, help="Every cache as JSON.")
def cache_list(cache_dir, runs_dirs, as_json):
    """Every cache file (finished, partial, or foreign: named like one but not provably featcache's), oldest first: dataset, backbone, size, age, users."""
    import json
    import time

    from featcache.extraction.housekeeping import human_age, human_size, list_caches

    caches = list_caches(cache_dir, list(runs_dirs))
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in caches], indent=2))
        return
    now = time.time()
    for c in caches:
        used = f"{len(c.users)} user{'s' if len(c.users) != 1 else ''}" if c.users else "unused"
        click.echo(f"{human_size(c.size):>10}  {human_age(now - c.modified):>4}  {c.state:<8}  {used:<8}  "
                   f"{c.dataset}/{c.path.name}")
    click.echo(f"{len(caches)} cache files, {human_size(sum(c.size for c in caches))} in {cache_dir} "
               f"({sum(not c.users for c in caches)} unused by any run, sweep or ranking in "
               f"{', '.join(map(str, runs_dirs))})")


@cache.command("prune")
@_CACHE_DIR
@_RUNS_DIR
@click.option("--older-than", default=None, metavar="AGE", help="Written longer ago than this: 30d, 12h, 2w.")
@click.option("--larger-than", default=None, metavar="SIZE", help="Larger than this: 500M, 2G.")
@click.option("--unused", is_flag=True, help="Read by no run, sweep or ranking in --runs-dir.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(cache_dir, runs_dirs, older_than, larger_than, unused, dry_run):
    """Remove the cache files that meet every criterion given (at least one), with their timing files.

    A cache another featcache process is writing is left alone. Only files featcache provably wrote are ever
    removed: named as it names caches (BACKBONE-HASH.h5, .h5.partial), with the fingerprint that hash stands
    for inside. A filesystem root or the home folder is refused as --cache-dir.
    """
    from featcache.extraction.housekeeping import (chosen, human_size, list_caches, parse_age, parse_size,
                                                   prunable_folder, remove)

    age = parse_age(older_than) if older_than is not None else None
    size = parse_size(larger_than) if larger_than is not None else None
    caches = list_caches(prunable_folder(cache_dir), list(runs_dirs))
    doomed = chosen(caches, age, size, unused)
    foreign = [c for c in caches if c.state == "foreign"]
    if foreign:
        click.echo(f"left {len(foreign)} file(s) named like caches that featcache cannot prove it wrote (no "
                   f"fingerprint matching the name), e.g. {foreign[0].path}")
    freed, busy = 0, []
    for c in doomed:
        if dry_run:
            click.echo(f"would remove {c.path} ({human_size(c.size)})")
            freed += c.size
        elif remove(c):
            click.echo(f"removed {c.path} ({human_size(c.size)})")
            freed += c.size
        else:
            busy.append(c)
            click.echo(f"left {c.path}: another featcache process is writing it")
    verb = "would free" if dry_run else "freed"
    click.echo(f"{len(doomed) - len(busy)} cache files, {verb} {human_size(freed)}")
