"""The training losses, and Mixup (Zhang et al. 2018) as Fisher, Meng & Papyan (2024) use it.

Every loss takes the logits z (B, C) and targets that are either hard labels y (B,) or a mixed pair
`Mixed(y_a, y_b, lam)`, for which it returns lam * loss(z, y_a) + (1 - lam) * loss(z, y_b). Each is
averaged over the batch; e_y is the one-hot vector of y and kappa the target scale:

    ce               -log softmax(z)_y
    mse              (1/C) sum_c (z_c - kappa e_y,c)^2
    mae              (1/C) sum_c |z_c - kappa e_y,c|
    smooth_l1        (1/C) sum_c huber(z_c - kappa e_y,c), huber(x) = x^2 / 2 if |x| < 1 else |x| - 1/2
    label_smoothing  -sum_c q_c log softmax(z)_c with q = (1 - eps) e_y + eps / C
    focal            -(1 - p_y)^gamma log p_y, p = softmax(z) (Lin et al. 2017; gamma = 0 is ce)

The regression losses average over the classes, as torch's MSELoss does: summed, MSE's gradient is C
times larger and the protocol's learning rate diverges in the first epoch. Each loss is computed in float32,
or in float64 from float64 logits.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from devices import HOST, to_device

LOSSES = ("ce", "mse", "mae", "smooth_l1", "label_smoothing", "focal")
ALIASES = {"cross_entropy": "ce"}
REGRESSION_LOSSES = ("mse", "mae", "smooth_l1")


@dataclass(frozen=True)
class Mixed:
    """The targets of a mixed batch: the input was lam * x + (1 - lam) * x[perm], y_b = y[perm]."""
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float


Targets = torch.Tensor | Mixed
LossFn = Callable[[torch.Tensor, Targets], torch.Tensor]


def canonical_loss(name: str) -> str:
    """The canonical name of a loss (case-insensitive, `cross_entropy` -> `ce`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return key


def loss_from_config(config: dict) -> LossFn:
    """The loss a run trains with (train.py's `--loss` and its parameters, as config.json holds them)."""
    return make_loss(config["loss"], config["num_classes"], config["target_scale"] or 1.0,
                     config["label_smoothing"] or 0.0, config["focal_gamma"] or 0.0)


def make_loss(name: str, num_classes: int, target_scale: float = 1.0, label_smoothing: float = 0.1,
              focal_gamma: float = 3.0) -> LossFn:
    """The loss `name` as a function of (logits, targets), targets being labels or `Mixed`."""
    name = canonical_loss(name)
    per_label: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if name == "ce":
        per_label = F.cross_entropy
    elif name == "label_smoothing":
        def per_label(z, y):
            return F.cross_entropy(z, y, label_smoothing=label_smoothing)
    elif name == "focal":
        def per_label(z, y):
            return focal_loss(z, y, focal_gamma)
    else:
        distance = {"mse": lambda d: d.pow(2), "mae": torch.abs,
                    "smooth_l1": lambda d: F.smooth_l1_loss(d, torch.zeros_like(d), reduction="none")}[name]

        def per_label(z, y):
            target = target_scale * F.one_hot(y, num_classes).to(z.dtype)
            return distance(z - target).mean()

    def loss(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        # At least float32: bf16 logits (autocast) are upcast, float64 ones (the UFM's, ufm.py) keep their precision.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if isinstance(targets, Mixed):
            return targets.lam * per_label(logits, targets.y_a) + (1 - targets.lam) * per_label(logits, targets.y_b)
        return per_label(logits, targets)

    return loss


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p_y)^gamma log p_y averaged over the batch."""
    log_p = logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(1 - log_p.exp()).pow(gamma) * log_p).mean()


def correct_count(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Correct predictions in the batch as a 0-dim float tensor (no host sync); for a mixed batch,
    lam * (argmax == y_a) + (1 - lam) * (argmax == y_b), the usual Mixup accuracy."""
    predicted = logits.argmax(dim=1)
    if isinstance(targets, Mixed):
        return (targets.lam * (predicted == targets.y_a).sum()
                + (1 - targets.lam) * (predicted == targets.y_b).sum()).float()
    return (predicted == targets).sum().float()


def mix_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator,
              generator: torch.Generator, same_class: bool = False) -> tuple[torch.Tensor, Mixed]:
    """Mixup: lam ~ Beta(alpha, alpha) and a random partner for each example (of its own class with
    `same_class`); returns lam * x + (1 - lam) * x[perm] and the targets `Mixed(y, y[perm], lam)`.

    `rng` draws lam and `generator` (a CPU generator) the pairing, so the batch is the same on any
    device."""
    lam = float(rng.beta(alpha, alpha))
    perm = (same_class_partners(y, generator) if same_class
            else to_device(torch.randperm(len(y), generator=generator, device=HOST), y.device))
    return lam * x + (1 - lam) * x[perm], Mixed(y, y[perm], lam)


def same_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A partner index for each example, of the same class and (when its class has two or more
    examples in the batch) never itself: a random cycle through each class's examples."""
    keys = to_device(torch.rand(len(labels), generator=generator, dtype=torch.float64, device=HOST), labels.device)
    order = torch.argsort(labels.to(torch.float64) + keys)  # grouped by class, shuffled within
    grouped = labels[order]
    positions = torch.arange(len(labels), device=labels.device)
    group_start = torch.searchsorted(grouped, grouped)
    following = (positions + 1).clamp(max=len(labels) - 1)
    next_in_class = torch.where(grouped[following] == grouped, following, group_start)
    next_in_class[-1] = group_start[-1]
    partners = torch.empty_like(order)
    partners[order] = order[next_in_class]
    return partners
