"""Running a model over data: the training epoch, the per-epoch evaluation and the collapse measurement.

Training and evaluation keep their running sums on the device and read them once per epoch, so the
device never waits for the host inside an epoch. The measurement pass is strict float32 whatever the
training precision (autocast off, TF32 off): bf16-rounded features put NC1 off by 44% at NC1 ~ 1e-4.
All randomness of an epoch (data order, augmentation, Mixup) is drawn from generators seeded by
(seed, epoch), so an epoch is the same whether the run was resumed before it or not.

Under torchrun (see distributed.py) each process trains on its share of every global batch, and
evaluates and measures its shard of each split; the sums are added across processes, so every
number is that of the whole split. Mixup draws the same lambda on every process but pairs each
example with a partner from its own process's share, not from the whole global batch.
"""
import contextlib
import copy
import itertools
import re
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

import datasets
import distributed
import losses
import models
import robustness
from datasets import Split
from devices import HOST
from errors import UserError
from models import classifier
from nc_metrics import (FEATURE_KEYS, FeatureStats, balancing_weights, calibration_bins, expected_calibration_error,
                        group_cosines, metrics_from_stats, nc1, ncc_disagreements, plane_coordinates, simplex_plane)



def build_model(config: dict, device: torch.device) -> nn.Module:
    """The run's network (from the registry, as config.json describes it) on the device, channels-last,
    with its last layer as the run chose it: learned (with or without bias) or a fixed simplex ETF; a
    UserError if it does not fit in memory."""
    try:
        model = models.get_model(config["model"], config["num_classes"], config["in_channels"], config["width"])
        if config.get("classifier", "learned") == "etf":
            try:
                classifier.fix_to_simplex_etf(model.fc, config["seed"])
            except ValueError as err:
                raise UserError(f"--classifier etf: {err}; choose a wider network or --classifier learned") from None
        elif not config.get("bias", True):
            classifier.remove_bias(model.fc)
        return model.to(device, memory_format=torch.channels_last)
    except RuntimeError as err:  # torch.OutOfMemoryError on CUDA; "can't allocate memory" on the CPU
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(err))
        size = f" (one of its tensors needs {int(asked[1]) / 2 ** 30:,.0f} GiB)" if asked else ""
        raise UserError(f"a {config['model']} of width {config['width']} does not fit in memory{size}; choose a "
                        "smaller --width") from None


def training_memory(settings: dict, batch: int, image_size: int) -> dict[str, int] | None:
    """A lower estimate of the bytes training the run's network takes on its device besides the data: its
    weights, their gradients and the optimizer's state (a momentum buffer for SGD, two moments for Adam(W)),
    and the activations of a batch of `batch` images of side `image_size` that the backward pass keeps (the
    output of every layer, counted once). The network is built and run on the meta device, which allocates
    nothing; None for a network of one's own that the meta device cannot run (one that reads a value)."""
    states = {"sgd": 1 if settings["momentum"] else 0, "adam": 2, "adamw": 2}[settings["optimizer"]]
    outputs = []

    def keep(module: nn.Module, inputs: tuple, output) -> None:
        if isinstance(output, torch.Tensor) and not any(output is given for given in inputs):  # not in place
            outputs.append(output.numel())

    with torch.device("meta"):
        model = models.get_model(settings["model"], settings["num_classes"], settings["in_channels"],
                                 settings["width"])
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(keep)
        try:
            model(torch.empty(batch, settings["in_channels"], image_size, image_size))
        except Exception:  # a network of one's own may do anything, some of which the meta device cannot
            return None
    weights = 4 * sum(parameter.numel() for parameter in model.parameters())
    activation_bytes = 2 if settings["precision"] == "bf16" else 4
    return {"weights, gradients and optimizer state": weights * (2 + states),
            "a batch's activations": activation_bytes * sum(outputs)}


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: losses.LossFn, data: Split,
                config: dict, epoch: int, on_batch: Callable[[], None] = lambda: None) -> dict[str, float]:
    """One epoch of training; returns the mean loss and the (running, train-mode) accuracy."""
    model.train()
    images, labels = data
    count, batch_size, world_size = len(labels), config["batch_size"], distributed.world_size()
    shuffle, augment_with, pairing = (epoch_generator(config["seed"], epoch, stream) for stream in range(3))
    lambdas = np.random.default_rng([config["seed"], epoch, 3])
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    shares = datasets.batches(images, labels, batch_size, *_normalization(config), shuffle=shuffle,
                              augment_with=augment_with if config["augment"] else None,
                              rank=distributed.rank(), world_size=world_size)
    for start, (x, y) in zip(range(0, count, batch_size), shares):
        targets: losses.Targets = y
        if config["mixup_alpha"] > 0:
            x, targets = losses.mix_batch(x, y, config["mixup_alpha"], lambdas, pairing,
                                          same_class=config["mixup_same_class"])
        optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, config["precision"]):
            logits = model(x)
        loss = loss_fn(logits, targets)
        # DDP averages the processes' gradients; weighting each by its share of the global batch makes
        # that the global batch's mean even when the shares differ in size (in one process the weight is 1).
        share_weight = len(y) * world_size / min(batch_size, count - start)
        (loss if share_weight == 1 else loss * share_weight).backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += losses.correct_count(logits.detach(), targets)
        on_batch()
    loss_total, correct_total = distributed.all_reduce_sum(torch.stack([loss_sum, correct]).double()).tolist()
    return {"train_loss": loss_total / count, "train_acc": correct_total / count}


def make_optimizer(model: torch.nn.Module, settings: dict, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or Adam/AdamW; fused kernels on CUDA. It holds the parameters that
    train (not a fixed ETF classifier's weight); with --classifier-weight-decay, the last layer's in a
    group of their own with that weight decay."""
    groups = parameter_groups(model, settings)
    common = dict(lr=settings["lr"], weight_decay=settings["weight_decay"])
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(groups, momentum=settings["momentum"], **common, **fast)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings["optimizer"]]
    return kind(groups, **common, **fast)


def parameter_groups(model: torch.nn.Module, settings: dict) -> list[dict]:
    """The optimizer's parameter groups: every trained parameter in one, or, with a classifier weight decay,
    the body's (at --weight-decay) then the last layer's (at --classifier-weight-decay)."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decay = settings.get("classifier_weight_decay")
    if decay is None:
        return [{"params": trained}]
    last = {id(parameter) for parameter in model.fc.parameters()}
    return [{"params": [parameter for parameter in trained if id(parameter) not in last]},
            {"params": [parameter for parameter in trained if id(parameter) in last], "weight_decay": decay}]


def make_scheduler(optimizer: torch.optim.Optimizer, settings: dict) -> torch.optim.lr_scheduler.MultiStepLR:
    """The rate is multiplied by lr_gamma after each milestone epoch (stepped once per epoch, after it)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, settings["lr_milestones"], settings["lr_gamma"])


class FullBatchesCompiled(nn.Module):
    """The model torch.compile'd for the full batches of an epoch, its smaller last batch run eagerly.

    On CUDA with CUDA graphs ("reduce-overhead"): at batch size 128 a ResNet-18 step is bound by kernel
    launches, and on an H100 graphs trained 2.75x faster than eager while the default mode was slower
    than eager. Compiling for one batch size (dynamic=False) keeps the kernels specialised; a second
    graph for the last batch (80 of CIFAR-10's 50,000 images) would cost another compilation, as long as
    the first, to save milliseconds per epoch. The parameters are `model`'s: checkpoints hold it alone."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default",
                                      dynamic=False)
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.compiled if len(x) == self.batch_size else self.model)(x)


EVALUATION_KEYS = ("test_loss", "test_acc", "test_ece")


@torch.inference_mode()
def evaluate(model: nn.Module, loss_fn: losses.LossFn, data: Split, config: dict,
             batch_size: int = 1000) -> dict[str, float]:
    """Loss, accuracy and expected calibration error (15 bins) on a split, in the training precision."""
    model.eval()
    images, labels = datasets.shard(data, batch_size, distributed.rank(), distributed.world_size())
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    bins = torch.zeros(15, 3, dtype=torch.float64, device=images.device)
    for x, y in datasets.batches(images, labels, batch_size, *_normalization(config)):
        with autocast(images.device, config["precision"]):
            logits = model(x).float()
        loss_sum += loss_fn(logits, y) * len(y)
        correct += losses.correct_count(logits, y)
        bins += calibration_bins(logits, y)
    totals = distributed.all_reduce_sum(torch.cat([torch.stack([loss_sum, correct]).double(), bins.flatten()]))
    count = len(data[1])
    return {"test_loss": totals[0].item() / count, "test_acc": totals[1].item() / count,
            "test_ece": expected_calibration_error(totals[2:].view_as(bins))}


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """IEEE float32 for every matmul and convolution (no TF32, no bf16), restored on exit."""
    backends = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn.conv,
                torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv]
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


@torch.inference_mode()
@strict_float32()
def measure_collapse(model: nn.Module, loss_fn: losses.LossFn, train: Split, test: Split, config: dict,
                     batch_size: int = 1000, layers: bool = False, test_collapse: bool = False) -> dict[str, float]:
    """Every number validate_nc.py records for one checkpoint, from one strict-float32 pass over each split.

    The train pass feeds `FeatureStats` and keeps its features (float32, on the device) until the class
    means are known, for `ncc_mismatch_train`; the test pass compares with the *train* means
    (`ncc_mismatch_test`, the paper's Figure 7). With `layers`, the same train pass also feeds one
    `FeatureStats` per stage of the network (`model.stage_features`), for `nc1_<stage>`; with
    `test_collapse`, the test pass feeds its own `FeatureStats`, for the collapse of the test features
    around their own class means (STATS_KEYS that depend on the features, suffixed `_test`).

    A run on an imbalanced training subset (config "imbalance" > 1) is measured class-balanced: every
    FeatureStats weighs its classes equally (`balancing_weights` of the labels it sees), and the numbers of
    Minority Collapse are added (`_minority_collapse`). A balanced run's statistics are the plain sample
    averages, as in the paper.

    Under torchrun each process measures its shard of each split (`datasets.shard`: whole batches, so
    every feature comes from the same batch as in one process) and the sums are added across
    processes, the NCC mismatch of each shard counted against the global class means. Every sum is
    float64, so the numbers do not depend on the number of processes beyond float64 rounding."""
    model.eval()
    weight, bias = model.fc.weight, model.fc.bias
    device = train[0].device
    rank, world_size = distributed.rank(), distributed.world_size()
    train_weights = _class_weights(train[1], config)
    stats = FeatureStats(config["num_classes"], weight.shape[1], device=device, class_weights=train_weights)
    stage_stats = _stage_stats(model, train, config, train_weights) if layers else {}
    test_stats = FeatureStats(config["num_classes"], weight.shape[1], device=device,
                              class_weights=_class_weights(test[1], config)) if test_collapse else None
    kept, train_totals = [], torch.zeros(2, dtype=torch.float64, device=device)
    broken = torch.zeros((), dtype=torch.float64, device=device)
    for stages, logits, y in _readouts(model, datasets.shard(train, batch_size, rank, world_size), config,
                                       batch_size, layers):
        for name, readout in stages:
            readout, broken = _zero_non_finite(readout, broken)
            if name in stage_stats:
                stage_stats[name].update(readout, y)
        features = readout
        stats.update(features, y)
        kept.append(features)
        train_totals += torch.stack([loss_fn(logits, y) * len(y), losses.correct_count(logits, y)]).to(torch.float64)
    for accumulator in (stats, *stage_stats.values()):
        distributed.all_reduce_stats(accumulator)
    means = stats.class_means()
    ncc_train = sum((ncc_disagreements(features, weight, bias, means) for features in kept),
                    torch.zeros((), dtype=torch.int64, device=device))
    del kept
    test_totals = torch.zeros(3, dtype=torch.float64, device=device)
    bins = torch.zeros(15, 3, dtype=torch.float64, device=device)
    per_class = torch.zeros(2, config["num_classes"], dtype=torch.float64, device=device)  # correct, images
    for stages, logits, y in _readouts(model, datasets.shard(test, batch_size, rank, world_size), config,
                                       batch_size, False):
        features, broken = _zero_non_finite(stages[-1][1], broken)
        if test_stats is not None:
            test_stats.update(features, y)
        test_totals += torch.stack([loss_fn(logits, y) * len(y), losses.correct_count(logits, y),
                                    ncc_disagreements(features, weight, bias, means)]).to(torch.float64)
        bins += calibration_bins(logits, y)
        per_class.index_add_(1, y, torch.stack([(logits.argmax(dim=1) == y).to(torch.float64),
                                                torch.ones(len(y), dtype=torch.float64, device=device)]))
    if test_stats is not None:
        distributed.all_reduce_stats(test_stats)
    totals = distributed.all_reduce_sum(torch.cat([train_totals, ncc_train.double()[None], test_totals,
                                                   broken[None], bins.flatten(), per_class.flatten()]))
    train_loss, train_correct, ncc_train_count, test_loss, test_correct, ncc_test, broken = totals[:7].tolist()
    if broken:
        raise UserError(f"the features of {broken:.0f} images are not finite (NaN or Inf): the network had diverged")
    n_train, n_test = len(train[1]), len(test[1])
    measured = {"train_acc": train_correct / n_train, "train_loss": train_loss / n_train,
                "test_acc": test_correct / n_test, "test_loss": test_loss / n_test,
                "test_ece": expected_calibration_error(totals[7:7 + bins.numel()].view_as(bins)),
                **metrics_from_stats(stats, weight),
                "ncc_mismatch_train": ncc_train_count / n_train, "ncc_mismatch_test": ncc_test / n_test}
    if test_stats is not None:
        on_test = metrics_from_stats(test_stats, weight)
        measured |= {f"{key}_test": on_test[key] for key in FEATURE_KEYS}
    for name, accumulator in stage_stats.items():
        measured[f"nc1_{name}"] = nc1(accumulator.within_class_covariance(),
                                      accumulator.class_means() - accumulator.global_mean())
    if layers:
        measured[f"nc1_{model.stage_names[-1]}"] = measured["nc1"]  # the last stage is the penultimate layer
    if train_weights is not None:
        measured |= _minority_collapse(weight, totals[7 + bins.numel():].view_as(per_class))
    return measured


@strict_float32()
def adversarial_robustness(model: nn.Module, test: Split, config: dict, samples: int,
                           batch_size: int = 100) -> dict[str, float]:
    """DeepFool's robustness (robustness.deepfool_robustness) on `samples` test images drawn with the
    run's seed, the same images at every checkpoint, in strict float32."""
    model.eval()
    chosen = robustness.sample_indices(len(test[1]), min(samples, len(test[1])), config["seed"])
    images, labels = test[0][chosen.to(test[0].device)], test[1][chosen.to(test[1].device)]
    mean, std = _normalization(config)
    return robustness.deepfool_robustness(model, images, labels, mean=mean, std=std, batch_size=batch_size)


REPRESENTATION_COLUMNS = ["kind", "lam", "class_a", "class_b", "x", "y"]


@torch.inference_mode()
@strict_float32()
def mixup_representations(model: nn.Module, train: Split, config: dict, classes: list[int], lambdas: list[float],
                          per_class: int = 100, bn_mode: str = "eval") -> list[dict]:
    """The last-layer features of Mixup inputs of three classes, in the plane of their classifiers'
    simplex (Fisher, Meng & Papyan 2024, Figure 1), as rows of REPRESENTATION_COLUMNS.

    Up to `per_class` training images of each class are paired with another of the same class
    (kind "same") and, in order, with those of each other class (kind "mixed"); for every lam the
    features of lam * x_a + (1 - lam) * x_b are projected on `simplex_plane` of the three classifier
    rows, around the mean clean feature of the three classes. Rows of kind "classifier" hold the
    centred classifier rows and "mean" the clean class means, in the same plane. With bn_mode "train"
    batch norm uses each lam's batch statistics, on a copy: the model itself is left untouched."""
    model = copy.deepcopy(model).train() if bn_mode == "train" else model.eval()
    images, labels = train
    generator = torch.Generator().manual_seed(config["seed"])
    members = []
    for label in classes:
        found = torch.nonzero(labels.cpu() == label).squeeze(1)
        members.append(found[torch.randperm(len(found), generator=generator, device=HOST)[:per_class]])
    count = min(len(found) for found in members)
    if count < 2:
        raise UserError(f"the Mixup representations need at least 2 training images of each class, and the run "
                        f"keeps {count} of one of classes {classes}; choose others with --classes")
    firsts, seconds, kinds = [], [], []
    for label, found in zip(classes, members):
        firsts.append(found[:count])
        seconds.append(found[:count].roll(1))  # each image with the next one of its class, never itself
        kinds += [("same", label, label)] * count
    for (a, found_a), (b, found_b) in itertools.combinations(zip(classes, members), 2):
        firsts.append(found_a[:count])
        seconds.append(found_b[:count])
        kinds += [("mixed", a, b)] * count

    def batch(indices: list[torch.Tensor]) -> torch.Tensor:
        return datasets.normalize(images[torch.cat(indices).to(images.device)], *_normalization(config))

    x_a, x_b = batch(firsts), batch(seconds)
    weight = model.fc.weight[classes]
    basis = simplex_plane(weight)
    clean = model.features(batch([found[:count] for found in members]))
    origin = clean.double().mean(dim=0)
    rows = []
    for lam in lambdas:
        points = plane_coordinates(model.features(lam * x_a + (1 - lam) * x_b), basis, origin).tolist()
        rows += [{"kind": kind, "lam": lam, "class_a": a, "class_b": b, "x": x, "y": y}
                 for (kind, a, b), (x, y) in zip(kinds, points)]
    rows += _simplex_rows(weight, basis, clean, classes, count, origin)
    return rows


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one random stream of one epoch, independent of every other (seed, epoch, stream)."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast when the run trains in bf16, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _zero_non_finite(features: torch.Tensor, broken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The features with the rows holding a NaN or Inf zeroed, and `broken` plus their number, on the
    device: the pass runs to its end on every process, and the checkpoint is refused after the sums."""
    bad = ~features.isfinite().all(dim=1)
    return torch.where(bad[:, None], 0.0, features), broken + bad.sum()


def _readouts(model: nn.Module, data: Split, config: dict, batch_size: int,
              layers: bool) -> Iterator[tuple[list[tuple[str, torch.Tensor]], torch.Tensor, torch.Tensor]]:
    """Per batch: the readouts [(stage name, (B, C))...] whose last is the penultimate features (only that
    one unless `layers`), the logits and the labels."""
    images, labels = data
    for x, y in datasets.batches(images, labels, batch_size, *_normalization(config)):
        stages = model.stage_features(x) if layers else [("features", model.features(x))]
        yield stages, model.fc(stages[-1][1]), y


def _class_weights(labels: torch.Tensor, config: dict) -> torch.Tensor | None:
    """The class weights of an imbalanced run's FeatureStats (each class counting equally, whatever its
    size, as the imbalanced-collapse literature measures), None for a balanced run (the plain averages)."""
    if config.get("imbalance", 1.0) == 1:
        return None
    return balancing_weights(torch.bincount(labels, minlength=config["num_classes"]))


def _minority_collapse(weight: torch.Tensor, per_class: torch.Tensor) -> dict[str, float]:
    """The numbers of Minority Collapse: `group_cosines` of the classifier, the test accuracy on the minority
    and the majority classes from the per-class (correct, images) counts of the test split, and each
    classifier row's norm ||w_c|| (`weight_norm_<c>`)."""
    classes = len(weight)
    groups = {"minority": list(datasets.minority_classes(classes)),
              "majority": list(datasets.majority_classes(classes))}
    correct, images = per_class
    accuracies = {f"test_acc_{name}": (correct[members].sum() / images[members].sum()).item()
                  for name, members in groups.items()}
    norms = weight.detach().to(torch.float64).norm(dim=1).tolist()
    return {**group_cosines(weight, groups["minority"], groups["majority"]), **accuracies,
            **{f"weight_norm_{label}": norm for label, norm in enumerate(norms)}}


def _stage_stats(model: nn.Module, train: Split, config: dict,
                 class_weights: torch.Tensor | None) -> dict[str, FeatureStats]:
    """An empty FeatureStats per stage but the last (the penultimate features, which `stats` gathers
    anyway), sized by one image's readouts, so that every process has the same accumulators even with
    no batch of its own."""
    x = datasets.normalize(train[0][:1], *_normalization(config))
    return {name: FeatureStats(config["num_classes"], readout.shape[1], device=x.device, class_weights=class_weights)
            for name, readout in model.stage_features(x)[:-1]}


def _simplex_rows(weight: torch.Tensor, basis: torch.Tensor, clean: torch.Tensor, classes: list[int], count: int,
                  origin: torch.Tensor) -> list[dict]:
    """Rows of the centred classifier rows and the clean class means, in the simplex plane."""
    arrows = plane_coordinates(weight.double() - weight.double().mean(dim=0), basis, torch.zeros_like(basis[0]))
    means = plane_coordinates(clean.double().view(len(classes), count, -1).mean(dim=1), basis, origin)
    return [{"kind": kind, "lam": 1.0, "class_a": label, "class_b": label, "x": x, "y": y}
            for kind, points in (("classifier", arrows), ("mean", means))
            for label, (x, y) in zip(classes, points.tolist())]


def _normalization(config: dict) -> tuple[list[float], list[float]]:
    return config["normalization"]["mean"], config["normalization"]["std"]
