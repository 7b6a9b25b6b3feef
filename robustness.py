"""Robustness to DeepFool perturbations (Moosavi-Dezfooli, Fawzi & Frossard 2016), for the paper's Figure 8.

`deepfool` is the L2 attack of DeepFool's Python code (github.com/LTS4/DeepFool), batched: each sample
steps towards the nearest boundary of its linearised classifier among its top classes until its decision
changes. `deepfool_robustness` turns the perturbations of a fixed set of test images into DeepFool's measure
of robustness, the mean of ||r(x)||_2 / ||x||_2, with both norms taken in pixel space: the image
in [0, 1] before the per-channel normalisation, so that the number does not depend on the run's
normalisation statistics. `sample_indices` picks that fixed set, the same for every checkpoint.
"""
from typing import Callable

import torch
import torch.nn as nn

from devices import HOST

Model = Callable[[torch.Tensor], torch.Tensor]  # a batch of inputs to its logits

# Added to every step's length, as in DeepFool's Python code (since its "numerical stability" fix) and
# foolbox's, so that a step ends just past the linearised boundary rather than on it; in pixel units it is
# far below any perturbation measured.
STEP_MARGIN = 1e-4

# Keeps a zero gradient from dividing by zero: its step is then zero, and the sample stays unflipped.
_NORM_FLOOR = 1e-12


def deepfool(model: Model, images: torch.Tensor, labels: torch.Tensor, overshoot: float = 0.02, max_iter: int = 50,
             candidates: int = 10) -> torch.Tensor:
    """The L2 DeepFool perturbation r of every sample (same shape as `images`), `images + r` being what
    the model classifies; all samples of the batch iterate together.

    As in DeepFool's Python code: the classes considered are the top `candidates` of the clean logits
    (all of them when there are no more classes); each step moves a sample by (|g_k| / ||grad g_k|| + STEP_MARGIN)
    along grad g_k / ||grad g_k||, where g_k = f_k - f_label is the logit gap of the candidate k whose
    linearised boundary is nearest; the model is evaluated and linearised at x + (1 + overshoot) * (sum of
    the steps), and r is that (1 + overshoot) * (sum of the steps). Nothing is clipped to the images' range.

    A sample stops once the model's argmax differs from its label (one misclassified from the start
    gets r = 0); one still classified as its label after `max_iter` steps is returned with the r those
    steps reached, which fools nothing. `model` must be in eval mode (batch statistics would tie the
    samples together) and keeps its parameters, buffers and `.grad`: gradients are taken with respect to
    the inputs only, under a local grad mode, so the function works inside `torch.inference_mode()` too.
    The precision (TF32, autocast) is the caller's."""
    return _deepfool(model, images, labels, overshoot, max_iter, candidates)[0]


def deepfool_robustness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mean: list[float],
                        std: list[float], overshoot: float = 0.02, max_iter: int = 50, candidates: int = 10,
                        batch_size: int = 100) -> dict[str, float]:
    """DeepFool's robustness of `model` (eval mode, taking images normalised as datasets.normalize does
    with `mean` and `std`, in [0, 1] units) on uint8 `images` (N, C, H, W) with their `labels`:

        deepfool_robustness   mean over the flipped samples of ||r(x)||_2 / ||x||_2, in pixel space
        deepfool_unflipped    share of samples whose decision `max_iter` steps did not change
        deepfool_clean_error  share of samples the model misclassifies before any attack
        deepfool_steps        mean number of steps the flipped samples took

    Each image is attacked away from the model's own decision, as DeepFool defines robustness (the
    distance to the nearest decision boundary), so a misclassified image counts like any other and the
    set measured is the same at every checkpoint; `labels` give only the clean error. An unflipped
    sample is left out of the mean, since its r is neither an upper nor a lower bound on its distance to
    the boundary; its share is reported instead. No flipped sample gives NaN."""
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first (batch norm would use and "
                         "update batch statistics)")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (pixel levels 0..255), got {images.dtype}")
    pixel_model = in_pixel_space(model, mean, std)
    ratios, flipped, steps, wrong = [], [], [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(torch.float32) / 255
        with torch.no_grad():
            decisions = pixel_model(x).argmax(dim=1)
        perturbation, hit, count = _deepfool(pixel_model, x, decisions, overshoot, max_iter, candidates)
        ratios.append(perturbation.flatten(1).double().norm(dim=1) / x.flatten(1).double().norm(dim=1))
        flipped.append(hit)
        steps.append(count)
        wrong.append(decisions != labels[start:start + batch_size])
    ratio, hit, count = torch.cat(ratios), torch.cat(flipped), torch.cat(steps)
    return {"deepfool_robustness": ratio[hit].mean().item(),
            "deepfool_unflipped": 1.0 - hit.double().mean().item(),
            "deepfool_clean_error": torch.cat(wrong).double().mean().item(),
            "deepfool_steps": count[hit].double().mean().item()}


def in_pixel_space(model: nn.Module, mean: list[float], std: list[float]) -> Model:
    """`model` as a function of float images in [0, 1] (B, C, H, W): they are normalised with the same
    operations and channels-last layout as datasets.normalize, so the clean logits are the evaluation's."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
        std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
        return model(((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last))
    return logits


def sample_indices(num_images: int, n: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of `n` distinct images out of `num_images`, drawn by a CPU generator seeded
    with `seed`: the same on every machine and device, so every checkpoint is measured on the same images."""
    if not 0 <= n <= num_images:
        raise ValueError(f"cannot pick {n} distinct images out of {num_images}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_images, generator=generator, device=HOST)[:n].sort().values


def _deepfool(model: Model, images: torch.Tensor, labels: torch.Tensor, overshoot: float, max_iter: int,
              candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perturbations r, whether each sample's decision changed, the number of steps each took)."""
    if candidates < 2:
        raise ValueError(f"DeepFool needs at least 2 candidate classes, got candidates={candidates}")
    # The caller may be measuring under inference mode, whose tensors autograd refuses: the inputs are
    # copied out of it and the gradients taken in a grad mode of our own.
    with torch.inference_mode(False), torch.enable_grad():
        x0, labels = images.detach().clone(), labels.clone()
        total = torch.zeros_like(x0)  # the sum of the steps, before the overshoot
        steps = torch.zeros(len(x0), dtype=torch.int64, device=x0.device)
        live = torch.arange(len(x0), device=x0.device)  # samples still classified as their label
        others = None
        for step in range(max_iter + 1):
            x = (x0[live] + (1 + overshoot) * total[live]).requires_grad_()
            logits = model(x)
            if others is None:
                others = _other_classes(logits.detach(), labels, candidates)
            keep = logits.argmax(dim=1) == labels[live]
            live = live[keep]
            if step == max_iter or not len(live):
                break
            total[live] += _step(x, logits, keep, labels[live], others[live])
            steps[live] += 1
        flipped = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        flipped[live] = False
        return (1 + overshoot) * total, flipped, steps


def _other_classes(logits: torch.Tensor, labels: torch.Tensor, candidates: int) -> torch.Tensor:
    """(B, K - 1) the classes DeepFool considers besides the label: the top of the clean logits, label
    excluded, K = min(candidates, C); for a correctly classified sample, the runners-up."""
    count = min(candidates, logits.shape[1]) - 1
    if count < 1:
        raise ValueError(f"DeepFool needs at least 2 classes, the model has {logits.shape[1]}")
    return logits.scatter(1, labels[:, None], float("-inf")).topk(count, dim=1).indices


def _step(x: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
          others: torch.Tensor) -> torch.Tensor:
    """One DeepFool step of each kept row of `x`: to the nearest linearised boundary, plus STEP_MARGIN."""
    kept = logits[keep]
    gaps = kept.gather(1, others) - kept.gather(1, labels[:, None])  # (b, K - 1), negative before the flip
    # One backward pass per candidate over the whole batch: each sample's gap depends on its own input only.
    grads = torch.stack([torch.autograd.grad(gaps[:, k].sum(), x, retain_graph=k + 1 < gaps.shape[1])[0][keep]
                         for k in range(gaps.shape[1])], dim=1)
    norms = grads.flatten(2).norm(dim=2).clamp_min(_NORM_FLOOR)
    distances = gaps.detach().abs() / norms
    nearest = distances.argmin(dim=1)
    rows = torch.arange(len(nearest), device=nearest.device)
    scale = (distances[rows, nearest] + STEP_MARGIN) / norms[rows, nearest]
    return scale.view(-1, *[1] * (x.dim() - 1)) * grads[rows, nearest]
