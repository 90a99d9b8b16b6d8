"""``fuse-train --taps auto``: the taps chosen on validation by greedy forward selection.

Flow: cli (the fuse-train stage) -> **select** -> fuse-train with the chosen taps. Starting from no
tap, each step adds the tap (of any given backbone) whose fusion with those already chosen gives
the best validation accuracy of a logistic-regression probe (every candidate and C solved at once on
the device, its C chosen on validation too), and stops when no tap improves it. The test split is never read here.
"""

from __future__ import annotations

from dataclasses import replace

from featcache.errors import FeatcacheError
from featcache.extraction.run import extract
from featcache.fuse.caches import load_features, locate_caches
from featcache.fuse.evaluate import validation_split
from featcache.fuse.fusion import fused_parts, standardised
from featcache.sweeping.config import all_taps
from featcache.sweeping.probes import presolve, probe

AUTO = "auto"


def choose_taps(cfg, log=print):
    """``cfg`` (a FuseTrainConfig asking for ``--taps auto``) with the chosen taps and the selection path."""
    import torch

    feat = cfg.features
    if cfg.run_extract:
        extract(feat, log=log)
    # every tap a candidate but the dead ones (constant, or lost below float16's range), unless --allow-dead-taps
    every_tap = all_taps(feat)  # in network order
    data = load_features(locate_caches(feat), set(every_tap), cfg.allow_dead_taps or "drop", log)
    refs = [r for r in every_tap if ("train", r) in data.taps]
    if not refs:
        raise FeatcacheError("--taps auto found every tap dead: extract again with --dtype float32, or pass "
                             "--allow-dead-taps to choose among them anyway")
    labels = data.labels["train"]
    fit_rows, val_rows = validation_split(labels, cfg.val_fraction, feat.data.seed, data.official_val)
    device = torch.device(cfg.options.device)
    X = standardised(data, fit_rows, val_rows, device, test=False)
    y = {"fit": torch.as_tensor(labels[fit_rows], device=device), "val": torch.as_tensor(labels[val_rows], device=device)}
    chosen, path, best = [], [], -1.0
    while len(chosen) < len(refs):
        candidates = [r for r in refs if r not in chosen]  # every candidate's fits at once
        solved = presolve("logreg", [[X["fit"][r] for r in [*chosen, ref]] for ref in candidates], y["fit"],
                          len(data.classes), cfg.options)
        trials = [(probe("logreg", fused_parts({"val": X["val"]}, [*chosen, ref]), y, len(data.classes), cfg.options,
                         solved=fits)["val_acc"], ref) for ref, (fits, _) in zip(candidates, solved)]
        score, ref = max(trials, key=lambda t: t[0])  # the first of equals, in network order
        if score <= best:
            break
        chosen.append(ref)
        best = score
        path.append({"taps": [str(r) for r in chosen], "val_acc": score})
        log(f"--taps auto: + {ref}: validation accuracy {score:.4f}")
    log(f"--taps auto chose {', '.join(map(str, chosen))} (no other tap raised the validation accuracy)")
    return replace(cfg, taps=(",".join(str(r) for r in chosen),), tap_selection=tuple(path))
