"""Every stage of the stage table, built from the command line, the Python API and a pipeline table: the same
request from all three, and each request runs (issue 39: a `[[rank]]` table once crashed every pipeline because
no test built each stage from a table)."""

import dataclasses
from pathlib import Path

import pytest
import source_fixtures as fx
from click.testing import CliRunner

from featcache.pipeline.stages import STAGES
from featcache.requests import API, build


class Built(Exception):
    """Raised with the request the command line built, before anything runs."""


def _values() -> dict[str, dict]:
    """Per stage, typed values (as the API takes them) for a tiny run; every stage in the table has an entry.
    Paths are relative (a pipeline file writes only below the folder it runs in)."""
    data = {"data_dir": Path("photos"), "backbone": ("tiny",), "weights": "random", "image_size": 16,
            "cache_dir": Path("cache"), "precision": "fp32", "dtype": "float32"}
    runs = Path("runs")
    return {
        "extract": {**data, "device": "cpu", "num_workers": 0, "quiet": True},
        "fuse-train": {**data, "device": "cpu", "taps": ("late",), "head": ("logreg",), "runs_dir": runs,
                       "val_fraction": 0.25, "quiet": True},
        "sweep": {**data, "device": "cpu", "combos": "singles", "head": ("logreg",), "runs_dir": runs,
                  "val_fraction": 0.25, "keep": 0, "quiet": True},
        "finetune": {**data, "device": "cpu", "epochs": 1, "hidden": (8,), "num_workers": 0, "runs_dir": runs,
                     "val_fraction": 0.25, "resume": True, "quiet": True},
        "rank": {**data, "device": "cpu", "score": ("hscore",), "num_workers": 0, "runs_dir": runs,
                 "val_fraction": 0.25, "quiet": True},
        "similarity": {**data, "device": "cpu", "runs_dir": runs, "quiet": True},
        "choose": {**data, "device": "cpu", "score": ("logme", "sfda"), "num_workers": 0, "runs_dir": runs,
                   "cv": 2, "budget": "30", "quiet": True},
        "report": {"runs_dir": runs, "out": Path("r.html"), "title": "fronts", "grid_images": 0,
                   "gradcam_images": 0, "device": "cpu"},
        "predict": {"run": "RUN", "images": ("photos",), "runs_dir": runs, "device": "cpu"},
    }


def _cli_args(cls, values: dict) -> list[str]:
    from featcache.requests import params

    flags = {p.name: p for p in params(cls)}
    args = []
    for name, value in values.items():
        p = flags[name]
        if p.meta.argument:
            continue
        if p.is_flag:
            args += [f"--{p.flag}"] if value else []
        elif p.multiple:
            for v in value:
                args += [f"--{p.flag}", str(v)]
        elif isinstance(value, tuple):
            args += [f"--{p.flag}", ",".join(map(str, value))]
        else:
            args += [f"--{p.flag}", str(value)]
    positional = [str(v) for name, value in values.items() if flags[name].meta.argument for v in value]
    return args + positional


def _toml(values: dict) -> str:
    import json

    from featcache.requests import params

    lines = []
    for name, value in values.items():
        value = [str(v) if isinstance(v, Path) else v for v in value] if isinstance(value, tuple) else \
            str(value) if isinstance(value, Path) else value
        lines.append(f"{name.replace('_', '-')} = {json.dumps(value)}")
    assert params  # the keys are the fields' names with dashes, as a pipeline file spells them
    return "\n".join(lines)


def test_every_stage_builds_the_same_request_from_every_front_and_runs(tmp_path, monkeypatch):
    import featcache.cli.generate as generate
    from featcache.cli.commands import cli
    from featcache.pipeline.files import load_pipeline

    fx.as_folder(tmp_path / "photos", fx.sample_images(per_class=6))
    values = _values()
    assert set(values) == set(STAGES), "a stage of the table has no entry here"
    real = generate.build

    def stop(cls, given, front):
        raise Built(real(cls, given, front))

    monkeypatch.chdir(tmp_path)
    for name, spec in STAGES.items():
        given = values[name]
        if name == "predict":  # a run that exists by now
            given = {**given, "run": str(next(p for p in (tmp_path / "runs").glob("[!.]*") if p.name != "sweeps"
                                             and p.name not in ("ranks", "choices", "similarity")))}
        from_api = build(spec.request, given, API)
        monkeypatch.setattr(generate, "build", stop)
        result = CliRunner().invoke(cli, [name, *_cli_args(spec.request, given)])
        monkeypatch.setattr(generate, "build", real)
        assert isinstance(result.exception, Built), (name, result.output)
        from_cli = result.exception.args[0]
        assert from_cli == from_api, name
        if spec.in_pipeline:
            table = f"[[{name}]]" if spec.repeatable else f"[{name}]"
            (tmp_path / "p.toml").write_text(f'[pipeline]\nname = "fronts"\n{table}\n{_toml(given)}\n')
            [stage] = load_pipeline(tmp_path / "p.toml").stages
            assert stage.request == from_api, (name, _differ(stage.request, from_api))
        outcome = spec.run(from_api, lambda message: None)  # what every front calls with that request
        assert outcome.status in ("ran", "reused"), name


def _differ(a, b) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("name", sorted(n for n, s in STAGES.items() if hasattr(s.request, "config")))
def test_every_request_makes_its_runners_config_by_the_one_rule(name, monkeypatch):
    """config() goes through requests.carried: every field the runner's config shares with the request by name
    is the request's value, so nothing is copied by hand (a rank request is its own config)."""
    import sys

    import featcache.requests as requests

    calls, real = [], requests.carried

    def recording(target, request, **given):
        calls.append((target, type(request)))
        return real(target, request, **given)

    for module in {sys.modules[c.__module__] for c in STAGES[name].request.__mro__ if c.__module__.startswith("featcache")}:
        if hasattr(module, "carried"):
            monkeypatch.setattr(module, "carried", recording)
    values = {"backbone": ("tiny",)} if "backbone" in {f.name for f in dataclasses.fields(STAGES[name].request)} else {}
    request = build(STAGES[name].request, values, API)
    config = request.config()
    if config is request:  # nothing to make: the runner takes the request
        return
    assert (type(config), type(request)) in calls, (name, calls)
