"""The one stage table: each stage's name, config builder, runner and reuse rule.

Both the commands (``featcache extract`` ...) and ``featcache run`` go through it. Adding a
stage is one entry here, its builder in flags and its click command; the pipeline learns of
it from this table and from the commands it is handed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from featcache.cli import flags


@dataclass(frozen=True)
class Outcome:
    """What one stage did: "ran" or "reused", the lines to show, the run folders it wrote or reused."""

    status: str
    outputs: list[str]
    runs: list[Path]


@dataclass(frozen=True)
class StageSpec:
    """One stage of the flow.

    Args:
        name: the command's name, and the pipeline table's (``[[fuse-train]]``).
        build: the command's parsed parameters -> the stage's frozen config.
        run: ``(config, params, log) -> Outcome``.
        reuse: "cache" (the stage serves an identical request from its own cache), "ledger"
            (the pipeline remembers the runs an identical request wrote), "itself" (the sweep keeps its
            finished evaluations in its folder, and its kept runs are served as fuse-train serves them) or
            "never".
        repeatable: a pipeline may hold several tables of it (``[[extract]]``).
        takes_runs: in a pipeline, a config without runs gets the runs of the stages before it.
    """

    name: str
    build: Callable[[dict], object]
    run: Callable[[object, dict, Callable], Outcome]
    reuse: str
    repeatable: bool = True
    takes_runs: bool = False


def _extract(config, params, log) -> Outcome:
    # Stage modules load torch: imported when a stage runs, so `featcache --help` starts fast.
    from featcache.extraction.run import extract

    done = extract(config, progress=not params.get("quiet", False), log=log)
    status = "reused" if all(r.status == "cached" for r in done) else "ran"
    return Outcome(status, [f"{r.backbone}: {r.status} {r.path}" for r in done], [])


def _fuse_train(config, params, log) -> Outcome:
    from featcache.fuse.train import fuse_train

    if config.taps == ("auto",):  # chosen on validation first (the sweep's probes), then trained as asked
        from featcache.sweep.select import choose_taps

        config = choose_taps(config, log)
    runs = fuse_train(config, log=log)
    return Outcome("ran", [str(r) for r in runs], runs)


def _sweep(config, params, log) -> Outcome:
    from featcache.records import run_folders
    from featcache.sweep.run import sweep_and_keep

    before = set(run_folders(config.runs_dir))
    folder, computed, kept = sweep_and_keep(config, log=log, progress=not params.get("quiet", False))
    fresh = computed or any(run not in before for run in kept)  # else every evaluation and kept run was there
    return Outcome("ran" if fresh else "reused", [str(folder), *map(str, kept)], kept)


def _finetune(config, params, log) -> Outcome:
    from featcache.finetuning.run import finetune

    run = finetune(config, log=log, progress=not params.get("quiet", False))
    return Outcome("ran", [str(run)], [run])


def _report(config, params, log) -> Outcome:
    from featcache.reporting.page import write_report

    out = write_report(config, log=log)
    return Outcome("ran", [str(out), str(Path(out).with_suffix(".csv"))], [])


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("extract", flags.extract_config, _extract, reuse="cache"),
    StageSpec("sweep", flags.sweep_config, _sweep, reuse="itself"),
    StageSpec("fuse-train", flags.fuse_train_config, _fuse_train, reuse="ledger"),
    StageSpec("finetune", flags.finetune_config, _finetune, reuse="ledger"),
    StageSpec("report", flags.report_config, _report, reuse="never", repeatable=False, takes_runs=True),
)}


def with_runs(spec: StageSpec, config, runs: list[Path], runs_dir: Path):
    """A report-like stage's config, given the earlier stages' runs when it names none."""
    if spec.takes_runs and not config.runs:
        return replace(config, runs=tuple(str(r) for r in runs), runs_dir=runs_dir)
    return config
