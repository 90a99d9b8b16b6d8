"""A study as one declarative TOML file, run stage by stage: extract, sweep, fuse-train,
finetune, report.

Inside the pipeline package (pipelines/*.toml -> **files** -> the stage table -> the stages).
A stage table holds its stage's request fields under their flag names (``image-size = 128``
is ``--image-size 128``; a list gives a repeatable field several values; ``true`` sets a switch),
built and checked by :func:`featcache.requests.build` as the command line and the API build
them, so defaults, types and checks cannot drift. ``[defaults]`` applies to every stage whose
request has the field. Stages run in flow order, each table in file order. A shared file
cannot set what only a person may (``trust-pickles``).

Nothing is done twice: extraction reuses caches by their fingerprint; a training stage
is looked up in ``<runs-dir>/pipeline-ledger.json`` by a hash of its request and its inputs'
fingerprints, and reused when its run folders are still there. An interrupted fine-tune
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import FeatcacheError, closest
from featcache.pipeline.ledger import recorded, remember, stage_key
from featcache.pipeline.stages import STAGES, Outcome, with_runs
from featcache.requests import PIPELINE, InvalidValue, Param, build, changed, convert, params, respell, shown

PIPELINE_STAGES = {name: spec for name, spec in STAGES.items() if spec.in_pipeline}
SECTIONS = ("pipeline", "defaults", *PIPELINE_STAGES)
PIPELINE_KEYS = ("name", "description", "reproduces", "reported", "runs-dir")


@dataclass
class StageResult:
    stage: str
    index: int
    status: str  # "ran" or "reused"
    seconds: float
    outputs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    kind: str  # extract, sweep, fuse-train, finetune or report
    index: int  # 1-based among the tables of its kind
    request: object  # the stage's request, built when the file is loaded


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    info: dict  # description, reproduces, reported
    runs_dir: Path
    stages: list[Stage]


def keys(kind: str) -> dict[str, Param]:
    """Key (the flag's name, e.g. "image-size") -> field, for the fields a pipeline file may set."""
    return {p.flag: p for p in params(PIPELINE_STAGES[kind].request) if p.meta.shared}


def _fail(path: Path, where: str, message: str) -> FeatcacheError:
    return FeatcacheError(f"{path}: {where}: {message}")


def _unknown_key(path: Path, where: str, key: str, known) -> FeatcacheError:
    guess = closest(key.replace("_", "-"), known)
    hint = f"; did you mean '{guess}'?" if guess else f" (known: {', '.join(sorted(known))})"
    return _fail(path, where, f"unknown key '{key}'{hint}")


def _stays_inside(path: Path, where: str, value) -> None:
    """A path a shared pipeline file asks featcache to write to stays below the folder it runs in: relative,
    without ``..`` (the same path given with ``--set`` on the command line is the user's own choice)."""
    if isinstance(value, str) and (Path(value).is_absolute() or ".." in Path(value).parts or value.startswith("~")):
        raise _fail(path, where, f"{value!r} leaves the folder featcache runs in: a pipeline file may only write "
                                 f"below it (a relative path without '..'); give it with --set on the command "
                                 f"line if you mean it")


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from ``--set``: the value read as TOML (1, 1e-4, true, ["a", "b"]), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise FeatcacheError(f"--set takes KEY=VALUE, e.g. --set weights=random. Got {text!r} instead")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().replace("_", "-"), value


def load_pipeline(path: Path, overrides: dict | None = None) -> Pipeline:
    """Read and check a pipeline file: every stage's request is built before anything runs.

    ``overrides`` (key -> value, from ``--set``) win over ``[defaults]`` and the stage tables, in
    every stage whose request has the field.
    """
    path = Path(path)
    overrides = overrides or {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatcacheError(f"no pipeline file {path}: see pipelines/ for examples") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FeatcacheError(f"{path}: not valid TOML: {exc}") from None
    for section, value in data.items():
        if section not in SECTIONS:
            guess = closest(section, SECTIONS)
            hint = f"; did you mean [{guess}]?" if guess else f" (known: {', '.join(SECTIONS)})"
            raise _fail(path, f"[{section}]", f"unknown section{hint}")
        stage_list = section in PIPELINE_STAGES and PIPELINE_STAGES[section].repeatable
        ok = isinstance(value, dict) or (stage_list and isinstance(value, list)
                                         and all(isinstance(v, dict) for v in value))
        if not ok:
            raise _fail(path, f"[{section}]", f"must be a table{' or an array of tables' if stage_list else ''}. "
                                              f"Got {type(value).__name__} instead")
    if "pipeline" not in data:
        raise _fail(path, "[pipeline]", "missing section: start the file with [pipeline] and name = \"...\"")
    head = data["pipeline"]
    for key in head:
        if key not in PIPELINE_KEYS:
            raise _unknown_key(path, "[pipeline]", key, PIPELINE_KEYS)
        if not isinstance(head[key], str):
            raise _fail(path, f"[pipeline] {key}", f"must be a string. Got {head[key]!r} instead")
    if "name" not in head:
        raise _fail(path, "[pipeline]", "missing key 'name'")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", head["name"]) or ".." in head["name"]:
        raise _fail(path, "[pipeline] name", f"must be a plain name (letters, digits, '.', '_', '-'): it names "
                                             f"runs/NAME and reports/NAME.html. Got {head['name']!r} instead")
    if "runs-dir" in head:
        _stays_inside(path, "[pipeline] runs-dir", head["runs-dir"])
    if not any(s in data for s in PIPELINE_STAGES):
        raise _fail(path, "stages",
                    "none found: add [[extract]], [[sweep]], [[fuse-train]], [[finetune]] or [report]")
    known = {key: p for kind in PIPELINE_STAGES for key, p in keys(kind).items()}
    writes = {key for kind in PIPELINE_STAGES for key, p in keys(kind).items() if p.meta.writes}
    defaults = {k.replace("_", "-"): v for k, v in data.get("defaults", {}).items()}
    for key in data.get("defaults", {}):
        if key.replace("_", "-") not in known:
            raise _unknown_key(path, "[defaults]", key, known)
        if key.replace("_", "-") in writes:
            _stays_inside(path, f"[defaults] {key}", data["defaults"][key])
    for key, value in overrides.items():
        if key not in known:
            raise _unknown_key(path, "--set", key, known)
        try:
            convert(known[key], value)
        except InvalidValue as exc:
            raise FeatcacheError(f"--set {key}=...: Invalid value for '{key}': {shown(value)} is not {exc.what}") from None
    runs_dir = Path(overrides.get("runs-dir", head.get("runs-dir", f"runs/{head['name']}")))
    stages = []
    for kind in PIPELINE_STAGES:
        tables = data.get(kind, [])
        for index, table in enumerate(tables if isinstance(tables, list) else [tables], start=1):
            where = f"[{kind}]" if not isinstance(tables, list) else f"[[{kind}]] #{index}"
            mine = keys(kind)
            for key in table:
                if key.replace("_", "-") not in mine:
                    raise _unknown_key(path, where, key, mine)
                if mine[key.replace("_", "-")].meta.writes:
                    _stays_inside(path, f"{where} {key}", table[key])
            merged = {k: v for k, v in defaults.items() if k in mine}
            if "runs-dir" in mine:
                merged["runs-dir"] = str(runs_dir)
            if kind == "finetune":
                merged["resume"] = True  # an interrupted pipeline continues where it stopped
            if kind == "report":
                merged.update({"out": f"reports/{head['name']}.html", "title": head["name"]})
            merged.update({k.replace("_", "-"): v for k, v in table.items()})
            merged.update({k: v for k, v in overrides.items() if k in mine})
            request = build(PIPELINE_STAGES[kind].request, {mine[k].name: v for k, v in merged.items()}, PIPELINE,
                            where=f"{path}: {where}")
            try:  # the stage's own config checks, before anything runs
                request.config()
            except FeatcacheError as exc:
                raise _fail(path, where, respell(str(exc), type(request), PIPELINE)) from None
            stages.append(Stage(kind, index, request))
    info = {k: head[k] for k in ("description", "reproduces", "reported") if k in head}
    return Pipeline(path, head["name"], info, runs_dir, stages)


def run_pipeline(pipeline: Pipeline, log=print) -> list[StageResult]:
    """Run every stage, reusing what exists; return what each stage did."""
    results: list[StageResult] = []
    runs: list[Path] = []  # this pipeline's run folders, in stage order
    made: list[Path] = []  # its sweep, ranking and choice folders: a report shows them beside the runs
    for stage in pipeline.stages:
        log(f"== {stage.kind} #{stage.index}")
        started = time.perf_counter()
        spec = STAGES[stage.kind]
        if spec.takes_runs and not stage.request.runs and not runs and not made:
            raise _fail(pipeline.path, f"[{stage.kind}]", "no runs to report: add a fuse-train or finetune stage")
        request = with_runs(spec, stage.request, [*runs, *made], pipeline.runs_dir)  # what it made, and only that
        key = stage_key(stage.kind, request) if spec.reuse == "ledger" else None
        names = recorded(Path(request.runs_dir), key) if key else None
        if names is not None:
            outcome = Outcome("reused", [str(Path(request.runs_dir) / n) for n in names],
                              [Path(request.runs_dir) / n for n in names])
        else:
            outcome = spec.run(request, log)
            if key:
                remember(Path(request.runs_dir), key,
                         {"stage": stage.kind, "pipeline": pipeline.name, "runs": [p.name for p in outcome.runs]})
        runs += outcome.runs
        if stage.kind in ("sweep", "rank") and isinstance(outcome.result, Path):
            made.append(outcome.result)
        if stage.kind == "choose" and outcome.result is not None:
            made.append(outcome.result.folder)
        results.append(StageResult(stage.kind, stage.index, outcome.status, time.perf_counter() - started,
                                   outcome.outputs))
    return results


def stage_options(stage: Stage) -> list[str]:
    """``key = value`` (TOML, as a pipeline file writes it) for each field of a stage that differs from its
    default, for ``run --dry-run``."""
    flags = {p.name: p.flag for p in params(type(stage.request))}
    return [f"{flags[name]} = {json.dumps(list(value) if isinstance(value, tuple) else value, default=str)}"
            for name, value in changed(stage.request).items()]


def summary(results: list[StageResult]) -> str:
    lines = [f"{'stage':<14}{'status':<8}{'seconds':>9}  outputs"]
    for r in results:
        first, *rest = r.outputs or ["-"]
        lines.append(f"{r.stage + ' #' + str(r.index):<14}{r.status:<8}{r.seconds:>9.1f}  {first}")
        lines += [f"{'':<31}{o}" for o in rest]
    ran = sum(r.status == "ran" for r in results)
    lines.append(f"{ran} stage{'s' if ran != 1 else ''} ran, {len(results) - ran} reused")
    return "\n".join(lines)
