from dataclasses import replace

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featcache.fuse.heads import HEADS, HeadOptions
from featcache.fuse.torch_head import TorchClassifier

# Checks the torch heads are marked to fail, each with the reason (documented in docs/fuse-train.md).
EXPECTED_FAILURES = {}


@parametrize_with_checks(
    [TorchClassifier(hidden=(), epochs=20, batch_size=32, patience=None, lr=0.05),
     TorchClassifier(hidden=(16,), dropout=0.1, epochs=20, batch_size=32, patience=None, lr=0.01)],
    expected_failed_checks=lambda est: EXPECTED_FAILURES,
)
def test_torch_heads_pass_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def blobs(n=300, classes=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(0, 1, (classes, dim))[y] * 3 + rng.normal(0, 1, (n, dim))
    return X.astype(np.float32), y


@pytest.mark.parametrize("name", sorted(h for h, entry in HEADS.items() if entry.make is not None))
def test_every_head_fits_predicts_and_scores(name):
    X, y = blobs()
    entry = HEADS[name]
    options = HeadOptions(epochs=60, hidden=(32,), lr=1e-2)
    for params in entry.candidates(options, len(X))[:1]:
        head = (entry.final or entry.make)(options, **params)  # the head a run keeps
        assert head.fit(X[:200], y[:200]) is head
        proba = head.predict_proba(X[200:])
        assert proba.shape == (100, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
        assert head.score(X[200:], y[200:]) > 0.9
        assert set(head.get_params()) >= set(clone(head).get_params())


def test_studies_heads_are_one_flag_each():
    big = HEADS["mlp"].make(HeadOptions(hidden=(512,), dropout=0.2, optimizer="adamw", lr=1e-4))
    big.fit(np.zeros((4, 3328), np.float32), [0, 1, 2, 3])
    assert [type(m).__name__ for m in big.module_] == ["Linear", "ReLU", "SeededDropout", "Linear"]
    assert big.module_[0].in_features == 3328 and big.module_[0].out_features == 512 and big.module_[2].p == 0.2
    small = HEADS["mlp"].make(HeadOptions(hidden=(256,), dropout=0.5))
    assert small.hidden == (256,) and small.dropout == 0.5


def test_seeded_dropout_drops_and_rescales_like_torch_dropout():
    import torch

    from featcache.fuse.torch_layers import SeededDropout

    layer = SeededDropout(0.25)
    layer.generator = torch.Generator().manual_seed(0)
    out = layer(torch.ones(200, 100))
    assert np.allclose(out.unique().numpy(), [0.0, 1 / 0.75]) and abs((out == 0).float().mean().item() - 0.25) < 0.02
    layer.generator = torch.Generator().manual_seed(0)
    assert torch.equal(layer(torch.ones(200, 100)), out)  # the masks come from the generator
    assert torch.equal(layer.eval()(torch.ones(3, 4)), torch.ones(3, 4))


def test_concurrent_and_stacked_candidates_give_the_sequential_selection(monkeypatch):
    from featcache.fuse import evaluate

    X, y = blobs(n=300)
    options = HeadOptions(hidden=(16,), epochs=8, batch_size=32, patience=None)
    runs = []
    for way in ("one by one", "threads", "stacked"):
        monkeypatch.setattr(evaluate, "TORCH_FITS", way)
        selection = evaluate.fit_select(HEADS["mlp"], options, X[:240], y[:240], X[240:], y[240:])
        runs.append((selection.candidates, selection.head.history_, selection.head.predict_proba(X[240:])))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] and np.array_equal(runs[0][2], runs[1][2])
    assert runs[2][0] == runs[0][0]  # stacked: the same up to float rounding
    np.testing.assert_allclose(runs[2][2], runs[0][2], atol=1e-5)


@pytest.mark.parametrize("optimizer,hidden,lr,precision", [("adam", (16, 8), 0.05, "fp32"), ("adamw", (16,), 0.01, "fp32"),
                                                          ("sgd", (), 0.05, "fp32"), ("adam", (16, 8), 0.05, "bf16")])
def test_stacked_candidates_train_as_each_does_alone(optimizer, hidden, lr, precision):
    """The candidates as one stacked network (a GPU's way) against each fitted alone: same epochs kept and stopped
    at (one stops early and leaves the stack, with its optimizer state), same curves and probabilities."""
    from featcache.fuse.torch_stack import fit_stacked, stackable

    X, y = blobs(n=260, dim=12, seed=1)
    X += np.random.default_rng(2).normal(0, 3, X.shape).astype(np.float32)  # overlapping: the decays matter
    options = HeadOptions(hidden=hidden, dropout=0.3, optimizer=optimizer, lr=lr, epochs=25, batch_size=32,
                          patience=2, grid={"weight_decay": (0.0, 3.0, 0.01)}, precision=precision)
    entry = HEADS["mlp"]
    candidates = entry.candidates(options, 200)
    heads = [entry.make(options, **p) for p in candidates]
    assert stackable(heads) and not stackable(heads[:1] + [entry.make(replace(options, lr=0.1))])
    fit_stacked(heads, X[:200], y[:200], eval_set=(X[200:], y[200:]))
    stops = set()
    for params, stacked in zip(candidates, heads):
        alone = entry.make(options, **params).fit(X[:200], y[:200], eval_set=(X[200:], y[200:]))
        assert stacked.best_epoch_ == alone.best_epoch_
        for key, curve in alone.history_.items():
            np.testing.assert_allclose(stacked.history_[key], curve, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stacked.predict_proba(X[200:]), alone.predict_proba(X[200:]), atol=1e-4)
        stops.add(len(alone.history_["train_loss"]))
    assert len(stops) > 1  # candidates stopped at different epochs: the stack narrowed


def test_torch_head_records_curves_and_stops_early_on_validation():
    X, y = blobs(n=400)
    head = TorchClassifier(hidden=(16,), epochs=200, patience=3, lr=0.05, random_state=1)
    head.fit(X[:300], y[:300], eval_set=(X[300:], y[300:]))
    epochs = len(head.history_["train_loss"])
    assert epochs < 200 and len(head.history_["val_acc"]) == epochs
    assert head.best_epoch_ == int(np.argmin(head.history_["val_loss"])) + 1


def test_same_seed_same_numbers():
    X, y = blobs()
    a = TorchClassifier(hidden=(8,), epochs=5, random_state=3).fit(X, y).predict_proba(X)
    b = TorchClassifier(hidden=(8,), epochs=5, random_state=3).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_heads_work_in_pipeline_and_grid_search():
    X, y = blobs()
    search = GridSearchCV(make_pipeline(StandardScaler(), TorchClassifier(hidden=(), epochs=10)),
                          {"torchclassifier__lr": [0.01, 0.1]}, cv=2).fit(X, y)
    assert search.best_score_ > 0.9


def test_a_torch_head_trained_in_bf16_on_the_cpu_matches_fp32():
    """fuse-train's torch heads follow --precision like extraction; bf16 costs no accuracy."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    fits = {p: TorchClassifier(hidden=(32,), epochs=8, precision=p, patience=None).fit(X[:1200], y[:1200])
            for p in ("fp32", "bf16")}
    exact, half = fits["fp32"], fits["bf16"]
    assert abs(half.history_["train_loss"][-1] - exact.history_["train_loss"][-1]) <= 0.02
    assert abs(half.score(X[1200:], y[1200:]) - exact.score(X[1200:], y[1200:])) <= 0.02
    assert half.predict_proba(X[:5]).dtype == np.float32


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("refusal", [RuntimeError, TypeError])
def test_the_optimizers_take_the_same_steps_fused_or_not(name, refusal, monkeypatch):
    """make_optimizer fuses where torch can, and falls back where it cannot (torch < 2.4 on the CPU
    refuses fused=True, and older optimizers have no such argument)."""
    import torch

    from featcache.fuse import torch_head

    def trained(optimizer_of):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(20, 5, generator=gen).requires_grad_()
        X = torch.randn(64, 20, generator=gen)
        opt = optimizer_of([w])
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(X @ w, torch.arange(64) % 5).backward()
            opt.step()
        return opt, w.detach()

    fused, w_fused = trained(lambda p: torch_head.make_optimizer(name, p, 0.01, 1e-3))
    assert fused.defaults["fused"] is True  # this torch fuses on the CPU
    cls = type(fused)

    class Unfusable(cls):  # what torch < 2.4 says for fused=True on the CPU
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise refusal("`fused=True` requires all the params to be floating point Tensors of supported "
                              "devices: ['cuda', 'xpu', 'privateuseone']" if refusal is RuntimeError else
                              "__init__() got an unexpected keyword argument 'fused'")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, cls.__name__, Unfusable)
    plain, w_plain = trained(lambda p: torch_head.make_optimizer(name, p, 0.01, 1e-3))
    assert isinstance(plain, Unfusable) and not plain.defaults.get("fused")
    assert torch.allclose(w_fused, w_plain, atol=1e-6)
