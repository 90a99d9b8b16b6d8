"""A study as one declarative TOML file, run stage by stage: extract, sweep, fuse-train,
finetune, report.

Flow: pipelines/*.toml -> **pipeline** -> the stages, through the CLI's own flag parsing.
A stage table holds its command's options under their flag names (``image-size = 128``
is ``--image-size 128``; lists repeat a flag; ``true`` sets a switch), so defaults, types
and checks are the command's own and cannot drift. ``[defaults]`` applies to every stage
whose command takes the option. Stages run in flow order, each table in file order.

Nothing is done twice: extraction reuses caches by their fingerprint; a training stage
is looked up in ``<runs-dir>/pipeline-ledger.json`` by a hash of all its resolved
options and its inputs' fingerprints, and reused when its run folders are still there. An interrupted fine-tune
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import click

from featcache.cli.ledger import recorded, remember, stage_key
from featcache.cli.stages import STAGES, Outcome, with_runs
from featcache.errors import FeatcacheError, closest

SECTIONS = ("pipeline", "defaults", *STAGES)
PIPELINE_KEYS = ("name", "description", "reproduces", "reported", "runs-dir")
# A pipeline file is shared: it cannot ask to load pickles (which can run code), only a person can.
COMMAND_LINE_ONLY = ("trust-pickles",)


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
    params: dict  # parsed by the command's click options
    config: object  # built from params once, when the file is loaded


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    info: dict  # description, reproduces, reported
    runs_dir: Path
    stages: list[Stage]


def _options(command: click.Command) -> dict[str, click.Option]:
    """Flag name without dashes -> option, e.g. "image-size"; never one a shared file must not set."""
    out = {}
    for param in command.params:
        if isinstance(param, click.Option):
            long = [o for o in param.opts if o.startswith("--")]
            if long and long[0][2:] not in COMMAND_LINE_ONLY:
                out[long[0][2:]] = param
        elif isinstance(param, click.Argument):
            out[param.name.replace("_", "-")] = param
    return out


def _fail(path: Path, where: str, message: str) -> FeatcacheError:
    return FeatcacheError(f"{path}: {where}: {message}")


def _unknown_key(path: Path, where: str, key: str, known) -> FeatcacheError:
    guess = closest(key.replace("_", "-"), known)
    hint = f"; did you mean '{guess}'?" if guess else f" (known: {', '.join(sorted(known))})"
    return _fail(path, where, f"unknown key '{key}'{hint}")


def _args(path: Path, where: str, table: dict, options: dict) -> list[str]:
    """The command line that a stage table stands for; bad keys and types name the key."""
    args, positional = [], []
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key not in options:
            raise _unknown_key(path, where, raw_key, options)
        option = options[key]
        if isinstance(option, click.Argument):
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise _fail(path, where, f"{raw_key} takes a string or a list of strings. Got {value!r} instead")
            positional += values
            continue
        flag = f"--{key}"
        if option.is_flag:
            if not isinstance(value, bool):
                raise _fail(path, where, f"{raw_key} is a switch: true or false. Got {value!r} instead")
            if value:
                args.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not option.multiple and len(value) != 1:
            raise _fail(path, where, f"{raw_key} takes one value. Got a list of {len(value)} instead")
        for v in values:
            if isinstance(v, (dict, list, bool)) or v is None:
                raise _fail(path, where, f"{raw_key} takes a number or a string. Got {v!r} instead")
            args += [flag, str(v)]
    return args + positional


def _parse(path: Path, where: str, command: click.Command, table: dict, overridden=()) -> dict:
    """Parse a stage table with the command's own option parser; return its params."""
    options = _options(command)
    args = _args(path, where, table, options)
    try:
        ctx = command.make_context(command.name, args)
    except click.BadParameter as exc:
        key = (exc.param.opts[0].lstrip("-") if exc.param is not None and exc.param.opts else "value")
        if key in overridden:  # the value came from the command line, not the file
            raise FeatcacheError(f"--set {key}=...: {exc.format_message()}") from None
        raise _fail(path, f"{where} {key}", exc.format_message()) from None
    except click.UsageError as exc:
        raise _fail(path, where, exc.format_message()) from None
    return dict(ctx.params)


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


def _override(table: dict, overrides: dict, options: dict) -> dict:
    """The table with every override its command takes, replacing the key however it was spelled."""
    mine = {k: v for k, v in overrides.items() if k in options}
    return {**{k: v for k, v in table.items() if k.replace("_", "-") not in mine}, **mine}


def load_pipeline(path: Path, commands: dict[str, click.Command], overrides: dict | None = None) -> Pipeline:
    """Read and check a pipeline file: every stage is parsed before anything runs.

    ``commands`` are the click commands of the stages (``cli.commands``): a table is parsed
    by its command's own options, so a file says exactly what the command line can.
    ``overrides`` (flag name -> value, from ``--set``) win over ``[defaults]`` and the stage
    tables, in every stage whose command takes the option.
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
        stage_list = section in STAGES and STAGES[section].repeatable
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
    if not any(s in data for s in STAGES):
        raise _fail(path, "stages",
                    "none found: add [[extract]], [[sweep]], [[fuse-train]], [[finetune]] or [report]")
    defaults = data.get("defaults", {})
    known = set().union(*(_options(commands[s]) for s in STAGES))
    for key in defaults:
        if key.replace("_", "-") not in known:
            raise _unknown_key(path, "[defaults]", key, known)
    for key in overrides:
        if key not in known:
            raise _unknown_key(path, "--set", key, known)
    runs_dir = Path(overrides.get("runs-dir", head.get("runs-dir", f"runs/{head['name']}")))
    stages = []
    for stage in STAGES:
        tables = data.get(stage, [])
        for index, table in enumerate(tables if isinstance(tables, list) else [tables], start=1):
            options = _options(commands[stage])
            merged = {k: v for k, v in defaults.items() if k.replace("_", "-") in options}
            if "runs-dir" in options:
                merged["runs-dir"] = str(runs_dir)
            if stage == "finetune":
                merged["resume"] = True  # an interrupted pipeline continues where it stopped
            if stage == "report":
                merged.update({"out": f"reports/{head['name']}.html", "title": head["name"]})
            merged = _override({**merged, **table}, overrides, options)
            where = f"[{stage}]" if not isinstance(tables, list) else f"[[{stage}]] #{index}"
            params = _parse(path, where, commands[stage], merged, overrides)
            try:  # the stage's own config checks, before anything runs
                config = STAGES[stage].build(params)
            except FeatcacheError as exc:
                raise _fail(path, where, str(exc)) from None
            stages.append(Stage(stage, index, params, config))
    info = {k: head[k] for k in ("description", "reproduces", "reported") if k in head}
    return Pipeline(path, head["name"], info, runs_dir, stages)


def run_pipeline(pipeline: Pipeline, log=print) -> list[StageResult]:
    """Run every stage, reusing what exists; return what each stage did."""
    results: list[StageResult] = []
    runs: list[Path] = []  # this pipeline's run folders, in stage order
    for stage in pipeline.stages:
        log(f"== {stage.kind} #{stage.index}")
        started = time.perf_counter()
        spec = STAGES[stage.kind]
        if spec.takes_runs and not stage.config.runs and not runs:
            raise _fail(pipeline.path, f"[{stage.kind}]", "no runs to report: add a fuse-train or finetune stage")
        config = with_runs(spec, stage.config, runs, pipeline.runs_dir)
        key = stage_key(stage) if spec.reuse == "ledger" else None
        names = recorded(Path(config.runs_dir), key) if key else None
        if names is not None:
            outcome = Outcome("reused", [str(Path(config.runs_dir) / n) for n in names],
                              [Path(config.runs_dir) / n for n in names])
        else:
            outcome = spec.run(config, stage.params, log)
            if key:
                remember(Path(config.runs_dir), key,
                          {"stage": stage.kind, "pipeline": pipeline.name, "runs": [p.name for p in outcome.runs]})
        runs += outcome.runs
        results.append(StageResult(stage.kind, stage.index, outcome.status, time.perf_counter() - started,
                                   outcome.outputs))
    return results


def stage_options(stage: Stage, command) -> list[str]:
    """``name = value`` (TOML, as a pipeline file writes it) for each option of a stage that differs from
    its command's default, for ``run --dry-run``."""
    lines = []
    for param in command.params:
        value = stage.params.get(param.name)
        default = param.default() if callable(param.default) else param.default
        if param.multiple:  # no default given: click's own "unset" marker, which is not a tuple
            default = tuple(default) if isinstance(default, (list, tuple)) else ()
        if value in (None, (), False) or value == default:
            continue
        name = next((o[2:] for o in param.opts if o.startswith("--")), param.name)
        value = list(value) if isinstance(value, tuple) else value
        lines.append(f"{name} = {json.dumps(value, default=str)}")
    return lines


def summary(results: list[StageResult]) -> str:
    lines = [f"{'stage':<14}{'status':<8}{'seconds':>9}  outputs"]
    for r in results:
        first, *rest = r.outputs or ["-"]
        lines.append(f"{r.stage + ' #' + str(r.index):<14}{r.status:<8}{r.seconds:>9.1f}  {first}")
        lines += [f"{'':<31}{o}" for o in rest]
    ran = sum(r.status == "ran" for r in results)
    lines.append(f"{ran} stage{'s' if ran != 1 else ''} ran, {len(results) - ran} reused")
    return "\n".join(lines)
