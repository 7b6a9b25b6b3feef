"""The run specification: every setting a user chooses for a run, declared once, and all that derives from it.

Papyan, Han & Donoho (2020) train with SGD, momentum 0.9, batch size 128, weight decay 5e-4 for 350
epochs, dividing the learning rate by 10 after epochs 350/3 and 2*350/3, with no augmentation, on a
class-balanced training set, and pick each learning rate from 25 values log-spaced on [1e-4, 0.25].

Each setting is a `Setting`: its config.json key (also its flag's dest), flag, help, default (the paper's
value, a departure for some datasets, or a rule of the settings it depends on), when it applies, its tag in
the run folder's name and its label in figures, whether it changes results, and the value a config.json
written before it existed meant. `TRAIN` is train.py's run (and validate_nc.py's selection), `UFM` ufm.py's
(unconstrained.py); they share the declarations of the loss, Mixup and imbalance. Everything else is derived:
the flags (`add_selection_arguments`, sweep.py's grids), `resolve_config` (a run's complete settings, written
to config.json), `run_name` (the folder, named after what differs from the defaults, so runs never share
one, runs of different lengths included), the checks of config.json (`settings_problems`) and of another
run (`result_differences`), `selection_flags` and the figures' labels (`setting_text`, `LABELS`). A run grows
longer only when asked (train.py's `--extend-to E`), which config.json records in `extended_from`.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass, field
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
# The analysis epochs of the authors' code for 350 epochs, verbatim.
AUTHORS_CHECKPOINTS = (*range(1, 15), 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77,
                       85, 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350)
REQUIRED = "required"  # a Setting's `before`: every config.json holds it (a file without it is refused)
Get = Callable[[str], object]  # a setting's value by key, as a rule of another setting sees it


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


def dataset_name(name: str) -> str:
    try:
        return datasets.canonical_name(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def model_name(name: str) -> str:
    """A registry model in lower case, or a module.path:function model as given (its case is its own)."""
    if not models.is_model_name(name):
        raise argparse.ArgumentTypeError(f"unknown model '{name}'; choose one of: {', '.join(models.MODEL_NAMES)}, "
                                         "wrn<depth>_<k> with depth 6n+4 (e.g. wrn40_10), or module.path:function "
                                         "for your own")
    return name if ":" in name else name.lower()


def loss_name(name: str) -> str:
    try:
        return losses.canonical_loss(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def default_milestones(epochs: int) -> list[int]:
    """The paper's schedule: the rate drops after epochs floor(E/3) and floor(2E/3) (those past epoch 0)."""
    return sorted({epoch for epoch in (epochs // 3, 2 * epochs // 3) if epoch > 0})


def paper_lr(get: Get) -> float:
    """The default learning rate of a run's dataset, model and optimizer."""
    if get("optimizer") != "sgd":
        return ADAPTIVE_LR
    return PAPER_LR.get((get("dataset"), get("model")), OTHER_LR)


@dataclass(frozen=True)
class Setting:
    """One user-chosen setting of a run, declared once.

    `key` is its config.json key and its flag's dest; `flag` its flag (default --<key with dashes>) and
    `parse` the rest of argparse's options (type, choices, action, metavar, nargs). `default` is the paper's
    value, or a rule of the other settings (a function of `Get`); `on` holds a dataset's departures from it.
    Where `applies` (a function of `Get`) is false the run does not have the setting: its value is None and
    its flag is refused, `applies_to` saying for which runs it is. `group` is "run" for the settings that select
    a run (and name its folder) and "training" for train.py's others. `tag` is how a value other than the
    default shows in the folder's name ("" the value alone, None never), `label` how figures name it ("" the
    value alone, None: never named). `result`: whether it changes what a run computes. `valid` is the rule for
    a config.json's value (default: what the flag's parser gives back for it). `before` is what a config.json
    written before the setting existed meant (REQUIRED: every config.json holds it). `given_default`: the flag's
    parser holds the default itself (else None, "not given", which the resolution turns into the default)."""
    key: str
    help: str
    default: object = None
    on: dict = field(default_factory=dict)
    applies: Callable[[Get], bool] | None = None
    applies_to: str = ""
    flag: str | None = None
    parse: dict = field(default_factory=dict)
    group: str = "run"
    tag: str | None = None
    label: str | None = None
    result: bool = True
    valid: Callable[[object], bool] | None = None
    before: object = None
    given_default: bool = False

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def default_for(self, get: Get) -> object:
        """The setting's default for a run whose other settings `get` gives."""
        if callable(self.default):
            return self.default(get)
        return self.on.get(get("dataset"), self.default) if self.on else self.default

    def resolve(self, given, get: Get) -> object:
        """The run's value: None where the setting does not apply, else `given` or the default."""
        if self.applies is not None and not self.applies(get):
            return None
        return self.default_for(get) if given is None else given

    def accepts(self, value) -> bool:
        """Whether `value` is one a command line can give the setting (what config.json may hold)."""
        if self.valid is not None:
            return self.valid(value)
        if "choices" in self.parse:
            return value in self.parse["choices"]
        if "type" not in self.parse:
            return isinstance(value, bool)
        values = value if self.parse.get("nargs") else [value]
        return isinstance(values, list) and all(_round_trips(self.parse["type"], item) for item in values)

    def add_to(self, add: Callable[..., object], prefix: str = "") -> None:
        """Add the setting's flag through `add` (a parser's or group's add_argument), its help after `prefix`."""
        default = self.default if self.given_default else None
        add(self.option, dest=self.key, default=default, help=prefix + self.help, **self.parse)


def _regression(get: Get) -> bool:
    return get("loss") in losses.REGRESSION_LOSSES


def _increasing_counts(value) -> bool:
    return isinstance(value, list) and all(_round_trips(positive_int, item) for item in value) \
        and all(a < b for a, b in zip(value, value[1:]))


# The settings of a run of a network (train.py), in the order its folder's name tags them and figures name them.
DATASET = Setting(
    "dataset", default="synthetic", given_default=True, parse={"type": dataset_name}, label="", before=REQUIRED,
    help=f"one of {', '.join(datasets.DATASETS)} (any case; default: synthetic, offline), or folder:PATH, your own "
    "images in PATH/train/<class>/ and PATH/test/<class>/ (torchvision's ImageFolder layout)")
MODEL = Setting(
    "model", default="resnet18", on={"CIFAR100": "resnet50"}, parse={"type": model_name}, label="", before=REQUIRED,
    help=f"network from the registry ({', '.join(models.MODEL_NAMES)}, wrn<depth>_<k>; default resnet18, resnet50 "
    "for CIFAR100), or module.path:function, your own: function(num_classes=C, in_channels=K, width=W) returns an "
    "nn.Module whose last layer is an nn.Linear (the module found on PYTHONPATH)")
WIDTH = Setting("width", default=64, on={"synthetic": 16}, parse={"type": positive_int}, tag="w", label="width",
                before=REQUIRED, help="channel width; 64 is the paper's ResNet (default 64, 16 on synthetic)")
SAMPLES_PER_CLASS = Setting(
    "samples_per_class", parse={"type": positive_int, "metavar": "K"}, tag="spc", label="spc", before=REQUIRED,
    help="train on a seeded class-balanced subset of K images per class, or with --imbalance K of the largest "
    "classes (default: the largest balanced subset)")
IMBALANCE = Setting(
    "imbalance", default=1.0, parse={"type": imbalance_ratio, "metavar": "R"}, tag="imb", label="imbalance",
    before=1.0, help="train on an imbalanced subset whose largest class has R times the samples of its smallest, the "
    "largest keeping K (see --imbalance-profile); the test set stays whole (default 1: balanced)")
IMBALANCE_PROFILE = Setting(
    "imbalance_profile", default="step", applies=lambda get: get("imbalance") > 1, applies_to="--imbalance above 1",
    parse={"choices": datasets.IMBALANCE_PROFILES}, label="profile",
    help="with --imbalance: step (Fang et al. 2021, default): the first ceil(C/2) classes keep K, the others "
    "ceil(K/R); exp (Cao et al. 2019): class c keeps floor(K R^(-c/(C-1)))")
EPOCHS = Setting(
    "epochs", default=350, on={"synthetic": 30}, parse={"type": epoch_count}, tag="ep", label="epochs", before=REQUIRED,
    help=f"epochs to train, at most {MAX_EPOCHS:,} (default 350; 30 on synthetic); another value is another run, in "
    "its own folder (train.py --extend-to trains a run longer)")
LOSS = Setting("loss", default="ce", given_default=True, parse={"type": loss_name}, label="loss", before=REQUIRED,
               help=f"{', '.join(losses.LOSSES)} (cross_entropy = ce; default ce)")
OPTIMIZER = Setting("optimizer", default="sgd", parse={"choices": ("sgd", "adam", "adamw")}, tag="", label="",
                    help="default sgd, the paper's")
LR = Setting(
    "lr", default=paper_lr, parse={"type": rate}, tag="lr", label="lr",
    help="learning rate (default: the paper's grid value for the dataset and model: "
    f"{PAPER_LR[('CIFAR10', 'resnet18')]} for CIFAR10/resnet18, {PAPER_LR[('CIFAR100', 'resnet50')]} for "
    f"CIFAR100/resnet50, else {OTHER_LR}; {ADAPTIVE_LR} for adam(w))")
MOMENTUM = Setting("momentum", default=0.9, applies=lambda get: get("optimizer") == "sgd",
                   applies_to="--optimizer sgd", parse={"type": fraction}, tag="mom", label="momentum",
                   help="SGD momentum (default 0.9)")
WEIGHT_DECAY = Setting("weight_decay", default=5e-4, parse={"type": decay}, tag="wd", label="wd", help="default 5e-4")
BATCH_SIZE = Setting("batch_size", default=128, parse={"type": positive_int}, tag="bs", label="batch",
                     help="training batch size (default 128)")
LR_MILESTONES = Setting(
    "lr_milestones", default=lambda get: default_milestones(get("epochs")), valid=_increasing_counts,
    parse={"type": positive_int, "nargs": "+", "metavar": "EPOCH"}, tag="ms", label="milestones", before=REQUIRED,
    help="multiply the learning rate by --lr-gamma after these epochs (default: epochs/3 and 2*epochs/3)")
LR_GAMMA = Setting("lr_gamma", default=0.1, parse={"type": rate}, tag="gamma", label="lr gamma",
                   help="learning-rate factor at each milestone (default 0.1)")
TARGET_SCALE = Setting(
    "target_scale", default=1.0, applies=_regression, applies_to=f"the regression losses "
    f"({', '.join(losses.REGRESSION_LOSSES)})", parse={"type": positive_float}, tag="kappa", label="kappa",
    help="kappa: regression targets are kappa * one-hot (mse, mae, smooth_l1; default 1)")
LABEL_SMOOTHING = Setting(
    "label_smoothing", default=0.1, applies=lambda get: get("loss") == "label_smoothing",
    applies_to="--loss label_smoothing", parse={"type": fraction}, tag="eps", label="eps",
    help="epsilon of label_smoothing (default 0.1)")
FOCAL_GAMMA = Setting("focal_gamma", default=3.0, applies=lambda get: get("loss") == "focal",
                      applies_to="--loss focal", parse={"type": non_negative_float}, tag="fgamma",
                      label="focal gamma", help="gamma of focal (default 3)")
AUGMENT = Setting(
    "augment", default=False, parse={"action": "store_true"}, tag="aug", label="augment",
    help="random 4-pixel crops and horizontal flips on the device (off in the paper; NC is always measured on "
    "clean data)")
MIXUP_ALPHA = Setting("mixup_alpha", default=0.0, parse={"type": non_negative_float, "metavar": "ALPHA"},
                      tag="mixup", label="mixup",
                      help="Mixup with lambda ~ Beta(alpha, alpha); 0 is off (default 0; Fisher et al. use 1)")
MIXUP_SAME_CLASS = Setting("mixup_same_class", default=False, parse={"action": "store_true"}, tag="sameclass",
                           label="same-class mixup", help="mix each example with another of its own class")
PRECISION = Setting(
    "precision", default="fp32", parse={"choices": ("fp32", "bf16")}, tag="", label="", before=REQUIRED,
    help="training precision: fp32 as the paper (default; on CUDA with PyTorch's defaults: TF32 convolutions, IEEE "
    "matmuls) or bf16 autocast (faster; see the README's evidence); measurement is always strict fp32")
SEED = Setting("seed", default=0, given_default=True, parse={"type": seed}, label="seed", before=REQUIRED,
               help="fixes initialisation, data order and subset: 0 to 2**32 - 1 (default 0)")
CLASSIFIER = Setting(
    "classifier", default="learned", parse={"choices": ("learned", "etf")}, tag="", label="", before="learned",
    help="the last layer: learned (default, the paper's) or etf, fixed to a simplex equiangular tight frame (C unit "
    "rows with pairwise cosines -1/(C-1), oriented at random from --seed), not trained, without bias or weight decay "
    "(Zhu et al. 2021)")
_LEARNED = {"applies": lambda get: get("classifier") == "learned", "applies_to": "--classifier learned"}
BIAS = Setting("bias", default=True, flag="--no-bias", parse={"action": "store_false"}, tag="nobias", label="bias",
               before=True, help="a learned last layer without bias (default: with bias, as the paper)", **_LEARNED)
CLASSIFIER_WEIGHT_DECAY = Setting(
    "classifier_weight_decay", parse={"type": decay, "metavar": "X"}, tag="cwd", label="classifier wd", **_LEARNED,
    help="weight decay of the learned last layer, apart from --weight-decay on the rest (default: --weight-decay "
    "for all, as the paper)")
IMAGE_SIZE = Setting(
    "image_size", applies=lambda get: datasets.is_folder(get("dataset")), applies_to="folder:PATH datasets",
    parse={"type": positive_int, "metavar": "S"}, tag="size", label="size",
    help="folder:PATH datasets: resize each image's shorter side to S and crop its centre to S x S (default: the "
    "images' own size, which must then be one square size)")
TEST_SAMPLES = Setting(
    "test_samples", parse={"type": positive_int, "metavar": "N"}, tag="test", label="test samples",
    help="evaluate and measure on a seeded class-balanced subset of N test images (each class N // C, the first "
    "N mod C classes one more; refused where a class has fewer) instead of the whole test split, in train.py's "
    "evaluations and validate_nc.py's measurement alike (default: the whole split)")
NUM_CHECKPOINTS = Setting(
    "num_checkpoints", default=50, on={"synthetic": 15}, parse={"type": positive_int}, group="training",
    result=False, before=REQUIRED, help="analysis checkpoints, log-spaced in 1..epochs, the last epoch always "
    "included (default 50; 15 on synthetic)")
EVAL_EVERY = Setting(
    "eval_every", default=1, parse={"type": non_negative_int, "metavar": "K"}, group="training", result=False,
    help="evaluate the test split every K epochs, and at every analysis checkpoint and the last epoch (default 1); "
    "0: never, leaving the test split to validate_nc.py's measurement of the checkpoints. log.csv leaves the other "
    "epochs' test columns empty. Training is the same whatever K: on small training sets evaluation is most of an "
    "epoch's time")
TRAIN = (DATASET, MODEL, WIDTH, SAMPLES_PER_CLASS, IMBALANCE, IMBALANCE_PROFILE, EPOCHS, LOSS, OPTIMIZER, LR,
         MOMENTUM, WEIGHT_DECAY, BATCH_SIZE, LR_MILESTONES, LR_GAMMA, TARGET_SCALE, LABEL_SMOOTHING, FOCAL_GAMMA,
         AUGMENT, MIXUP_ALPHA, MIXUP_SAME_CLASS, PRECISION, SEED, CLASSIFIER, BIAS, CLASSIFIER_WEIGHT_DECAY,
         IMAGE_SIZE, TEST_SAMPLES, NUM_CHECKPOINTS, EVAL_EVERY)


def _ufm(setting: Setting, **changes) -> Setting:
    """A setting of train.py's as ufm.py has it: its parser holds the default; `changes` are ufm.py's own."""
    return dataclasses.replace(setting, **{"given_default": True, **changes})


# The settings of a run of the unconstrained-features model (ufm.py, unconstrained.py): the loss, Mixup and the
# imbalance are train.py's; a run's folder is named UFM-K<K>-d<D>-n<n>-<loss>-seed<seed>, then the tags in order.
UFM = (
    Setting("classes", default=10, given_default=True, parse={"type": lambda text: _checked(
        int(text), lambda v: v >= 2, "must be at least 2", text), "metavar": "K"}, label="K",
        help="number of classes (default 10)"),
    Setting("dim", default=512, given_default=True, parse={"type": positive_int, "metavar": "D"}, label="d",
            help="feature dimension d (default 512, ResNet-18's); the optima of docs/ufm.md need K <= d + 1 "
            "(MSE: K <= d)"),
    _ufm(SAMPLES_PER_CLASS, default=500, flag="--per-class", parse={"type": positive_int, "metavar": "n"}, tag=None,
         help="training samples per class, of the largest classes under --imbalance (default 500)"),
    _ufm(LOSS), _ufm(SEED, help="fixes the initialisation, the batches and Mixup's draws (default 0)"),
    _ufm(IMBALANCE, help="the largest class has R times the samples of the smallest (default 1: balanced)"),
    _ufm(IMBALANCE_PROFILE, given_default=False, help="with --imbalance: step (Fang et al. 2021, default): the "
         "first ceil(K/2) classes keep n samples, the others ceil(n/R); exp: class c keeps floor(n R^(-c/(K-1)))"),
    _ufm(OPTIMIZER, default="gd", parse={"choices": ("gd", "sgd")}, help="gd: gradient descent on the whole "
         "training set (default); sgd: on shuffled batches of --batch-size; no momentum"),
    _ufm(LR, default=8.0, parse={"type": positive_float}, help="learning rate (default 8: large, since a feature's "
         "share of the mean loss is 1/N; docs/ufm.md)"),
    _ufm(BATCH_SIZE, given_default=False, applies=lambda get: get("optimizer") == "sgd",
         applies_to="--optimizer sgd", help="with --optimizer sgd: samples per step (default 128)"),
    Setting("weight_decay_classifier", default=5e-4, given_default=True, tag="lamW", label="λW",
            parse={"type": non_negative_float, "metavar": "LAMBDA_W"},
            help="lamW, the weight decay of the classifier (default 5e-4)"),
    Setting("weight_decay_features", default=5e-4, given_default=True, tag="lamH", label="λH",
            parse={"type": non_negative_float, "metavar": "LAMBDA_H"},
            help="lamH, the weight decay of the features (default 5e-4, the paper's weight decay)"),
    Setting("weight_decay_bias", default=0.0, applies=lambda get: get("bias"), applies_to="a classifier with bias",
            tag="lamb", label="λb", parse={"type": non_negative_float, "metavar": "LAMBDA_B"},
            help="lamb, the weight decay of the bias (default 0: unregularised)"),
    _ufm(BIAS, applies=None, applies_to="", help="a classifier without bias (default: with an unregularised bias)"),
    _ufm(TARGET_SCALE, given_default=False), _ufm(LABEL_SMOOTHING, given_default=False),
    _ufm(FOCAL_GAMMA, given_default=False), _ufm(MIXUP_ALPHA),
    _ufm(MIXUP_SAME_CLASS, given_default=False, applies=lambda get: get("mixup_alpha") > 0,
         applies_to="--mixup-alpha above 0"),
    Setting("steps", default=5000, given_default=True, parse={"type": positive_int, "metavar": "S"}, tag="steps",
            label="steps", help="optimizer steps (default 5000)"),
    _ufm(PRECISION, default="fp64", parse={"choices": ("fp64", "fp32")},
         help="fp64 (default) or fp32 for every tensor and the loss"),
    _ufm(NUM_CHECKPOINTS, on={}, parse={"type": positive_int, "metavar": "M"}, help="steps at which nc_metrics.csv "
         "and log.csv get a row: M log-spaced in 1..S, the last always included (default 50)"),
)
# How figures name each setting of either kind of run (a key both have names the same thing).
LABELS = {setting.key: setting.label for setting in (*TRAIN, *UFM) if setting.label is not None}


@dataclass(frozen=True)
class DataFacts:
    """What a run's data turned out to be, written into config.json beside the settings (same keys as ever):
    the classes and image channels, the subset's samples per class (of the largest class) and each class's
    count, a folder dataset's image size, the training subset's normalisation, the folder read and the data's
    fingerprint (datasets.data_fingerprint)."""
    num_classes: int
    in_channels: int
    samples_per_class: int
    class_counts: list
    image_size: int | None
    normalization: dict
    data_root: str
    data_fingerprint: dict

    def record(self, settings: dict) -> None:
        """Write the facts into a run's settings; the image size only for a folder dataset, which has it."""
        facts = dataclasses.asdict(self)
        if not datasets.is_folder(settings["dataset"]):
            facts.pop("image_size")
        settings.update(facts)


# What a config.json must hold besides its settings for the scripts to rebuild the run's network and data.
_REQUIRED_FACTS = {"num_classes": lambda value: type(value) is int and value > 0,
                   "in_channels": lambda value: type(value) is int and value > 0,
                   "data_root": lambda value: isinstance(value, str)}
# What a run's config.json must hold for the scripts to rebuild its network and data.
CONFIG_KEYS = (*(setting.key for setting in TRAIN if setting.before == REQUIRED), *_REQUIRED_FACTS)


class FlagGroup(Protocol):
    """What the add_*_arguments functions add their flags to: a parser, one of its argument groups (whose
    flags --help lists under the group's title), or a stand-in that changes the flags on their way."""

    def add_argument(self, *flags: str, **options) -> argparse.Action | None: ...


def add_selection_arguments(group: FlagGroup, selecting: bool = False) -> None:
    """The flags that select a run (and so its default folder), shared by train.py and validate_nc.py;
    with `selecting` (validate_nc.py's), each flag's help says that it selects the run train.py wrote."""
    prefix = "selects the run: " if selecting else ""
    add_settings(group, TRAIN, "run", prefix)
    group.add_argument("--run-dir", type=Path, help=prefix + "the run folder (default: "
                       "runs/<DATASET>-<model>-<loss>-seed<seed>[-<non-default settings>])")


def add_settings(group: FlagGroup, spec: tuple[Setting, ...], kind: str, prefix: str = "") -> None:
    """The flags of the settings of `spec` in `kind` ("run" or "training"), each help after `prefix`."""
    for setting in spec:
        if setting.group == kind:
            setting.add_to(group.add_argument, prefix)


def add_training_arguments(training: FlagGroup, data: FlagGroup | None = None,
                           output: FlagGroup | None = None) -> None:
    """train.py's flags besides the selection flags (sweep.py passes them on to train.py unchanged): how long
    and how to train into `training`, where the data is and the device into `data`, and what is written
    besides the run folder into `output` (by default all into `training`)."""
    add = training.add_argument
    add("--extend-to", type=epoch_count, metavar="E", help="train the run the other flags select on to epoch E "
        f"(at most {MAX_EPOCHS:,}), at the learning rate its schedule ends with (its milestones stay), with the "
        "analysis checkpoints of its length up to it and those of E after it; recorded in config.json's extended_from")
    add_settings(training, TRAIN, "training")
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


def resolve(spec: tuple[Setting, ...], args: argparse.Namespace) -> dict:
    """Every setting of `spec` from the flags (`args`, by dest; a flag not given is None) and the defaults, in
    the spec's order; each rule sees the settings it depends on, resolved first whatever their order."""
    settings = {setting.key: setting for setting in spec}
    resolved = {}

    def get(key: str):
        if key not in resolved:
            resolved[key] = settings[key].resolve(getattr(args, key, None), get)
        return resolved[key]

    return {key: get(key) for key in settings}


def resolve_config(args: argparse.Namespace) -> dict:
    """Every setting of a train.py run, from the flags and the defaults, with the classes and channels of its
    dataset after the dataset (the rest of the data's facts come once it is loaded, `DataFacts`)."""
    settings = resolve(TRAIN, args)
    if args.lr_milestones:
        settings["lr_milestones"] = _milestones(args.lr_milestones, settings["epochs"])
    _refuse_overflowing_schedule(settings["lr"], settings["lr_gamma"], settings["lr_milestones"])
    found = datasets.info(settings["dataset"])
    return {"dataset": settings.pop("dataset"), "num_classes": found.num_classes, "in_channels": found.channels,
            **settings}


def refuse_inapplicable(args: argparse.Namespace, settings: dict) -> None:
    """Refuse a flag given for a setting that the run it selects does not have (`resolve_config`'s
    `settings` leave it None): --image-size on a built-in dataset, --focal-gamma with another loss."""
    for setting in TRAIN:
        if setting.applies is not None and getattr(args, setting.key, None) is not None \
                and settings[setting.key] is None:
            raise UserError(f"{setting.option} applies to {setting.applies_to} only, which this run is not: drop it")


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
    if (epochs, count) == (EPOCHS.default, NUM_CHECKPOINTS.default):
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


def run_name(config: dict) -> str:
    """<DATASET>-<model>-<loss>-seed<seed>, then a tag for each setting that differs from its default."""
    return "-".join([datasets.label(config["dataset"]), config["model"].replace(":", "."), config["loss"],
                     f"seed{config['seed']}", *name_tags(TRAIN, config)])


def name_tags(spec: tuple[Setting, ...], run: dict) -> list[str]:
    """The tags of a run's settings (of `spec`) that are not their defaults, in the spec's order: "w16",
    "imb10step", "ms50_100", "nobias", "bf16"."""
    tags = []
    for setting in spec:
        value = run.get(setting.key)
        if setting.tag is None or value is None or value == setting.default_for(run.get):
            continue
        if isinstance(value, bool):
            tags.append(setting.tag)
        elif setting.key == "imbalance":
            tags.append(f"{setting.tag}{value:g}{run['imbalance_profile']}")
        elif isinstance(value, list):
            tags.append(setting.tag + "_".join(map(str, value)))
        else:
            tags.append(f"{setting.tag}{value:g}" if isinstance(value, float) else f"{setting.tag}{value}")
    return tags


def default_run_dir(config: dict, args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / run_name(config)


def result_differences(old: dict, new: dict, spec: tuple[Setting, ...] = TRAIN) -> list[str]:
    """The result-changing settings on which two configs differ, as 'key: old -> new' (a train.py run's length
    is compared apart, as the one it was started with: --extend-to grows it), and, of a train.py run, the
    normalisation statistics of its training subset."""
    found = [f"{setting.key}: {_setting(old, setting.key, spec)!r} -> {_setting(new, setting.key, spec)!r}"
             for setting in spec
             if setting.result and setting is not EPOCHS
             and _setting(old, setting.key, spec) != _setting(new, setting.key, spec)]
    if spec is TRAIN and old.get("normalization") != new.get("normalization"):
        found.append("normalization: the statistics of another training subset")
    return found


def setting_text(key: str, value) -> str:
    """A setting as a figure prints it: "width=16", "spc=100", "bf16", "augment", "milestones=50,100"."""
    name = LABELS.get(key, key)
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
    return [setting_text(setting.key, run[setting.key]) for setting in TRAIN
            if setting.label is not None and setting not in (DATASET, MODEL, SEED)
            and run.get(setting.key) is not None and run[setting.key] != _reference(setting, run, paper=True)]


def selection_flags(run: dict) -> list[str]:
    """The command-line flags that select a run (a config.json, or `resolve_config`'s settings): --dataset,
    then each setting that differs from its default, e.g. ["--dataset", "CIFAR10", "--width", "8"]."""
    run = {**run, "epochs": planned_epochs(run)}  # an extended run is still selected by its first --epochs
    flags = ["--dataset", run["dataset"]]
    for setting in TRAIN:
        value = run.get(setting.key)
        if setting.group != "run" or setting is DATASET or value is None or value == _reference(setting, run):
            continue
        if isinstance(value, bool):
            flags.append(setting.option if value else "--no-" + setting.key.replace("_", "-"))
        else:
            flags += [setting.option, *map(str, value if isinstance(value, list) else [value])]
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
    rules = {**{setting.key: setting.accepts for setting in TRAIN}, **_REQUIRED_FACTS}
    missing = [key for key in keys if key not in run]
    invalid = [f"{key} = {run[key]!r}" for key in keys if key in run and key in rules and not rules[key](run[key])]
    return ([f"settings missing: {', '.join(missing)}"] if missing else []) + \
        ([f"invalid settings: {', '.join(invalid)}"] if invalid else [])


def paper_run_name(dataset: str) -> str:
    """The folder name of the run with every default for this dataset."""
    return f"{datasets.label(dataset)}-{MODEL.default_for(lambda key: dataset)}-{LOSS.default}-seed0"


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu or --device auto")
    return torch.device(name)


def _reference(setting: Setting, run: dict, paper: bool = False):
    """What a run's setting is compared with to tell whether it was chosen: its default for the run (with
    `paper`, the paper's protocol, without the dataset's departures), the whole balanced training set for
    the samples per class (which config.json records once the data is loaded)."""
    if setting is SAMPLES_PER_CLASS:
        return datasets.FULL_PER_CLASS.get(run.get("dataset"))
    if setting.applies is not None and not setting.applies(_with_defaults(run)):
        return None
    if paper and not callable(setting.default):
        return setting.default
    return setting.default_for(_with_defaults(run))


def _with_defaults(run: dict) -> Get:
    """The settings of `run`, each it lacks (a hand-written or older config.json) being its default."""
    by_key = {setting.key: setting for setting in TRAIN}

    def get(key: str):
        value = run.get(key)
        return by_key[key].default_for(get) if value is None and key in by_key else value

    return get


def _setting(run: dict, key: str, spec: tuple[Setting, ...] = TRAIN):
    """A setting of a run's config, or of a run written before the setting existed, the value it had."""
    if key in run:
        return run[key]
    before = next((setting.before for setting in spec if setting.key == key), None)
    return None if before == REQUIRED else before


def _round_trips(parse: Callable[[str], object], value) -> bool:
    """Whether `value` is what `parse` (a flag's type) gives for its own text: a value a command line gives."""
    try:
        return type(value) is not bool and parse(str(value)) == value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


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


_FLOAT32_RULE = f"must be at most {FLOAT32_MAX:.3g}, float32's largest number, in which the optimizer computes"


def _checked(value, ok, rule: str, text: str):
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value
