"""Run records -> one self-contained HTML page comparing every run, and its table as CSV.

Flow: records (+ explain for Grad-CAM, figures for the plots) -> **page**. Everything the
page shows comes from the run records, the caches' timing files and the dataset itself;
figures are embedded as PNG data URIs, so the file opens anywhere without a network.
Sections that cannot be drawn (a dataset that is not on this machine, a head Grad-CAM
cannot differentiate) say why in place of the figure.
"""

from __future__ import annotations

import base64
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache._version import __version__
from featcache.backbones.modules import with_modules
from featcache.backbones.registry import BACKBONES
from featcache.device import resolve_device
from featcache.data.datasets import load_dataset
from featcache.data.images import load_image
from featcache.errors import FeatcacheError
from featcache.extraction.config import preprocess_for
from featcache.extraction.store import read_timing
from featcache.files import atomic_write
from featcache.reporting import figures
from featcache.reporting.explain import gradcam, overlay
from featcache.reporting.guard import check_replaceable, readable_runs, why
from featcache.reporting.choices import choice_folders, choice_section, is_choice
from featcache.reporting.ranks import rank_folders, rank_section
from featcache.reporting.sweeps import (
    dataset_suite,
    is_similarity,
    similarity_folders,
    similarity_section,
    sweep_folders,
    sweep_section,
)
from featcache.runs.comparison import HEADERS, chosen_text, comparison_table, dataset_text, labels, variant
from featcache.runs.records import (
    RunRecord,
    no_runs,
    record_features,
    record_request,
    resolve_run,
    run_folders,
)

REPORT_COLUMNS = ["label", "dataset", "weights", "fusion", "chosen", "variant", "val_acc", "test_acc", "macro_f1",
                  "fit_s", "warnings"]  # the page's table; the CSV beside it has every column


@dataclass(frozen=True)
class ReportConfig:
    """Flags of ``featcache report``."""

    runs: tuple[str, ...] = ()  # run folders or names; empty: every run in runs_dir
    runs_dir: Path = Path("runs")
    out: Path = Path("reports/report.html")
    title: str = "featcache report"
    grid_images: int = 12
    gradcam_images: int = 4
    device: str = "cpu"
    force: bool = False  # replace an -o file (and its CSV) that featcache did not write


def head_text(record: RunRecord) -> str:
    chosen = chosen_text(record)
    return f"{record.head} ({chosen})" if chosen else record.head


def _uri(png: bytes):
    """A figure featcache drew, as a data: URI for an <img src>. The one place the page is
    handed markup it does not escape: the PNG's bytes are base64, so nothing from data can get in."""
    from markupsafe import Markup

    return Markup("data:image/png;base64," + base64.b64encode(png).decode("ascii"))


class _Images:
    """Datasets loaded once per request; images of test rows as the backbone sees them."""

    def __init__(self):
        self.loaded: dict = {}

    def dataset(self, record: RunRecord):
        request = record_request(record)
        if request not in self.loaded:
            try:
                self.loaded[request] = load_dataset(request)
            except FeatcacheError as exc:
                self.loaded[request] = FeatcacheError(f"images unavailable: {exc}")
        if isinstance(self.loaded[request], FeatcacheError):
            raise self.loaded[request]
        return self.loaded[request]

    def rows(self, record: RunRecord, split: str, rows) -> np.ndarray:

        part = self.dataset(record).splits[split]
        if part.images is not None:
            return part.images[rows]
        feat = record_features(record)  # shown as the first backbone sees them
        pre = preprocess_for(feat, BACKBONES.lookup(feat.backbones[0]))
        return np.stack([load_image(part.files[i], pre) for i in rows])

    def test_sample(self, record: RunRecord, n: int):
        """(rows, true labels, predicted labels) of up to n test images, a third of them mistakes if any."""
        split = self.dataset(record).splits["test"]
        predicted = np.asarray(record.metrics["predictions"])
        if record.test_index is not None:  # the scored rows, by source position (unreadable images were left out)
            position = {int(v): row for row, v in enumerate(split.index)}
            scored = np.asarray([position[int(v)] for v in record.test_index], dtype=np.int64)
        else:
            scored = np.arange(len(predicted))
        true = split.labels[scored]
        picked = pick_shown(true, predicted, n)
        return scored[picked], true[picked], predicted[picked]


def pick_shown(true: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """Positions of up to n test images to show: about a third mistakes when there are any, the rest right,
    and mistakes again where too few are right (a weak run is still shown n images)."""
    wrong, right = (_by_class(np.flatnonzero(mask), true) for mask in (true != predicted, true == predicted))
    n_wrong = min(len(wrong), max(n // 3, n - len(right)))
    return np.sort(np.concatenate([right[: n - n_wrong], wrong[:n_wrong]]))


def _by_class(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``rows`` taken class by class in turn (each class's first row, then each one's second ...), so that the first
    few shown cover every class rather than the first classes of a test split sorted by class."""
    groups = [rows[labels[rows] == c] for c in np.unique(labels[rows])]
    order = [g[i] for i in range(max((len(g) for g in groups), default=0)) for g in groups if i < len(g)]
    return np.asarray(order, dtype=np.int64)


def _architecture(record: RunRecord) -> bytes:

    c = record.config
    backbones = []
    used = {ref.rsplit(":", 1)[0] for ref in record.taps}
    for name in (b for b in c["backbones"] if b in used):  # a backbone given but none of its taps chosen: not drawn
        taps = []
        for ref in record.taps:
            backbone, tap = ref.rsplit(":", 1)
            if backbone != name:
                continue
            try:
                t = with_modules(BACKBONES.lookup(name), tuple(c.get("modules") or ()), c.get("image_size")).tap(tap)
                taps.append((tap, f"{t.channels} ch, stride {t.stride} -> {t.width(c['pooling'])}"))
            except FeatcacheError:
                taps.append((tap, "(backbone not registered here)"))
        trainable = "frozen" if not record.finetuned else f"unfreeze {c['unfreeze']}"
        backbones.append({"name": name, "note": f"{c['weights']} weights\n{trainable}", "taps": taps})
    k = len(record.classes)
    tuned = record.finetuned
    if tuned or record.head in ("mlp", "linear"):  # torch heads: their layers
        options = c if tuned else c["head_options"]
        hidden = [] if (c["head"] if tuned else record.head) == "linear" else list(options["hidden"])
        head, width = [], record.dim
        dropout = [f"Dropout {options['dropout']}"] if options["dropout"] else []
        for h in hidden:
            head += [f"Linear {width} -> {h}", "ReLU", *dropout]
            width = h
        head.append(f"Linear {width} -> {k}")
    else:  # scikit-learn heads: the estimator and its chosen parameters
        params = ", ".join(f"{name}={value}" for name, value in record.selection["params"].items())
        head = [f"{record.head} ({params})", f"-> {k} classes"]
    blocks = c.get("res_blocks")
    refine = f"{blocks} residual block{'s' if blocks != 1 else ''}" if c.get("head") == "resblocks" else None
    norm = "no normalisation" if refine else c["tap_norm"]  # fine-tune uses none for one refined map
    return figures.architecture(backbones, c["pooling"], norm, record.dim, refine, head)


def _gradcam(run_dir: Path, record: RunRecord, images: _Images, n: int, device: str, built: dict) -> bytes:

    rows, true, _ = images.test_sample(record, n)
    out = gradcam(run_dir, record, images.rows(record, "test", rows), device=device, built=built)
    overlays = {tap: [overlay(img, heat) for img, heat in zip(out["images"], maps)]
                for tap, maps in out["heatmaps"].items()}
    return figures.gradcam_grid(out["images"], overlays, true, out["predicted"], record.classes,
                                out["map_sizes"], out["empty"])


def _section(run_dir: Path, record: RunRecord, images: _Images, cfg: ReportConfig, built: dict) -> dict:
    """One run's figures (data URIs), or for each one that cannot be drawn, why.

    ``built`` holds the frozen backbones already made for earlier runs' Grad-CAM.
    """
    out = {"record": record, "variant": variant(record), "head": head_text(record), "figures": {}, "notes": {}}

    def attempt(key, draw):
        try:
            out["figures"][key] = _uri(draw())
        except FeatcacheError as exc:
            out["notes"][key] = str(exc)

    classes = record.classes
    metrics = record.metrics
    attempt("architecture", lambda: _architecture(record))
    if record.curves:
        attempt("curves", lambda: figures.curves(record.curves))
    else:
        out["notes"]["curves"] = f"{record.head} is fitted in one go (no epochs); its hyper-parameters were " \
                                 f"chosen on validation: {record.selection['params']}"
    attempt("confusion", lambda: figures.confusion(metrics["confusion_matrix"], classes))
    attempt("per_class", lambda: figures.per_class(metrics["per_class"]))
    if "predictions" not in metrics:
        out["notes"]["predictions"] = "this run's record holds no test predictions (made by an older featcache)"
        out["notes"]["gradcam"] = out["notes"]["predictions"]
        return out

    def prediction_grid():
        rows, true, predicted = images.test_sample(record, cfg.grid_images)
        return figures.predictions(images.rows(record, "test", rows), true, predicted, classes)

    attempt("predictions", prediction_grid)
    if cfg.gradcam_images > 0:
        attempt("gradcam", lambda: _gradcam(run_dir, record, images, cfg.gradcam_images, cfg.device, built))
    return out


def _facts(data, record: RunRecord | None) -> list[str]:
    """What the Data section says of a dataset: its source, split sizes, where validation comes from, classes."""
    sizes = {name: len(split) for name, split in data.splits.items()}
    val = data.splits["train"].official_val
    n_val = int(val.sum()) if val is not None else 0
    names = ", ".join(data.classes[:20]) + (f" and {len(data.classes) - 20} more" if len(data.classes) > 20 else "")
    source = data.about.get("source") or (record.config["dataset"] if record else data.key)
    return [f"source: {source}",
            f"{sizes['train'] - n_val} train, {n_val} validation, {sizes['test']} test images" if n_val else
            f"{sizes['train']} train images (validation carved from them), {sizes['test']} test images",
            f"validation: {data.validation}",
            f"{len(data.classes)} classes: {names}"]


SAMPLE_CLASSES = 12  # the Data section's grid shows this many classes at most (CIFAR-100's 300 cells took 20 s)


def _samples(record: RunRecord, images: _Images, per_class: int = 3) -> bytes:
    data = images.dataset(record)
    labels = np.asarray(data.splits["train"].labels)
    shown = range(min(len(data.classes), SAMPLE_CLASSES))
    rows = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in shown])
    return figures.image_grid(images.rows(record, "train", rows), [data.classes[k] for k in labels[rows]],
                              columns=per_class * min(4, len(data.classes)), cell=1.1)


def _time_spent(records: list[RunRecord]) -> tuple[dict, list[dict]]:
    caches = {}
    for r in records:
        for backbone, cache in r.caches.items():
            caches[cache["path"]] = backbone
    rows, passes = [], {}
    for path, backbone in caches.items():
        timing = read_timing(Path(path))
        shared = timing.get("shared_pass") if isinstance(timing, dict) else None
        shared = [b for b in shared if isinstance(b, str)] if isinstance(shared, list) else []
        rows.append({"cache": path, "backbone": backbone,
                     "seconds": timing["seconds"] if timing else None,
                     "images": timing["images"] if timing else None,
                     "shared": [b for b in shared if b != backbone] if len(shared) > 1 else []})
        if timing:  # backbones extracted in one pass share its seconds: counted once
            passes[(tuple(sorted(shared)) or (path,), timing["seconds"], timing["images"])] = timing["seconds"] or 0.0
    parts = {
        "extraction (each pass once)": sum(passes.values()),
        "head training (frozen runs)": sum(r.timings["fit_seconds"] for r in records if not r.finetuned),
        "fine-tuning": sum(r.timings["fit_seconds"] for r in records if r.finetuned),
    }
    return parts, rows


def _named(item: str, runs_dir: Path) -> tuple[str, Path | None]:
    """("sweep" | "rank" | "choice", its folder) for a named sweep, ranking or choice folder (a path, or a name in
    --runs-dir); else ("run", None): a run, resolved as runs are."""
    for folder in (Path(item), runs_dir / item, runs_dir / "sweeps" / item, runs_dir / "ranks" / item,
                   runs_dir / "choices" / item, runs_dir / "similarity" / item):
        if is_choice(folder):
            return "choice", folder
        if is_similarity(folder):
            return "similarity", folder
        if (folder / "table.csv").is_file() and (folder / "sweep.json").is_file():
            return "sweep", folder
        if (folder / "table.csv").is_file() and (folder / "rows.jsonl").is_file() and folder.parent.name == "ranks":
            return "rank", folder
    return "run", None


def write_report(cfg: ReportConfig, log=print) -> Path:
    """Write the HTML page and the CSV beside it; return the HTML path."""
    from jinja2 import Environment, PackageLoader

    if cfg.runs:  # what was named, and only that: runs, sweep folders, ranking folders, choice folders
        named = [_named(r, Path(cfg.runs_dir)) for r in cfg.runs]
        folders = [resolve_run(r, cfg.runs_dir) for r, (kind, _) in zip(cfg.runs, named) if kind == "run"]
        swept = [path for kind, path in named if kind == "sweep"]
        ranked = [path for kind, path in named if kind == "rank"]
        chosen = [path for kind, path in named if kind == "choice"]
        similar = [path for kind, path in named if kind == "similarity"]
    else:  # the whole folder
        folders, swept, ranked = run_folders(cfg.runs_dir), sweep_folders(cfg.runs_dir), rank_folders(cfg.runs_dir)
        chosen, similar = choice_folders(cfg.runs_dir), similarity_folders(cfg.runs_dir)
    if not (folders or swept or ranked or chosen or similar):  # a sweep, a ranking or a choice alone is worth a page
        raise no_runs(cfg.runs_dir, "train some with featcache fuse-train or featcache finetune")
    unreadable: list[dict] = []  # folders of the runs folder that cannot be shown, each with why
    folders, records = readable_runs(folders, bool(cfg.runs), unreadable, log)
    if cfg.gradcam_images > 0:
        resolve_device(cfg.device)  # a missing GPU is one line now, not a note in every section
    out = Path(cfg.out)
    check_replaceable(out, cfg.force)
    try:  # fail before the drawing, not after: the folder must take a new file
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise FeatcacheError(f"cannot write {out}: {exc.strerror or exc}; choose another -o") from exc
    started = time.perf_counter()
    images, built = _Images(), {}
    sections = []
    for folder, record, label in zip(folders, records, labels(records)):
        log(f"report: drawing {label} ({record.run})")
        try:
            sections.append({**_section(folder, record, images, cfg, built), "label": label})
        except Exception as exc:  # a record whose fields hold what no figure can draw: the rest of the page goes on
            sections.append({"record": record, "label": label, "variant": variant(record), "head": record.head,
                             "figures": {}, "notes": {"architecture": f"this run cannot be drawn: {why(exc)}"}})
    samples = {}
    for record in records:
        request = record_request(record)
        if request not in samples:
            try:
                data = images.dataset(record)
                samples[request] = {"title": dataset_text(record), "uri": _uri(_samples(record, images)),
                                    "facts": _facts(data, record), "classes": len(data.classes)}
            except FeatcacheError as exc:
                samples[request] = {"title": dataset_text(record), "note": str(exc)}
    def sections_of(folders, read, kind: str, folder_name: str, figures: tuple) -> list[dict]:
        """Each folder's section, its figures as data URIs; a damaged folder named on the page, the rest drawn."""
        out = []
        for folder in folders:
            try:
                section = read(folder)
            except Exception as exc:  # a damaged table, answer or matrix: named on the page, the rest still drawn
                unreadable.append({"name": f"{folder_name}/{folder.name}", "why": why(exc)})
                log(f"report: {kind} {folder} is unreadable ({why(exc)}): shown as such")
                continue
            out.append({**section, **{k: _uri(section[k]) for k in figures if section.get(k)}})
        return out

    sweeps = sections_of(swept, sweep_section, "sweep", "sweeps", ("depth", "pairs", "fewshot"))
    ranks = sections_of(ranked, rank_section, "ranking", "ranks", ("agreement", "pareto"))
    choices = sections_of(chosen, choice_section, "choice", "choices", ("bars", "pareto"))
    similarities = sections_of(similar, similarity_section, "similarity", "similarity", ("heatmap",))
    suite = dataset_suite(sweeps)
    parts, cache_rows = _time_spent(records)
    if sweeps:  # every stage's time, each counted once: the sweeps' evaluations, the choices' probes
        parts["sweeps (probes and scores)"] = sum(sw.get("seconds", 0.0) for sw in sweeps)
    if choices:
        parts["choose (probes)"] = sum(float(ch["answer"].get("probe_seconds") or 0.0) for ch in choices)
    table = comparison_table(records)
    random_runs = [r.run for r in records if r.config["weights"] == "random"]
    # Every value from data (folder, class, run and file names, a pipeline's texts) is escaped,
    # whatever the template's file name: a report is mailed around and opened in browsers.
    env = Environment(loader=PackageLoader("featcache.reporting"), autoescape=True)
    page = env.get_template("report.html.j2").render(
        title=cfg.title, version=__version__, generated=time.strftime("%Y-%m-%d %H:%M"),
        table=table.to_dict("records"), columns=REPORT_COLUMNS, headers={c: HEADERS.get(c, c) for c in REPORT_COLUMNS},
        csv_name=out.with_suffix(".csv").name,
        random_runs=random_runs, n_runs=len(records), sections=sections, samples=list(samples.values()),
        time_uri=_uri(figures.time_spent(parts)), cache_rows=cache_rows, sweeps=sweeps, unreadable=unreadable,
        suite=suite, ranks=ranks, choices=choices, similarities=similarities,
    )
    _write_atomic(out, page)
    _write_atomic(out.with_suffix(".csv"), table.to_csv(index=False))
    log(f"report written to {out} and {out.with_suffix('.csv')} in {time.perf_counter() - started:.1f} s")
    return out


def _write_atomic(path: Path, text: str) -> None:
    try:
        atomic_write(path, text)
    except OSError as exc:
        raise FeatcacheError(f"cannot write {path}: {exc.strerror or exc}; choose another -o") from exc
