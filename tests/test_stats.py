"""Bootstrap intervals (orpo.stats): coverage on synthetic data whose true mean is known."""

import numpy as np
import pytest

from orpo.stats import bootstrap_mean_ci, bootstrap_ratio_ci, paired_difference, verdict


def coverage(draw, true_mean, trials=400, resamples=1000):
    rng = np.random.default_rng(12345)
    hits = 0
    for t in range(trials):
        lo, hi = bootstrap_mean_ci(draw(rng), resamples=resamples, seed=t)
        hits += lo <= true_mean <= hi
    return hits / trials


def test_95_interval_of_a_mean_covers_the_true_mean_about_95_percent_of_the_time():
    # Log-prob-like values: skewed (a shifted gamma), mean -2.5 exactly.
    cov = coverage(lambda rng: -rng.gamma(2.0, 1.25, size=120), -2.5)
    assert 0.93 <= cov <= 0.97, cov


def test_95_interval_of_an_accuracy_covers_the_true_share():
    cov = coverage(lambda rng: (rng.random(200) < 0.7).astype(float), 0.7)
    assert 0.93 <= cov <= 0.97, cov


def test_a_narrower_level_covers_less_and_intervals_shrink_like_one_over_root_n():
    x = np.random.default_rng(0).normal(size=400)
    w95 = np.diff(bootstrap_mean_ci(x))[0]
    w50 = np.diff(bootstrap_mean_ci(x, level=0.5))[0]
    w95_quarter = np.diff(bootstrap_mean_ci(x[:100]))[0]
    assert w50 < w95
    assert w95_quarter / w95 == pytest.approx(2.0, rel=0.2)  # a quarter of the pairs: twice the width
    assert bootstrap_mean_ci([1.0]) is None


def test_token_weighted_ratio_interval_is_around_the_ratio_of_sums():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 40, size=200).astype(float)
    nll = tokens * 2.0 + rng.normal(size=200)  # about 2 nats per token, long pairs weigh more
    lo, hi = bootstrap_ratio_ci(nll, tokens)
    assert lo < nll.sum() / tokens.sum() < hi and hi - lo < 0.05


def test_paired_difference_sees_a_small_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    base = rng.normal(-3.0, 1.0, size=64)  # pair-to-pair spread shared by both runs
    sft, orpo = base + rng.normal(0, 0.05, 64), base + 0.1 + rng.normal(0, 0.05, 64)
    p = paired_difference(orpo, sft)
    assert p["distinguishable"] and p["ci"][0] > 0 and p["n"] == 64
    assert p["diff"] == pytest.approx(float((orpo - sft).mean()))
    # The same shift judged from the two unpaired intervals overlaps completely.
    a, b = bootstrap_mean_ci(orpo), bootstrap_mean_ci(sft)
    assert a[0] < b[1]
    assert "distinguishable from zero: the whole 95% interval is above 0" in verdict("margin", p)
    same = paired_difference(sft + rng.normal(0, 0.05, 64), sft)
    assert not same["distinguishable"] and "contains 0" in verdict("margin", same)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
