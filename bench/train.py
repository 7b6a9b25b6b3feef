"""Seconds per epoch of train.py's training loop against a bare loop doing the same work, and against
the usual torchvision DataLoader pipeline.

    python bench/train.py                                   # CPU: resnet18 width 16, synthetic, 1000 images
    python bench/train.py --device cuda --width 64
    python bench/train.py --dataset CIFAR10 --data-root /tmp/cifar --samples-per-class 200

Every contender trains its own copy of one freshly initialised model (channels_last, the run's
precision and autocast) with train.py's optimizer and the run's loss:

    train_epoch  engine.train_epoch as train.py calls it, per-batch progress bar included (written to
                 /dev/null): a seeded shuffle, each batch indexed from the uint8 split on the device
                 and normalised there, running loss and accuracy summed on the device, one sync.
    evaluate     engine.evaluate on the test split, which train.py runs after every epoch.
    bare train   fixed batches normalised once beforehand, in stored order: forward,
                 loss.backward(), optimizer.step() and nothing else.
    bare eval    the forward over the test split, pre-normalised, logits discarded.
    DataLoader   a torchvision-style dataset over the same uint8 images (HWC arrays, a PIL image per
                 item, Compose([ToTensor(), Normalize(mean, std)])), DataLoader(shuffle=True,
                 num_workers=--workers), each batch copied to the device, then the bare step.

train_epoch is compared with bare train (the target, at most 1.10x), train_epoch + evaluate with bare
train + bare eval, and DataLoader with bare train. train.py's checkpoint and log writes are left out.
"""
import argparse
import copy
import itertools
import os
import sys
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
from bench import common  # noqa: E402

EVAL_BATCH_SIZE = 1000  # engine.evaluate's default, which train.py uses
TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="training precision, as train.py's --precision (default fp32)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (default 0: the loading runs in the training process)")
    return common.parse(parser, argv)


def main(args: argparse.Namespace) -> int:
    work = common.load_workload(args, args.precision)
    settings, device = work.settings, work.device
    precision = settings["precision"]
    loss_fn = losses.loss_from_config(settings)
    torch.manual_seed(settings["seed"])
    initial = engine.build_model(settings, device)
    repo, bare, loaded = (copy.deepcopy(initial) for _ in range(3))
    repo_optimizer, bare_optimizer, loaded_optimizer = (engine.make_optimizer(model, settings, device)
                                                        for model in (repo, bare, loaded))
    train_batches = common.fixed_batches(work.train, settings, settings["batch_size"])
    test_batches = common.fixed_batches(work.test, settings, EVAL_BATCH_SIZE)
    loader = _torchvision_loader(work.train, settings, args.workers, device)
    epochs = itertools.count(1)
    with open(os.devnull, "w") as sink:
        seconds = common.interleaved_seconds({
            "train_epoch": lambda: _repo_train_epoch(repo, repo_optimizer, loss_fn, work, next(epochs), sink),
            "evaluate": lambda: engine.evaluate(repo, loss_fn, work.test, settings, EVAL_BATCH_SIZE),
            "bare train": lambda: common.bare_train_epoch(bare, bare_optimizer, loss_fn, train_batches, precision),
            "bare eval": lambda: common.forward_pass(bare, test_batches, precision),
            "DataLoader": lambda: _loader_train_epoch(loaded, loaded_optimizer, loss_fn, loader, precision),
        }, args.repeats, not args.quick, device)

    repo_train, bare_train = common.median(seconds["train_epoch"]), common.median(seconds["bare train"])
    repo_full = common.median(seconds["train_epoch"], seconds["evaluate"])
    bare_full = common.median(seconds["bare train"], seconds["bare eval"])
    loader_train = common.median(seconds["DataLoader"])
    what = common.describe(work, f"batch {settings['batch_size']}", precision, f"median of {args.repeats}")
    print(f"train epoch ({what}): train_epoch {repo_train:.3g} s vs bare {bare_train:.3g} s "
          f"({common.ratio(repo_train, bare_train)}, target <= {TARGET:.2f}x); "
          f"with evaluate {repo_full:.3g} s vs bare {bare_full:.3g} s ({common.ratio(repo_full, bare_full)}); "
          f"DataLoader(ToTensor, Normalize), {args.workers} workers {loader_train:.3g} s "
          f"({common.ratio(loader_train, bare_train)} bare train)")
    return 0


def _repo_train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: losses.LossFn,
                      work: common.Workload, epoch: int, sink: TextIO) -> dict[str, float]:
    """engine.train_epoch with the per-batch progress bar that train.py's train_for drives."""
    total = datasets.num_batches(len(work.train[1]), work.settings["batch_size"])
    with tqdm(total=total, leave=False, unit="batch", file=sink) as bar:
        return engine.train_epoch(model, optimizer, loss_fn, work.train, work.settings, epoch, bar.update)


def _loader_train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: losses.LossFn,
                        loader: DataLoader, precision: str) -> None:
    model.train()
    device = next(model.parameters()).device
    for x, y in loader:
        # Handed over in the model's memory format, so that the difference is the pipeline's alone.
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        common.train_step(model, optimizer, loss_fn, x, y.to(device, non_blocking=True), precision)


def _torchvision_loader(split: engine.Split, settings: dict, workers: int, device: torch.device) -> DataLoader:
    """The usual pipeline: a map-style dataset, ToTensor and Normalize per image, default collation."""
    norm = settings["normalization"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(norm["mean"], norm["std"])])
    return DataLoader(_PilImages(split, transform), batch_size=settings["batch_size"], shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(settings["seed"]))


class _PilImages(Dataset):
    """The split as torchvision's CIFAR10 serves it: HWC uint8 arrays in memory, a PIL image per item."""

    def __init__(self, split: engine.Split, transform: transforms.Compose):
        images, labels = split
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        self.images = arrays[..., 0] if arrays.shape[3] == 1 else arrays  # PIL wants grey images as H x W
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


if __name__ == "__main__":
    sys.exit(main(parse_args()))
