"""Measure Neural Collapse on features that any code wrote: every measure of nc_metrics.py from saved penultimate
features and their labels (and the last layer and held-out features, if saved too), at any number of classes,
in memory that grows with neither the samples nor the square of the classes.

    python measure_features.py step_1000.npz step_2000.npz step_4000.npz --out measured/
    python measure_features.py features/ --out measured/ --min-class-samples 2
    python plotting.py nc measured/ --out measured/plots        # Figures 2-7 and 9 from the rows

Each FILE is one checkpoint: a .npz, .pt or .safetensors file, or a folder of shards or of .npy files (see
feature_files.py), with the arrays `features` (N, d) and `labels` (N,), and optionally `weight` (K, d) and
`bias` (K,) of the last layer and `test_features` and `test_labels` held out. Each adds a row to
<out>/nc_metrics.csv, numbered (its `epoch`) by the last number in its name (step_1000.npz: 1000), else by its
place among FILES; a row measured before for that number is replaced.

K is the weight's row count, else the largest label + 1. Every class 0..K-1 needs two samples (one gives no
within-class variance); `--min-class-samples m` leaves out the classes with fewer than m, their samples and
their classifier rows, as Wu & Papyan (2024) do, and says how many. The classes are weighed equally (the
class-balanced statistics of nc_metrics.py, the plain averages when the classes are balanced). The features
are read twice: once into FeatureStats, once with the class means known for the NCC mismatch, the accuracy
and the cross-entropy loss of the classifier's logits (with a classifier); the held-out features once.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import runs
from errors import ArgumentParser, UserError, run_cli
from feature_files import Array, Checkpoint, open_checkpoint
from nc_metrics import (PAIRWISE_MEMORY, FeatureStats, NearestClassMean, balancing_weights, calibration_bins,
                        classifier_logits, expected_calibration_error, metrics_from_stats)

WINDOW_MATRICES = 4  # float64 window x max(d, K) matrices a pass holds at once
MAX_CLASSES = 2 ** 31  # labels beyond are not class indices (without a weight, K is the largest label + 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    add = parser.add_argument_group("input",
                                    "The checkpoints, each a file or a folder of the arrays it holds.").add_argument
    add("files", type=Path, nargs="+", metavar="FILE", help="a checkpoint's .npz, .pt or .safetensors file, or a "
        "folder of its shards or .npy files")
    add("--min-class-samples", type=int, default=None, metavar="M", help="leave out the classes with fewer than M "
        "samples (default: none; every class needs two)")
    parser.add_argument_group("output").add_argument(
        "--out", type=Path, required=True, help="the folder of nc_metrics.csv (made if missing)")
    args = parser.parse_args(argv)
    if args.min_class_samples is not None and args.min_class_samples < 2:
        parser.error(f"--min-class-samples {args.min_class_samples}: a class needs two samples at least")
    return args


def main(args: argparse.Namespace) -> int:
    checkpoints = [open_checkpoint(path) for path in args.files]  # every file checked before any is measured
    numbers = _row_numbers(args.files)
    out = runs.usable_folder(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    for number, checkpoint in zip(numbers, checkpoints):
        started = time.perf_counter()
        row, samples, classes = measure(checkpoint, args.min_class_samples)
        runs.merge_nc_metrics(out, [{"epoch": number, **row}])
        print(f"{checkpoint.path}: {samples:,} samples of {classes:,} classes, row {number} of "
              f"{out / 'nc_metrics.csv'}, "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def measure(checkpoint: Checkpoint, min_samples: int | None,
            memory: int = PAIRWISE_MEMORY) -> tuple[dict, int, int]:
    """The columns of nc_metrics.csv for one checkpoint (those needing a classifier or held-out features None where
    it has none), and the numbers of samples and classes measured."""
    train, test = checkpoint.parts(), checkpoint.parts("test_")
    dim = train[0][0].shape[1]
    weight, bias = _classifier(checkpoint, dim)
    counts, firsts = _count_labels(train, None if weight is None else len(weight))
    kept = _kept_classes(checkpoint, counts, firsts, min_samples, train)
    kept = torch.from_numpy(kept)
    remap = torch.full((len(counts),), -1, dtype=torch.int64)
    remap[kept] = torch.arange(len(kept))
    stats = FeatureStats(len(kept), dim, class_weights=balancing_weights(torch.from_numpy(counts[kept.numpy()])))
    for features, labels in _windows(train, memory // (8 * WINDOW_MATRICES * dim)):
        keep = remap[labels] >= 0
        stats.update(features[keep], remap[labels[keep]])
    if weight is not None:
        weight = weight[kept]
        bias = None if bias is None else bias[kept]
    measured = metrics_from_stats(stats, weight, memory)
    rule, samples = NearestClassMean(stats.class_means()), stats.num_samples
    del stats
    rows = max(1, memory // (8 * WINDOW_MATRICES * max(dim, len(kept))))
    columns = dict.fromkeys(["train_acc", "train_loss", "test_acc", "test_loss", "test_ece", "ncc_mismatch_train",
                             "ncc_mismatch_test"])
    if weight is not None:
        train_totals, _ = _classify(train, remap, weight, bias, rule, rows, calibrate=False)
        columns |= {"train_acc": train_totals[0], "train_loss": train_totals[1], "ncc_mismatch_train": train_totals[2]}
    if weight is not None and test:
        _count_labels(test, len(remap))  # test labels checked in range
        test_totals, bins = _classify(test, remap, weight, bias, rule, rows, calibrate=True)
        columns |= {"test_acc": test_totals[0], "test_loss": test_totals[1], "ncc_mismatch_test": test_totals[2],
                    "test_ece": expected_calibration_error(bins)}
    return columns | measured, samples, len(kept)


def _classifier(checkpoint: Checkpoint, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight (K, d) and bias (K,) in float64, checked, or None."""
    weight_array, bias_array = checkpoint.single("weight"), checkpoint.single("bias")
    if weight_array is None:
        if bias_array is not None:
            raise UserError(f"{bias_array.path}: a bias without a weight; save the last layer's weight too")
        return None, None
    if len(weight_array.shape) != 2 or weight_array.shape[1] != dim or weight_array.kind != "float":
        raise UserError(f"{weight_array.path}: the weight must be floating point of shape (K, {dim}) for features of "
                        f"width {dim}, got {list(weight_array.shape)}")
    if weight_array.shape[0] < 2:
        raise UserError(f"{weight_array.path}: a weight of {weight_array.shape[0]} row(s); a classifier has two "
                        "classes "
                        "at least")
    if bias_array is not None and (bias_array.shape != weight_array.shape[:1] or bias_array.kind != "float"):
        raise UserError(f"{bias_array.path}: the bias must be floating point of shape ({weight_array.shape[0]},), got "
                        f"{list(bias_array.shape)}")
    weight = weight_array.whole().to(torch.float64)
    bias = None if bias_array is None else bias_array.whole().to(torch.float64)
    for array, values in ((weight_array, weight), (bias_array, bias)):
        if values is not None and not values.isfinite().all():
            row = (~values.isfinite()).reshape(len(values), -1).any(dim=1).nonzero()[0].item()
            raise UserError(f"{array.path}, row {row}: the {array.name} holds NaN or Inf")
    return weight, bias


def _count_labels(parts: list[tuple[Array, Array]], classes: int | None) -> tuple[np.ndarray, list]:
    """The samples per class (K,) and each class's first sample as (labels array, row); a label outside
    [0, classes) (or negative) is a UserError naming its file and row."""
    counts, firsts = np.zeros(classes or 0, dtype=np.int64), [None] * (classes or 0)
    for _, labels in parts:
        start = 0
        for window in labels.windows(1 << 20):
            values = window.numpy()
            bad = np.flatnonzero((values < 0) | (values >= (classes or MAX_CLASSES)))
            if len(bad):
                limit = f"[0, {classes}) (the weight has {classes} rows)" if classes else f"[0, {MAX_CLASSES})"
                raise UserError(f"{labels.path}, row {start + bad[0]}: label {values[bad[0]]} is outside {limit}")
            if len(values) and values.max() >= len(counts):
                counts = np.concatenate([counts, np.zeros(values.max() + 1 - len(counts), dtype=np.int64)])
                firsts += [None] * (len(counts) - len(firsts))
            unseen, where = np.unique(values, return_index=True)
            for label, row in zip(unseen[counts[unseen] == 0], where[counts[unseen] == 0]):
                firsts[label] = (labels, start + row)
            counts += np.bincount(values, minlength=len(counts))
            start += len(values)
    firsts += [None] * (len(counts) - len(firsts))
    return counts, firsts


def _kept_classes(checkpoint: Checkpoint, counts: np.ndarray, firsts: list, min_samples: int | None,
                  train: list[tuple[Array, Array]]) -> np.ndarray:
    """The classes measured: all, or with `min_samples` those with that many samples (saying how many are left
    out); every one kept needs two samples, and two classes at least must be."""
    if min_samples is None:
        kept = np.arange(len(counts))
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise UserError(f"{checkpoint.path}: class {empty[0]} of 0..{len(counts) - 1} has no samples "
                            f"({len(empty)} such); pass --min-class-samples 2 to leave out classes with fewer than 2")
        single = np.flatnonzero(counts == 1)
        if len(single):
            labels, row = firsts[single[0]]
            raise UserError(f"{labels.path}, row {row}: the only sample of class {single[0]} ({len(single)} classes "
                            "have one), which has no within-class variance; pass --min-class-samples 2 to leave them "
                            "out")
    else:
        kept = np.flatnonzero(counts >= min_samples)
        left = len(counts) - len(kept)
        print(f"{checkpoint.path}: {left} of {len(counts)} classes have fewer than {min_samples} samples "
              f"({int(counts.sum() - counts[kept].sum())} of {int(counts.sum())} samples) and are left out",
              file=sys.stderr)
    if len(kept) < 2:
        raise UserError(f"{checkpoint.path}: {len(kept)} class(es) to measure; collapse needs two at least")
    return kept


def _windows(parts: list[tuple[Array, Array]], rows: int):
    """(features, labels) windows of at most `rows` rows over the shards; a feature row holding NaN or Inf is
    a UserError naming its file and row."""
    for features, labels in parts:
        start = 0
        for h, y in zip(features.windows(max(1, rows)), labels.windows(max(1, rows))):
            bad = (~h.isfinite().all(dim=1)).nonzero()
            if len(bad):
                raise UserError(f"{features.path}, row {start + bad[0].item()}: the {features.name} hold NaN or Inf; "
                                "the network had diverged or the file is corrupt")
            yield h, y
            start += len(y)


def _classify(parts: list[tuple[Array, Array]], remap: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              rule: NearestClassMean, rows: int, calibrate: bool) -> tuple[list[float], torch.Tensor]:
    """[accuracy, mean cross-entropy, NCC mismatch] of the classifier over the samples of the kept classes, and
    (with `calibrate`) their calibration bins."""
    totals = torch.zeros(3, dtype=torch.float64)
    bins = torch.zeros(15, 3, dtype=torch.float64)
    count = 0
    for features, labels in _windows(parts, rows):
        keep = remap[labels] >= 0
        h, y = features[keep], remap[labels[keep]]
        logits = classifier_logits(h, weight, bias)
        predicted = logits.argmax(dim=1)
        totals += torch.stack([(predicted == y).sum(), F.cross_entropy(logits, y, reduction="sum"),
                               (predicted != rule(h)).sum()]).to(torch.float64)
        if calibrate:
            bins += calibration_bins(logits, y)
        count += len(y)
    return (totals / max(count, 1)).tolist(), bins


def _row_numbers(files: list[Path]) -> list[int]:
    """Each checkpoint's row number: the last number in its name, else its place (from 1) among FILES."""
    numbers = []
    for place, path in enumerate(files, start=1):
        found = re.findall(r"\d+", path.stem if path.suffix in (".npz", ".pt", ".safetensors") else path.name)
        numbers.append(int(found[-1]) if found else place)
    repeated = sorted({number for number in numbers if numbers.count(number) > 1})
    if repeated:
        twins = [str(path) for path, number in zip(files, numbers) if number == repeated[0]]
        raise UserError(f"{' and '.join(twins)} would both be row {repeated[0]}; give each checkpoint its own number "
                        "in its name (step_1000.npz)")
    return numbers


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
