"""Grad-CAM through pytorch-grad-cam, for frozen heads put back on their backbones and fine-tuned runs."""

import numpy as np
import pytest
import torch

from featcache.backbones.registry import BACKBONES
from featcache.data.datasets import DataRequest, load_dataset
from featcache.errors import FeatcacheError
from featcache.fuse.heads import HEADS, HeadOptions
from featcache.reporting.explain import gradcam, head_module
from featcache.runs.records import load_record

TEST = load_dataset(DataRequest(name="digits", limit_train=200, limit_test=60)).splits["test"]


def test_gradcam_explains_the_recorded_prediction_of_every_differentiable_run(report_runs):
    _, runs = report_runs
    explained = 0
    for run in runs:
        record = load_record(run)
        if record["head"] == "svm" and record["selection"]["params"]["kernel"] == "rbf":
            with pytest.raises(FeatcacheError, match="Grad-CAM needs a differentiable head; this SVC"):
                gradcam(run, record, TEST.images[:4])
            continue
        out = gradcam(run, record, TEST.images[:8])
        # The rebuilt network predicts what the run recorded: the head really sits on its backbones.
        assert list(out["predicted"]) == record["metrics"]["predictions"][:8], record["run"]
        assert set(out["heatmaps"]) == set(record["taps"])
        for tap, heat in out["heatmaps"].items():
            assert heat.shape == (8, 32, 32) and heat.min() >= 0 and heat.max() <= 1
            assert heat.reshape(8, -1).std(axis=1).max() > 0  # a map, not a constant
            # the size of the feature map it was computed on, and which images had nothing to show
            stride = BACKBONES[tap.split(":")[0]].tap(tap.split(":")[1]).stride
            assert out["map_sizes"][tap] == (32 // stride, 32 // stride)
            assert out["empty"][tap] == [bool(np.ptp(h) == 0) for h in heat]
        assert out["images"].shape == (8, 32, 32, 3)
        explained += 1
    assert explained >= 4


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("head", ["logreg", "svm"])
def test_linear_heads_become_their_decision_function(head, n_classes):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = rng.integers(0, n_classes, 120)
    entry = HEADS[head]
    options = HeadOptions()
    model = (entry.final or entry.make)(options, C=1.0)
    model.fit(X, y)
    module = head_module(model)
    scores = module(torch.from_numpy(X)).detach().numpy()
    inner = model.calibrated_classifiers_[0].estimator if head == "svm" else model
    decision = inner.decision_function(X)
    if n_classes == 2:
        decision = np.stack([-decision, decision], axis=1)
    np.testing.assert_allclose(scores, decision, rtol=1e-4, atol=1e-4)
    assert np.array_equal(scores.argmax(1), inner.predict(X))


def test_frozen_runs_share_their_backbones_and_explain_the_same(report_runs, monkeypatch):
    """A report passes one dict along: each frozen backbone is built once, the heatmaps do not change."""
    import featcache.finetuning.model

    _, runs = report_runs
    frozen = [(run, record) for run in runs if (record := load_record(run))["kind"] == "frozen"
              and not (record["head"] == "svm" and record["selection"]["params"]["kernel"] == "rbf")]
    assert len(frozen) >= 2
    alone = [gradcam(run, record, TEST.images[:4]) for run, record in frozen]
    real, calls = featcache.finetuning.model.build_backbone, []
    monkeypatch.setattr(featcache.finetuning.model, "build_backbone", lambda *a: calls.append(a[0].name) or real(*a))
    built = {}
    shared = [gradcam(run, record, TEST.images[:4], built=built) for run, record in frozen]
    assert calls == ["tiny"] and len(built) == 1
    for a, b in zip(alone, shared):
        assert list(a["predicted"]) == list(b["predicted"])
        assert all(np.array_equal(a["heatmaps"][tap], b["heatmaps"][tap]) for tap in a["heatmaps"])
