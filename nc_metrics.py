"""Neural Collapse metrics of Papyan, Han & Donoho (2020), as pure functions of tensors.

Notation: h_i the penultimate feature of sample i with label y_i, N samples, C classes, d features;
mu_c the class means, mu_G the global mean of the features; M~ the C x d matrix of centred class means
mu_c - mu_G (its rows are the "means" below); W the C x d weight of the last linear layer, w_c its rows
(uncentred), b its bias. Std is the unbiased (n - 1) estimate; Avg the plain average.

    nc1                  Tr(Sigma_W Sigma_B^+) / C, with Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
                         Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T, and Sigma_B^+ its pseudo-inverse
                         on its top C - 1 eigenpairs (Sigma_B has rank C - 1).                  (Figure 6)
    equinorm_means       Std_c ||mu_c - mu_G|| / Avg_c ||mu_c - mu_G||.                          (Figure 2)
    equinorm_weights     Std_c ||w_c|| / Avg_c ||w_c||.                                           (Figure 2)
    equiangular_means    Std_{c, c' != c} cos(mu_c - mu_G, mu_c' - mu_G): over the C(C - 1) ordered
                         off-diagonal entries of the cosine matrix, as the paper writes it.   (Figure 3)
    equiangular_weights  Std_{c, c' != c} cos(w_c, w_c'), likewise (both 0 when C = 2).          (Figure 3)
    maxangle_means       Avg over c != c' of |cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C - 1)|.       (Figure 4)
    maxangle_weights     Avg over c != c' of |cos(w_c, w_c') + 1/(C - 1)|.                        (Figure 4)
    self_duality         || W / ||W||_F - M~ / ||M~||_F ||_F^2.                                  (Figure 5)
    ncc_mismatch         the fraction of samples where the classifier's argmax_c (w_c . h + b_c)
                         differs from the nearest class mean argmin_c ||h - mu_c||.             (Figure 7)

The field's other measures, as their papers define them (N_c the samples of class c, V_c = (1/N_c)
sum_{i in c} ||h_i - mu_c||^2 the variance of class c, E = (I_C - 1 1^T / C) / sqrt(C - 1) the simplex
ETF's Gram matrix scaled to Frobenius norm 1):

    nc1_trace_ratio      Tr(Sigma_W) / Tr(Sigma_B), Sigma_W and Sigma_B as for nc1.
                                                   (Tirer, Huang & Niles-Weed 2023, ICML)
    cdnv                 Avg over pairs c < c' of (V_c + V_c') / (2 ||mu_c - mu_c'||^2), the class-distance
                         normalised variance.       (Galanti, Gyorgy & Hutter 2022, ICLR)
    etf_error_means      || M~ M~^T / ||M~ M~^T||_F - E ||_F.          (Zhu et al. 2021, NeurIPS, NC2)
    etf_error_weights    || W W^T / ||W W^T||_F - E ||_F.              (Zhu et al. 2021, NeurIPS, NC2)
    wh_alignment         || W M~^T / ||W M~^T||_F - E ||_F.            (Zhu et al. 2021, NeurIPS, NC3)
    hyperspherical_energy_means
                         Avg over c != c' of 1 / ||m_c - m_c'||, m_c = (mu_c - mu_G) / ||mu_c - mu_G||:
                         the Riesz s = 1 energy of the centred class means on the unit sphere, lowest
                         for a simplex ETF, where it is sqrt((C - 1) / (2 C)).
                                                   (Liu et al. 2023, ICLR, GNC2)

The measures of Wu & Papyan (2024, "Linguistic Collapse") for many classes, m_c as above:

    gnc2_log_distance_var
                         Var over c != c' of log(1 / ||m_c - m_c'||) (population variance), their GNC2, the
                         hyperspherical uniformity of the centred class means: 0 when all pairwise distances
                         are equal, as in a simplex ETF.
    unc3_dot_var         Var_c <w_c, mu_c - mu_G> (unbiased), their UNC3, uniform duality.
    unc3_cosine_var      Var_c cos(w_c, mu_c - mu_G) (unbiased), its cosine variant.

All but the energy are 0 at full collapse; the trace ratio and the CDNV are 0 as soon as every feature
sits on its class mean.

Pairwise quantities at any number of classes. The cosines, the CDNV, the energy, GNC2 and the ETF errors
are sums over the C x C matrices V V^T (V the means or the classifier rows) and W M~^T, which are never held
whole: `pair_measures` and `etf_alignment` walk them in square tiles whose side `tile_size` derives from a
memory budget (PAIRWISE_MEMORY), so peak memory is O(C d + d^2 + tile^2) whatever C. Symmetric matrices are
walked on and above the diagonal, each tile off it standing for its mirror. Each tile's values are
reduced in float64 at once: means and variances merged tile by tile with Chan et al.'s pairwise update,
exact whatever the tiling up to rounding. The Frobenius norms the ETF errors divide by come first, from
the d x d matrices (||V V^T||_F = ||V^T V||_F, ||W M~^T||_F^2 = <W^T W, M~^T M~>). Distances come from
the Gram tile (||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b), except for pairs closer than CLOSE relative to
their norms, which are measured again from their difference, where the Gram matrix's rounding would show.
A small C is one tile: the same arithmetic, no second code path.

Which mean and which Sigma_W. The paper's classes are balanced, and there mu_G, the mean of all features,
is also the mean of the class means, and Sigma_W, the average over samples, is also the average of the
per-class covariances. On an imbalanced training set (train.py --imbalance) the two readings part, and
the class-balanced one is taken, as the imbalanced-collapse literature does (e.g. Thrampoulidis et al.
2022), so that a class weighs the same in every quantity whatever its size: FeatureStats with
`balancing_weights` (N / (C N_c) per sample of class c) makes
    mu_G     = (1/C) sum_c mu_c                                     the centre of M~ and of Sigma_B, hence
                                                                    of nc1, the *_means metrics, self_duality
                                                                    and the measures above that use M~;
    Sigma_W  = (1/C) sum_c (1/N_c) sum_{i: y_i = c} (h_i - mu_c)(h_i - mu_c)^T  in nc1 and the trace ratio.
ncc_mismatch uses the class means alone, and the *_weights metrics the classifier alone, in both cases.
A balanced run is measured with unit weights, the plain sample averages above; its balancing weights
would be exactly 1, so the two readings agree there to the last bit. Beside these, for imbalanced runs:

    minority_cosine      Avg over minority classes c != c' of cos(w_c, w_c'), the minority being the
                         last floor(C/2) classes (datasets.minority_classes): Fang, He, Long & Su
                         (2021)'s measure of Minority Collapse, 1 when those rows share one direction.
    majority_cosine      the same over the first ceil(C/2) classes.

Everything is accumulated and computed in float64. `FeatureStats` gathers the class statistics in one
streaming pass with memory O(C d + d^2) whatever the number of samples; `metrics_from_stats` turns them
into every metric but `ncc_mismatch`, which needs the features themselves and is computed batch by
batch with `ncc_disagreements` once the class means are known. `collapse_metrics` does all of it from
full tensors. The expected calibration error, reported beside the collapse metrics, is here too, and
the plane of three classes' simplex onto which the Mixup representation figure projects features.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

PAPER_KEYS = ("nc1", "equinorm_means", "equinorm_weights", "equiangular_means", "equiangular_weights",
              "maxangle_means", "maxangle_weights", "self_duality")
OTHER_KEYS = ("nc1_trace_ratio", "cdnv", "etf_error_means", "etf_error_weights", "wh_alignment",
              "hyperspherical_energy_means", "gnc2_log_distance_var", "unc3_dot_var", "unc3_cosine_var")
STATS_KEYS = PAPER_KEYS + OTHER_KEYS
# The keys of STATS_KEYS that need the classifier.
CLASSIFIER_KEYS = ("equinorm_weights", "equiangular_weights", "maxangle_weights", "self_duality", "etf_error_weights",
                   "wh_alignment", "unc3_dot_var", "unc3_cosine_var")
METRIC_KEYS = STATS_KEYS + ("ncc_mismatch",)
# The keys of STATS_KEYS that depend on the features (the others are the classifier's alone).
FEATURE_KEYS = ("nc1", "equinorm_means", "equiangular_means", "maxangle_means", "self_duality", "nc1_trace_ratio",
                "cdnv", "etf_error_means", "wh_alignment", "hyperspherical_energy_means", "gnc2_log_distance_var",
                "unc3_dot_var", "unc3_cosine_var")
PAIRWISE_MEMORY = 2 ** 28  # bytes the tiles of a pairwise pass may hold at once (256 MiB)
_TILE_MATRICES = 12  # float64 tile x tile matrices that a tile of `pair_measures` holds at once, at most
# Pairs at cosine above 1 - CLOSE are measured from their difference: from the Gram matrix, the rounding of the
# norms (relative 1e-16) would be 1e-13 or more of their squared distance there.
CLOSE = 1e-3


class FeatureStats:
    """Streaming float64 class statistics of features: counts, class means, the within-class scatter and
    each class's within-class sum of squares (for the class variances V_c of the CDNV), each sample of class
    c counting `class_weights[c]` times (default 1) in the global mean and Sigma_W. The weights are fixed
    before the pass (`balancing_weights` of the training labels), so the class-balanced statistics take one
    pass and no per-class d x d matrix.

    Each class's sums are accumulated around a shift, the first sample seen of that class, so nearly
    collapsed features far from the origin lose no precision to cancellation (and features identical
    within their class give a within-class covariance of exactly zero).
    Memory is O(C d + d^2) whatever the number of samples. Two accumulators of the same class weights can
    be merged (or their tensors summed across processes once `rebase` has given them the same shift).
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None,
                 class_weights: torch.Tensor | None = None):
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got num_classes={num_classes}")
        if dim < 1:
            raise ValueError(f"need a positive feature dimension, got dim={dim}")
        self.num_classes, self.dim = num_classes, dim
        zeros = dict(dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, **zeros)
        self.shift = torch.zeros(num_classes, dim, **zeros)
        self.sums = torch.zeros(num_classes, dim, **zeros)  # sum of (h - shift_c) per class
        self.scatter = torch.zeros(dim, dim, **zeros)  # sum of weight_y (h - shift_y)(h - shift_y)^T
        # Each sample of class c counts weights[c] times in the global mean and Sigma_W (ones: the plain
        # sample averages, and multiplying by 1 leaves every bit of them as it was).
        self.weights = torch.ones(num_classes, **zeros) if class_weights is None else class_weights.to(**zeros)
        self.squares = torch.zeros(num_classes, **zeros)  # sum of ||h - shift_c||^2 per class

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of features (B, d) with integer labels (B,) in [0, C)."""
        _check_batch(features, labels, self.num_classes, self.dim)
        h = features.detach().to(self.sums.device, torch.float64)
        labels = labels.to(self.sums.device)
        positions = torch.arange(len(labels), device=labels.device)
        first = torch.full((self.num_classes,), len(labels), device=labels.device)
        first.scatter_reduce_(0, labels, positions, reduce="amin")  # each class's first sample here
        first_seen = (self.counts == 0) & (first < len(labels))
        candidates = h[first.clamp(max=max(len(labels) - 1, 0))] if len(labels) else self.shift
        self.shift = torch.where(first_seen[:, None], candidates, self.shift)
        centred = h - self.shift[labels]
        self.counts += torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        self.sums.index_add_(0, labels, centred)
        self.scatter.addmm_(centred.T, centred * self.weights[labels, None])
        self.squares.index_add_(0, labels, centred.pow(2).sum(dim=1))

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the samples accumulated by `other` to this accumulator (in place) and return it."""
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"cannot merge statistics of {other.num_classes} classes x {other.dim} "
                             f"features into {self.num_classes} classes x {self.dim} features")
        if not torch.equal(other.weights.to(self.weights.device), self.weights):
            raise ValueError("cannot merge statistics accumulated with different class weights")
        unseen = self.counts == 0
        self.shift = torch.where(unseen[:, None], other.shift.to(self.shift.device), self.shift)
        sums, scatter, squares = other._recentred(self.shift.to(other.shift.device))
        self.counts += other.counts.to(self.counts.device)
        self.sums += sums.to(self.sums.device)
        self.scatter += scatter.to(self.scatter.device)
        self.squares += squares.to(self.squares.device)
        return self

    def rebase(self, shift: torch.Tensor) -> None:
        """Re-centre the sums on another per-class shift (C, d); the statistics do not change."""
        shift = shift.to(self.shift.device, torch.float64)
        self.sums, self.scatter, self.squares = self._recentred(shift)
        self.shift = shift.clone()

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum().item())

    def class_means(self) -> torch.Tensor:
        """The class means mu_c, (C, d); a class without samples is an error."""
        self._require_every_class()
        return self.shift + self.sums / self.counts[:, None]

    def global_mean(self) -> torch.Tensor:
        """The global mean mu_G: the class means weighted by their counts times the class weights, (d,); with
        `balancing_weights`, the mean of the class means."""
        weighted = self.weights * self.counts
        return (weighted @ self.class_means()) / weighted.sum()

    def within_class_covariance(self) -> torch.Tensor:
        """Sigma_W = sum_i w_{y_i} (h_i - mu_{y_i})(h_i - mu_{y_i})^T / sum_i w_{y_i}, (d, d): with unit weights
        (1/N) sum_i ..., with `balancing_weights` the average over classes of each class's covariance."""
        self._require_every_class()
        # sqrt(w_c n_c) (mu_c - shift_c), per class
        deviation = self.sums * self.weights.sqrt()[:, None] / self.counts.sqrt()[:, None]
        return (self.scatter - deviation.T @ deviation) / (self.weights * self.counts).sum()

    def class_variances(self) -> torch.Tensor:
        """V_c = (1/N_c) sum_{i in c} ||h_i - mu_c||^2 per class, (C,)."""
        self._require_every_class()
        return (self.squares - self.sums.pow(2).sum(dim=1) / self.counts) / self.counts

    def _recentred(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sums, scatter, squares) accumulated around `shift` instead of `self.shift`:
        h - a = (h - b) - (a - b)."""
        delta = shift - self.shift
        sums = self.sums - self.counts[:, None] * delta
        cross = delta.T @ (self.weights[:, None] * self.sums)
        scatter = self.scatter - cross - cross.T + delta.T @ ((self.weights * self.counts)[:, None] * delta)
        squares = self.squares - 2 * (delta * self.sums).sum(dim=1) + self.counts * delta.pow(2).sum(dim=1)
        return sums, scatter, squares

    def _require_every_class(self) -> None:
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"class(es) {empty[:10]} have no samples; every one of the "
                             f"{self.num_classes} classes needs at least one")


def tpt_row(measured: list[dict]) -> dict | None:
    """The row of a table of measured checkpoints (nc_metrics.csv's, in epoch order) where the terminal phase of
    training begins: the first whose clean training set is classified without error (`train_acc` exactly 1),
    or None."""
    return next((row for row in measured if row.get("train_acc") == 1.0), None)


def collapse_metrics(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None, num_classes: int | None = None) -> dict[str, float]:
    """Every metric of the module docstring (METRIC_KEYS) from full tensors: features (N, d), labels (N,),
    the classifier weight (C, d) and bias (C,) (zero if None); C is weight's row count."""
    classes = weight.shape[0]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"num_classes={num_classes} but the classifier has {classes} rows")
    stats = FeatureStats(classes, weight.shape[1], device=features.device)
    stats.update(features, labels)
    metrics = metrics_from_stats(stats, weight)
    metrics["ncc_mismatch"] = ncc_mismatch(features, weight, bias, stats.class_means())
    return metrics


def metrics_from_stats(stats: FeatureStats, weight: torch.Tensor | None,
                       memory: int = PAIRWISE_MEMORY) -> dict[str, float]:
    """The metrics STATS_KEYS (all but ncc_mismatch) from accumulated statistics and the classifier (C, d); without
    a classifier (None), those of CLASSIFIER_KEYS left out. The pairwise passes hold about `memory` bytes of tiles."""
    centred_means = stats.class_means() - stats.global_mean()
    within = stats.within_class_covariance()
    means = pair_measures(centred_means, stats.class_variances(), memory)
    measured = {
        "nc1": nc1(within, centred_means),
        "equinorm_means": coefficient_of_variation(centred_means.norm(dim=1)),
        "equiangular_means": means.cosine_std,
        "maxangle_means": means.maxangle,
        "nc1_trace_ratio": (within.trace() / (centred_means.pow(2).sum() / len(centred_means))).item(),
        "cdnv": means.cdnv,
        "etf_error_means": means.etf_error,
        "hyperspherical_energy_means": means.energy,
        "gnc2_log_distance_var": means.log_distance_var,
    }
    if weight is None:
        return measured
    _check_weight(weight, stats.num_classes, stats.dim)
    w = weight.detach().to(stats.sums.device, torch.float64)
    weights = pair_measures(w, memory=memory)
    dots = (w * centred_means).sum(dim=1)
    return measured | {
        "equinorm_weights": coefficient_of_variation(w.norm(dim=1)),
        "equiangular_weights": weights.cosine_std,
        "maxangle_weights": weights.maxangle,
        "self_duality": self_duality(w, centred_means),
        "etf_error_weights": weights.etf_error,
        "wh_alignment": etf_alignment(w, centred_means, memory),
        "unc3_dot_var": dots.var().item(),
        "unc3_cosine_var": (dots / (w.norm(dim=1) * centred_means.norm(dim=1))).var().item(),
    }


def nc1(within_covariance: torch.Tensor, centred_means: torch.Tensor) -> float:
    """Tr(Sigma_W Sigma_B^+) / C, Sigma_B = M~^T M~ / C inverted on its top C - 1 eigenpairs.

    Sigma_B's eigenpairs come from the thin SVD of the C x d matrix M~ (eigenvalues s_k^2 / C), which is
    exact and cheap even for d = 2048, where a generic pinv of the d x d matrix mistakes rounding noise
    for spectrum."""
    classes = centred_means.shape[0]
    _, singular, right = torch.linalg.svd(centred_means, full_matrices=False)
    rank = min(classes - 1, centred_means.shape[1])
    directions = right[:rank]  # (rank, d), orthonormal rows
    eigenvalues = singular[:rank] ** 2 / classes
    projected = ((directions @ within_covariance) * directions).sum(dim=1)  # v_k^T Sigma_W v_k
    # A pseudo-inverse leaves out the eigenvalues that are 0 up to rounding (class means spanning fewer than
    # C - 1 dimensions), with numpy's pinv cut-off for the singular values of M~.
    cutoff = singular[0] * max(centred_means.shape) * torch.finfo(singular.dtype).eps
    inverse = torch.where(singular[:rank] > cutoff, 1 / eigenvalues, torch.zeros_like(eigenvalues))
    return ((projected * inverse).sum() / classes).item()


def balancing_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class sample weights N / (C N_c), float64, from the samples per class N_c (N in all): under them
    every class counts equally in `FeatureStats`'s global mean and Sigma_W. They are exactly 1 when the
    classes are balanced, so balanced statistics are the plain ones to the last bit."""
    counts = counts.to(torch.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs at least one sample, got counts {counts.tolist()}")
    return counts.sum() / (len(counts) * counts)


def group_cosines(weight: torch.Tensor, minority: list[int], majority: list[int]) -> dict[str, float]:
    """Minority Collapse (Fang, He, Long & Su 2021) in the classifier (C, d): `minority_cosine` and
    `majority_cosine`, the `mean_pair_cosine` of the rows of the minority and of the majority classes."""
    w = weight.detach().to(torch.float64)
    return {"minority_cosine": mean_pair_cosine(w[minority]), "majority_cosine": mean_pair_cosine(w[majority])}


def mean_pair_cosine(vectors: torch.Tensor) -> float:
    """The mean cosine between distinct rows of a (k, d) matrix: 1 when they all point one way, -1/(k - 1) at
    least (a simplex); NaN for fewer than two rows."""
    if len(vectors) < 2:
        return float("nan")
    return pair_measures(vectors.to(torch.float64)).cosine_mean


def coefficient_of_variation(values: torch.Tensor) -> float:
    """Std / Avg of a vector of positive values (unbiased Std)."""
    return (values.std() / values.mean()).item()


def self_duality(weight: torch.Tensor, centred_means: torch.Tensor) -> float:
    """|| W / ||W||_F - M~ / ||M~||_F ||_F^2."""
    return (weight / weight.norm() - centred_means / centred_means.norm()).pow(2).sum().item()


@dataclass(frozen=True)
class PairMeasures:
    """What `pair_measures` gives for C vectors v_c (the rows of V), u_c = v_c / ||v_c||:

    cosine_mean, cosine_std  Avg and unbiased Std of cos(v_c, v_c') over the C (C - 1) ordered pairs c != c'
                             (each unordered pair twice, as Std_{c, c' != c} in the paper counts them)
    maxangle                 Avg over c != c' of |cos(v_c, v_c') + 1/(C - 1)|: zero exactly for a simplex ETF
    etf_error                || V V^T / ||V V^T||_F - (I - 1 1^T / C) / sqrt(C - 1) ||_F (Zhu et al.'s NC2)
    and, given the class variances V_c (the rows being centred class means; None otherwise):
    energy                   Avg over c != c' of 1 / ||u_c - u_c'||, the Riesz s = 1 energy on the unit sphere
    log_distance_var         the population variance over c != c' of log(1 / ||u_c - u_c'||) (Wu & Papyan's GNC2)
    cdnv                     Avg over c != c' of (V_c + V_c') / (2 ||v_c - v_c'||^2)
    """
    cosine_mean: float
    cosine_std: float
    maxangle: float
    etf_error: float
    energy: float | None = None
    log_distance_var: float | None = None
    cdnv: float | None = None


def pair_measures(vectors: torch.Tensor, variances: torch.Tensor | None = None,
                  memory: int = PAIRWISE_MEMORY) -> PairMeasures:
    """The `PairMeasures` of the rows of `vectors` (C, d), C >= 2, in one pass over the tiles of V V^T on and
    above its diagonal (see the module docstring), holding about `memory` bytes of tiles at once."""
    v = vectors.to(torch.float64)
    classes = len(v)
    squares = v.pow(2).sum(dim=1)
    inverse = squares.rsqrt()  # 1 / ||v_c||
    scale = (v.T @ v).norm()  # ||V V^T||_F
    cosines, logs = _Moments(), _Moments()
    deviations, energies, ratios = _Mean(), _Mean(), _Mean()
    etf_residual = 0.0
    for rows, cols, times in _tiles(classes, tile_size(memory), symmetric=True):
        diagonal = rows == cols
        gram = v[rows] @ v[cols].T
        etf_residual += times * _etf_residual(gram / scale, diagonal, classes)
        cosine = gram * inverse[rows, None]
        cosine *= inverse[None, cols]
        pairs = _pairs(cosine, diagonal)
        cosines.add(pairs, times)
        deviations.add((pairs + 1.0 / (classes - 1)).abs_(), times)
        if variances is None:
            continue
        unit, whole = (_pairs(distances, diagonal) for distances in
                       _squared_distances(v, inverse, squares, gram, cosine, diagonal, rows, cols))
        energies.add(unit.rsqrt(), times)
        logs.add(unit.log_().mul_(-0.5), times)
        ratios.add(_pairs(variances[rows, None] + variances[None, cols], diagonal).div_(whole).mul_(0.5), times)
    measured = PairMeasures(cosines.mean, cosines.std(), deviations.mean, math.sqrt(etf_residual))
    if variances is None:
        return measured
    return dataclasses.replace(measured, energy=energies.mean, log_distance_var=logs.variance(), cdnv=ratios.mean)


def etf_alignment(weight: torch.Tensor, centred_means: torch.Tensor, memory: int = PAIRWISE_MEMORY) -> float:
    """|| W M~^T / ||W M~^T||_F - (I - 1 1^T / C) / sqrt(C - 1) ||_F (Zhu et al.'s NC3), over the tiles of the C x C
    matrix W M~^T, holding about `memory` bytes of tiles at once."""
    w, m = weight.to(torch.float64), centred_means.to(torch.float64)
    scale = ((w.T @ w) * (m.T @ m)).sum().sqrt()  # ||W M~^T||_F
    residual = sum(_etf_residual(w[rows] @ m[cols].T / scale, rows == cols, len(w))
                   for rows, cols, _ in _tiles(len(w), tile_size(memory), symmetric=False))
    return math.sqrt(residual)


def tile_size(memory: int = PAIRWISE_MEMORY) -> int:
    """The side of the square tiles of the pairwise passes: as many entries as `memory` bytes hold for each of
    the float64 matrices a tile needs at once."""
    return max(1, math.isqrt(memory // (8 * _TILE_MATRICES)))


def ncc_mismatch(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 class_means: torch.Tensor) -> float:
    """The fraction of samples whose classifier argmax_c (w_c . h + b_c) differs from the nearest class
    mean argmin_c ||h - mu_c|| (ties go to the lower class index in both)."""
    if len(features) == 0:
        raise ValueError("ncc_mismatch needs at least one sample")
    return ncc_disagreements(features, weight, bias, class_means).item() / len(features)


def ncc_disagreements(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      class_means: torch.Tensor) -> torch.Tensor:
    """The number of samples counted by `ncc_mismatch`, as a 0-dim tensor on the features' device
    (so a streaming caller sums batches without waiting for the device)."""
    _check_weight(weight, class_means.shape[0], class_means.shape[1])
    predicted = classifier_logits(features, weight, bias).argmax(dim=1)
    return (predicted != NearestClassMean(class_means)(features)).sum()


def classifier_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The logits w_c . h + b_c of features (B, d) under the classifier (C, d) and bias (C,) (zero if None),
    (B, C), in float64 on the features' device."""
    _check_features(features, weight.shape[1])
    h = features.detach().to(torch.float64)
    logits = h @ weight.detach().to(h.device, torch.float64).T
    if bias is not None:
        logits += bias.detach().to(h.device, torch.float64)
    return logits


class NearestClassMean:
    """The nearest-class-mean rule argmin_c ||h - mu_c|| (ties to the lower class index), for class means (C, d)
    on the device of the features it is given, its terms computed once."""

    def __init__(self, class_means: torch.Tensor):
        means = class_means.detach().to(torch.float64)
        # Distances compared around the means' centre: translation-free, and no cancellation far from 0.
        self.centre = means.mean(dim=0)
        self.centred = means - self.centre
        self.half_squares = 0.5 * self.centred.pow(2).sum(dim=1)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The nearest class mean of each of the features (B, d), (B,)."""
        _check_features(features, self.centred.shape[1])
        h = features.detach().to(self.centred.device, torch.float64)
        return ((h - self.centre) @ self.centred.T - self.half_squares).argmax(dim=1)


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> torch.Tensor:
    """Per confidence bin (equal width on [0, 1]): [count, sum of confidences, number correct], (num_bins, 3)
    in float64; bins of several batches add up."""
    probabilities = logits.detach().to(torch.float64).softmax(dim=1)
    confidence, prediction = probabilities.max(dim=1)
    # Bin k holds confidences in (k/B, (k+1)/B]; a confidence of exactly 0 cannot occur with softmax.
    bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    correct = (prediction == labels.to(prediction.device)).to(torch.float64)
    table = torch.zeros(num_bins, 3, dtype=torch.float64, device=logits.device)
    values = torch.stack([torch.ones_like(confidence), confidence, correct], dim=1)
    return table.index_add_(0, bins, values)


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE = sum_k (n_k / N) |acc_k - conf_k| from `calibration_bins` (Guo et al. 2017)."""
    counts, confidence, correct = bins.unbind(dim=1)
    return ((correct - confidence).abs().sum() / counts.sum()).item()


def simplex_plane(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (2, d), float64, of the plane of the triangle that three vectors (3, d) span
    once centred at their mean; the first axis points at the first centred vector."""
    if rows.shape[0] != 3:
        raise ValueError(f"simplex_plane takes 3 vectors, not {rows.shape[0]}")
    centred = rows.double() - rows.double().mean(dim=0)
    first = centred[0] / centred[0].norm()
    second = centred[1] - (centred[1] @ first) * first
    if second.norm() <= 1e-12 * centred.norm():
        raise ValueError("the three vectors are collinear: they span no plane")
    return torch.stack([first, second / second.norm()])


def plane_coordinates(vectors: torch.Tensor, basis: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """The coordinates (n, 2), float64, of the vectors (n, d) minus `origin`, projected on `basis` (2, d)."""
    return (vectors.double() - origin.double()) @ basis.T


def _check_batch(features: torch.Tensor, labels: torch.Tensor, num_classes: int, dim: int) -> None:
    _check_features(features, dim)
    if labels.dim() != 1 or len(labels) != len(features):
        raise ValueError(f"labels must have shape ({len(features)},) to match the features, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from "
                         f"{labels.min().item()} to {labels.max().item()}")


def _check_features(features: torch.Tensor, dim: int) -> None:
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features must have shape (N, {dim}), got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf; the network diverged or the input is corrupt")


def _check_weight(weight: torch.Tensor, num_classes: int, dim: int) -> None:
    if weight.dim() != 2 or tuple(weight.shape) != (num_classes, dim):
        raise ValueError(f"the classifier weight must have shape ({num_classes}, {dim}), "
                         f"got {tuple(weight.shape)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")


class _Moments:
    """The count, mean and sum of squared deviations from the mean of values added tile by tile, each tile's
    own merged in with Chan, Golub & LeVeque's pairwise update (no cancellation however many tiles), in
    float64; a tile added `times` times stands for itself and its mirror."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def add(self, values: torch.Tensor, times: int = 1) -> None:
        if values.numel() == 0:
            return
        variance, mean = torch.var_mean(values, correction=0)
        count, mean = times * values.numel(), mean.item()
        total, delta = self.count + count, mean - self.mean
        self.mean += delta * count / total
        self.squares += count * variance.item() + delta * delta * self.count * count / total
        self.count = total

    def std(self) -> float:
        """The unbiased standard deviation."""
        return math.sqrt(self.squares / (self.count - 1))

    def variance(self) -> float:
        """The population variance."""
        return self.squares / self.count


class _Mean:
    """The mean of values added tile by tile, each tile's sum in float64; `times` as for `_Moments`."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor, times: int = 1) -> None:
        self.total += times * values.sum().item()
        self.count += times * values.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count


def _tiles(count: int, tile: int, symmetric: bool):
    """(rows, cols, times) for the square tiles of a count x count matrix: with `symmetric`, those on and above
    the diagonal, a tile off it counting twice (for its mirror); otherwise all of them, once."""
    starts = range(0, count, tile)
    for first in starts:
        for second in starts:
            if not symmetric or second >= first:
                yield (slice(first, min(first + tile, count)), slice(second, min(second + tile, count)),
                       2 if symmetric and second > first else 1)


def _pairs(tile: torch.Tensor, on_diagonal: bool) -> torch.Tensor:
    """A tile's entries c != c': the tile itself off the diagonal, its off-diagonal entries (flattened) on it."""
    if not on_diagonal:
        return tile
    return tile[~torch.eye(len(tile), tile.shape[1], dtype=torch.bool, device=tile.device)]


def _etf_residual(scaled: torch.Tensor, on_diagonal: bool, classes: int) -> float:
    """The sum of squares of a tile of G / ||G||_F - (I - 1 1^T / C) / sqrt(C - 1), from the tile of G / ||G||_F
    (overwritten)."""
    residual = scaled.add_(1.0 / (classes * math.sqrt(classes - 1)))
    if on_diagonal:
        residual.diagonal().sub_(1.0 / math.sqrt(classes - 1))
    return residual.square_().sum().item()


def _squared_distances(v: torch.Tensor, inverse: torch.Tensor, squares: torch.Tensor, gram: torch.Tensor,
                       cosine: torch.Tensor, on_diagonal: bool, rows: slice,
                       cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared distances ||u_c - u_c'||^2 between the unit rows and ||v_c - v_c'||^2 between the rows of a
    tile, from its Gram matrix; the pairs at cosine above 1 - CLOSE are measured again from their differences
    (a few rows at a time: as many values as a tile holds). Elsewhere ||v_c - v_c'||^2 >= (1 - cos)(||v_c||^2 +
    ||v_c'||^2) > CLOSE (||v_c||^2 + ||v_c'||^2), so both distances keep a relative accuracy near 1e-13."""
    unit = cosine.mul(-2).add_(2).clamp_(min=0)
    whole = gram.mul(-2)
    whole += squares[rows, None]
    whole += squares[None, cols]
    whole.clamp_(min=0)
    close = cosine > 1 - CLOSE
    if on_diagonal:
        close.fill_diagonal_(False)
    first, second = close.nonzero(as_tuple=True)
    step = max(1, gram.numel() // v.shape[1])
    for start in range(0, len(first), step):
        a, b = first[start:start + step] + rows.start, second[start:start + step] + cols.start
        whole[a - rows.start, b - cols.start] = (v[a] - v[b]).pow(2).sum(dim=1)
        unit_difference = v[a] * inverse[a, None] - v[b] * inverse[b, None]
        unit[a - rows.start, b - cols.start] = unit_difference.pow(2).sum(dim=1)
    return unit, whole
