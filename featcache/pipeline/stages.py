"""The one stage table: each stage's name, request, runner and reuse rule.

Inside the pipeline package, above every stage: the command line (``featcache extract`` ...), the
Python API (``featcache.extract(...)``) and pipeline files (``[[extract]]``) all go through it, each
building the stage's request with :func:`featcache.requests.build`. Adding a stage is one request
class and one entry here; its command, API function and pipeline table follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from featcache.choosing.request import ChooseRequest
from featcache.extraction.request import ExtractRequest
from featcache.finetuning.request import FinetuneRequest
from featcache.fuse.request import FuseRequest
from featcache.ranking.request import RankRequest
from featcache.reporting.request import ReportRequest
from featcache.runs.request import PredictRequest
from featcache.sweeping.request import SimilarityRequest, SweepRequest


@dataclass(frozen=True)
class Outcome:
    """What one stage did: "ran" or "reused", the lines to show, the run folders it wrote or reused, and the
    stage's own result (for the API: the cache paths, the sweep folder, ...)."""

    status: str
    outputs: list[str]
    runs: list[Path]
    result: object = None


@dataclass(frozen=True)
class StageSpec:
    """One stage of the flow.

    Args:
        name: the command's name, the API function's (dashes as underscores) and the pipeline table's.
        request: the request class; its fields are the command's options, the API's keywords and the
            table's keys.
        run: ``(request, log) -> Outcome``.
        reuse: "cache" (the stage serves an identical request from its own cache), "ledger" (the pipeline
            remembers the runs an identical request wrote), "itself" (the sweep keeps its finished
            evaluations in its folder, and its kept runs are served as fuse-train serves them) or "never".
        repeatable: a pipeline may hold several tables of it (``[[extract]]``).
        takes_runs: in a pipeline, a request without runs gets the runs of the stages before it.
        in_pipeline: a pipeline file may hold it.
    """

    name: str
    request: type
    run: Callable[[object, Callable], Outcome]
    reuse: str
    repeatable: bool = True
    takes_runs: bool = False
    in_pipeline: bool = True


def _extract(request: ExtractRequest, log) -> Outcome:
    # Stage modules load torch: imported when a stage runs, so `featcache --help` starts fast.
    from featcache.extraction.run import extract

    done = extract(request.config(), progress=not request.quiet, log=log)
    status = "reused" if all(r.status == "cached" for r in done) else "ran"
    return Outcome(status, [f"{r.backbone}: {r.status} {r.path}" for r in done], [], done)


def _fuse_train(request: FuseRequest, log) -> Outcome:
    from featcache.fuse.train import fuse_train

    config = request.config()
    if config.taps == ("auto",):  # chosen on validation first (the sweep's probes), then trained as asked
        from featcache.sweeping.select import choose_taps

        config = choose_taps(config, log)
    runs = fuse_train(config, log=log)
    return Outcome("ran", [str(r) for r in runs], runs, runs)


def _sweep(request: SweepRequest, log) -> Outcome:
    from featcache.runs.records import run_folders
    from featcache.sweeping.run import sweep_and_keep

    config = request.config()
    before = set(run_folders(config.runs_dir))
    folder, computed, kept = sweep_and_keep(config, log=log, progress=not request.quiet)
    fresh = computed or any(run not in before for run in kept)  # else every evaluation and kept run was there
    return Outcome("ran" if fresh else "reused", [str(folder), *map(str, kept)], kept, folder)


def _finetune(request: FinetuneRequest, log) -> Outcome:
    from featcache.finetuning.run import finetune
    from featcache.fuse.saved import trusting

    config = request.config()
    with trusting(request.trust_pickles):
        run = finetune(config, log=log, progress=not request.quiet)
    return Outcome("ran", [str(run)], [run], run)


def _report(request: ReportRequest, log) -> Outcome:
    from featcache.fuse.saved import trusting
    from featcache.reporting.page import write_report

    with trusting(request.trust_pickles):
        out = write_report(request.config(), log=log)
    return Outcome("ran", [str(out), str(Path(out).with_suffix(".csv"))], [], Path(out))


def _predict(request: PredictRequest, log) -> Outcome:
    import featcache.finetuning.saved  # noqa: F401  registers the run kinds' predictors
    import featcache.fuse.predict  # noqa: F401
    from featcache.data.datasets import image_entries
    from featcache.fuse.saved import trusting
    from featcache.runs.predict import check_output, predict_files, write_predictions
    from featcache.runs.records import resolve_run

    run = resolve_run(str(request.run), request.runs_dir)
    if request.output is not None:
        check_output(request.output, request.force)  # before any network is built
    with trusting(request.trust_pickles):
        predictions = predict_files(run, image_entries(request.images), device=request.device, top_k=request.top_k)
    if request.output is not None:
        write_predictions(request.output, predictions)
    lines = [f"{file}\t{label}\t{prob:.4f}" for file, label, prob in predictions] if request.top_k == 1 else [
        f"{file}\t" + "\t".join(f"{label}\t{prob:.4f}" for label, prob in ranked) for file, ranked in predictions]
    return Outcome("ran", lines, [], predictions)


def _rank(request: RankRequest, log) -> Outcome:
    from featcache.ranking.run import rank

    folder = rank(request, log=log, progress=not request.quiet)
    return Outcome("ran", [str(folder / "table.csv")], [], folder)


def _choose(request: ChooseRequest, log) -> Outcome:
    from featcache.choosing.run import choose

    choice = choose(request, log=log, progress=not request.quiet)
    return Outcome("reused" if choice.served else "ran", [str(choice.folder)], [], choice)


def _similarity(request: SimilarityRequest, log) -> Outcome:
    from featcache.sweeping.similarity import similarity

    table = similarity(request, log=log)
    return Outcome("ran", [str(table.attrs["folder"] / "cka.csv")], [], table)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("rank", RankRequest, _rank, reuse="itself"),
    StageSpec("choose", ChooseRequest, _choose, reuse="itself"),
    StageSpec("extract", ExtractRequest, _extract, reuse="cache"),
    StageSpec("sweep", SweepRequest, _sweep, reuse="itself"),
    StageSpec("similarity", SimilarityRequest, _similarity, reuse="never"),
    StageSpec("fuse-train", FuseRequest, _fuse_train, reuse="ledger"),
    StageSpec("finetune", FinetuneRequest, _finetune, reuse="ledger"),
    StageSpec("report", ReportRequest, _report, reuse="never", repeatable=False, takes_runs=True),
    StageSpec("predict", PredictRequest, _predict, reuse="never", in_pipeline=False),
)}


def with_runs(spec: StageSpec, request, runs: list[Path], runs_dir: Path):
    """A report-like stage's request, given the earlier stages' runs when it names none."""
    if spec.takes_runs and not request.runs:
        return replace(request, runs=tuple(str(r) for r in runs), runs_dir=runs_dir)
    return request
