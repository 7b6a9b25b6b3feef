"""The paper's training protocol as defaults, the flags that select a run, and the run's folder name.

Papyan, Han & Donoho (2020) train with SGD, momentum 0.9, batch size 128, weight decay 5e-4 for 350
epochs, dividing the learning rate by 10 after epochs 350/3 and 2*350/3, with no augmentation, on a
class-balanced training set, and pick each learning rate from 25 values log-spaced on [1e-4, 0.25].
Every flag left out resolves to that protocol; `resolve_config` turns the flags into the run's
complete settings (written to `config.json`), and `run_name` names its folder after what differs from
the defaults, so runs never share a folder: runs of different lengths included. A run grows longer only
when asked (train.py's `--extend-to E`), which config.json records in `extended_from`.
"""
import argparse
import math
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

import datasets
import losses
import models
from errors import UserError

# The grid points of logspace(1e-4, 0.25, 25) the paper used for these pairs; 0.0679 is the
# authors' MNIST value, used for every other pair.
PAPER_LR = {("CIFAR10", "resnet18"): 0.1302501827396728, ("CIFAR100", "resnet50"): 0.18045095091164853}
OTHER_LR = 0.0679
ADAPTIVE_LR = 1e-3  # Adam and AdamW diverge at the SGD rates above
# The longest run a flag may ask for: a hundred thousand epochs, far beyond any study of collapse (the paper
# trains 350), so that a mistyped length is refused instead of training, and being followed, for ever.
MAX_EPOCHS = 100_000
# The optimizers hand the learning rate, the weight decays and the rate after each milestone to float32
# kernels, which cannot take a number beyond float32's largest.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

PROTOCOL = {"model": "resnet18", "width": 64, "epochs": 350, "batch_size": 128, "momentum": 0.9,
            "weight_decay": 5e-4, "lr_gamma": 0.1, "num_checkpoints": 50, "optimizer": "sgd",
            "loss": "ce", "target_scale": 1.0, "label_smoothing": 0.1, "focal_gamma": 3.0,
            "mixup_alpha": 0.0, "mixup_same_class": False, "augment": False, "precision": "fp32", "eval_every": 1,
            "imbalance": 1.0, "imbalance_profile": "step",
            "classifier": "learned", "bias": True, "classifier_weight_decay": None, "image_size": None}
# The analysis epochs of the authors' code for 350 epochs, verbatim.
AUTHORS_CHECKPOINTS = (*range(1, 15), 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77,
                       85, 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350)
# Departures from the protocol per dataset: CIFAR-100 is the paper's ResNet-50 case; synthetic is
# the CPU quick start, small enough to train and validate in under a minute on two cores.
DATASET_DEFAULTS = {"CIFAR100": {"model": "resnet50"},
                    "synthetic": {"epochs": 30, "width": 16, "num_checkpoints": 15}}

# Settings that change what a run computes: a run folder belongs to one value of each (and to one
# --epochs, which only --extend-to may grow). Anything else (device, data folder, checkpoint count) may change.
RESULT_KEYS = ("dataset", "model", "width", "loss", "target_scale", "label_smoothing", "focal_gamma",
               "optimizer", "lr", "momentum", "weight_decay", "batch_size", "lr_milestones", "lr_gamma",
               "samples_per_class", "seed", "augment", "mixup_alpha", "mixup_same_class", "precision",
               "normalization", "imbalance", "imbalance_profile", "classifier", "bias", "classifier_weight_decay",
               "image_size")
# Result-changing settings added after runs were first written: what a config.json that lacks them meant.
ADDED_SETTINGS = {"imbalance": 1.0, "classifier": "learned", "bias": True, "classifier_weight_decay": None,
                  "image_size": None}

# The settings that only some runs have, and which runs: `resolve_config` leaves them None for the others,
# where their flags are refused (sweep.py leaves them out of those runs' commands).
APPLIES_TO = {"image_size": "folder:PATH datasets",
              "target_scale": f"the regression losses ({', '.join(losses.REGRESSION_LOSSES)})",
              "label_smoothing": "--loss label_smoothing", "focal_gamma": "--loss focal",
              "momentum": "--optimizer sgd", "imbalance_profile": "--imbalance above 1",
              "bias": "--classifier learned", "classifier_weight_decay": "--classifier learned"}

# How a non-default setting shows in the run folder's name.
NAME_TAGS = (("width", "w"), ("samples_per_class", "spc"), ("imbalance", "imb"), ("epochs", "ep"), ("optimizer", ""), ("lr", "lr"),
             ("momentum", "mom"), ("weight_decay", "wd"), ("batch_size", "bs"), ("lr_milestones", "ms"),
             ("lr_gamma", "gamma"), ("target_scale", "kappa"), ("label_smoothing", "eps"),
             ("focal_gamma", "fgamma"), ("augment", "aug"), ("mixup_alpha", "mixup"),
             ("mixup_same_class", "sameclass"), ("precision", ""), ("classifier", ""), ("bias", "nobias"),
             ("classifier_weight_decay", "cwd"), ("image_size", "size"))

# The user-facing settings that tell runs apart in a figure, with the short names figures print
# ("" prints the value alone). Derived values (normalisation statistics, class counts) never appear.
SETTING_NAMES = {"dataset": "", "model": "", "width": "width", "samples_per_class": "spc",
                 "imbalance": "imbalance", "imbalance_profile": "profile", "epochs": "epochs",
                 "loss": "loss", "target_scale": "kappa", "label_smoothing": "eps", "focal_gamma": "focal gamma",
                 "optimizer": "", "lr": "lr", "momentum": "momentum", "weight_decay": "wd", "batch_size": "batch",
                 "lr_milestones": "milestones", "lr_gamma": "lr gamma", "augment": "augment",
                 "mixup_alpha": "mixup", "mixup_same_class": "same-class mixup", "precision": "", "seed": "seed",
                 "classifier": "", "bias": "bias", "classifier_weight_decay": "classifier wd", "image_size": "size",
                 # ufm.py's own (unconstrained.py), which a train.py run's config never holds
                 "classes": "K", "dim": "d", "weight_decay_features": "λH", "weight_decay_classifier": "λW",
                 "weight_decay_bias": "λb", "steps": "steps"}


class FlagGroup(Protocol):
    """What the add_*_arguments functions add their flags to: a parser, one of its argument groups (whose
    flags --help lists under the group's title), or a stand-in that changes the flags on their way."""

    def add_argument(self, *flags: str, **options) -> argparse.Action | None: ...


def add_selection_arguments(group: FlagGroup, selecting: bool = False) -> None:
    """The flags that select a run (and so its default folder), shared by train.py and validate_nc.py;
    with `selecting` (validate_nc.py's), each flag's help says that it selects the run train.py wrote."""
    add = _Selecting(group).add_argument if selecting else group.add_argument
    add("--dataset", type=_dataset_name, default="synthetic",
        help=f"one of {', '.join(datasets.DATASETS)} (any case; default: synthetic, offline), or folder:PATH, your "
        "own images in PATH/train/<class>/ and PATH/test/<class>/ (torchvision's ImageFolder layout)")
    add("--image-size", type=positive_int, metavar="S", help="folder:PATH datasets: resize each image's shorter "
        "side to S and crop its centre to S x S (default: the images' own size, which must then be one square size)")
    add("--model", type=_model_name, help="network from the registry "
        f"({', '.join(models.MODEL_NAMES)}, wrn<depth>_<k>; default resnet18, resnet50 for CIFAR100), or "
        "module.path:function, your own: function(num_classes=C, in_channels=K, width=W) returns an nn.Module whose "
        "last layer is an nn.Linear (the module found on PYTHONPATH)")
    add("--width", type=positive_int, help="channel width; 64 is the paper's ResNet (default 64, 16 on synthetic)")
    add_loss_arguments(add)
    add("--optimizer", choices=("sgd", "adam", "adamw"), help="default sgd, the paper's")
    add("--lr", type=rate, help="learning rate (default: the paper's grid value for the dataset "
        f"and model: {PAPER_LR[('CIFAR10', 'resnet18')]} for CIFAR10/resnet18, "
        f"{PAPER_LR[('CIFAR100', 'resnet50')]} for CIFAR100/resnet50, else {OTHER_LR}; {ADAPTIVE_LR} for adam(w))")
    add("--momentum", type=fraction, help="SGD momentum (default 0.9)")
    add("--weight-decay", type=decay, help="default 5e-4")
    add("--batch-size", type=positive_int, help="training batch size (default 128)")
    add("--lr-milestones", type=positive_int, nargs="+", metavar="EPOCH",
        help="multiply the learning rate by --lr-gamma after these epochs (default: epochs/3 and 2*epochs/3)")
    add("--lr-gamma", type=rate, help="learning-rate factor at each milestone (default 0.1)")
    add("--samples-per-class", type=positive_int, metavar="K",
        help="train on a seeded class-balanced subset of K images per class, or with --imbalance K of the largest "
        "classes (default: the largest balanced subset)")
    add("--imbalance", type=imbalance_ratio, metavar="R", help="train on an imbalanced subset whose largest class has "
        "R times the samples of its smallest, the largest keeping K (see --imbalance-profile); the test set stays "
        "whole (default 1: balanced)")
    add("--imbalance-profile", choices=datasets.IMBALANCE_PROFILES, help="with --imbalance: step (Fang et al. 2021, "
        "default): the first ceil(C/2) classes keep K, the others ceil(K/R); exp (Cao et al. 2019): class c keeps "
        "floor(K R^(-c/(C-1)))")
    add("--epochs", type=epoch_count, help=f"epochs to train, at most {MAX_EPOCHS:,} (default 350; 30 on synthetic); "
        "another value is another run, in its own folder (train.py --extend-to trains a run longer)")
    add("--augment", action="store_true", default=None,
        help="random 4-pixel crops and horizontal flips on the device (off in the paper; NC is always measured on clean data)")
    add_mixup_arguments(add)
    add("--precision", choices=("fp32", "bf16"), help="training precision: fp32 as the paper (default; on CUDA "
        "with PyTorch's defaults: TF32 convolutions, IEEE matmuls) or bf16 autocast (faster; see the README's "
        "evidence); measurement is always strict fp32")
    add("--classifier", choices=("learned", "etf"), help="the last layer: learned (default, the paper's) or etf, "
        "fixed to a simplex equiangular tight frame (C unit rows with pairwise cosines -1/(C-1), oriented at random "
        "from --seed), not trained, without bias or weight decay (Zhu et al. 2021)")
    add("--no-bias", dest="bias", action="store_false", default=None,
        help="a learned last layer without bias (default: with bias, as the paper)")
    add("--classifier-weight-decay", type=decay, metavar="X", help="weight decay of the learned "
        "last layer, apart from --weight-decay on the rest (default: --weight-decay for all, as the paper)")
    add("--seed", type=seed, default=0, help="fixes initialisation, data order and subset: 0 to 2**32 - 1 "
        "(default 0)")
    add("--run-dir", type=Path, help="the run folder (default: runs/<DATASET>-<model>-<loss>-seed<seed>[-<non-default settings>])")


def add_loss_arguments(add: Callable[..., object]) -> None:
    """The flags of the loss and its parameters (train.py's and ufm.py's), through `add` (a group's add_argument)."""
    add("--loss", type=_loss_name, default="ce", help=f"{', '.join(losses.LOSSES)} (cross_entropy = ce; default ce)")
    add("--target-scale", type=positive_float, help="kappa: regression targets are kappa * one-hot (mse, mae, smooth_l1; default 1)")
    add("--label-smoothing", type=fraction, help="epsilon of label_smoothing (default 0.1)")
    add("--focal-gamma", type=non_negative_float, help="gamma of focal (default 3)")


def add_mixup_arguments(add: Callable[..., object]) -> None:
    """The flags of Mixup (train.py's and ufm.py's), through `add` (a group's add_argument)."""
    add("--mixup-alpha", type=non_negative_float, metavar="ALPHA",
        help="Mixup with lambda ~ Beta(alpha, alpha); 0 is off (default 0; Fisher et al. use 1)")
    add("--mixup-same-class", action="store_true", default=None,
        help="mix each example with another of its own class")


def add_training_arguments(training: FlagGroup, data: FlagGroup | None = None,
                           output: FlagGroup | None = None) -> None:
    """train.py's flags besides the selection flags (sweep.py passes them on to train.py unchanged): how long
    and how to train into `training`, where the data is and the device into `data`, and what is written
    besides the run folder into `output` (by default all into `training`)."""
    add = training.add_argument
    add("--extend-to", type=epoch_count, metavar="E", help="train the run the other flags select on to epoch E "
        f"(at most {MAX_EPOCHS:,}), at the learning rate its schedule ends with (its milestones stay), with the "
        "analysis checkpoints of its length up to it and those of E after it; recorded in config.json's extended_from")
    add("--num-checkpoints", type=positive_int, help="analysis checkpoints, log-spaced in 1..epochs, "
        "the last epoch always included (default 50; 15 on synthetic)")
    add("--eval-every", type=non_negative_int, metavar="K", help="evaluate the test split every K epochs, and at "
        "every analysis checkpoint and the last epoch (default 1); 0: never, leaving the test split to "
        "validate_nc.py's measurement of the checkpoints. log.csv leaves the other epochs' test columns empty. "
        "Training is the same whatever K: on small training sets evaluation is most of an epoch's time")
    add("--save-last", choices=("epoch", "checkpoint"), default="epoch", help="when last.pt, the state a run "
        "resumes from, is rewritten: after every epoch (default: a crash loses at most the epoch in progress), "
        "or at the analysis checkpoints, the last epoch and a stop by SIGTERM only (each write costs a GPU's "
        "training thread 0.01 s on idle host cores, up to 0.35 s on busy ones, against a 1.3 s compiled ResNet-18 "
        "epoch; see docs/performance.md). "
        "Resuming gives the same run either way")
    add("--deterministic", action="store_true", help="bit-identical reruns: PyTorch's deterministic "
        "algorithms, no cuDNN autotuning (on a GPU this costs speed, often 10-30%%)")
    add("--compile", action="store_true", help="torch.compile the training step, with CUDA graphs on a GPU "
        "(checkpoints still hold the plain weights)")
    add("--sync-bn", action=argparse.BooleanOptionalAction, help="under torchrun: batch-norm statistics over "
        "the global batch, as in one process (default: on with CUDA; torch's SyncBatchNorm needs CUDA, so on "
        "the CPU each process normalises with its own share of the batch)")
    add = (data or training).add_argument
    add("--data-root", type=Path, default=Path("data"), help="folder holding the datasets (default ./data)")
    add("--download", action="store_true", help="download the dataset into --data-root if it is missing")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    (output or training).add_argument(
        "--tensorboard", action="store_true", help="also write each epoch's numbers of log.csv to "
        "<run>/tensorboard/ for TensorBoard (the CSV stays the record)")


def add_measurement_arguments(group: FlagGroup) -> None:
    """validate_nc.py's measurements beyond Figures 2-7 (sweep.py passes them on to every run's validate_nc.py)."""
    add = group.add_argument
    add("--layers", action="store_true", help="also NC1 after every stage of the network (nc1_<stage> columns, "
        "layerwise_nc1.png), from the same forward pass")
    add("--test-collapse", action="store_true", help="also the collapse of the test features around their own "
        "class means (nc1_test and the other feature metrics with a _test suffix), drawn beside the train "
        "curves of Figures 2-6; from the test pass that runs anyway")
    add("--adversarial", action="store_true", help="also the paper's Figure 8: DeepFool's robustness on a fixed "
        "sample of test images (deepfool_* columns, fig8_adversarial_robustness.png); a separate pass")
    add("--adversarial-samples", type=positive_int, default=100, metavar="N",
        help="test images DeepFool attacks at every checkpoint, drawn with the run's seed (default 100)")


def resolve_config(args: argparse.Namespace) -> dict:
    """Every setting of the run, from the flags and the defaults (data-derived settings come later)."""
    dataset = args.dataset
    defaults = defaults_for(dataset, args.model, args.optimizer)
    loss = args.loss
    regression = loss in losses.REGRESSION_LOSSES
    found = datasets.info(dataset)
    config = {"dataset": dataset, "num_classes": found.num_classes, "in_channels": found.channels,
              "image_size": args.image_size if datasets.is_folder(dataset) else None}
    for key in ("model", "width", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "lr_gamma", "num_checkpoints", "augment", "mixup_alpha", "mixup_same_class", "precision",
                "eval_every"):
        value = getattr(args, key, None)
        config[key] = defaults[key] if value is None else value
    config["loss"] = loss
    config["target_scale"] = _chosen(args.target_scale, defaults["target_scale"], regression)
    config["label_smoothing"] = _chosen(args.label_smoothing, defaults["label_smoothing"], loss == "label_smoothing")
    config["focal_gamma"] = _chosen(args.focal_gamma, defaults["focal_gamma"], loss == "focal")
    if config["optimizer"] != "sgd":
        config["momentum"] = None
    config["lr_milestones"] = _milestones(args.lr_milestones, config["epochs"]) if args.lr_milestones else \
        default_milestones(config["epochs"])
    _refuse_overflowing_schedule(config["lr"], config["lr_gamma"], config["lr_milestones"])
    config["samples_per_class"] = args.samples_per_class
    config["imbalance"] = defaults["imbalance"] if args.imbalance is None else args.imbalance
    config["imbalance_profile"] = _chosen(args.imbalance_profile, defaults["imbalance_profile"],
                                          config["imbalance"] > 1)
    config["seed"] = args.seed
    config["classifier"] = args.classifier or defaults["classifier"]
    learned = config["classifier"] == "learned"  # the fixed ETF has no bias and no weight decay to choose
    config["bias"] = _chosen(args.bias, defaults["bias"], learned)
    config["classifier_weight_decay"] = _chosen(args.classifier_weight_decay, defaults["classifier_weight_decay"],
                                                learned)
    return config


def refuse_inapplicable(args: argparse.Namespace, settings: dict) -> None:
    """Refuse a flag given for a setting that the run it selects does not have (`resolve_config`'s
    `settings` leave it None): --image-size on a built-in dataset, --focal-gamma with another loss."""
    for key, needs in APPLIES_TO.items():
        if getattr(args, key, None) is not None and settings[key] is None:
            flag = "--no-bias" if key == "bias" else "--" + key.replace("_", "-")
            raise UserError(f"{flag} applies to {needs} only, which this run is not: drop it")


def contradictions(requested: dict, given: set[str], run: dict) -> list[str]:
    """The selection flags among `given` (by dest) whose settings in `requested` (`resolve_config`'s) differ
    from those of `run` (a config.json), as "--flag value (the run's: value)"; --epochs may be the length
    the run was started with or the one it has now."""
    found = []
    for key in sorted(given & requested.keys()):
        theirs = [planned_epochs(run), run.get("epochs")] if key == "epochs" else [_setting(run, key)]
        if requested[key] not in theirs:
            value = " ".join(map(str, requested[key])) if isinstance(requested[key], list) else requested[key]
            found.append(f"--{key.replace('_', '-')} {value} (the run's {key}: {theirs[-1]!r})")
    return found


def defaults_for(dataset: str, model: str | None, optimizer: str | None) -> dict:
    """The protocol's default of every setting for this dataset (and model and optimizer, which set the lr)."""
    defaults = {**PROTOCOL, **DATASET_DEFAULTS.get(dataset, {})}
    model = model or defaults["model"]
    optimizer = optimizer or defaults["optimizer"]
    lr = ADAPTIVE_LR if optimizer != "sgd" else PAPER_LR.get((dataset, model), OTHER_LR)
    return {**defaults, "model": model, "optimizer": optimizer, "lr": lr, "samples_per_class": None}


def default_milestones(epochs: int) -> list[int]:
    """The paper's schedule: the rate drops after epochs floor(E/3) and floor(2E/3) (those past epoch 0)."""
    return sorted({epoch for epoch in (epochs // 3, 2 * epochs // 3) if epoch > 0})


def analysis_epochs(run: dict) -> list[int]:
    """The analysis checkpoints of a run (its settings): `checkpoint_epochs` of its length and count; of a run
    that --extend-to lengthened, those of each length it was given over the epochs that length added, so that a
    run extended before it reached its length gets the checkpoints of one extended once it had."""
    epochs, reached = [], 0
    for length in [*run.get("extended_from", []), run["epochs"]]:
        epochs += [epoch for epoch in checkpoint_epochs(length, run["num_checkpoints"]) if epoch > reached]
        reached = length
    return epochs


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """`count` distinct epochs in 1..epochs, log-spaced, the last always included. For the paper's 350
    epochs and 50 checkpoints, the authors' own list; otherwise unique(round(logspace(0, log10(E), K)))
    for the smallest K that gives `count` epochs (which differs from theirs in 157 and 205)."""
    if (epochs, count) == (PROTOCOL["epochs"], PROTOCOL["num_checkpoints"]):
        return list(AUTHORS_CHECKPOINTS)
    if count >= epochs:
        return list(range(1, epochs + 1))
    if count == 1:
        return [epochs]
    for points in range(count, 100 * count + epochs):
        grid = np.unique(np.round(np.logspace(0, math.log10(epochs), points)).astype(int))
        if len(grid) >= count:
            return grid[np.linspace(0, len(grid) - 1, count).round().astype(int)].tolist()
    raise AssertionError("unreachable: the grid reaches every epoch")


def run_name(config: dict, args: argparse.Namespace) -> str:
    """<DATASET>-<model>-<loss>-seed<seed>, then a tag for each setting given on the command line
    that differs from its default."""
    defaults = defaults_for(config["dataset"], config["model"], config["optimizer"])
    parts = [datasets.label(config["dataset"]), config["model"].replace(":", "."), config["loss"],
             f"seed{config['seed']}"]
    for key, tag in NAME_TAGS:
        given, value = getattr(args, key, None), config[key]
        if given is None or given == defaults[key] or value is None:
            continue
        if isinstance(value, bool):
            parts.append(tag)
        elif key == "imbalance":
            parts.append(f"{tag}{value:g}{config['imbalance_profile']}")
        elif isinstance(value, list):
            parts.append(tag + "_".join(map(str, value)))
        else:
            parts.append(f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}")
    return "-".join(parts)


def default_run_dir(config: dict, args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / run_name(config, args)


def result_differences(old: dict, new: dict) -> list[str]:
    """The result-changing settings on which two configs differ, as 'key: old -> new'."""
    return [f"{key}: {_setting(old, key)!r} -> {_setting(new, key)!r}" if key != "normalization" else
            "normalization: the statistics of another training subset"
            for key in RESULT_KEYS if _setting(old, key) != _setting(new, key)]


def setting_text(key: str, value) -> str:
    """A setting as a figure prints it: "width=16", "spc=100", "bf16", "augment", "milestones=50,100"."""
    name = SETTING_NAMES.get(key, key)
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, list):
        value = ",".join(map(str, value))
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{name}={value}" if name else str(value)


def protocol_departures(run: dict) -> list[str]:
    """The settings of a run (its config.json) that differ from the paper's protocol for its dataset and
    model, as `setting_text` prints them, e.g. ["width=16", "spc=100", "epochs=150", "bf16"]."""
    paper = _reference(run, PROTOCOL)
    return [setting_text(key, run[key]) for key in SETTING_NAMES
            if key in paper and key != "model" and run.get(key) is not None and run[key] != paper[key]]


def selection_flags(run: dict) -> list[str]:
    """The command-line flags that select a run (a config.json, or `resolve_config`'s settings): --dataset,
    then each setting that differs from its default, e.g. ["--dataset", "CIFAR10", "--width", "8"]."""
    run = {**run, "epochs": planned_epochs(run)}  # an extended run is still selected by its first --epochs
    defaults = {**_reference(run, defaults_for(run["dataset"], None, None)), "seed": 0}
    flags = ["--dataset", run["dataset"]]
    for key in SETTING_NAMES:
        value = run.get(key)
        if key == "dataset" or value is None or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
    return flags


def planned_epochs(run: dict) -> int:
    """The --epochs a run was started with: its config's epochs, or the first length it had if --extend-to
    has extended it since."""
    return (run.get("extended_from") or [run.get("epochs")])[0]


def settings_problems(run, keys: tuple[str, ...]) -> list[str]:
    """What keeps `run` (a config.json's contents, or a checkpoint's config) from being a run's settings, as
    far as `keys` go: each of them missing, or holding a value no command line gives (an unknown name, a
    number of the wrong kind); an empty list if none."""
    if not isinstance(run, dict):
        return [f"a JSON {type(run).__name__} where the settings' object belongs"]
    missing = [key for key in keys if key not in run]
    invalid = [f"{key} = {run[key]!r}" for key in keys if key in run and not _VALID.get(key, _anything)(run[key])]
    return ([f"settings missing: {', '.join(missing)}"] if missing else []) + \
        ([f"invalid settings: {', '.join(invalid)}"] if invalid else [])


def paper_run_name(dataset: str) -> str:
    """The folder name of the run with every default for this dataset."""
    return f"{datasets.label(dataset)}-{defaults_for(dataset, None, None)['model']}-{PROTOCOL['loss']}-seed0"


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu or --device auto")
    return torch.device(name)


def _reference(run: dict, settings: dict) -> dict:
    """`settings` completed with what depends on the run: the default learning rate of its dataset, model
    and optimizer, the whole balanced training set, and the default milestones of its length."""
    return {**settings, "lr": defaults_for(run.get("dataset"), run.get("model"), run.get("optimizer"))["lr"],
            "samples_per_class": datasets.FULL_PER_CLASS.get(run.get("dataset")),
            "lr_milestones": default_milestones(run.get("epochs") or PROTOCOL["epochs"])}


def _setting(run: dict, key: str):
    """A setting of a run's config, or of a run written before the setting existed, the value it had."""
    return run.get(key, ADDED_SETTINGS.get(key))


def _count(value) -> bool:
    return type(value) is int and value > 0


def _named(canonical) -> Callable[[object], bool]:
    """Whether a value is a name as its flag's parser spells it (a dataset, model or loss)."""
    def valid(value) -> bool:
        try:
            return isinstance(value, str) and canonical(value) == value
        except ValueError:
            return False
    return valid


def _anything(value) -> bool:
    return True


# What a run's settings may hold where a script reads them: every value a command line can give.
_VALID = {"dataset": _named(datasets.canonical_name), "loss": _named(losses.canonical_loss),
          "model": lambda value: isinstance(value, str) and models.is_model_name(value) and value == value.lower(),
          "num_classes": _count, "in_channels": _count, "width": _count, "epochs": _count, "num_checkpoints": _count,
          "samples_per_class": _count, "seed": lambda value: type(value) is int and 0 <= value < 2 ** 32,
          "lr_milestones": lambda value: isinstance(value, list) and all(map(_count, value))
          and all(a < b for a, b in zip(value, value[1:])),
          "precision": lambda value: value in ("fp32", "bf16"), "data_root": lambda value: isinstance(value, str)}


def _milestones(given: list[int], epochs: int) -> list[int]:
    """The --lr-milestones as given, if they rise strictly and fall within the run."""
    if any(a >= b for a, b in zip(given, given[1:])):
        raise UserError(f"--lr-milestones {' '.join(map(str, given))}: give each epoch once, in increasing order")
    if given[-1] > epochs:
        raise UserError(f"--lr-milestones {given[-1]} is beyond the last epoch ({epochs}); a milestone is an "
                        f"epoch in 1..{epochs} after which the learning rate drops")
    return list(given)


def _refuse_overflowing_schedule(lr: float, gamma: float, milestones: list[int]) -> None:
    """Refuse a schedule whose rate grows (--lr-gamma above 1) past float32's largest number."""
    if math.log(lr) + len(milestones) * max(0.0, math.log(gamma)) > math.log(FLOAT32_MAX):
        raise UserError(f"--lr {lr:g} multiplied by --lr-gamma {gamma:g} at {len(milestones)} milestone(s) exceeds "
                        f"{FLOAT32_MAX:.3g}, float32's largest number, in which the optimizer computes; choose a "
                        "smaller --lr or --lr-gamma")


def _chosen(value, default, relevant: bool):
    """A loss parameter's value if its loss uses it, else None (so unused settings never clash)."""
    if not relevant:
        return None
    return default if value is None else value


class _Selecting:
    """Adds the selection flags to `group` as validate_nc.py takes them: the same flags, each help saying that
    it selects the run (a measurement changes no setting)."""

    def __init__(self, group: FlagGroup):
        self.group = group

    def add_argument(self, *flags: str, **options) -> argparse.Action | None:
        return self.group.add_argument(*flags, **{**options, "help": "selects the run: " + options["help"]})


def _dataset_name(name: str) -> str:
    try:
        return datasets.canonical_name(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _model_name(name: str) -> str:
    if not models.is_model_name(name):
        raise argparse.ArgumentTypeError(f"unknown model '{name}'; choose one of: {', '.join(models.MODEL_NAMES)}, "
                                         "wrn<depth>_<k> with depth 6n+4 (e.g. wrn40_10), or module.path:function "
                                         "for your own")
    return name if ":" in name else name.lower()


def _loss_name(name: str) -> str:
    try:
        return losses.canonical_loss(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def seed(text: str) -> int:
    return _checked(int(text), lambda v: 0 <= v < 2 ** 32, "must lie in 0 .. 2**32 - 1", text)


def positive_int(text: str) -> int:
    return _checked(int(text), lambda v: v > 0, "must be a positive integer", text)


def non_negative_int(text: str) -> int:
    return _checked(int(text), lambda v: v >= 0, "must be 0 or a positive integer", text)


def epoch_count(text: str) -> int:
    return _checked(positive_int(text), lambda v: v <= MAX_EPOCHS, f"must be at most {MAX_EPOCHS:,} epochs", text)


def rate(text: str) -> float:
    """A learning rate or its factor: positive, and a number float32 holds (see FLOAT32_MAX)."""
    return _checked(positive_float(text), lambda v: v <= FLOAT32_MAX, _FLOAT32_RULE, text)


def decay(text: str) -> float:
    """A weight decay: not negative, and a number float32 holds (see FLOAT32_MAX)."""
    return _checked(non_negative_float(text), lambda v: v <= FLOAT32_MAX, _FLOAT32_RULE, text)


def positive_float(text: str) -> float:
    return _checked(float(text), lambda v: 0 < v < math.inf, "must be a positive finite number", text)


def non_negative_float(text: str) -> float:
    return _checked(float(text), lambda v: 0 <= v < math.inf, "must be a finite number, not negative", text)


def imbalance_ratio(text: str) -> float:
    return _checked(float(text), lambda v: 1 <= v < math.inf, "must be a finite ratio of at least 1 (1 is balanced)",
                    text)


def fraction(text: str) -> float:
    return _checked(float(text), lambda v: 0 <= v < 1, "must lie in [0, 1)", text)


_FLOAT32_RULE = f"must be at most {FLOAT32_MAX:.3g}, float32's largest number, in which the optimizer computes"


def _checked(value, ok, rule: str, text: str):
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value
