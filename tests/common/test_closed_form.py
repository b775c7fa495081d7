"""Closed-form heads from summed statistics (common.closed_form): sums, exact SecAgg+
transport through Flower's own arithmetic, screening, the solves, personalisation and
the differential-privacy release."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import quantize
from scipy.stats import norm
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from fedhead.common import closed_form as cf
from fedhead.common.closed_form import (
    FixedPointCodec,
    GaussianRelease,
    Layout,
    Statistics,
)
from fedhead.common.errors import ConfigError, DataError
from fedhead.common.rounds import REJECT_REASONS
from tests.secagg_replay import Federation


def features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, correlated, class-dependent features (like pooled ReLU activations)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 1, (classes, d))
    mix = rng.normal(0, 1, (d, d)) / math.sqrt(d)
    x = np.maximum(centres[y] + rng.normal(0, 1, (n, d)) @ mix + 0.5, 0)
    return x, y


def direct(x: np.ndarray, y: np.ndarray, classes: int) -> Statistics:
    return Statistics(
        np.bincount(y, minlength=classes).astype(float),
        np.stack([x[y == c].sum(axis=0) for c in range(classes)]),
        x.T @ x,
    )


def assert_stats_close(a: Statistics, b: Statistics, atol: float = 0.0) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12, atol=atol)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-12, atol=atol)


# --- the statistics ----------------------------------------------------------------


def test_statistics_are_the_sums_also_in_chunks_and_over_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = features(301, 7, 3)
    assert_stats_close(Statistics.of(x, y, 3), direct(x, y, 3))
    monkeypatch.setattr(cf, "CHUNK_VALUES", 50)  # 7 rows per chunk
    assert_stats_close(
        Statistics.of(x.astype(np.float16), y, 3), direct(x.astype(np.float16).astype(float), y, 3)
    )
    views = np.stack([x, 2 * x, x + 1])  # every view counts as an example
    stacked = np.concatenate(list(views))
    assert_stats_close(Statistics.of(views, y, 3), direct(stacked, np.tile(y, 3), 3))


def test_sites_statistics_sum_to_the_pooled_statistics() -> None:
    x, y = features(500, 6, 3)
    parts = [slice(0, 17), slice(17, 350), slice(350, 500)]
    summed = sum((Statistics.of(x[p], y[p], 3) for p in parts), Statistics.zeros(Layout(3, 6)))
    assert_stats_close(summed, Statistics.of(x, y, 3), atol=1e-9)
    assert summed.total == 500


def test_wire_vector_round_trip_and_layout() -> None:
    x, y = features(40, 5, 2)
    stats = Statistics.of(x, y, 2)
    layout = stats.layout
    vector = stats.to_vector()
    assert vector.shape == (layout.size,) == (2 + 2 * 5 + 15,)
    assert_stats_close(Statistics.from_vector(vector, layout), stats)
    assert layout.describe(1) == "the count of class 1"
    assert layout.describe(2 + 5 + 3) == "the sum of class 1, feature 3"
    iu = np.triu_indices(5)
    for k in (0, 4, 5, 9, 14):
        assert layout.describe(12 + k) == f"the Gram entry ({iu[0][k]}, {iu[1][k]})"
    with pytest.raises(ValueError, match="has 27 values"):
        Statistics.from_vector(vector[:-1], layout)
    assert Layout(2, 1280).bytes_float64() == 8 * (2 + 2560 + 1280 * 1281 // 2)


def test_bad_site_data_is_refused_with_one_line() -> None:
    x, y = features(10, 3, 2)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        Statistics.of(x, y + 1, 2)
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        Statistics.of(x, y, 2)
    with pytest.raises(DataError, match="labels must be 10 integers"):
        Statistics.of(x, y.astype(float), 2)


def test_clipping_scales_long_vectors_to_the_norm_and_counts_them() -> None:
    x, y = features(200, 4, 2)
    r = float(np.median(np.linalg.norm(x, axis=1)))
    out = cf.clipped_statistics(x, y, 2, clip_norm=r)
    long = np.linalg.norm(x, axis=1) > r
    assert out.clipped == int(long.sum()) > 0 and out.examples == 200
    clipped = x.copy()
    clipped[long] *= (r / np.linalg.norm(x[long], axis=1))[:, np.newaxis]
    assert_stats_close(out.statistics, direct(clipped, y, 2))
    assert np.linalg.norm(x, axis=1).max() > r  # the caller's features are not changed


# --- exact transport through Flower's SecAgg+ ---------------------------------------


def test_grid_points_pass_flowers_stochastic_quantization_unchanged() -> None:
    codec = FixedPointCodec()
    x = np.random.default_rng(1).normal(0, 1e5, 2000)
    digits = codec.digits(x)
    assert digits.min() >= 0 and digits.max() < 2**22
    for _ in range(3):  # stochastic rounding has nothing to round
        (quantized,) = quantize([codec.encode(x)], codec.clipping_range, codec.quantization_range)
        np.testing.assert_array_equal(quantized, digits.ravel())


@pytest.mark.parametrize("max_weight", [1000.0, 5000.0])
def test_secagg_sum_of_three_very_different_sites_is_the_plain_sum(max_weight: float) -> None:
    """Flower's real quantize, factor_combine, masks mod 2^32 and unmask arithmetic on
    the statistics of sites of 5,000, 37 and 800 images: every site reports
    num_examples == max_weight (1000 is Flower's default, below the largest site)."""
    x, y = features(5837, 8, 3, seed=2)
    x[:, 0] -= 0.7  # one feature with both signs
    sizes = [5000, 37, 800]
    cuts = np.cumsum([0, *sizes])
    sites = [Statistics.of(x[a:b], y[a:b], 3) for a, b in itertools.pairwise(cuts)]
    plain = sum((s.to_vector() for s in sites), np.zeros(sites[0].layout.size))
    codec = FixedPointCodec()
    encoded = [codec.encode(s.to_vector(), s.layout) for s in sites]
    mean = Federation(3, max_weight=max_weight).aggregate(encoded, [int(max_weight)] * 3)
    decoded = codec.decode(mean, 3)
    bound = codec.error_bound(3) + 4 * np.finfo(float).eps * np.abs(plain)
    assert (np.abs(decoded - plain) <= bound).all()
    assert codec.error_bound(3) == 3 * 2.0**-31
    summed = Statistics.from_vector(decoded, sites[0].layout)
    np.testing.assert_array_equal(summed.counts, np.bincount(y, minlength=3))
    assert cf.aggregate_problems(summed, max_examples=6000) == []
    assert cf.screen_statistics(decoded, summed.layout, 6000, codec.error_bound(3)) == []


def test_the_fixed_point_error_stays_within_the_stated_bound() -> None:
    """Values with many fraction bits: the only loss is each site's rounding to 2^-F."""
    rng = np.random.default_rng(3)
    codec = FixedPointCodec(fraction_bits=12)  # a coarse grid makes the rounding visible
    xs = [rng.uniform(-100, 100, 3000) for _ in range(4)]
    mean = Federation(4).aggregate([codec.encode(x) for x in xs], [1000] * 4)
    err = np.abs(codec.decode(mean, 4) - sum(xs))
    assert err.max() <= codec.error_bound(4) + 1e-12
    assert err.max() > codec.error_bound(4) / 4  # the bound is not loose by orders


@pytest.mark.parametrize(("limbs", "fraction_bits", "scale"), [(1, 8, 10.0), (2, 20, 1e3)])
def test_other_digit_counts_round_trip(limbs: int, fraction_bits: int, scale: float) -> None:
    codec = FixedPointCodec(limbs=limbs, fraction_bits=fraction_bits)
    x = np.random.default_rng(4).uniform(-scale, scale, 500)
    assert codec.capacity > scale
    mean = Federation(2).aggregate([codec.encode(x), codec.encode(-x / 2)], [1000, 1000])
    np.testing.assert_allclose(codec.decode(mean, 2), x / 2, atol=codec.error_bound(2) * 1.01)


def test_the_codec_refuses_a_statistic_it_cannot_carry() -> None:
    x, y = features(20, 4, 2)
    stats = Statistics.of(x, y, 2)
    codec = FixedPointCodec()
    gram = stats.gram.copy()
    gram[1, 2] = gram[2, 1] = 5e9  # beyond 2^32
    big = Statistics(stats.counts, stats.sums, gram)
    with pytest.raises(cf.StatisticRangeError, match=r"the Gram entry \(1, 2\) is 5e\+09"):
        codec.encode(big.to_vector(), big.layout)
    vector = stats.to_vector()
    vector[0] = np.nan
    with pytest.raises(cf.StatisticRangeError, match="the count of class 0 is nan"):
        codec.encode(vector, stats.layout)


def test_codec_settings_off_a_power_of_two_grid_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"secagg-clipping-range: 6\.0 is not a power of two"):
        FixedPointCodec(clipping_range=6.0)
    with pytest.raises(ConfigError, match="secagg-quantization-range: 1000000"):
        FixedPointCodec(quantization_range=1_000_000)
    with pytest.raises(ValueError, match="limbs must be an integer in"):
        FixedPointCodec(limbs=4)
    with pytest.raises(ValueError, match="fraction_bits 59 leaves no integer bits"):
        FixedPointCodec(fraction_bits=59, limbs=3, quantization_range=2**20)
    FixedPointCodec(clipping_range=0.5, quantization_range=2**16, limbs=3, fraction_bits=24)


def test_decoding_refuses_an_aggregate_no_honest_codec_sites_produce() -> None:
    codec = FixedPointCodec()
    x = np.random.default_rng(5).uniform(-5, 5, 100)
    fed = Federation(3)
    # a site that reports another weight than max_weight scales its digits off the grid
    mean = fed.aggregate([codec.encode(x)] * 3, [1000, 1000, 700])
    with pytest.raises(cf.StatisticRangeError, match="off the grid"):
        codec.decode(mean, 3)
    # digit sums beyond n (2^L - 1): a mean no three sites' digits give
    too_big = np.full(300, codec.clipping_range * 1.5)
    with pytest.raises(cf.StatisticRangeError, match=r"outside \[0, 12582909\]"):
        codec.decode(too_big, 3)
    with pytest.raises(ValueError, match="overflows the modulus"):
        codec.decode(mean, 1024)


def test_an_aggregate_counting_more_than_the_caps_is_refused() -> None:
    x, y = features(30, 3, 2)
    stats = Statistics.of(x, y, 2)
    (problem,) = cf.aggregate_problems(stats, max_examples=29)
    assert problem.reason == "weight" and "30" in problem.detail


# --- screening plain statistics ----------------------------------------------------


def screen(stats: Statistics | np.ndarray, max_examples: float = 1e9) -> list[cf.Problem]:
    vector = stats.to_vector() if isinstance(stats, Statistics) else stats
    return cf.screen_statistics(vector, Layout(3, 5), max_examples)


def honest() -> Statistics:
    x, y = features(60, 5, 3)
    x[:, 4] = 0.0  # a dead ReLU feature: equality in Cauchy-Schwarz
    return Statistics.of(x, y, 3)


def test_honest_statistics_pass_the_screen_also_with_fewer_examples_than_features() -> None:
    assert screen(honest(), max_examples=60) == []
    x, _y = features(3, 5, 3, seed=9)  # rank-deficient scatter
    assert screen(Statistics.of(x, np.array([0, 1, 1]), 3)) == []


def replaced(stats: Statistics, **changes: np.ndarray) -> Statistics:
    fields = {"counts": stats.counts, "sums": stats.sums, "gram": stats.gram, **changes}
    return Statistics(**fields)


def test_the_screen_refuses_malicious_statistics_with_a_bounded_reason() -> None:
    s = honest()
    cases: dict[str, tuple[Statistics | np.ndarray, str, str]] = {}
    vec = s.to_vector()
    cases["shape"] = (vec[:-2], "structure", "shape (31,)")
    nan = vec.copy()
    nan[5] = np.nan
    cases["nan"] = (nan, "non_finite", "the sum of class 0, feature 2")
    cases["inflated"] = (replaced(s, counts=s.counts * 10), "weight", "600 examples")
    cases["fractional"] = (replaced(s, counts=s.counts + 0.5), "malformed", "fractional")
    cases["negative"] = (replaced(s, counts=-s.counts), "malformed", "negative")
    g = s.gram.copy()
    g[0, 1] = g[1, 0] = 1.01 * math.sqrt(g[0, 0] * g[1, 1])
    cases["off_diagonal"] = (replaced(s, gram=g), "range", "first the Gram entry (0, 1)")
    g = s.gram.copy()
    g[2, 2] = -1.0
    cases["diagonal"] = (replaced(s, gram=g), "range", "negative Gram diagonal")
    cases["sums"] = (replaced(s, sums=s.sums * 3), "range", "sum_c s_ca^2/n_c > G_aa")
    empty = s.counts.copy()
    empty[1] = 0
    cases["empty"] = (replaced(s, counts=empty), "range", "class 1 has no examples")
    # pairwise Cauchy-Schwarz holds, but no vectors have these second moments
    g = np.full((5, 5), -0.9) + 1.9 * np.eye(5)
    cases["psd"] = (Statistics(np.array([1.0, 1, 1]), np.zeros((3, 5)), g), "range", "semi-def")
    for name, (stats, reason, words) in cases.items():
        problems = screen(stats, max_examples=60)
        assert len(problems) == 1, name
        assert problems[0].reason == reason, (name, problems)
        assert reason in REJECT_REASONS
        assert words in problems[0].detail, (name, problems[0].detail)


# --- the solves --------------------------------------------------------------------


@pytest.mark.parametrize(("classes", "shrinkage"), [(2, 0.1), (3, 0.3), (3, 0.0)])
def test_lda_is_scikit_learns_shrinkage_lda(classes: int, shrinkage: float) -> None:
    x, y = features(400, 6, classes, seed=classes)
    head = cf.lda_head(Statistics.of(x, y, classes), shrinkage)
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y)
    np.testing.assert_allclose(head.probabilities(x), sk.predict_proba(x), atol=1e-9)


def test_lda_with_an_identity_target_is_the_textbook_formula() -> None:
    x, y = features(300, 5, 3, seed=7)
    alpha = 0.2
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    within = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(3))
    cov = within / len(y)
    shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / 5 * np.eye(5)
    w = np.linalg.solve(shrunk, means.T).T
    prior = np.bincount(y) / len(y)
    logits = x @ w.T - 0.5 * np.sum(means * w, axis=1) + np.log(prior)
    head = cf.lda_head(Statistics.of(x, y, 3), alpha)
    np.testing.assert_allclose(head.logits(x), logits, rtol=1e-9, atol=1e-9)


def test_ridge_is_the_least_squares_solution_with_an_unpenalised_bias() -> None:
    x, y = features(250, 6, 3, seed=11)
    lam = 0.05
    n = len(y)
    a = np.vstack(
        [
            np.hstack([x, np.ones((n, 1))]),
            np.hstack([math.sqrt(lam * n) * np.eye(6), np.zeros((6, 1))]),
        ]
    )
    targets = np.vstack([np.eye(3)[y], np.zeros((6, 3))])
    theta = np.linalg.lstsq(a, targets, rcond=None)[0]
    head = cf.ridge_solution(Statistics.of(x, y, 3), lam)
    np.testing.assert_allclose(head.weight, theta[:6].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(head.bias, theta[6], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_ridge_head_is_lda_on_the_ridge_scores(classes: int) -> None:
    """Calibrated from the statistics alone: the same as fitting a shared-covariance
    Gaussian model to the scores of the data themselves."""
    x, y = features(500, 6, classes, seed=13)
    stats = Statistics.of(x, y, classes)
    scores = cf.ridge_solution(stats, 0.01).logits(x)
    means = np.stack([scores[y == c].mean(axis=0) for c in range(classes)])
    centred = scores - means[y]
    precision = np.linalg.pinv(centred.T @ centred / len(y), rcond=1e-10, hermitian=True)
    prior = np.bincount(y) / len(y)
    logits = (
        scores @ precision @ means.T
        - 0.5 * np.einsum("ck,kl,cl->c", means, precision, means)
        + np.log(prior)
    )
    head = cf.ridge_head(stats, 0.01)
    probs = head.probabilities(x)
    np.testing.assert_allclose(
        probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-8
    )
    if classes == 2:  # a monotone map of the ridge score: ridge's ranking
        order = np.argsort(scores[:, 1] - scores[:, 0])
        assert (np.diff(probs[order, 1]) >= -1e-12).all()
    assert (probs.argmax(1) == y).mean() > 0.5


def test_the_federated_head_is_the_pooled_head_through_secagg() -> None:
    x, y = features(3000, 8, 3, seed=17)
    sites = [
        Statistics.of(x[p], y[p], 3) for p in (slice(0, 2000), slice(2000, 2010), slice(2010, 3000))
    ]
    codec = FixedPointCodec()
    mean = Federation(3).aggregate([codec.encode(s.to_vector()) for s in sites], [1000] * 3)
    fed = Statistics.from_vector(codec.decode(mean, 3), sites[0].layout)
    pooled = Statistics.of(x, y, 3)
    for solve, p in ((cf.lda_head, 0.1), (cf.ridge_head, 0.01)):
        diff = np.abs(solve(fed, p).probabilities(x) - solve(pooled, p).probabilities(x))
        assert diff.max() < 1e-9


def test_a_class_no_site_holds_is_named() -> None:
    x, y = features(50, 4, 2)
    stats = Statistics.of(x, y, 3)
    for solve in (cf.lda_head, cf.ridge_head):
        with pytest.raises(cf.MissingClassError, match="class 'effusion' has no training"):
            solve(stats, 0.1, class_names=("normal", "pneumonia", "effusion"))


def test_an_unsolvable_system_is_one_clear_error() -> None:
    x, y = features(4, 6, 2, seed=3)  # 4 examples, 6 features: singular without shrinkage
    with pytest.raises(cf.SolveError, match=r"LDA covariance \(shrinkage 0\) is not positive"):
        cf.lda_head(Statistics.of(x, y, 2), 0.0)


def test_the_candidate_grids() -> None:
    x, y = features(200, 5, 2)
    stats = Statistics.of(x, y, 2)
    lda = cf.candidate_heads(stats, cf.LDA)
    ridge = cf.candidate_heads(stats, cf.RIDGE, (0.5,))
    assert [c.parameter for c in lda] == list(cf.LDA_SHRINKAGES)
    assert [c.label for c in ridge] == ["ridge lambda=0.5"]
    assert all(c.head.weight.shape == (2, 5) for c in lda + ridge)
    with pytest.raises(ValueError, match="method must be one of"):
        cf.candidate_heads(stats, "svm")


# --- personalisation ---------------------------------------------------------------


def test_a_personalised_head_moves_from_the_site_to_the_federation_with_kappa() -> None:
    x, y = features(1000, 5, 2, seed=19)
    site = Statistics.of(x[:100], y[:100], 2)
    fed = Statistics.of(x, y, 2)
    assert_stats_close(cf.personalized_statistics(site, fed, 0.0), site)
    mixed = cf.personalized_statistics(site, fed, 1.0)
    assert mixed.total == pytest.approx(2 * site.total)
    local, federated = cf.lda_head(site, 0.1), cf.lda_head(fed, 0.1)
    far = cf.lda_head(cf.personalized_statistics(site, fed, 1e6), 0.1)
    np.testing.assert_allclose(far.weight, federated.weight, rtol=1e-4)
    between = cf.lda_head(mixed, 0.1).probabilities(x)
    lo, hi = local.probabilities(x), federated.probabilities(x)
    assert np.abs(between - hi).mean() < np.abs(lo - hi).mean()
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        cf.personalized_statistics(site, fed, -1.0)


# --- differential privacy ----------------------------------------------------------


def test_one_record_changes_each_block_by_at_most_its_sensitivity() -> None:
    r, rng = 2.5, np.random.default_rng(23)
    release = GaussianRelease(1.0, r)
    layout = Layout(2, 6)
    sens = release.sensitivities()
    for k in range(50):
        x = rng.normal(size=6) if k else np.eye(6)[2]  # the axis-aligned one is tight
        x *= r / np.linalg.norm(x)
        change = Statistics.of(x[np.newaxis], np.array([1]), 2).to_vector()
        blocks = np.split(change, [layout.num_classes, layout.num_classes * (1 + layout.dim)])
        norms = [np.linalg.norm(b) for b in blocks]
        assert all(n <= s * (1 + 1e-12) for n, s in zip(norms, sens, strict=True))
        if k == 0:
            np.testing.assert_allclose(norms, sens)


def test_the_noise_has_the_stated_standard_deviation_per_block() -> None:
    release = GaussianRelease(noise_multiplier=1.3, clip_norm=3.0, shares=(0.2, 0.3, 0.5))
    x, y = features(100, 4, 2)
    stats = Statistics.of(x, y, 2)
    rng = np.random.default_rng(29)
    draws = np.stack(
        [release.add_noise(stats, rng).to_vector() - stats.to_vector() for _ in range(3000)]
    )
    blocks = np.split(draws, [2, 10], axis=1)
    for block, std, share, sens in zip(
        blocks, release.noise_stds(), release.shares, release.sensitivities(), strict=True
    ):
        assert std == pytest.approx(1.3 * sens / math.sqrt(share))
        # 3000 x >= 2 draws: the sample std is within ~1.5% (one standard error) of std
        assert block.std() == pytest.approx(std, rel=0.05)
        assert abs(block.mean()) < 4 * std / math.sqrt(block.size)
    # one Gaussian mechanism of multiplier z: sum_j (sensitivity_j / std_j)^2 = 1 / z^2
    ratio = sum(
        (s / d) ** 2 for s, d in zip(release.sensitivities(), release.noise_stds(), strict=True)
    )
    assert ratio == pytest.approx(1 / 1.3**2)


def _exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle & Wang (2018): the smallest epsilon of a Gaussian mechanism at delta."""

    def delta_of(eps: float) -> float:
        return float(
            norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z)
        )

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z", [0.8, 2.0, 5.0])
def test_the_accountants_epsilon_bounds_the_exact_one_closely(z: float) -> None:
    eps = GaussianRelease(z, 1.0, delta=1e-5).epsilon()
    exact = _exact_gaussian_epsilon(z, 1e-5)
    assert exact <= eps <= 1.6 * exact


def test_a_noisy_release_stays_solvable() -> None:
    x, y = features(80, 6, 3, seed=31)
    stats = Statistics.of(x, y, 3)
    release = GaussianRelease(
        noise_multiplier=5.0, clip_norm=float(np.linalg.norm(x, axis=1).max())
    )
    rng = np.random.default_rng(37)
    noisy = release.add_noise(stats, rng)
    assert np.linalg.eigvalsh(cf.within_scatter(noisy)).min() < 0  # raw noise breaks it
    out = cf.consistent(noisy)
    assert (out.counts >= 1).all()
    assert np.linalg.eigvalsh(cf.within_scatter(out)).min() > -1e-8 * np.trace(out.gram)
    for solve, p in ((cf.lda_head, 0.01), (cf.ridge_head, 1e-4)):
        assert np.isfinite(solve(out, p).probabilities(x)).all()
    assert_stats_close(cf.consistent(stats), stats, atol=1e-8)


def test_release_settings_are_validated_by_name() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        GaussianRelease(0.0, 1.0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        GaussianRelease(1.0, -1.0)
    with pytest.raises(ValueError, match="shares must be 3 positive numbers"):
        GaussianRelease(1.0, 1.0, shares=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="delta must be in"):
        GaussianRelease(1.0, 1.0, delta=0.0)
    views = GaussianRelease(1.0, 2.0, rows_per_record=4)
    assert views.sensitivities() == (4.0, 8.0, 16.0)


def test_flowers_secagg_workflow_delivers_the_exact_sum() -> None:
    """Flower's own SecAggPlusWorkflow and secaggplus_mod (sites served in-process by
    the loopback grid): the strategy receives the mean the codec decodes to the sum."""
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import (
        FitRes,
        NDArrays,
        Parameters,
        Scalar,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from tests.loopback import LoopbackGrid

    x, y = features(5837, 6, 3, seed=41)
    cuts = {1: slice(0, 5000), 2: slice(5000, 5037), 3: slice(5037, 5837)}
    sites = {nid: Statistics.of(x[p], y[p], 3) for nid, p in cuts.items()}
    codec, max_weight = FixedPointCodec(), 1000

    class StatisticsClient(NumPyClient):
        def __init__(self, stats: Statistics) -> None:
            self.stats = stats

        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            return [codec.encode(self.stats.to_vector(), self.stats.layout)], max_weight, {}

    app = ClientApp(
        client_fn=lambda ctx: StatisticsClient(sites[ctx.node_id]).to_client(),
        mods=[secaggplus_mod],
    )
    received: list[np.ndarray] = []

    class Capture(FedAvg):
        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[tuple[ClientProxy, FitRes] | BaseException],
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            received.append(parameters_to_ndarrays(results[0][1].parameters)[0])
            return super().aggregate_fit(server_round, results, failures)

    size = 3 * sites[1].layout.size
    strategy = Capture(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=3,
        min_available_clients=3,
        initial_parameters=ndarrays_to_parameters([np.zeros(size)]),
    )
    context = LegacyContext(
        Context(1, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1), strategy
    )
    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, max_weight=max_weight)
    DefaultWorkflow(fit_workflow=workflow)(LoopbackGrid(app, {n: {} for n in sites}), context)
    plain = sum(s.to_vector() for s in sites.values())
    decoded = codec.decode(received[0], 3)
    assert (np.abs(decoded - plain) <= codec.error_bound(3) + 4e-16 * np.abs(plain)).all()
