"""The probe sweep against fuse-train head by head: the same tap pairs and heads, side by side.

Issue 15's benchmark: every cross pair of resnet50 x mobilenet_v2 taps (4 x 6 = 24) with logreg,
svm and mlp on 1,000 / 300 digits at 128 px (random weights), (a) as one ``featcache sweep``
and (b) as ``fuse-train`` runs, one per pair and head, as today. Extraction is done once before
either and timed by neither. Prints both times, their ratio and each head's best test accuracy.

    python benchmarks/sweep.py                 # all 24 pairs (fuse-train takes about 25 minutes on 2 cores)
    python benchmarks/sweep.py --pairs 4       # the first 4 pairs, both ways
    python benchmarks/sweep.py --large         # point 10: logreg, svm, knn on 50,000 x 1,792 (targets 60 s each)
    python benchmarks/sweep.py --large --baseline   # and fuse-train's logreg on the same features, side by side
    python benchmarks/sweep.py --solvers       # logreg's and the svm's solvers two ways each, on the pairs' fit rows
    python benchmarks/sweep.py --large --solvers    # the same on the 50,000-row combination

``--large`` extracts digits tiled 35 times (50,000 / 10,000 rows, 32 px; each copy shifted by a
pixel, so validation rows have near-twins in training) through resnet18 and mobilenet_v2 (random
weights), fuses their late taps (512 + 1,280 columns) and times each head's probe alone: C or k
chosen on validation, the test split scored once.

``--solvers`` times the linear heads' solvers alone on the same fit rows, one after the other, and
prints each one's seconds, their ratio and each C's objective summed over the combinations. logreg:
every C of every combination at once (``lanes.solve_many``, the sweep's) against one C at a time,
combination by combination, warm-started (``solvers.solve_path``, the one before it). svm, where its
rows' form applies (up to 3 rows per column), ``hinge_rows.newton_rows`` two ways: one C at a time, each
from the last solution (the sweep's on the CPU), against every C of a combination at once (on a GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import tiled_digits

from featcache.backbones.registry import BACKBONES
from featcache.device import resolve_device, resolve_precision
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract
from featcache.fuse.evaluate import fit_select
from featcache.fuse.heads import HEADS, HeadOptions
from featcache.fuse.train import FuseTrainConfig, fuse_train
from featcache.runs.records import load_record
from featcache.sweeping.config import SweepConfig
from featcache.sweeping.run import sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N cross pairs [all]")
    parser.add_argument("--heads", default="logreg,svm,mlp")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the extracted caches here, so a second run skips the extraction [a temporary folder]")
    parser.add_argument("--sweep-only", action="store_true", help="time (a) only, with each head's fit seconds")
    parser.add_argument("--large", action="store_true", help="CIFAR-10 size: each fast head alone on 50,000 rows")
    parser.add_argument("--rows", type=int, default=50000, help="training rows of --large [50000]")
    parser.add_argument("--solvers", action="store_true",
                        help="time the linear heads' solvers two ways each instead (on --large's rows with --large)")
    parser.add_argument("--baseline", action="store_true",
                        help="--large: also fit fuse-train's logreg head (scikit-learn, four C) on the same features "
                             "and print the ratio (about 7 minutes at 50,000 rows on 2 cores)")
    args = parser.parse_args()
    if args.large:
        return large(args)
    if args.solvers:
        return solvers_on_pairs(args)

    a, b = args.backbones.split(",")
    pairs = _pairs(args)
    heads = tuple(args.heads.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        features = _digits_features(args, tmp)
        # the torch heads at the precision the command line gives them (--precision auto: bf16 on a CPU with it)
        options = HeadOptions(device=args.device, precision=resolve_precision("auto", resolve_device(args.device)))
        print(f"{len(pairs)} pairs of {a} x {b} taps, heads {', '.join(heads)}, {args.train}/{args.test} digits at "
              f"{args.image_size} px, torch heads in {options.precision}", flush=True)

        start = time.perf_counter()
        folder = sweep(SweepConfig(features=features, combos="0", taps=tuple(pairs), heads=heads, keep=0,
                                   options=options, runs_dir=Path(tmp) / "sweep"), log=lambda m: None)
        swept = time.perf_counter() - start
        import pandas as pd

        table = pd.read_csv(folder / "table.csv")
        print(f"(a) featcache sweep: {swept:.1f} s (fit seconds by head: "
              + ", ".join(f"{h} {table[table['head'] == h]['fit_s'].sum():.1f}" for h in heads) + ")", flush=True)
        if args.sweep_only:
            return
        width = {taps.replace("+", ","): w for taps, w in zip(table["taps"], table["width"])}

        start = time.perf_counter()
        by_hand = {}  # head -> [(val, test, pair)]
        for pair in pairs:
            for head in heads:
                cfg = FuseTrainConfig(features=features, taps=(pair,), heads=(head,), options=options,
                                      runs_dir=Path(tmp) / "runs", allow_dead_taps=True)
                [run] = fuse_train(cfg, log=lambda m: None)
                record = load_record(run)
                by_hand.setdefault(head, []).append((record.selection["val_accuracy"], record.metrics["accuracy"], pair))
        seconds = time.perf_counter() - start
        print(f"(b) fuse-train head by head: {seconds:.1f} s", flush=True)
        print(f"a is {seconds / swept:.1f}x faster than b")
        for head in heads:
            # both sides pick by validation accuracy alone, ties to the narrower pair, then to the earlier pair
            theirs = min(by_hand[head], key=lambda r: (-r[0], width[r[2]], pairs.index(r[2])))
            rows = table[table["head"] == head]
            ours = rows.iloc[0]  # the sweep's table is ranked by that rule
            same = {pair: test for _, test, pair in by_hand[head]}
            gap = np.mean([abs(t - same[p.replace("+", ",")]) for p, t in zip(rows["taps"], rows["test_acc"])])
            print(f"  {head:7s} best by validation: sweep test {ours['test_acc']:.4f} ({ours['taps']}), fuse-train "
                  f"test {theirs[1]:.4f} ({theirs[2]}): {100 * (ours['test_acc'] - theirs[1]):+.1f} points; "
                  f"mean |test difference| over the pairs {100 * gap:.2f} points")


def _pairs(args) -> list[str]:
    a, b = args.backbones.split(",")
    pairs = [f"{a}:{x.node},{b}:{y.node}" for x in BACKBONES.lookup(a).taps for y in BACKBONES.lookup(b).taps]
    return pairs[: args.pairs] if args.pairs else pairs


def solvers_on_pairs(args):
    from featcache.fuse.fusion import parse_taps

    pairs = _pairs(args)
    with tempfile.TemporaryDirectory() as tmp:
        features = _digits_features(args, tmp)
        refs = [parse_taps(pair, features) for pair in pairs]
        fit, y = _fit_rows(features, {r for pair in refs for r in pair}, SweepConfig.val_fraction, args.device)
        print(f"the linear heads' solvers on the fit rows of {len(pairs)} tap pairs ({len(y)} rows)", flush=True)
        compare_solvers([[fit[r] for r in pair] for pair in refs], y)


def _digits_features(args, tmp) -> ExtractConfig:
    """The benchmark's digits through ``--backbones``, extracted (into ``--cache-dir`` or ``tmp``)."""
    features = ExtractConfig(data=tiled_digits(1, limit_train=args.train, limit_test=args.test),
                             backbones=tuple(args.backbones.split(",")), weights="random",
                             preprocess=PreprocessConfig(image_size=args.image_size), dtype="float32",
                             device=args.device, cache_dir=args.cache_dir or Path(tmp) / "cache")
    extract(features, progress=False, log=lambda m: None)
    return features


def _fit_rows(features, refs, val_fraction: float, device):
    """The standardised training rows the sweep fits on (its first seed's split) of each tap, and their labels."""
    import torch

    from featcache.fuse.caches import load_features, locate_caches
    from featcache.fuse.evaluate import validation_split
    from featcache.sweeping.run import standardised

    data = load_features(locate_caches(features), set(refs), allow_dead=True, log=lambda m: None)
    fit, val = validation_split(data.labels["train"], val_fraction, 0)
    X = standardised(data, fit, val, torch.device(device), test=False)
    return X["fit"], torch.as_tensor(data.labels["train"][fit], device=device)


def compare_solvers(problems: list, y) -> None:
    """Each linear head's grid of C on every problem (tap blocks side by side), solved two ways, side by side:
    logreg by the lanes and by the path; the svm (where its rows' form applies) every C at once and one C at
    a time, each from the last solution."""
    import torch

    from featcache.fuse.heads import C_GRID, SVM_C_GRID
    from featcache.solvers import hinge_rows, lanes
    from featcache.solvers import path as solvers

    k = int(y.max()) + 1

    def timed(solve):
        if y.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = solve()
        if y.is_cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def side_by_side(loss, Cs, ways):
        labels = y.cpu().numpy()
        seconds = []
        for name, solve in ways:
            solved, took = timed(solve)
            sums = [sum(solvers.objective_value(X.cpu().numpy(), labels, W[i].cpu().numpy(), C, loss)
                        for X, W in zip(fused, solved)) for i, C in enumerate(Cs)]
            print(f"  {loss} {name:46s} {took:6.2f} s, summed objectives at C = {Cs}: "
                  + " / ".join(f"{v:.4f}" for v in sums), flush=True)
            seconds.append(took)
        print(f"  {loss}: at once is {seconds[0] / seconds[1]:.2f}x the one at a time's speed", flush=True)

    fused = [torch.cat(blocks, dim=1) for blocks in problems]
    Cs = list(C_GRID)
    lanes.solve_many(problems[:1], y, Cs[:1], k, max_iter=5)  # first calls: the libraries' set-up, timed by neither
    solvers.solve_path(fused[0], y, Cs[:1], "logreg", k, max_iter=5)
    side_by_side("logreg", Cs, [("one C at a time (solve_path)", lambda: [solvers.solve_path(X, y, Cs, "logreg", k)
                                                                          for X in fused]),
                                ("every C and combination at once (solve_many)", lambda: lanes.solve_many(problems, y,
                                                                                                          Cs, k))])
    Cs = list(SVM_C_GRID)
    forms = [_svm_rows(X) for X in fused]
    kept = [hinge_rows.through_rows(*rows.shape, len(Cs)) for rows, _ in forms]
    if not all(kept):  # solved every class at once through the features, C after C, either way
        print(f"  svm: {kept.count(False)} of {len(kept)} problems past the rows' form left out")
    fused, forms = [X for X, ok in zip(fused, kept) if ok], [f for f, ok in zip(forms, kept) if ok]
    if not forms:
        return
    hinge_rows.newton_rows(hinge_rows.rows_form(forms[0][0]), y, Cs[:1], k, max_iter=2)

    def one_at_a_time(form):
        out, previous = [], None
        for C in Cs:
            [previous] = hinge_rows.newton_rows(form, y, [C], k, init=previous)
            out.append(previous)
        return out

    def each(solve):
        return lambda: [[back(W) for W in solve(hinge_rows.rows_form(rows))] for rows, back in forms]

    side_by_side("svm", Cs, [("one C at a time, warm-started (the CPU's)", each(one_at_a_time)),
                             ("every C at once (a GPU's)",
                              each(lambda form: hinge_rows.newton_rows(form, y, Cs, k)))])


def _svm_rows(X):
    """The rows the svm's Newton solves on (``solve_path``'s rotation) and the map of a solution back to ``X``'s."""
    import torch

    from featcache.solvers import path as solvers

    Z, V, _ = solvers.rotate(X)
    if Z is None:
        return X, lambda W: W
    return Z, lambda W: torch.cat([V @ W[:-1], W[-1:]])


def large(args):
    import torch

    from featcache.fuse.caches import load_features, locate_caches
    from featcache.fuse.evaluate import validation_split
    from featcache.fuse.fusion import parse_taps
    from featcache.sweeping.probes import probe
    from featcache.sweeping.run import fused_parts, standardised

    with tempfile.TemporaryDirectory() as tmp:
        features = ExtractConfig(data=tiled_digits(35, limit_train=args.rows, limit_test=args.rows // 5),
                                 backbones=("resnet18", "mobilenet_v2"), weights="random",
                                 preprocess=PreprocessConfig(image_size=32), dtype="float32", device=args.device,
                                 cache_dir=args.cache_dir or Path(tmp) / "cache")
        extract(features, progress=False, log=lambda m: None)
        refs = parse_taps("late", features)
        data = load_features(locate_caches(features), set(refs), allow_dead=True, log=lambda m: None)
        fit, val = validation_split(data.labels["train"], 0.1, 0)
        std = standardised(data, fit, val, torch.device(args.device))
        X = fused_parts(std, refs)
        labels = {"fit": data.labels["train"][fit], "val": data.labels["train"][val], "test": data.labels["test"]}
        y = {part: torch.as_tensor(v, device=args.device) for part, v in labels.items()}
        print(f"fit / val / test rows {len(X['fit'])} / {len(X['val'])} / {len(X['test'])}, "
              f"{X['fit'].shape[1]} columns", flush=True)
        if args.solvers:
            return compare_solvers([[std["fit"][r] for r in refs]], y["fit"])
        seconds = {}
        for head in ("logreg", "svm", "knn"):
            result = probe(head, X, y, len(data.classes), HeadOptions(device=args.device))
            seconds[head] = result["fit_s"]
            print(f"  {head:7s} {result['fit_s']:6.1f} s (target <= 60 on a CPU, <= 5 on a GPU), chose "
                  f"{result['chosen']}, val {result['val_acc']:.4f}, test {result['test_acc']:.4f}", flush=True)
        if args.baseline:  # fuse-train's own logreg head: scikit-learn, its C grid, chosen on the same validation rows
            numpy = {part: X[part].float().cpu().numpy() for part in X}
            selection = fit_select(HEADS.lookup("logreg"), HeadOptions(), numpy["fit"], labels["fit"], numpy["val"],
                                   labels["val"])
            test = float(np.mean(selection.head.predict(numpy["test"]) == labels["test"]))
            print(f"  fuse-train's logreg {selection.fit_seconds:6.1f} s, chose {selection.params}, val "
                  f"{selection.val_accuracy:.4f}, test {test:.4f}: the sweep's logreg is "
                  f"{selection.fit_seconds / seconds['logreg']:.1f}x faster", flush=True)


if __name__ == "__main__":
    main()
