"""The unconstrained-features model (UFM): the last layer of a network and its features, trained alone.

Each training sample i of class y_i has a free feature vector h_i in R^d (the rows of H, N x d), trained
jointly with the classifier W (K x d) and its bias b (K) by minimising

    f(W, H, b) = (1/N) sum_i loss(W h_i + b, y_i) + (lamW/2) ||W||_F^2 + (lamH/2) ||H||_F^2 + (lamb/2) ||b||^2

(Mixon, Parshall & Pi 2020; Zhu et al. 2021; Fang et al. 2021's layer-peeled model, regularised; Tirer &
Bruna 2022; Zhou et al. 2022), `loss` being train.py's for the same flags (losses.make_loss). lamb is 0
unless asked (the bias unregularised); without a bias, b = 0. Mixup mixes the features themselves, the
network being the identity on them. The optimizer is gradient descent on the whole training set (gd) or
SGD on shuffled batches (sgd), without momentum, the weight decay of every parameter applied at every
step: the mean loss of a batch plus the decay is an unbiased estimate of f's gradient, each h_i taking
part in a batch with probability B/N. Float64 by default.

ufm.py runs it into an ordinary run folder (runs.py); docs/ufm.md derives its optima. A study of sweep.py
with --script ufm.py runs grids of it (studies.py).
"""
import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import config
import datasets
import losses
import runs
from errors import UserError
from nc_metrics import FeatureStats, balancing_weights, group_cosines, metrics_from_stats, ncc_mismatch

SCRIPT = "ufm.py"
FINAL = "final.pt"
PRECISIONS = {"fp64": torch.float64, "fp32": torch.float32}
# log.csv's columns beyond train.py's: the objective f and the norm of its gradient, at the logged steps.
LOG_EXTRA = ["objective", "grad_norm"]


@dataclass
class Model:
    """The trained tensors: the classifier's weight (K, d) and bias (K, or None), the features (N, d) and
    their labels (N,)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    features: torch.Tensor
    labels: torch.Tensor

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight, self.features] + ([self.bias] if self.bias is not None else [])


def add_selection_arguments(group: config.FlagGroup) -> None:
    """ufm.py's flags that select a run (and so its default folder); their dests are config.json's keys."""
    config.add_settings(group, config.UFM, "run")
    group.add_argument("--run-dir", type=Path, help="the run folder (default: runs/UFM-K<K>-d<D>-n<n>-<loss>-seed<seed>"
                       "[-<non-default settings>])")


def add_run_arguments(group: config.FlagGroup) -> None:
    """ufm.py's other flags: how often it measures, and where it runs; none changes the run's numbers beyond
    rounding (the device)."""
    config.add_settings(group, config.UFM, "training")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")


def resolve_config(args: argparse.Namespace) -> dict:
    """Every setting of the run from the flags, a setting the run does not use (a loss's parameter under
    another loss, the batch size of gd, the profile of a balanced set, same-class pairs without Mixup)
    None, and what derives from them: the classes' sizes and the figures' names for the run."""
    settings = config.resolve(config.UFM, args)
    run = {"script": SCRIPT, "time_unit": "step", "dataset": "UFM", "model": f"K={args.classes}, d={args.dim}",
           **settings, "num_classes": settings["classes"]}
    run["class_counts"] = datasets.imbalanced_counts(args.classes, args.samples_per_class, args.imbalance,
                                                     run["imbalance_profile"])
    if run["batch_size"] is not None and run["batch_size"] > sum(run["class_counts"]):
        raise UserError(f"--batch-size {run['batch_size']} is more than the {sum(run['class_counts'])} training "
                        "samples; choose a smaller one, or --optimizer gd for the whole set at every step")
    return run


def run_name(run: dict) -> str:
    """UFM-K<K>-d<D>-n<n>-<loss>-seed<seed>, then a tag for each setting that is not its default."""
    return "-".join(["UFM", f"K{run['classes']}", f"d{run['dim']}", f"n{run['samples_per_class']}", run["loss"],
                     f"seed{run['seed']}", *config.name_tags(config.UFM, run)])


def default_run_dir(run: dict, args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / run_name(run)


def initial_model(run: dict, device: torch.device | str = "cpu") -> Model:
    """W and H with entries N(0, 1/d) drawn from the run's seed, b = 0, and the labels: class c's N_c
    samples (config's class_counts) one after the other."""
    dtype = PRECISIONS[run["precision"]]
    generator = _generator(run["seed"], 0)
    counts = torch.tensor(run["class_counts"])
    scale = run["dim"] ** -0.5
    weight = torch.randn(run["classes"], run["dim"], generator=generator, dtype=torch.float64) * scale
    features = torch.randn(int(counts.sum()), run["dim"], generator=generator, dtype=torch.float64) * scale
    bias = torch.zeros(run["classes"], dtype=torch.float64) if run["bias"] else None
    labels = torch.repeat_interleave(torch.arange(run["classes"]), counts)
    return Model(*(tensor.to(device, dtype) if tensor is not None else None for tensor in (weight, bias, features)),
                 labels.to(device))


def objective(model: Model, run: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, the mean loss) on the clean features: the quantities the optimizer minimises and reports."""
    loss = losses.loss_from_config(run)(logits(model, model.features), model.labels)
    return loss + _penalty(model, run), loss


def logits(model: Model, features: torch.Tensor) -> torch.Tensor:
    """W h + b for each row h of `features`."""
    out = features @ model.weight.T
    return out if model.bias is None else out + model.bias


def train(model: Model, run: dict, measure_at: set[int],
          on_measure: Callable[[int, float], None]) -> None:
    """Run the optimizer's steps 1..S on `model` in place; after each step of `measure_at`, call
    `on_measure(step, seconds)` with the seconds the steps since the previous call took (the measurement's
    own time left out). A measured step whose loss is not finite stops the run with a UserError."""
    loss_fn = losses.loss_from_config(run)
    lr, alpha = run["lr"], run["mixup_alpha"]
    decays = [run["weight_decay_classifier"], run["weight_decay_features"], run["weight_decay_bias"]]
    pairing, lambdas = _generator(run["seed"], 2), np.random.default_rng([run["seed"], 3])
    tick = time.perf_counter()
    for step, rows in enumerate(_batches(len(model.labels), run), start=1):
        rows = rows if rows is None else rows.to(model.labels.device)
        leaf = _leaves(model, model.features if rows is None else model.features[rows],
                       model.labels if rows is None else model.labels[rows])
        inputs, targets = (losses.mix_batch(leaf.features, leaf.labels, alpha, lambdas, pairing,
                                            run["mixup_same_class"]) if alpha > 0 else (leaf.features, leaf.labels))
        loss = loss_fn(logits(leaf, inputs), targets)
        grads = torch.autograd.grad(loss, leaf.parameters())
        with torch.no_grad():
            for parameter, decay in zip(model.parameters(), decays):
                if decay:
                    parameter.mul_(1 - lr * decay)
            model.weight.sub_(grads[0], alpha=lr)
            if rows is None:
                model.features.sub_(grads[1], alpha=lr)
            else:
                model.features.index_add_(0, rows, grads[1], alpha=-lr)
            if model.bias is not None:
                model.bias.sub_(grads[2], alpha=lr)
        if step in measure_at:
            finite = math.isfinite(loss.item())  # which waits for the device: `seconds` is the steps' whole time
            seconds = time.perf_counter() - tick
            if not finite:
                raise UserError(f"the run diverged at step {step} (loss {loss.item()}); lower the learning rate, "
                                f"e.g. --lr {lr / 2:g}, in a new --run-dir")
            on_measure(step, seconds)
            tick = time.perf_counter()


def measure(model: Model, run: dict) -> tuple[dict, dict]:
    """The rows of log.csv and nc_metrics.csv for the model as it is: the loss, accuracy, objective and its
    gradient's norm; and every metric validate_nc.py records (nc_metrics.py), class-balanced for an
    imbalanced run with its Minority Collapse columns, the test columns empty (there is no test split)."""
    with torch.enable_grad():
        probe = _leaves(model, model.features, model.labels)
        total, loss = objective(probe, run)
        grads = torch.autograd.grad(total, probe.parameters())
        grad_norm = torch.cat([grad.flatten() for grad in grads]).norm().item()
    with torch.no_grad():
        accuracy = losses.correct_count(logits(model, model.features), model.labels).item() / len(model.labels)
        counts = torch.tensor(run["class_counts"])
        imbalanced = run["imbalance"] > 1
        stats = FeatureStats(run["classes"], run["dim"], device=model.features.device,
                             class_weights=balancing_weights(counts) if imbalanced else None)
        stats.update(model.features, model.labels)
        metrics = {"train_acc": accuracy, "train_loss": loss.item(), "test_acc": None, "test_loss": None,
                   "test_ece": None, **metrics_from_stats(stats, model.weight),
                   "ncc_mismatch_train": ncc_mismatch(model.features, model.weight, model.bias, stats.class_means()),
                   "ncc_mismatch_test": None}
        if imbalanced:
            minority, majority = datasets.minority_classes(run["classes"]), datasets.majority_classes(run["classes"])
            norms = model.weight.double().norm(dim=1).tolist()
            metrics |= group_cosines(model.weight, list(minority), list(majority))
            metrics |= {f"weight_norm_{label}": norm for label, norm in enumerate(norms)}
    logged = {"lr": run["lr"], "train_loss": loss.item(), "train_acc": accuracy, "test_loss": None, "test_acc": None,
              "test_ece": None, "objective": total.item(), "grad_norm": grad_norm}
    return logged, metrics


def save_final(run_dir: Path, model: Model, run: dict) -> None:
    """final.pt: {"weight", "bias" (None without one), "features", "labels", "config"}, on the CPU."""
    runs.save_checkpoint(Path(run_dir) / FINAL, {
        "weight": model.weight.detach().cpu(), "bias": None if model.bias is None else model.bias.detach().cpu(),
        "features": model.features.detach().cpu(), "labels": model.labels.cpu(), "config": run})


def load_final(run_dir: Path) -> Model:
    """The tensors of a run's final.pt, on the CPU, once the file is found intact (runs.load_archive) and
    its tensors fit one another and its config; anything else is a UserError naming the file."""
    path = Path(run_dir) / FINAL
    state = runs.load_archive(path, SCRIPT)
    problem = _final_problem(state)
    if problem:
        raise UserError(f"{path} is not a final.pt written by {SCRIPT} ({problem}); delete it, and run {SCRIPT} "
                        "again to write it")
    return Model(state["weight"], state["bias"], state["features"], state["labels"])


def finished(run_dir: Path, steps: int) -> bool:
    """Whether ufm.py has finished the run in `run_dir`: its final.pt, the last file it writes, is there and
    log.csv reaches `steps`."""
    log = runs.read_log(run_dir)
    return (Path(run_dir) / FINAL).is_file() and bool(log) and log[-1]["epoch"] == steps


def result_differences(old: dict, new: dict) -> list[str]:
    """The result-changing settings on which two UFM configs differ, as 'key: old -> new'."""
    return config.result_differences(old, new, config.UFM)


def _batches(count: int, run: dict) -> Iterator[torch.Tensor | None]:
    """Per step, the rows of H it trains: None (all of them) for gd; for sgd, shuffled batches of
    --batch-size, a new permutation each pass over the samples, its last smaller batch kept."""
    order = _generator(run["seed"], 1)
    step = 0
    while True:
        passes = [None] if run["optimizer"] == "gd" else torch.randperm(count, generator=order).split(run["batch_size"])
        for rows in passes:
            if step == run["steps"]:
                return
            step += 1
            yield rows


def _leaves(model: Model, features: torch.Tensor, labels: torch.Tensor) -> Model:
    """The model with `features` and `labels` (a batch's, or all) for its own, its tensors shared but each a
    leaf of its own that records its gradient."""
    return Model(model.weight.detach().requires_grad_(),
                 None if model.bias is None else model.bias.detach().requires_grad_(),
                 features.detach().requires_grad_(), labels)


def _penalty(model: Model, run: dict) -> torch.Tensor:
    penalty = run["weight_decay_classifier"] / 2 * model.weight.pow(2).sum() \
        + run["weight_decay_features"] / 2 * model.features.pow(2).sum()
    if model.bias is not None:
        penalty = penalty + run["weight_decay_bias"] / 2 * model.bias.pow(2).sum()
    return penalty


def _final_problem(state) -> str | None:
    """What keeps a loaded final.pt from being one ufm.py wrote, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return "no config in it"
    tensors = [state.get(key) for key in ("weight", "features", "labels")]
    if not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        return "weight, features or labels missing"
    weight, features, labels = tensors
    run = state["config"]
    classes, dim, count = run.get("classes"), run.get("dim"), sum(run.get("class_counts") or [])
    if weight.shape != (classes, dim) or features.shape != (count, dim) or labels.shape != (count,):
        return f"shapes {tuple(weight.shape)}, {tuple(features.shape)}, {tuple(labels.shape)} for K={classes}, " \
               f"d={dim}, N={count}"
    bias = state.get("bias")
    if run.get("bias") != (bias is not None) or (bias is not None and (not isinstance(bias, torch.Tensor)
                                                                       or bias.shape != (classes,))):
        return "its bias does not match its config"
    if labels.dtype != torch.int64 or labels.min() < 0 or labels.max() >= classes:
        return "labels outside 0..K-1"
    return None


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one random stream of the run (0 initialisation, 1 batch order, 2 Mixup pairing)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
