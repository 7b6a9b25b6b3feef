"""Image datasets from their standard files to normalised batches on the training device.

Each split is read by our own readers from the files torchvision's download writes (torchvision is
used only to download: its dataset classes check md5 sums, which a re-encoded offline copy fails).
Instead of md5 sums the readers check shapes, dtypes, label ranges and, in `load_split`, the official
number of samples per split. A whole split is held on the device as uint8; `batches` indexes it there,
augments and normalises each batch on the device, with no DataLoader and no workers.

A folder of one's own images, `folder:PATH`, is read in torchvision's ImageFolder layout: PATH/train/<class>/
and PATH/test/<class>/ hold the image files (PNG, JPEG and the other formats Pillow reads), the classes
numbered in the sorted order of their folder names, which must be the same in both splits. The images
are decoded once into the same uint8 tensors as every other dataset, in RGB, at one size: --image-size S
resizes each image's shorter side to S and crops its centre to S x S; without it, every image must be
square and of one size already.
"""
import argparse
import gzip
import hashlib
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from devices import HOST, available_memory, to_device
from errors import UserError

TEST_SUBSET_STREAM = 7  # the random stream of --test-samples' subset, apart from the training subset's


@dataclass(frozen=True)
class DatasetInfo:
    """What a network needs to know of a dataset: classes, image channels and image side in pixels."""
    num_classes: int
    channels: int
    size: int


DATASETS: dict[str, DatasetInfo] = {
    "CIFAR10": DatasetInfo(10, 3, 32),
    "CIFAR100": DatasetInfo(100, 3, 32),
    "MNIST": DatasetInfo(10, 1, 28),
    "FashionMNIST": DatasetInfo(10, 1, 28),
    "SVHN": DatasetInfo(10, 3, 32),
    "STL10": DatasetInfo(10, 3, 96),
    "synthetic": DatasetInfo(10, 3, 32),
}

# The generated dataset: a smooth random colour template per class plus per-image brightness and
# per-pixel Gaussian noise, all in pixel levels (0..255). Its seed is fixed so that runs with
# different training seeds train on the same data.
SYNTHETIC_DATA_SEED = 20200924
SYNTHETIC_TRAIN_PER_CLASS = 100
SYNTHETIC_TEST_PER_CLASS = 50
SYNTHETIC_TEMPLATE_GRID = 4
SYNTHETIC_TEMPLATE_STD = 20.0
SYNTHETIC_BRIGHTNESS_STD = 20.0
SYNTHETIC_NOISE_STD = 60.0

# Official (train, test) sizes, checked by `load_split` in place of md5 sums.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "CIFAR10": (50000, 10000),
    "CIFAR100": (50000, 10000),
    "MNIST": (60000, 10000),
    "FashionMNIST": (60000, 10000),
    "SVHN": (73257, 26032),
    "STL10": (5000, 8000),
    "synthetic": (10 * SYNTHETIC_TRAIN_PER_CLASS, 10 * SYNTHETIC_TEST_PER_CLASS),
}

# Training images per class of the largest class-balanced subset (the smallest class's size): the
# paper's class-balanced training set, and what --samples-per-class defaults to.
FULL_PER_CLASS: dict[str, int] = {"CIFAR10": 5000, "CIFAR100": 500, "MNIST": 5421, "FashionMNIST": 6000,
                                  "SVHN": 4659, "STL10": 500, "synthetic": SYNTHETIC_TRAIN_PER_CLASS}

CROP_PADDING = 4
RATIO_TOLERANCE = 1e-9  # relative: an --imbalance R within it of the ratio its counts have is that ratio
IMBALANCE_PROFILES = ("step", "exp")

FOLDER_PREFIX = "folder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W) and int64 labels (N,)
DIGEST_CHARS = 16  # of a SHA-256 in hex: 64 bits, against accidental change, not forgery


class RunData(NamedTuple):
    """A run's data, as `load_run_data` gives it."""
    train: Split
    test: Split
    per_class: int  # the samples kept of the largest class
    fingerprint: dict  # `data_fingerprint` of both splits as read


def canonical_name(name: str) -> str:
    """The dataset's name as spelled in DATASETS, found case-insensitively, or folder:<absolute path>;
    usable as an argparse type."""
    if name.lower().startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path:
            raise _UnknownDataset("--dataset folder:PATH needs the folder's path, e.g. folder:data/flowers")
        return FOLDER_PREFIX + str(Path(path).expanduser().absolute())
    by_lower = {known.lower(): known for known in DATASETS}
    if name.lower() not in by_lower:
        raise _UnknownDataset(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return by_lower[name.lower()]


def is_folder(name: str) -> bool:
    """Whether `name` (canonical) is a folder of one's own images, folder:PATH."""
    return name.startswith(FOLDER_PREFIX)


def label(name: str) -> str:
    """The dataset's name in run folders' and plot folders' names: folder-<folder name> for folder:PATH."""
    return f"folder-{Path(name[len(FOLDER_PREFIX):]).name}" if is_folder(name) else name


def info(name: str, image_size: int | None = None) -> DatasetInfo:
    """The classes, channels and image side of a dataset (canonical name); for a folder, its classes are
    the class folders of PATH/train, and its side `image_size` (None until its images are read)."""
    if is_folder(name):
        return DatasetInfo(len(folder_classes(name)), 3, image_size)
    return DATASETS[name]


def folder_classes(name: str) -> list[str]:
    """The class names of folder:PATH, its training split's class folders in sorted order; the test split
    must have the same ones."""
    root = Path(name[len(FOLDER_PREFIX):])
    found = {split: sorted(path.name for path in (root / split).iterdir() if path.is_dir())
             for split in ("train", "test") if (root / split).is_dir()}
    if len(found) < 2 or not found["train"]:
        raise UserError(f"{root} is not an image folder dataset: it needs train/<class>/ and test/<class>/ "
                        "folders of images (torchvision's ImageFolder layout)")
    if found["train"] != found["test"]:
        differing = sorted(set(found["train"]) ^ set(found["test"]))
        raise UserError(f"{root}: train/ and test/ must hold the same class folders, but {', '.join(differing[:5])} "
                        "is in only one of them")
    if len(found["train"]) < 2:
        raise UserError(f"{root}/train holds one class folder; Neural Collapse needs at least 2 classes")
    return found["train"]


def load_run_data(run: dict, root: str | Path, download: bool, device: torch.device,
                  check: Callable[[dict], None] | None = None) -> RunData:
    """A run's data on `device`, by its settings `run` (config.json's: dataset, samples_per_class, seed and,
    where a config.json written before them lacks them, imbalance 1, imbalance_profile and image_size None):
    the seeded training subset (`subset_indices`), the whole test split (never subsampled, so an imbalanced
    run is tested as a balanced one), the samples kept of the largest class (a folder's images at the run's
    image size, see the module), and the fingerprint of both splits as read, which `check` (if given) is
    called with first: a run refuses data other than its own before anything else is said of it (that it has
    too few images for the run's subset)."""
    name, image_size = run["dataset"], run.get("image_size")
    if is_folder(name):
        classes = folder_classes(name)
        _refuse_too_large_folder(name, image_size)
        train_images, train_labels = read_folder(name, True, image_size)
        test_images, test_labels = read_folder(name, False, image_size)
        if test_images.shape[1:] != train_images.shape[1:]:
            raise UserError(f"{name[len(FOLDER_PREFIX):]}: the test images are {test_images.shape[-1]} pixels wide, "
                            f"the training images {train_images.shape[-1]}; pass --image-size S to bring all to S x S")
    else:
        train_images, train_labels = load_split(name, root, True, download)
        absent = sorted(set(range(DATASETS[name].num_classes)) - set(train_labels.unique().tolist()))
        if absent:
            raise UserError(f"the {name} training split in {Path(root).absolute()} has no images of class(es) "
                            f"{', '.join(map(str, absent[:10]))}; every class needs some: restore the full copy "
                            "(--download)")
        test_images, test_labels = load_split(name, root, False, download)
        classes = [str(label) for label in range(DATASETS[name].num_classes)]
    fingerprint = data_fingerprint(name, (train_images, train_labels), (test_images, test_labels), classes)
    if check is not None:
        check(fingerprint)
    if run.get("test_samples") is not None:
        test_keep = test_subset_indices(test_labels, run["test_samples"], run["seed"])
        test_images, test_labels = test_images[test_keep], test_labels[test_keep]
    keep = subset_indices(train_labels, run["samples_per_class"], run["seed"], run.get("imbalance", 1.0),
                          run.get("imbalance_profile"))
    per_class = int(torch.bincount(train_labels[keep]).max())
    return RunData((train_images[keep].to(device), train_labels[keep].to(device)),
                   (test_images.to(device), test_labels.to(device)), per_class, fingerprint)


def data_fingerprint(name: str, train: Split, test: Split, classes: list[str]) -> dict:
    """What identifies the data of a run, small enough for config.json: for each split (on the host), each
    class's number of images and a digest of their pixels in order, and a digest of the order of the labels;
    for the synthetic data, its generator's settings too. The same images give the same fingerprint whatever
    the files held them (gzipped or not, in whichever folder); a changed, added, removed or reordered image
    changes it. Hashing takes about as long as reading the files, so it is done at every start and measurement."""
    fingerprint = {"train": _split_fingerprint(*train, classes), "test": _split_fingerprint(*test, classes)}
    if name == "synthetic":
        fingerprint["generator"] = {"seed": SYNTHETIC_DATA_SEED, "train_per_class": SYNTHETIC_TRAIN_PER_CLASS,
                                    "test_per_class": SYNTHETIC_TEST_PER_CLASS, "grid": SYNTHETIC_TEMPLATE_GRID,
                                    "template_std": SYNTHETIC_TEMPLATE_STD,
                                    "brightness_std": SYNTHETIC_BRIGHTNESS_STD, "noise_std": SYNTHETIC_NOISE_STD}
    return fingerprint


def data_changes(recorded: dict | None, found: dict) -> list[str] | None:
    """How the data of the fingerprint `found` differs from the one a run `recorded` (both `data_fingerprint`s),
    e.g. ["train: class cat has 12 images, 10 when recorded", "test: the 4 images of class dog changed"]; an
    empty list if it does not, None if nothing was recorded (a run written before runs recorded their data)."""
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or recorded.keys() != found.keys():
        return ["the fingerprint config.json records is not one of this data's kind"]
    changes = [f"the generator's {key}: {value!r} -> {found['generator'].get(key)!r}"
               for key, value in recorded.get("generator", {}).items() if found["generator"].get(key) != value]
    for split in ("train", "test"):
        try:
            changed = _split_changes(split, recorded[split]["classes"], found[split]["classes"])
            if not changed and recorded[split]["order"] != found[split]["order"]:
                changed.append(f"{split}: the images are in another order")
        except (KeyError, TypeError, ValueError, AttributeError):
            changed = [f"{split}: its recorded fingerprint is damaged"]
        changes += changed
    return changes


def fetch(name: str, root: str | Path) -> None:
    """Fetch both splits of a dataset into `root`, unless they are there already."""
    if is_folder(canonical_name(name)):
        raise UserError("--download fetches the built-in datasets; a folder:PATH dataset is read where it is: "
                        "drop --download")
    for train in (True, False):
        _download_if_missing(canonical_name(name), Path(root).absolute(), train)


def load_split(name: str, root: str | Path, train: bool, download: bool = False) -> Split:
    """A split as uint8 images (N, C, H, W) and int64 labels (N,) in the files' order, downloaded first
    when asked and missing, and checked to have the official number of samples."""
    name = canonical_name(name)
    root = Path(root).absolute()
    if download:
        _download_if_missing(name, root, train)
    images, labels = read_split(name, root, train)
    check_count(name, train, len(labels), root)
    return images, labels


def read_split(name: str, root: str | Path, train: bool) -> Split:
    """A split as `load_split` gives it, with its format checked but not its size, so that copies of
    any size read (small test files, deliberately cut-down copies)."""
    name = canonical_name(name)
    if name == "synthetic":
        return _synthetic_split(train)
    root = Path(root).absolute()
    paths = _split_paths(name, root, train)
    info = DATASETS[name]
    images, labels = _READERS[name](paths, info.num_classes)
    if images.shape[1:] != (info.channels, info.size, info.size):
        raise _corrupt(paths[0], f"its images are {images.shape[1:]}, not {(info.channels, info.size, info.size)}")
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_folder(name: str, train: bool, image_size: int | None) -> Split:
    """A split of folder:PATH as uint8 RGB images (N, 3, S, S) and int64 labels, class by class in sorted
    file order; S is `image_size` (each image's shorter side resized to S, then its centre cropped), or
    without it the one size of its images, which must then be square."""
    classes = folder_classes(name)
    images, labels = [], []
    for index, files in enumerate(_folder_files(name, train, classes)):
        for path in files:
            image = _read_image(path, image_size)
            if image.shape != (images[0] if images else image).shape:
                raise UserError(f"{path} is {image.shape[2]}x{image.shape[1]} but {path.parent.parent} has images of "
                                f"{images[0].shape[2]}x{images[0].shape[1]}: pass --image-size S to bring them all "
                                "to S x S")
            images.append(image)
            labels.append(index)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def check_count(name: str, train: bool, count: int, root: str | Path) -> None:
    """Raise UserError unless `count` is the official number of samples of the split."""
    expected = SPLIT_SIZES[name][0 if train else 1]
    if count != expected:
        split = "train" if train else "test"
        raise UserError(f"the {name} {split} split in {Path(root).absolute()} has {count} samples instead of "
                        f"the official {expected}; delete that copy and pass --download to fetch it again")


def refuse_other_data(recorded: dict | None, found: dict, dataset: str, run_dir: Path, use: str) -> str | None:
    """Raise a UserError naming what changed if the data of the fingerprint `found` is not the data the run in
    `run_dir` recorded (see `data_changes`), before it is `use`d ("continued", "measured"); a warning to show if
    the run recorded none (it was written before runs did), else None."""
    changes = data_changes(recorded, found)
    if changes is None:
        return (f"{run_dir} was trained before runs recorded their data's fingerprint: that it is {use} on the data "
                "it was trained on cannot be checked")
    if changes:
        raise UserError(f"the data of {dataset} is not the data {run_dir} was trained on ({'; '.join(changes)}); "
                        "use that data (restore it, or pass --data-root a copy of it), or train a new run on this "
                        "data in another --run-dir")
    return None


def refuse_inexact_imbalance(num_classes: int, per_class: int, imbalance: float, profile: str | None) -> None:
    """Refuse a step profile's --imbalance R whose counts (`imbalanced_counts` of n = `per_class`) have another
    ratio of the largest class to the smallest, which is what R promises there: R would name the run after
    data it does not have, and every R of the same counts would name the same run again (n = 20: R = 40 and
    R = 1e9 keep 20 and 1, as R = 20 does; R = 1.0000001 keeps every class whole). R must make n/R a whole
    number, the smallest class's count, which makes it the smallest R of its counts. In the exp profile R is
    Cao et al.'s parameter of a curve, not the ratio of its ends (CIFAR-100-LT at R = 200 keeps 500 ... 2)."""
    counts = imbalanced_counts(num_classes, per_class, imbalance, profile)
    obtained = max(counts) / min(counts)
    if profile == "exp" or math.isclose(obtained, imbalance, rel_tol=RATIO_TOLERANCE):
        return
    if obtained == 1:
        raise UserError(f"--imbalance {imbalance:.12g} keeps all {per_class} samples of every class: that is the "
                        "balanced run; drop --imbalance")
    exact = _step_ratio(num_classes, per_class, min(counts))
    raise UserError(f"--imbalance {imbalance:.12g} keeps {max(counts)} and {min(counts)} samples of the largest and "
                    f"smallest classes, a ratio of {obtained:g}: R must make {per_class}/R (the smallest class's "
                    f"count) a whole number; --imbalance {repr(exact).removesuffix('.0')} keeps these counts")


def subset_indices(labels: torch.Tensor, samples_per_class: int | None, seed: int, imbalance: float = 1.0,
                   profile: str | None = None) -> torch.Tensor:
    """Sorted int64 indices of a seeded training subset with `imbalanced_counts` samples of each class: n =
    `samples_per_class` (None: as many as the smallest class has) of every class when `imbalance` is 1.

    Each class's samples are the first of one seeded permutation of its members, so for one seed the subsets
    are nested: an imbalanced subset keeps the majority classes of the balanced one and a prefix of each of
    its other classes."""
    cpu_labels = labels.cpu()
    classes, available = torch.unique(cpu_labels, return_counts=True)
    most = int(available.min())
    per_class = most if samples_per_class is None else samples_per_class
    if per_class < 1:
        raise UserError(f"--samples-per-class must be at least 1, not {per_class}")
    if per_class > most:
        raise UserError(f"--samples-per-class {per_class} is more than the data has: at most {most} per class")
    counts = imbalanced_counts(len(classes), per_class, imbalance, profile)
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label, count in zip(classes, counts):
        members = torch.nonzero(cpu_labels == label).squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(picks)).values.to(labels.device)


def test_subset_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of a seeded class-balanced subset of `count` test samples (--test-samples): each of
    the C classes gives count // C, the first count mod C classes one more, the first of a permutation of its
    members drawn from `seed` by a generator of its own (the training subset's draws stay as they were). A
    class with fewer samples than its share is refused."""
    cpu_labels = labels.cpu()
    classes, available = torch.unique(cpu_labels, return_counts=True)
    shares = [count // len(classes) + (c < count % len(classes)) for c in range(len(classes))]
    short = [(int(label), share, int(have)) for label, share, have in zip(classes, shares, available) if share > have]
    if short:
        label, share, have = short[0]
        most = int(available.min()) * len(classes)
        raise UserError(f"--test-samples {count} needs {share} test images of class {label}, which has {have}; "
                        f"choose at most {most}, the smallest class's {int(available.min())} per class")
    state = np.random.SeedSequence([seed, TEST_SUBSET_STREAM]).generate_state(1)
    generator = torch.Generator().manual_seed(int(state[0]))
    members = [torch.nonzero(cpu_labels == label).squeeze(1) for label in classes]
    picks = [ones[torch.randperm(len(ones), generator=generator)[:share]] for ones, share in zip(members, shares)]
    return torch.sort(torch.cat(picks)).values.to(labels.device)


def imbalanced_counts(num_classes: int, per_class: int, imbalance: float = 1.0,
                      profile: str | None = None) -> list[int]:
    """Training samples to keep of each class c = 0 .. C-1, from n = `per_class` and the ratio R = `imbalance`:

    step (Fang, He, Long & Su 2021): the first ceil(C/2) classes keep n, the other floor(C/2) keep ceil(n/R);
    exp (Cao, Wei, Gaidon, Arechiga & Ma 2019): class c keeps floor(n * (1/R)^(c/(C-1))), computed as
        their code computes it, so that n = 5000, R = 100 gives CIFAR-10-LT's 5000, 2997, ..., 83, 50.
    R = 1 keeps n of every class in either profile. A class left with no sample is a UserError."""
    if imbalance < 1:
        raise UserError(f"--imbalance {imbalance:g} is below 1; it is the ratio of the largest class to the smallest "
                        "(1 is balanced)")
    if imbalance == 1:
        return [per_class] * num_classes
    if profile == "step":
        majority = len(majority_classes(num_classes))
        return [per_class] * majority + [math.ceil(per_class / imbalance)] * (num_classes - majority)
    if profile == "exp":
        counts = [math.floor(per_class * (1 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]
        if counts[-1] < 1:
            raise UserError(f"--imbalance {imbalance:g} with --imbalance-profile exp leaves class {num_classes - 1} "
                            f"no sample of {per_class} (floor({per_class}/{imbalance:g}) = 0); lower --imbalance "
                            "or raise --samples-per-class")
        return counts
    raise UserError(f"unknown imbalance profile {profile!r}; choose one of: {', '.join(IMBALANCE_PROFILES)}")


def majority_classes(num_classes: int) -> range:
    """The first ceil(C/2) classes: those `imbalanced_counts` keeps most of, in either profile."""
    return range(math.ceil(num_classes / 2))


def minority_classes(num_classes: int) -> range:
    """The last floor(C/2) classes: those `imbalanced_counts` keeps fewest of (step: the minority; exp: the
    floor(C/2) smallest classes, ties to the later class)."""
    return range(math.ceil(num_classes / 2), num_classes)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of uint8 images (N, C, H, W), in [0, 1] units."""
    # A 256-bin histogram per channel holds all the statistics exactly, so the images are never
    # copied to floating point; the moments are then taken in float64 from 256 numbers.
    histograms = torch.stack([torch.bincount(images[:, channel].reshape(-1), minlength=256)
                              for channel in range(images.shape[1])]).cpu().double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    counts = histograms.sum(1)
    mean = histograms @ levels / counts
    variance = (histograms * (levels - mean[:, None]) ** 2).sum(1) / counts
    return mean.tolist(), variance.sqrt().tolist()


def normalize(images: torch.Tensor, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) as float32 (x/255 - mean)/std per channel, in channels_last memory format;
    `mean` and `std` as lists, or as `channel_tensors` on the images' device (what `batches` passes, so
    that they are copied to the device once, not at every batch)."""
    if not isinstance(mean, torch.Tensor):
        mean, std = channel_tensors(mean, std, images.device)
    scaled = images.to(dtype=torch.float32, memory_format=torch.channels_last)
    return scaled.div_(255).sub_(mean).div_(std)


def channel_tensors(mean: list[float], std: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel normalisation constants as float32 tensors (1, C, 1, 1) on `device`."""
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 images (B, C, H, W), each randomly cropped from its reflect-padded self (padding
    CROP_PADDING) and flipped left-right with probability 1/2; randomness from the CPU `generator`."""
    count, _, height, width = images.shape
    device = images.device
    offsets = to_device(torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=generator, device=HOST), device)
    flips = to_device(torch.randint(0, 2, (count, 1), generator=generator, dtype=torch.bool, device=HOST), device)
    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    columns = torch.where(flips, width - 1 - columns, columns)
    source_rows = _reflected(rows + offsets[:, :1] - CROP_PADDING, height)
    source_columns = _reflected(columns + offsets[:, 1:] - CROP_PADDING, width)
    samples = torch.arange(count, device=device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: (B, H, W, C), i.e. channels_last.
    picked = images[samples, :, source_rows[:, :, None], source_columns[:, None, :]]
    return picked.permute(0, 3, 1, 2)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: list[float], std: list[float], *,
            shuffle: torch.Generator | None = None, augment_with: torch.Generator | None = None,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float32 channels_last images and int64 labels, batch by batch, on the images' device.

    With `shuffle`, the order is `torch.randperm` from that CPU generator (the same on every device);
    otherwise the stored order. The last batch may be smaller. With `world_size` > 1, rank `rank` gets
    its contiguous share of each global batch of `batch_size` samples (as `torch.tensor_split` cuts
    it), augmented exactly as in one process."""
    count = len(labels)
    if shuffle is None:
        order = torch.arange(count, device=images.device)
    else:
        order = to_device(torch.randperm(count, generator=shuffle, device=HOST), images.device)
    mean, std = channel_tensors(mean, std, images.device)
    for start in range(0, count, batch_size):
        window = order[start:start + batch_size]
        share = _share(len(window), rank, world_size)
        if augment_with is None:
            batch = images[window[share]]
        else:
            # Drawn for the whole global batch, so that each image gets the crop and flip it gets in one process.
            batch = augment(images[window], augment_with)[share]
        yield normalize(batch, mean, std), labels[window[share]]


def shard(data: Split, batch_size: int, rank: int, world_size: int) -> Split:
    """Rank `rank`'s part of a split to evaluate or measure: a contiguous run of whole batches of
    `batch_size`, the runs as even as whole batches allow (a rank may get none). Every sample is in
    exactly one part, and `batches` cuts each part into the very batches it cuts the whole split into."""
    images, labels = data
    blocks = _share(num_batches(len(labels), batch_size), rank, world_size)
    part = slice(blocks.start * batch_size, blocks.stop * batch_size)
    return images[part], labels[part]


def num_batches(count: int, batch_size: int) -> int:
    """The number of batches `batches` yields for `count` samples (the last one may be smaller)."""
    return math.ceil(count / batch_size)


class _UnknownDataset(ValueError, argparse.ArgumentTypeError):
    """An unknown dataset name; argparse shows an ArgumentTypeError's message as it is."""


# Relative paths of each dataset's (train, test) files; any of them may also be gzipped (name + ".gz").
_FILES: dict[str, tuple[list[str], list[str]]] = {
    "CIFAR10": ([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)], ["cifar-10-batches-py/test_batch"]),
    "CIFAR100": (["cifar-100-python/train"], ["cifar-100-python/test"]),
    "SVHN": (["train_32x32.mat"], ["test_32x32.mat"]),
    "STL10": (["stl10_binary/train_X.bin", "stl10_binary/train_y.bin"],
              ["stl10_binary/test_X.bin", "stl10_binary/test_y.bin"]),
    "synthetic": ([], []),
    **{name: ([f"{name}/raw/train-images-idx3-ubyte", f"{name}/raw/train-labels-idx1-ubyte"],
              [f"{name}/raw/t10k-images-idx3-ubyte", f"{name}/raw/t10k-labels-idx1-ubyte"])
       for name in ("MNIST", "FashionMNIST")},
}

# numpy's own array-rebuilding functions, wherever this numpy version keeps them: what `pickle`
# calls for an array under protocols up to 4, and under protocol 5.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]

# The only globals a CIFAR pickle may name: those that rebuild numpy arrays, under the module names
# that numpy 1 (and Python 2) and numpy 2 write.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

# What a damaged file makes the readers raise (pickle and loadmat fail in many ways on cut-off bytes).
_DAMAGE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError,
           OverflowError, OSError, zlib.error, scipy.io.matlab.MatReadError)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and plain containers, so a file cannot run code."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise UserError(f"{self.path} asks to load {module}.{name}, which a dataset file never needs; "
                            "refusing to read it: delete it and download the dataset again")
        return _PICKLE_GLOBALS[module, name]


def _located_files(name: str, root: Path, train: bool) -> list[Path | None]:
    """Each file of the split as found under `root` (plain or gzipped), None where absent."""
    located = []
    for relative in _FILES[name][0 if train else 1]:
        candidates = [root / relative, root / f"{relative}.gz"]
        located.append(next((path for path in candidates if path.is_file()), None))
    return located


def _split_paths(name: str, root: Path, train: bool) -> list[Path]:
    located = _located_files(name, root, train)
    if None in located:
        missing = _FILES[name][0 if train else 1][located.index(None)]
        raise UserError(f"{name} not found in {root} (looked for {missing}); pass --download to fetch it, "
                        "or --data-root to point at a copy")
    return located


def _download_if_missing(name: str, root: Path, train: bool) -> None:
    if None in _located_files(name, root, train):
        _download(name, root, train)


def _download(name: str, root: Path, train: bool) -> None:
    # Imported here: torchvision's datasets take a while to import and are needed only to download.
    import torchvision.datasets

    split = {"train": train} if name in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST") \
        else {"split": "train" if train else "test"}
    try:
        getattr(torchvision.datasets, name)(str(root), download=True, **split)
    except (OSError, RuntimeError) as err:
        raise UserError(f"could not download {name} into {root} ({err}); check the network connection, "
                        "or put a copy there and pass --data-root") from None


def _folder_files(name: str, train: bool, classes: list[str]) -> list[list[Path]]:
    """The image files of each class of a split of folder:PATH, in sorted order; every class needs some in
    both splits (a class without test images has no test accuracy, and its test features no class mean)."""
    split = Path(name[len(FOLDER_PREFIX):]) / ("train" if train else "test")
    found = []
    for class_name in classes:
        files = sorted(path for path in (split / class_name).iterdir()
                       if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{split / class_name} holds no images ({', '.join(IMAGE_SUFFIXES)}); every class "
                            "needs training and test images: add some, or remove the class from both train/ and test/")
        found.append(files)
    return found


def _refuse_too_large_folder(name: str, image_size: int | None) -> None:
    """Refuse, before decoding any, images that --image-size makes larger than the host's memory can hold."""
    if image_size is None:
        return  # the images' own size, which the files hold already
    classes = folder_classes(name)
    count = sum(len(files) for train in (True, False) for files in _folder_files(name, train, classes))
    needed, free = count * 3 * image_size ** 2, available_memory(HOST)
    if free is not None and needed > free:
        raise UserError(f"the {count} images of {name[len(FOLDER_PREFIX):]} at --image-size {image_size} take "
                        f"{needed / 2 ** 30:,.1f} GiB, more than the {free / 2 ** 30:,.1f} GiB of memory available; "
                        "choose a smaller --image-size")


def _split_fingerprint(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """{"classes": {name: [images, digest of their pixels in order]}, "order": digest of the labels}."""
    digests = [hashlib.sha256() for _ in classes]
    for pixels, label in zip(images.reshape(len(images), -1).numpy(), labels.tolist()):
        digests[label].update(pixels)
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return {"classes": {name: [count, digest.hexdigest()[:DIGEST_CHARS]]
                        for name, count, digest in zip(classes, counts, digests)},
            "order": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:DIGEST_CHARS]}


def _split_changes(split: str, recorded: dict, found: dict) -> list[str]:
    """How the classes of a split differ from those recorded (see `data_changes`)."""
    changes = []
    for name in [*found, *(name for name in recorded if name not in found)]:
        if name not in found:
            changes.append(f"{split}: class {name} ({recorded[name][0]} images when recorded) is gone")
        elif name not in recorded:
            changes.append(f"{split}: class {name} ({found[name][0]} images) is new")
        elif found[name][0] != recorded[name][0]:
            changes.append(f"{split}: class {name} has {found[name][0]} images, {recorded[name][0]} when recorded")
        elif found[name][1] != recorded[name][1]:
            changes.append(f"{split}: the {found[name][0]} images of class {name} changed")
    return changes


def _step_ratio(num_classes: int, per_class: int, smallest: int) -> float:
    """The step profile's --imbalance that keeps `smallest` of each minority class: per_class / smallest, or,
    where float rounding puts per_class over it a hair above `smallest` (ceil would keep one more), the next
    float above it."""
    ratio = per_class / smallest
    while imbalanced_counts(num_classes, per_class, ratio, "step")[-1] > smallest:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _read_image(path: Path, size: int | None) -> np.ndarray:
    """One image file as uint8 RGB (3, S, S): resized and centre-cropped to `size`, or as it is if square."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"{path} is not an image Pillow can read ({err}); remove or replace it") from None
    width, height = image.size
    if size is None:
        if width != height:
            raise UserError(f"{path} is {width}x{height}, not square: pass --image-size S to resize the images' "
                            "shorter side to S and crop their centres to S x S")
    elif (width, height) != (size, size):
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image).transpose(2, 0, 1).copy()


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({why}); delete it and download it again (--download)")


def _open(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); fix its permissions, or pass --data-root "
                        "a readable copy") from None


def _read_bytes(path: Path) -> bytearray:
    """The file's (decompressed) bytes, as a bytearray so that arrays built on it are writable."""
    try:
        with _open(path) as file:
            return bytearray(file.read())
    except (EOFError, OSError, zlib.error) as err:
        raise _corrupt(path, str(err)) from None


def _checked_labels(values: object, count: int, num_classes: int, path: Path) -> np.ndarray:
    """`values` as int64 labels, checked to be `count` of them, each in [0, num_classes)."""
    try:
        labels = np.asarray(values).astype(np.int64).reshape(-1)
    except (ValueError, TypeError):
        raise _corrupt(path, "its labels are not integers") from None
    if len(labels) != count:
        raise _corrupt(path, f"{len(labels)} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}")
    return labels


def _read_cifar(paths: list[Path], num_classes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(path, num_classes, label_key) for path in paths]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def _read_cifar_batch(path: Path, num_classes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch: `data` rows hold the red, green and blue 32x32 planes in turn."""
    with _open(path) as file:
        try:
            entry = _ArrayUnpickler(file, path).load()
        except _DAMAGE as err:
            raise _corrupt(path, f"unpickling failed: {err}") from None
    if not isinstance(entry, dict):
        raise _corrupt(path, "it does not hold a dictionary")
    # Python 2 pickles read with encoding="bytes" (or rewritten from such a read) have bytes keys.
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, "its 'data' is not an N x 3072 uint8 array")
    if label_key not in entry:
        raise _corrupt(path, f"it has no '{label_key}'")
    labels = _checked_labels(entry[label_key], len(data), num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def _read_idx_pair(paths: list[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = paths
    images = _read_idx(images_path, 3)
    labels = _checked_labels(_read_idx(labels_path, 1), len(images), num_classes, labels_path)
    return images[:, None], labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes: magic 0x0000 08 <ndim>, then ndim big-endian uint32 sizes, then data."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise _corrupt(path, f"not an idx file of unsigned bytes with {ndim} dimension(s)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise _corrupt(path, f"{len(raw) - header} data bytes where its header promises {math.prod(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_svhn(paths: list[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A MATLAB file with `X` (32, 32, 3, N) uint8 and `y` (N, 1) in 1..10, where 10 is the digit 0."""
    (path,) = paths
    try:
        with _open(path) as file:
            contents = scipy.io.loadmat(file)
    except _DAMAGE as err:
        raise _corrupt(path, f"reading it as a MATLAB file failed: {err}") from None
    pixels, digits = contents.get("X"), contents.get("y")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or digits is None:
        raise _corrupt(path, "it lacks a 4-dimensional uint8 'X' and a 'y'")
    images = np.ascontiguousarray(pixels.transpose(3, 2, 0, 1))
    labels = _checked_labels(np.where(digits == 10, 0, digits), len(images), num_classes, path)
    return images, labels


def _read_stl(paths: list[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 files: each image 3 x 96 x 96 stored column-major (width before height); labels 1..10."""
    images_path, labels_path = paths
    raw = _read_bytes(images_path)
    image_bytes = 3 * 96 * 96
    if len(raw) % image_bytes:
        raise _corrupt(images_path, f"{len(raw)} bytes is not a whole number of {image_bytes}-byte images")
    images = np.ascontiguousarray(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    labels = _checked_labels(np.frombuffer(_read_bytes(labels_path), dtype=np.uint8).astype(np.int64) - 1,
                             len(images), num_classes, labels_path)
    return images, labels


_READERS: dict[str, Callable[[list[Path], int], tuple[np.ndarray, np.ndarray]]] = {
    "CIFAR10": partial(_read_cifar, label_key="labels"),
    "CIFAR100": partial(_read_cifar, label_key="fine_labels"),
    "MNIST": _read_idx_pair,
    "FashionMNIST": _read_idx_pair,
    "SVHN": _read_svhn,
    "STL10": _read_stl,
}


def _synthetic_split(train: bool) -> Split:
    """The generated split: the same bits on every call, labels cycling through the classes."""
    per_class = SYNTHETIC_TRAIN_PER_CLASS if train else SYNTHETIC_TEST_PER_CLASS
    info = DATASETS["synthetic"]
    generator = torch.Generator().manual_seed(SYNTHETIC_DATA_SEED + (1 if train else 2))
    labels = torch.arange(info.num_classes * per_class) % info.num_classes
    shape = (len(labels), info.channels, info.size, info.size)
    noise = SYNTHETIC_NOISE_STD * torch.randn(shape, generator=generator)
    brightness = SYNTHETIC_BRIGHTNESS_STD * torch.randn((len(labels), 1, 1, 1), generator=generator)
    pixels = _synthetic_templates()[labels] + brightness + noise
    return pixels.round_().clamp_(0, 255).to(torch.uint8), labels


def _synthetic_templates() -> torch.Tensor:
    """One smooth colour image per class (float pixel levels): coarse noise upsampled bilinearly."""
    info = DATASETS["synthetic"]
    generator = torch.Generator().manual_seed(SYNTHETIC_DATA_SEED)
    grid = SYNTHETIC_TEMPLATE_GRID
    coarse = torch.randn((info.num_classes, info.channels, grid, grid), generator=generator)
    smooth = F.interpolate(coarse, size=(info.size, info.size), mode="bilinear", align_corners=False)
    return 127.5 + SYNTHETIC_TEMPLATE_STD * smooth


def _share(count: int, rank: int, world_size: int) -> slice:
    """Part `rank` of `count` items cut in `world_size` contiguous parts as `torch.tensor_split` cuts
    them: sizes differ by at most one, the larger parts first."""
    size, extra = divmod(count, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def _reflected(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices past either edge mirrored back inside [0, size), the edge itself not repeated."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)
