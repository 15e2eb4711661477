"""The domain-gap measures against naive or closed-form references: Fréchet distance, MMD and its permutation test,
LogME, earth mover's distance, label overlap and the ranking rule."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg, stats
from scipy.optimize import minimize

from distseg.analysis import GapError
from distseg.analysis.labels import SYNONYMS, canonical_lookup, label_overlap
from distseg.analysis.logme import evidence, logme
from distseg.analysis.measures import (color_distance, frechet_distance, mmd_test, rbf_kernel, size_gap,
                                       wasserstein_1d)
from distseg.analysis.ranking import rank
from distseg.analysis.stats import Moments


def _psd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (1, 4, 16):
        mu1, mu2, c1, c2 = rng.normal(size=d), rng.normal(size=d), _psd(rng, d), _psd(rng, d)
        naive = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(naive, rel=1e-6, abs=1e-9)
        assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_moments_give_numpy_mean_and_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) * [1, 2, 3] + 5
    m = Moments.empty(3)
    for part in np.array_split(x, 7):
        m.add(part)
    assert np.allclose(m.mean(), x.mean(0)) and np.allclose(m.cov(), np.cov(x.T))


def _naive_mmd2(x, y, h):
    k = lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_naive_unbiased_estimator():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(7, 3)) + 0.5
    assert mmd_test(x, y, 1.3, permutations=5).mmd2 == pytest.approx(_naive_mmd2(x, y, 1.3), rel=1e-9)
    assert np.allclose(np.diag(rbf_kernel(x, 1.0)), 1.0)


def test_mmd_p_values_are_uniform_under_the_null_and_small_under_a_shift():
    rng = np.random.default_rng(3)
    null = np.array([mmd_test(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)), 2.0, permutations=99,
                              seed=i).p_value for i in range(200)])
    assert stats.kstest(null, "uniform").pvalue > 0.01
    assert 0.01 <= (null <= 0.05).mean() <= 0.10 and 0.4 < null.mean() < 0.6
    shifted = [mmd_test(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 1.0, 2.0, permutations=99,
                        seed=i).p_value for i in range(20)]
    assert np.mean(np.array(shifted) <= 0.05) >= 0.9


def _reference_logme(f, labels):
    """Maximise the Gaussian marginal likelihood log N(y; 0, I/β + F Fᵀ/α) numerically, per class."""
    n = len(f)
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(float)

        def neg(p):
            cov = np.eye(n) / np.exp(p[1]) + f @ f.T / np.exp(p[0])
            return -stats.multivariate_normal(np.zeros(n), cov).logpdf(y)

        res = minimize(neg, x0=[0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-11,
                                                                          "maxiter": 4000})
        out.append(-res.fun / n)
    return float(np.mean(out))


def test_logme_matches_a_direct_evidence_maximisation():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(40, 6))
    labels = np.digitize(f @ rng.normal(size=6) + 0.5 * rng.normal(size=40), [-1.0, 1.0])  # 3 classes
    y = (labels == 1).astype(float)
    direct = stats.multivariate_normal(np.zeros(40), np.eye(40) / 3.0 + f @ f.T / 2.0).logpdf(y)
    assert evidence(f, y, 2.0, 3.0) == pytest.approx(direct, rel=1e-9)
    assert logme(f, labels) == pytest.approx(_reference_logme(f, labels), abs=1e-5)
    noise = rng.normal(size=(40, 6))
    assert logme(f, labels) > logme(noise, labels)  # features that explain the labels score higher


def test_earth_movers_distance_grows_with_the_shift():
    base = np.zeros((3, 256), dtype=np.int64)
    base[:, 100] = 10
    for shift in (5, 20, 80):
        moved = np.roll(base, shift, axis=1)
        assert color_distance(base, moved) == pytest.approx(shift / 256)
    assert wasserstein_1d(base[0], base[0]) == 0.0
    assert size_gap(np.array([[256, 256]]), np.array([[128, 128]])) == pytest.approx(1.0)


def test_label_overlap_through_the_synonym_table():
    lookup = canonical_lookup(SYNONYMS)
    dubai = {"building": 10, "land": 50, "road": 10, "vegetation": 10, "water": 20}
    assert label_overlap(dubai, dubai, lookup).overlap == pytest.approx(1.0)
    other = {"Buildings": 5, "bare soil": 25, "trees": 5, "grassland": 5, "forest": 0, "clouds": 60}
    lo = label_overlap(dubai, other, lookup)
    assert lo.shared == ("bare_land", "building", "vegetation") and lo.candidate_only == ("clouds",)
    assert lo.target_only == ("road", "water")
    assert lo.overlap == pytest.approx(0.05 + 0.25 + 0.10)  # min of the shares per canonical class
    assert label_overlap(dubai, {"clouds": 3}, lookup).overlap == 0.0
    with pytest.raises(GapError, match="listed under both"):
        canonical_lookup({"water": ["lake"], "sea": ["lake"]})


def test_ranking_normalises_signals_and_names_the_driver():
    values = {"near": {"fd": 0.1, "mmd": 0.01, "color": 0.02, "texture": 0.01, "size": 0.0, "labels": 1.0,
                       "logme": None},
              "mid": {"fd": 0.5, "mmd": 0.05, "color": 0.02, "texture": 0.01, "size": 0.0, "labels": 1.0,
                      "logme": None},
              "far": {"fd": 1.0, "mmd": 0.10, "color": 0.03, "texture": 0.02, "size": 0.0, "labels": None,
                      "logme": None}}
    r = rank(values)
    assert r.order == ["near", "mid", "far"]
    assert r.family_score["far"]["feature"] == 1.0 and "labels" not in r.family_score["far"]
    # low-level: colour 2/3, texture 1/2, size 0 (no candidate differs) -> 7/18 for near and mid, 2/3 for far
    assert r.family_score["mid"]["low-level"] == pytest.approx(7 / 18)
    assert r.score["far"] == pytest.approx((1 + 2 / 3) / 2)  # an unlabelled candidate: the mean of its two families
    assert r.step_driver == {"near": None, "mid": "feature", "far": "feature"}
    assert r.driver == "feature" and r.driver_share == pytest.approx(0.9 / (0.9 + 2 / 3 - 7 / 18))
    one = rank({"only": values["near"]})
    assert one.order == ["only"] and one.driver is None
