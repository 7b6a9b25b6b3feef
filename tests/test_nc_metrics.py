"""nc_metrics against closed-form cases, hand-computed examples, invariances and an exact reference."""
import math

import numpy as np
import pytest
import torch

from nc_metrics import (METRIC_KEYS, STATS_KEYS, FeatureStats, calibration_bins, collapse_metrics,
                        expected_calibration_error, metrics_from_stats, ncc_mismatch, pair_measures, plane_coordinates,
                        simplex_plane)

SQRT2 = math.sqrt(2.0)


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """C unit vectors in R^d with pairwise cosine -1/(C-1), randomly oriented (d >= C - 1)."""
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centred)  # orthonormal basis whose span contains the simplex
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    rank = num_classes - 1
    coordinates = centred @ basis[:, :rank]  # (C, C-1) coordinates of the simplex in its own span
    etf = coordinates @ rotation[:rank]
    return etf / etf.norm(dim=1, keepdim=True)


def as_features(means: list[list[float]], deviations: list[list[list[float]]]):
    """Features mean_c + deviation for each class's list of deviations, with their labels."""
    rows, labels = [], []
    for c, (mean, devs) in enumerate(zip(means, deviations)):
        for dev in devs:
            rows.append([m + e for m, e in zip(mean, dev)])
            labels.append(c)
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(labels)


# ---------------------------------------------------------------- closed form: the simplex ETF

@pytest.mark.parametrize("num_classes,dim", [(2, 1), (3, 2), (10, 9), (10, 512), (7, 30)])
def test_simplex_etf_is_fully_collapsed(num_classes, dim):
    etf = simplex_etf(num_classes, dim)
    offset = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    means = 3.7 * etf + offset  # any scale, any global mean
    labels = torch.arange(num_classes).repeat_interleave(5)
    features = means[labels]
    weight = 0.4 * etf
    bias = -weight @ offset  # the classifier ignores the global mean, as NC4 needs
    metrics = collapse_metrics(features, labels, weight, bias)
    assert metrics["nc1"] == 0.0
    assert metrics["nc1_trace_ratio"] == 0.0 and metrics["cdnv"] == 0.0
    # The Riesz s = 1 energy of a simplex: every pairwise distance is sqrt(2 - 2 cos) = sqrt(2C / (C - 1)).
    energy = math.sqrt((num_classes - 1) / (2 * num_classes))
    assert metrics["hyperspherical_energy_means"] == pytest.approx(energy, rel=1e-12)
    for key in set(METRIC_KEYS) - {"hyperspherical_energy_means"}:
        assert abs(metrics[key]) < 1e-10, key


def test_features_on_their_class_means_have_zero_trace_ratio_and_cdnv():
    generator = torch.Generator().manual_seed(2)
    means = 1e3 + torch.randn(6, 9, dtype=torch.float64, generator=generator)  # no ETF, far from the origin
    labels = torch.arange(6).repeat(4)
    metrics = collapse_metrics(means[labels].to(torch.float32), labels, torch.randn(6, 9, generator=generator))
    assert metrics["nc1_trace_ratio"] == 0.0 and metrics["cdnv"] == 0.0 and metrics["nc1"] == 0.0
    assert metrics["etf_error_means"] > 0.1  # the means themselves are not collapsed


def test_simplex_etf_cosines_are_minus_one_over_c_minus_one():
    for num_classes in (3, 10, 100):
        measured = pair_measures(simplex_etf(num_classes, num_classes + 5), memory=8 * 12 * 7 ** 2)  # tiles of 7
        assert measured.cosine_mean == pytest.approx(-1.0 / (num_classes - 1), abs=1e-12)
        assert measured.cosine_std < 1e-12 and measured.maxangle < 1e-12


def test_equiangularity_counts_ordered_pairs_and_relates_to_the_other_conventions_by_a_factor():
    """docs/numerics.md's conversion: with n = C(C-1)/2 pairs, the unbiased Std over the ordered entries is the
    unbiased Std over unordered pairs times sqrt(2(n-1)/(2n-1)); the population Std is that times sqrt((n-1)/n)."""
    generator = torch.Generator().manual_seed(0)
    for classes in (5, 10):
        vectors = torch.randn(classes, 7, generator=generator, dtype=torch.float64)
        unit = (vectors / vectors.norm(dim=1, keepdim=True)).numpy()
        unordered = np.array([unit[a] @ unit[b] for a in range(classes) for b in range(a + 1, classes)])
        ordered = np.array([unit[a] @ unit[b] for a in range(classes) for b in range(classes) if a != b])
        metric = collapse_metrics(vectors, torch.arange(classes), vectors)["equiangular_weights"]
        n = len(unordered)
        assert metric == pytest.approx(ordered.std(ddof=1), rel=1e-12)
        assert metric == pytest.approx(unordered.std(ddof=1) * math.sqrt(2 * (n - 1) / (2 * n - 1)), rel=1e-12)
        assert unordered.std(ddof=0) == pytest.approx(unordered.std(ddof=1) * math.sqrt((n - 1) / n), rel=1e-12)


# ---------------------------------------------------------------- hand-computed small cases

def test_two_classes_by_hand():
    # mu_0 = (-1, 0), mu_1 = (1, 0), deviations +-(a, 1) with a = 1/2.
    # Sigma_W = [[a^2, a], [a, 1]], Sigma_B = [[1, 0], [0, 0]] -> Tr(Sigma_W Sigma_B^+) = a^2, nc1 = a^2 / 2.
    features, labels = as_features([[-1, 0], [1, 0]], [[[0.5, 1], [-0.5, -1]], [[0.5, 1], [-0.5, -1]]])
    weight = torch.tensor([[-2.0, 0.0], [1.0, 1.0]])
    metrics = collapse_metrics(features, labels, weight, bias=torch.tensor([0.0, -0.6]))
    assert metrics["nc1"] == pytest.approx(0.125, rel=1e-12)
    assert metrics["equinorm_means"] == pytest.approx(0.0, abs=1e-15)  # both centred means have norm 1
    # ||w|| = 2 and sqrt(2): Std / Avg = (|2 - sqrt2| / sqrt2) / ((2 + sqrt2) / 2) = 3 sqrt2 - 4
    assert metrics["equinorm_weights"] == pytest.approx(3 * SQRT2 - 4, rel=1e-12)
    assert metrics["equiangular_means"] == 0.0 and metrics["equiangular_weights"] == 0.0  # one pair, twice
    assert metrics["maxangle_means"] == pytest.approx(0.0, abs=1e-15)  # cos = -1 = -1/(C-1)
    assert metrics["maxangle_weights"] == pytest.approx(1 - 1 / SQRT2, rel=1e-12)  # cos(w0, w1) = -1/sqrt2
    # <W, M~> = 3, ||W||_F = sqrt6, ||M~||_F = sqrt2: 2 - 2 * 3 / sqrt12 = 2 - sqrt3
    assert metrics["self_duality"] == pytest.approx(2 - math.sqrt(3), rel=1e-12)
    # Only (0.5, -1) disagrees: logits (-1, -1.1) pick class 0, its nearest mean is class 1's.
    assert metrics["ncc_mismatch"] == 0.25


def test_three_classes_by_hand():
    # Means (1, 0), (0, 1), (-1, -1) (global mean 0), deviations +-(s, 0) with s = 0.3.
    # Sigma_B = [[2, 1], [1, 2]] / 3, its inverse [[2, -1], [-1, 2]]; Sigma_W = [[s^2, 0], [0, 0]]
    # -> Tr = 2 s^2, nc1 = 2 s^2 / 3 = 0.06.
    devs = [[0.3, 0.0], [-0.3, 0.0]]
    features, labels = as_features([[1, 0], [0, 1], [-1, -1]], [devs, devs, devs])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    metrics = collapse_metrics(features, labels, weight)
    assert metrics["nc1"] == pytest.approx(0.06, rel=1e-12)
    # norms 1, 1, sqrt2: mean m = (2 + sqrt2) / 3, unbiased Std = sqrt(((1-m)^2 * 2 + (sqrt2-m)^2) / 2)
    m = (2 + SQRT2) / 3
    cv = math.sqrt((2 * (1 - m) ** 2 + (SQRT2 - m) ** 2) / 2) / m
    assert metrics["equinorm_means"] == pytest.approx(cv, rel=1e-12)
    assert metrics["equinorm_weights"] == pytest.approx(cv, rel=1e-12)
    # The cosine matrix's off-diagonal entries, each pair twice: 0, 0 and four times -1/sqrt2. Their mean
    # is -sqrt2/3, their squared deviations sum to 2 * 2/9 + 4 * 1/18 = 2/3: unbiased Std = sqrt(2/15).
    # (The 3 unordered pairs alone would give 1/sqrt6.) Avg |cos + 1/2| = (sqrt2 - 1/2) / 3 either way.
    assert metrics["equiangular_means"] == pytest.approx(math.sqrt(2 / 15), rel=1e-12)
    assert metrics["equiangular_weights"] == pytest.approx(math.sqrt(2 / 15), rel=1e-12)
    assert metrics["maxangle_means"] == pytest.approx((SQRT2 - 0.5) / 3, rel=1e-12)
    assert metrics["maxangle_weights"] == pytest.approx((SQRT2 - 0.5) / 3, rel=1e-12)
    assert metrics["self_duality"] == pytest.approx(0.0, abs=1e-15)  # W equals M~
    assert metrics["ncc_mismatch"] == 0.0


def test_three_classes_other_measures_by_hand():
    # Means (1, 0), (0, 1), (-1, -1); class 0 has deviations +-(0.3, 0), class 1 +-(0, 0.6), class 2 one sample
    # on its mean: V = (0.09, 0.36, 0). The global mean of the 5 samples is (2 mu0 + 2 mu1 + mu2) / 5 = (0.2, 0.2):
    # M~ = [(0.8, -0.2), (-0.2, 0.8), (-1.2, -1.2)], squared norms 0.68, 0.68, 2.88.
    # Tr(Sigma_W) = (2 * 0.09 + 2 * 0.36) / 5 = 0.18, Tr(Sigma_B) = 4.24 / 3: ratio 0.54 / 4.24.
    # Squared distances between means: |mu0 - mu1|^2 = 2, |mu0 - mu2|^2 = 5, |mu1 - mu2|^2 = 5, so the CDNV is
    # ((0.09 + 0.36) / 4 + (0.09 + 0) / 10 + (0.36 + 0) / 10) / 3 = (0.1125 + 0.009 + 0.036) / 3 = 0.0525.
    features, labels = as_features([[1, 0], [0, 1], [-1, -1]],
                                   [[[0.3, 0.0], [-0.3, 0.0]], [[0.0, 0.6], [0.0, -0.6]], [[0.0, 0.0]]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    metrics = collapse_metrics(features, labels, weight)
    assert metrics["nc1_trace_ratio"] == pytest.approx(0.54 / 4.24, rel=1e-12)
    assert metrics["cdnv"] == pytest.approx(0.0525, rel=1e-12)
    # M~ M~^T = [[0.68, -0.32, -0.72], [-0.32, 0.68, -0.72],
    # [-0.72, -0.72, 2.88]], Frobenius norm sqrt(2 * 0.4624 + 2 * 0.1024 + 4 * 0.5184 + 8.2944) = sqrt(11.4976).
    # E = [[2, -1, -1], [-1, 2, -1], [-1, -1, 2]] / (3 sqrt2).
    gram = np.array([[0.68, -0.32, -0.72], [-0.32, 0.68, -0.72], [-0.72, -0.72, 2.88]])
    simplex = np.array([[2, -1, -1], [-1, 2, -1], [-1, -1, 2]]) / (3 * SQRT2)
    assert np.sqrt(11.4976) == pytest.approx(np.linalg.norm(gram), rel=1e-12)
    assert metrics["etf_error_means"] == pytest.approx(np.linalg.norm(gram / np.sqrt(11.4976) - simplex), rel=1e-12)
    # W W^T = diag(1, 1, 0), norm sqrt2: the error is || diag(1, 1, 0)/sqrt2 - E ||_F; entry by entry:
    # (1/sqrt2 - 2/(3 sqrt2))^2 = 1/18 twice, (2/(3 sqrt2))^2 = 2/9 once, 1/18 for each of the 6 off-diagonals.
    assert metrics["etf_error_weights"] == pytest.approx(math.sqrt(2 / 18 + 2 / 9 + 6 / 18), rel=1e-12)
    # W M~^T: rows w_c . m~_c' = [[0.8, -0.2, -1.2], [-0.2, 0.8, -1.2], [0, 0, 0]], norm sqrt(4.24).
    product = np.array([[0.8, -0.2, -1.2], [-0.2, 0.8, -1.2], [0.0, 0.0, 0.0]])
    assert metrics["wh_alignment"] == pytest.approx(np.linalg.norm(product / np.sqrt(4.24) - simplex), rel=1e-12)
    # Unit centred means: m0 = (4, -1)/sqrt17, m1 = (-1, 4)/sqrt17, m2 = -(1, 1)/sqrt2. ||m0 - m1|| = 5 sqrt2 / sqrt17;
    # ||m0 - m2||^2 = ||m1 - m2||^2 = 2 + 2 * 3 / sqrt34 (cos(m0, m2) = -3 / sqrt34).
    far = 1 / math.sqrt(2 + 6 / math.sqrt(34))
    assert metrics["hyperspherical_energy_means"] == pytest.approx((math.sqrt(17) / (5 * SQRT2) + 2 * far) / 3,
                                                                   rel=1e-12)


def test_unbalanced_classes_use_the_weighted_global_mean():
    # Class 0: (-1, 1), (-1, 1), (2, 1) -> mu_0 = (0, 1); class 1: (4, 1). mu_G = (3 mu_0 + mu_1) / 4 = (1, 1).
    # M~ = [(-1, 0), (3, 0)]: Sigma_B = [[5, 0], [0, 0]]; Sigma_W = [[6 / 4, 0], [0, 0]] -> nc1 = 1.5 / 5 / 2.
    features = torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    metrics = collapse_metrics(features, labels, weight=torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert metrics["nc1"] == pytest.approx(0.15, rel=1e-12)
    assert metrics["equinorm_means"] == pytest.approx(SQRT2 / 2, rel=1e-12)  # norms 1 and 3
    assert metrics["self_duality"] == pytest.approx(2 - 2 * 4 / (SQRT2 * math.sqrt(10)), rel=1e-12)


def test_ncc_mismatch_with_other_means():
    # Test features against another split's means (the paper's Figure 7).
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.5, 1.0], [-1.0, 0.0]])
    weight, bias = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0, -2.2])
    # classifier: class 1 iff x > 2.2 -> 0, 1, 1, 0; nearest mean: class 1 iff x > 2 -> 0, 1, 1, 0
    assert ncc_mismatch(features, weight, bias, means) == 0.0
    bias = torch.tensor([0.0, -2.8])  # class 1 iff x > 2.8: (2.5, 1) now disagrees
    assert ncc_mismatch(features, weight, bias, means) == 0.25


# ---------------------------------------------------------------- invariances and streaming

def random_problem(num_samples=300, num_classes=5, dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    means = 3 * torch.randn(num_classes, dim, dtype=torch.float64, generator=generator)
    features = means[labels] + torch.randn(num_samples, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(num_classes, dim, dtype=torch.float64, generator=generator)
    bias = torch.randn(num_classes, dtype=torch.float64, generator=generator)
    return features, labels, weight, bias


def test_nc1_is_invariant_to_rotation_and_scale_of_the_features():
    features, labels, weight, _ = random_problem()
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(3)))
    base = collapse_metrics(features, labels, weight)["nc1"]
    moved = collapse_metrics(5.5 * features @ rotation.T, labels, weight)["nc1"]
    assert moved == pytest.approx(base, rel=1e-12)


def test_self_duality_is_invariant_to_scaling_the_classifier():
    features, labels, weight, _ = random_problem()
    base = collapse_metrics(features, labels, weight)
    scaled = collapse_metrics(features, labels, 17.0 * weight)
    for key in ("self_duality", "equinorm_weights", "equiangular_weights", "maxangle_weights"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 300])
def test_streaming_equals_full_tensors_for_any_batching_and_order(batch_size):
    features, labels, weight, bias = random_problem()
    full = collapse_metrics(features, labels, weight, bias)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(batch_size))
    stats = FeatureStats(5, 12)
    for chunk in order.split(batch_size):
        stats.update(features[chunk], labels[chunk])
    streamed = metrics_from_stats(stats, weight)
    assert set(streamed) == set(STATS_KEYS)
    for key in STATS_KEYS:
        assert streamed[key] == pytest.approx(full[key], rel=1e-12), key


def test_merging_two_accumulators_equals_one_over_the_union():
    features, labels, weight, _ = random_problem()
    first, second = FeatureStats(5, 12), FeatureStats(5, 12)
    first.update(features[:100], labels[:100])
    second.update(features[100:], labels[100:])
    union = FeatureStats(5, 12)
    union.update(features, labels)
    merged = metrics_from_stats(first.merge(second), weight)
    expected = metrics_from_stats(union, weight)
    for key in STATS_KEYS:
        assert merged[key] == pytest.approx(expected[key], rel=1e-12), key
    assert first.num_samples == 300


def test_merge_fills_classes_the_first_accumulator_has_not_seen():
    features, labels, weight, _ = random_problem()
    only_low, only_high = FeatureStats(5, 12), FeatureStats(5, 12)
    low = labels < 2
    only_low.update(features[low], labels[low])
    only_high.update(features[~low], labels[~low])
    union = FeatureStats(5, 12)
    union.update(features, labels)
    assert torch.allclose(only_low.merge(only_high).class_means(), union.class_means(), rtol=1e-13)


def test_rebase_keeps_the_statistics():
    features, labels, _, _ = random_problem()
    stats = FeatureStats(5, 12)
    stats.update(features, labels)
    covariance = stats.within_class_covariance()
    variances = stats.class_variances()
    stats.rebase(torch.full((5, 12), 7.0, dtype=torch.float64))
    assert torch.allclose(stats.within_class_covariance(), covariance, rtol=1e-10, atol=1e-13)
    assert torch.allclose(stats.class_variances(), variances, rtol=1e-10, atol=1e-13)


def test_nearly_collapsed_features_far_from_the_origin_keep_their_precision():
    num_classes, dim, per_class = 4, 16, 50
    generator = torch.Generator().manual_seed(0)
    etf = simplex_etf(num_classes, dim)
    labels = torch.arange(num_classes).repeat(per_class)
    noise = 1e-3 * torch.randn(len(labels), dim, dtype=torch.float64, generator=generator)
    features = (1e4 + etf[labels] + noise).to(torch.float32)  # what a network hands over: float32
    stats = FeatureStats(num_classes, dim)
    for chunk in torch.arange(len(labels)).split(32):
        stats.update(features[chunk], labels[chunk])
    got = metrics_from_stats(stats, etf)["nc1"]

    # Exact reference: two passes in float64, deviations taken around the final class means.
    h = features.to(torch.float64)
    means = torch.stack([h[labels == c].mean(dim=0) for c in range(num_classes)])
    deviations = h - means[labels]
    sigma_w = deviations.T @ deviations / len(h)
    centred = means - h.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / num_classes)
    top = eigenvectors[:, -(num_classes - 1):] / eigenvalues[-(num_classes - 1):]
    pinv = top @ eigenvectors[:, -(num_classes - 1):].T
    expected = torch.trace(sigma_w @ pinv).item() / num_classes
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-6)


def test_other_measures_equal_a_plain_two_pass_computation():
    """Streamed in batches from float32 features far from the origin, against numpy in float64 over the
    whole set, class means first, deviations second."""
    features, labels, weight, _ = random_problem(num_samples=301, num_classes=7, dim=20, seed=4)
    features = (features + 50.0).to(torch.float32)
    stats = FeatureStats(7, 20)
    for chunk in torch.arange(301).split(64):
        stats.update(features[chunk], labels[chunk])
    got = metrics_from_stats(stats, weight)

    h, y, w = features.double().numpy(), labels.numpy(), weight.numpy()
    means = np.stack([h[y == c].mean(axis=0) for c in range(7)])
    variances = np.array([((h[y == c] - means[c]) ** 2).sum(axis=1).mean() for c in range(7)])
    centred = means - h.mean(axis=0)
    within = sum(((h[y == c] - means[c]) ** 2).sum() for c in range(7)) / len(h)
    between = (centred ** 2).sum() / 7
    pairs = [(a, b) for a in range(7) for b in range(a + 1, 7)]
    cdnv = np.mean([(variances[a] + variances[b]) / (2 * ((means[a] - means[b]) ** 2).sum()) for a, b in pairs])
    simplex = (np.eye(7) - 1 / 7) / np.sqrt(6)

    def error(gram):
        return np.linalg.norm(gram / np.linalg.norm(gram) - simplex)

    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    energy = np.mean([1 / np.linalg.norm(unit[a] - unit[b]) for a in range(7) for b in range(7) if a != b])
    expected = {"nc1_trace_ratio": within / between, "cdnv": cdnv, "etf_error_means": error(centred @ centred.T),
                "etf_error_weights": error(w @ w.T), "wh_alignment": error(w @ centred.T),
                "hyperspherical_energy_means": energy}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_hundred_classes_at_resnet50_width():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(100).repeat(3)
    features = torch.randn(300, 2048, generator=generator)
    weight = torch.randn(100, 2048, generator=generator)
    metrics = collapse_metrics(features, labels, weight, torch.zeros(100), num_classes=100)
    assert set(metrics) == set(METRIC_KEYS)
    assert all(math.isfinite(value) for value in metrics.values())


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 1, 3]), r"labels must lie in \[0, 3\)"),
    (torch.tensor([0, 1, -1]), r"labels must lie in \[0, 3\)"),
    (torch.tensor([0, 1]), "labels must have shape"),
    (torch.tensor([0.0, 1.0, 2.0]), "labels must be integers"),
])
def test_bad_labels_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        FeatureStats(3, 2).update(torch.zeros(3, 2), labels)


def test_a_class_without_samples_is_named():
    stats = FeatureStats(3, 2)
    stats.update(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no samples"):
        metrics_from_stats(stats, torch.randn(3, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_refused(bad):
    features = torch.randn(4, 2)
    features[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        FeatureStats(2, 2).update(features, torch.tensor([0, 1, 0, 1]))


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"features must have shape \(N, 3\)"):
        FeatureStats(2, 3).update(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    stats = FeatureStats(2, 3)
    stats.update(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"classifier weight must have shape \(2, 3\)"):
        metrics_from_stats(stats, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_classes=3 but the classifier has 2 rows"):
        collapse_metrics(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(2, 3), num_classes=3)


def test_fewer_than_two_classes_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        FeatureStats(1, 4)


# ---------------------------------------------------------------- calibration

def confident_logits(confidence: float, predicted: int) -> list[float]:
    """Two-class logits whose softmax gives `confidence` to class `predicted`."""
    pair = [math.log(confidence), math.log(1 - confidence)]
    return pair if predicted == 0 else pair[::-1]


def test_ece_is_zero_when_confidence_equals_accuracy():
    # Four predictions of class 0 at confidence 0.75, three of them right.
    logits = torch.tensor([confident_logits(0.75, 0)] * 4, dtype=torch.float64)
    bins = calibration_bins(logits, torch.tensor([0, 0, 0, 1]))
    assert expected_calibration_error(bins) == pytest.approx(0.0, abs=1e-12)


def test_ece_two_bins_by_hand():
    # Bin (0.8667, 0.9333]: 4 samples at 0.9, 2 right -> |0.5 - 0.9| = 0.4 with weight 4/6;
    # bin (0.5333, 0.6]: 2 samples at 0.55, 1 right -> |0.5 - 0.55| = 0.05 with weight 2/6. ECE = 17/60.
    logits = torch.tensor([confident_logits(0.9, 0)] * 4 + [confident_logits(0.55, 1)] * 2,
                          dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    bins = calibration_bins(logits[:3], labels[:3]) + calibration_bins(logits[3:], labels[3:])
    assert bins[:, 0].sum() == 6 and (bins[:, 0] > 0).sum() == 2
    assert expected_calibration_error(bins) == pytest.approx(17 / 60, rel=1e-12)


def test_a_simplex_projects_to_an_equilateral_triangle_centred_at_the_origin():
    shift = torch.linspace(-3, 5, 7, dtype=torch.float64)
    rows = 2.5 * simplex_etf(3, 7) + shift
    basis = simplex_plane(rows)
    assert torch.allclose(basis @ basis.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    corners = plane_coordinates(rows, basis, rows.mean(dim=0))
    assert torch.allclose(corners.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(corners.norm(dim=1), torch.full((3,), 2.5, dtype=torch.float64))
    sides = torch.pdist(corners)
    assert torch.allclose(sides, torch.full((3,), 2.5 * math.sqrt(3), dtype=torch.float64))
    assert corners[0, 1].abs() < 1e-12 and corners[0, 0] > 0  # the first axis points at the first class


def test_a_feature_along_a_centred_classifier_row_projects_onto_that_row_s_line():
    rows = simplex_etf(3, 6, seed=3) + 1.0
    basis = simplex_plane(rows)
    origin, other = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direction = rows[1] - rows.mean(dim=0)
    off_plane = other - basis.T @ (basis @ other)
    # A same-class mix of a feature with itself is that feature; its part outside the plane is dropped.
    feature = origin + 0.7 * direction + 4.0 * off_plane
    point = plane_coordinates(feature[None], basis, origin)[0]
    arrow = plane_coordinates(direction[None], basis, torch.zeros(6, dtype=torch.float64))[0]
    assert torch.allclose(point, 0.7 * arrow, atol=1e-12)


def test_collinear_classifier_rows_span_no_plane():
    line = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    with pytest.raises(ValueError, match="collinear"):
        simplex_plane(line)


def test_collinear_class_means_leave_the_zero_eigenvalue_out_of_the_pseudo_inverse():
    # Means -1, 0, 1 on the first axis: Sigma_B = diag(2/3, 0) has one zero eigenvalue, which Sigma_B^+
    # leaves out. Deviations +-(0.3, 0.2): Sigma_W = [[0.09, 0.06], [0.06, 0.04]] -> Tr = 0.09 * 3/2, / 3.
    devs = [[0.3, 0.2], [-0.3, -0.2]]
    features, labels = as_features([[-1, 0], [0, 0], [1, 0]], [devs, devs, devs])
    weight = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert collapse_metrics(features, labels, weight)["nc1"] == pytest.approx(0.09 * 1.5 / 3, rel=1e-12)
