import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featcache.backbones.registry import BACKBONES
from featcache.errors import FeatcacheError
from featcache.fuse.fusion import TapNormalizer, TapRef, parse_taps


def _features(backbones):
    from featcache.extraction.config import ExtractConfig

    return ExtractConfig(backbones=backbones, weights="random")


def dim(refs):
    return sum(BACKBONES[r.backbone].tap(r.tap).channels for r in refs)


def test_late_of_two_backbones_is_the_studies_3328_vector():
    refs = parse_taps("late", _features(("resnet50", "mobilenet_v2")))
    assert refs == (TapRef("resnet50", "layer4"), TapRef("mobilenet_v2", "features.18"))
    assert dim(refs) == 3328


def test_two_layers_of_one_backbone_and_qualified_taps():
    assert dim(parse_taps("early,late", _features(("mobilenet_v2",)))) == 32 + 1280
    refs = parse_taps("resnet50:late,mobilenet_v2:early", _features(("resnet50", "mobilenet_v2")))
    assert [str(r) for r in refs] == ["resnet50:layer4", "mobilenet_v2:features.6"]
    assert dim(refs) == 2048 + 32
    assert parse_taps("layer3,mid", _features(("resnet18",))) == (TapRef("resnet18", "layer3"),)  # same tap once


def test_bad_taps_name_the_closest():
    with pytest.raises(FeatcacheError, match="Got 'erly' instead; did you mean 'early'"):
        parse_taps("erly", _features(("resnet18",)))
    with pytest.raises(FeatcacheError, match="did you mean 'resnet50'"):
        parse_taps("resnet05:late", _features(("resnet50",)))
    with pytest.raises(FeatcacheError, match="empty entry"):
        parse_taps("late,", _features(("resnet50",)))


def test_standard_norm_uses_train_statistics_only():
    train = [np.array([[0.0], [2.0]]), np.array([[10.0, 1], [30.0, 1]])]
    norm = TapNormalizer("standard").fit(train)
    out = norm.transform([np.array([[1.0]]), np.array([[20.0, 1]])])
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.0]])
    l2 = TapNormalizer("l2").fit(train).transform(train)
    np.testing.assert_allclose(np.linalg.norm(l2[:, 1:], axis=1), 1.0, rtol=1e-6)
    with pytest.raises(FeatcacheError, match="'--tap-norm' option must be one of"):
        TapNormalizer("zscore")


def test_per_tap_normalisation_recovers_what_plain_concatenation_loses():
    """Two taps of very different scale: a small informative one, a loud uninformative one."""
    rng = np.random.default_rng(0)
    n, classes = 900, 3
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 1, (classes, 16))
    quiet = (centres[y] + rng.normal(0, 1.0, (n, 16))) * 1e-3  # informative, tiny scale
    loud = rng.normal(0, 1, (n, 64)) * 1e3  # noise, huge scale
    train, test = slice(0, 600), slice(600, None)
    scores = {}
    for method in ("none", "standard"):
        norm = TapNormalizer(method).fit([quiet[train], loud[train]])
        head = LogisticRegression(C=1.0, max_iter=500).fit(norm.transform([quiet[train], loud[train]]), y[train])
        scores[method] = head.score(norm.transform([quiet[test], loud[test]]), y[test])
    assert scores["standard"] > 0.8
    assert scores["standard"] - scores["none"] > 0.3, scores


@pytest.mark.parametrize("scale", [1e-13, 1e8])
def test_standardisation_is_scale_free(scale):
    """A tap of values around 1e-13 (efficientnet's late taps with random weights, stored as float32) or 1e8
    standardises to what the same tap times 1e13 (or divided by 1e8) does: no absolute floor on the scale."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    X = (rng.normal(size=(200, 16)) + np.eye(4, 16)[y] * 4).astype(np.float64)
    X[:, 5] = 3.0  # a constant column stays constant (zero), not amplified
    tiny = (X * scale).astype(np.float32)
    plain = X.astype(np.float32)
    a = TapNormalizer("standard").fit_transform([tiny])
    b = TapNormalizer("standard").fit_transform([plain])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.all(a[:, 5] == 0)
    fit = lambda Z: LogisticRegression(max_iter=500).fit(Z[:150], y[:150]).score(Z[150:], y[150:])  # noqa: E731
    assert fit(a) == fit(b) > 0.9


def test_column_moments_and_the_float16_widening_equal_numpys_bit_for_bit():
    """The standardisation's sums by row chunks are numpy's float64 reductions exactly; a large float16 tap widened by
    the reader equals numpy's astype."""
    from featcache.extraction.reader import float32
    from featcache.fuse.fusion import column_moments

    rng = np.random.default_rng(0)
    block = (rng.normal(size=(10_001, 7)) * 10.0 ** rng.integers(-6, 6, 7)).astype(np.float32)
    sums, squares = column_moments(block, rows=1000)
    assert np.array_equal(sums, block.sum(axis=0, dtype=np.float64))
    assert np.array_equal(squares, np.square(block, dtype=np.float64).sum(axis=0))
    half = rng.normal(scale=1e-5, size=(1 << 20) + 3).astype(np.float16)  # subnormals included
    assert np.array_equal(float32(half), half.astype(np.float32)) and float32(half).dtype == np.float32


def test_the_standard_transform_equals_normalize_tap_bit_for_bit():
    """TapNormalizer's fused standardisation (torch, in place) is normalize_tap's NumPy float32 arithmetic exactly,
    float16 taps widened first, and leaves its input as it was."""
    from featcache.fuse.fusion import TapNormalizer, normalize_tap

    rng = np.random.default_rng(1)
    blocks = [rng.normal(3, 2, (501, 9)).astype(np.float16), (rng.normal(size=(501, 4)) * 1e-4).astype(np.float32)]
    kept = [b.copy() for b in blocks]
    norm = TapNormalizer("standard").fit(blocks)
    got = norm.transform(blocks)
    want = np.concatenate([normalize_tap(b.astype(np.float32), "standard", *norm.statistics(i))
                           for i, b in enumerate(blocks)], axis=1)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert all(np.array_equal(b, k) for b, k in zip(blocks, kept))


@pytest.mark.parametrize("fit_rows", [np.arange(0, 300), slice(0, 300)], ids=["index", "slice"])
def test_standardised_parts_never_change_the_loaded_taps(fit_rows):
    """The fit and validation rows are normalised where they lie only when they are copies of the loaded tap."""
    from featcache.fuse.fusion import TapNormalizer, standardised_tap

    rng = np.random.default_rng(2)
    train, test = rng.normal(2, 3, (400, 6)).astype(np.float32), rng.normal(2, 3, (50, 6)).astype(np.float32)
    kept = train.copy(), test.copy()
    parts = standardised_tap(train, fit_rows, np.arange(300, 400), test, "cpu")
    assert np.array_equal(train, kept[0]) and np.array_equal(test, kept[1])
    norm = TapNormalizer("standard").fit([train[fit_rows]])
    assert np.array_equal(parts["fit"].numpy(), norm.transform([train[fit_rows]]))
