"""The pairwise measures in tiles against a plain dense computation in numpy (K = 2,000), pairs too close for a
Gram matrix, and Wu & Papyan's GNC2 and UNC3 by hand."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from nc_metrics import FeatureStats, PairMeasures, metrics_from_stats, pair_measures

PAIRWISE = ("equiangular_means", "equiangular_weights", "maxangle_means", "maxangle_weights", "cdnv", "etf_error_means",
            "etf_error_weights", "wh_alignment", "hyperspherical_energy_means", "gnc2_log_distance_var", "unc3_dot_var",
            "unc3_cosine_var", "self_duality")


def dense_reference(h: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """The measures over pairs of classes, whole K x K matrices in numpy, distances from scipy's pdist (each pair's
    difference), from the features themselves (balanced classes: mu_G the mean of all features)."""
    classes = len(w)
    means = np.stack([h[y == c].mean(axis=0) for c in range(classes)])
    variances = np.array([((h[y == c] - means[c]) ** 2).sum(axis=1).mean() for c in range(classes)])
    centred = means - h.mean(axis=0)
    off = ~np.eye(classes, dtype=bool)
    simplex = (np.eye(classes) - 1 / classes) / np.sqrt(classes - 1)

    def cosines(v):
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        return (unit @ unit.T)[off]

    def error(gram):
        return np.linalg.norm(gram / np.linalg.norm(gram) - simplex)

    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    distances = pdist(unit)  # the unordered pairs c < c'
    first, second = np.triu_indices(classes, k=1)
    dots = (w * centred).sum(axis=1)
    return {"equiangular_means": cosines(centred).std(ddof=1), "equiangular_weights": cosines(w).std(ddof=1),
            "maxangle_means": np.abs(cosines(centred) + 1 / (classes - 1)).mean(),
            "maxangle_weights": np.abs(cosines(w) + 1 / (classes - 1)).mean(),
            "cdnv": ((variances[first] + variances[second]) / (2 * pdist(means, "sqeuclidean"))).mean(),
            "etf_error_means": error(centred @ centred.T), "etf_error_weights": error(w @ w.T),
            "wh_alignment": error(w @ centred.T), "hyperspherical_energy_means": (1 / distances).mean(),
            "gnc2_log_distance_var": np.log(1 / distances).var(), "unc3_dot_var": dots.var(ddof=1),
            "unc3_cosine_var": (dots / (np.linalg.norm(w, axis=1) * np.linalg.norm(centred, axis=1))).var(ddof=1),
            "self_duality": ((w / np.linalg.norm(w) - centred / np.linalg.norm(centred)) ** 2).sum()}


def test_tiled_measures_equal_the_dense_computation_at_two_thousand_classes():
    classes, dim = 2000, 24
    generator = np.random.default_rng(0)
    means = 3 * generator.standard_normal((classes, dim))
    y = np.repeat(np.arange(classes), 2)
    h = means[y] + generator.standard_normal((2 * classes, dim))
    w = means + generator.standard_normal((classes, dim))
    stats = FeatureStats(classes, dim)
    for chunk in np.array_split(np.arange(len(y)), 7):
        stats.update(torch.from_numpy(h[chunk]), torch.from_numpy(y[chunk]))
    expected = dense_reference(h, y, w)
    tiles = {side: metrics_from_stats(stats, torch.from_numpy(w), memory=8 * 12 * side ** 2) for side in (173, 2000)}
    for key in PAIRWISE:
        for side, measured in tiles.items():  # 12 x 12 tiles (the last ragged), and one tile
            assert measured[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-300), (key, side)


def test_pairs_too_close_for_the_gram_matrix_are_measured_from_their_difference():
    # Two class means 1e-7 apart at distance ~1 from the rest: from the Gram matrix, ||a||^2 + ||b||^2 - 2 a.b
    # would lose about 1e-16 / 1e-14 of their squared distance; the CDNV and the energy are dominated by that pair.
    means = np.array([[1.0, 0.0, 0.0], [1.0, 1e-7, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    deviations = np.array([[0.0, 0.0, 1e-9], [0.0, 0.0, -1e-9]])
    h = (means[:, None, :] + deviations[None]).reshape(-1, 3)
    y = np.repeat(np.arange(4), 2)
    w = np.eye(4, 3) + 0.5
    stats = FeatureStats(4, 3)
    stats.update(torch.from_numpy(h), torch.from_numpy(y))
    measured = metrics_from_stats(stats, torch.from_numpy(w))
    expected = dense_reference(h, y, w)
    for key in ("cdnv", "hyperspherical_energy_means", "gnc2_log_distance_var"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-8), key


def test_a_tile_and_its_mirror_count_as_the_dense_matrix_does_for_every_tile_side():
    vectors = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    variances = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whole = pair_measures(vectors, variances)
    for side in (1, 2, 3, 10):
        tiled = pair_measures(vectors, variances, memory=8 * 12 * side ** 2)
        for field in PairMeasures.__dataclass_fields__:
            assert getattr(tiled, field) == pytest.approx(getattr(whole, field), rel=1e-13), (side, field)


def test_gnc2_and_unc3_by_hand():
    # Means (1, 0), (0, 1), (-1, -1), class 0 deviations +-(0.3, 0), class 1 +-(0, 0.6), class 2 one sample: the
    # global mean is (0.2, 0.2) and M~ = [(0.8, -0.2), (-0.2, 0.8), (-1.2, -1.2)] (as in test_nc_metrics).
    # Unit centred means m0 = (4, -1)/sqrt17, m1 = (-1, 4)/sqrt17, m2 = -(1, 1)/sqrt2: ||m0 - m1|| = 5 sqrt2/sqrt17,
    # ||m0 - m2|| = ||m1 - m2|| = sqrt(2 + 6/sqrt34). With a = log(1/||m0 - m1||) and b the other two, each pair
    # counted alike, the population variance is (2/9)(a - b)^2.
    h = torch.tensor([[1.3, 0.0], [0.7, 0.0], [0.0, 1.6], [0.0, 0.4], [-1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2])
    stats = FeatureStats(3, 2)
    stats.update(h, y)
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    measured = metrics_from_stats(stats, w)
    a = -math.log(5 * math.sqrt(2) / math.sqrt(17))
    b = -0.5 * math.log(2 + 6 / math.sqrt(34))
    assert measured["gnc2_log_distance_var"] == pytest.approx(2 / 9 * (a - b) ** 2, rel=1e-12)
    # <w_c, m~_c> = 1.6, 0.8, 2.4: mean 1.6, unbiased variance (0 + 0.64 + 0.64) / 2 = 0.64.
    assert measured["unc3_dot_var"] == pytest.approx(0.64, rel=1e-12)
    # cosines 1.6 / (2 sqrt0.68), 0.8 / sqrt0.68 (equal: 0.8 / sqrt0.68 each) and 2.4 / (sqrt2 sqrt2.88) = 1:
    # two values c = 0.8 / sqrt0.68 and 1, mean (2c + 1)/3, unbiased variance (1 - c)^2 / 3.
    c = 0.8 / math.sqrt(0.68)
    assert measured["unc3_cosine_var"] == pytest.approx((1 - c) ** 2 / 3, rel=1e-12)


def test_gnc2_is_zero_for_a_simplex_and_unc3_for_a_classifier_proportional_to_the_means():
    from test_nc_metrics import simplex_etf
    etf = simplex_etf(7, 9)
    labels = torch.arange(7).repeat(3)
    stats = FeatureStats(7, 9)
    stats.update(5 * etf[labels] + 2.0, labels)
    measured = metrics_from_stats(stats, 0.3 * etf)
    assert measured["gnc2_log_distance_var"] < 1e-28
    assert measured["unc3_dot_var"] < 1e-28 and measured["unc3_cosine_var"] < 1e-28
