"""The last layer's variants: fixed to a simplex equiangular tight frame, or without bias.

A fixed simplex ETF classifier (Zhu et al. 2021, "A Geometric Analysis of Neural Collapse with
Unconstrained Features"; Fisher, Meng & Papyan 2024) has C unit-norm rows with pairwise cosines
-1/(C - 1): the geometry Neural Collapse ends in, imposed from the start. Its orientation in feature
space is random, drawn from the run's seed with a generator of its own, so the rest of the network is
initialised exactly as in a learned-classifier run of the same seed. Its weight stays a parameter (so
checkpoints hold it and load as any other) that requires no gradient: the optimizer never sees it,
so it is neither trained nor decayed.
"""
import torch
import torch.nn as nn


def simplex_etf(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """C unit rows in R^d (float64) with pairwise cosines -1/(C - 1), in a random orientation drawn from
    `seed`; needs d >= C - 1, the dimension the simplex spans."""
    if dim < num_classes - 1:
        raise ValueError(f"a simplex of {num_classes} classes spans {num_classes - 1} dimensions, "
                         f"more than the {dim} features")
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centred)  # its first C - 1 columns span the centred simplex
    coordinates = centred @ basis[:, :num_classes - 1]  # (C, C - 1): the simplex in its own span
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, num_classes - 1, dtype=torch.float64, generator=generator)
    orthonormal, triangular = torch.linalg.qr(gaussian)
    orthonormal = orthonormal * torch.sign(torch.diagonal(triangular))  # uniform over orientations
    rows = coordinates @ orthonormal.T
    return rows / rows.norm(dim=1, keepdim=True)


def fix_to_simplex_etf(linear: nn.Linear, seed: int) -> None:
    """Make `linear` the fixed simplex ETF of `simplex_etf` (in place): no bias, weight not trained."""
    with torch.no_grad():
        linear.weight.copy_(simplex_etf(linear.out_features, linear.in_features, seed))
    linear.weight.requires_grad_(False)
    linear.register_parameter("bias", None)


def remove_bias(linear: nn.Linear) -> None:
    """Drop the bias of `linear` (in place), keeping its weight as initialised."""
    linear.register_parameter("bias", None)
