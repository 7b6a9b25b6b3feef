"""What the benchmarks in bench/ share: the loop benchmarks' common flags, a run's settings and data built
the way train.py builds them, the bare loops' pre-normalised batches, and timing (interleaved, and of one
call with the device's queued work finished).

Contenders are timed in turn, ABCABC..., and compared by their medians, so that load from other
processes on the machine falls on all of them alike.
"""
import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import config
import datasets
import engine
import losses
import train

# Flags left out take these values; --quick is the test suite's tiny run. 100 images per class is
# the whole synthetic training split.
FULL = {"width": 16, "samples_per_class": 100, "repeats": 5}
QUICK = {"width": 4, "samples_per_class": 10, "repeats": 1}

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Workload:
    """A run's settings, as its config.json would hold them, and its data on the device."""
    device: torch.device
    settings: dict
    train: engine.Split
    test: engine.Split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every loop benchmark takes."""
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    add("--dataset", default="synthetic", help="as train.py's --dataset (default synthetic, offline)")
    add("--data-root", default="data", help="as train.py's --data-root (default ./data)")
    add("--model", default="resnet18", help="a network of the registry (default resnet18)")
    add("--width", type=config.positive_int, help=f"channel width (default {FULL['width']}; "
        f"{QUICK['width']} with --quick)")
    add("--samples-per-class", type=config.positive_int, metavar="K",
        help=f"training images per class (default {FULL['samples_per_class']}; "
        f"{QUICK['samples_per_class']} with --quick)")
    add("--repeats", type=config.positive_int, help="timed repetitions of each contender, interleaved; the "
        f"median is reported (default {FULL['repeats']}; {QUICK['repeats']} with --quick)")
    add("--threads", type=config.positive_int, help="torch threads (default 1 on the CPU, where two threads on "
        "two loaded cores can be 100x slower; torch's default on CUDA)")
    add("--seed", type=int, default=0, help="initialisation, data order and subset (default 0)")
    add("--quick", action="store_true", help=f"a tiny run for the test suite: width {QUICK['width']}, "
        f"{QUICK['samples_per_class']} images per class, {QUICK['repeats']} repetition, no warm-up")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed flags, each one left out set to its default (FULL, or QUICK with --quick)."""
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_workload(args: argparse.Namespace, precision: str) -> Workload:
    """Settings and data from train.py's own flag parsing, config resolution and loading."""
    run_args = train.parse_args(["--dataset", args.dataset, "--data-root", args.data_root, "--model", args.model,
                                 "--width", str(args.width), "--samples-per-class", str(args.samples_per_class),
                                 "--precision", precision, "--seed", str(args.seed), "--device", args.device])
    device = config.resolve_device(run_args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py sets it for non-deterministic runs
    settings = config.resolve_config(run_args)
    train_split, test_split = train.load_data(settings, run_args, device)
    return Workload(device, settings, train_split, test_split)


def fixed_batches(split: engine.Split, settings: dict, batch_size: int) -> Batches:
    """The split in stored order, normalised once (float32, channels_last, on its device), in batches."""
    norm = settings["normalization"]
    return list(datasets.batches(*split, batch_size, norm["mean"], norm["std"]))


def bare_train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: losses.LossFn, batches: Batches,
                     precision: str) -> None:
    """The batches' training steps and nothing else."""
    model.train()  # a bare eval of the model may have left it in eval mode
    for x, y in batches:
        train_step(model, optimizer, loss_fn, x, y, precision)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: losses.LossFn, x: torch.Tensor,
               y: torch.Tensor, precision: str) -> None:
    """Forward (under the run's autocast), loss, backward, optimizer step."""
    with engine.autocast(x.device, precision):
        logits = model(x)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.inference_mode()
def forward_pass(model: nn.Module, batches: Batches, precision: str) -> None:
    """The model's eval-mode forward over the batches, logits discarded."""
    model.eval()
    for x, _ in batches:
        with engine.autocast(x.device, precision):
            model(x)


def interleaved_seconds(contenders: dict[str, Callable[[], object]], repeats: int, warm_up: bool,
                        device: torch.device) -> dict[str, list[float]]:
    """Each contender's seconds in each of `repeats` rounds (ABCABC...), after one untimed round if
    `warm_up`: the first run pays for allocator growth, kernel selection and lazy imports."""
    if warm_up:
        for run in contenders.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            seconds[name].append(seconds_of(run, device))
    return seconds


def median(*series: list[float]) -> float:
    """The median over rounds of the sum of the series (one contender, or several timed back to back)."""
    return statistics.median(map(sum, zip(*series)))


def describe(work: Workload, *details: str) -> str:
    """The workload in a few words, for a summary line."""
    settings = work.settings
    if work.device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(work.device)})"
    else:
        where = f"cpu, {torch.get_num_threads()} thread(s)"
    return ", ".join([settings["dataset"], f"{settings['model']} width {settings['width']}",
                      f"{len(work.train[1])} train + {len(work.test[1])} test images", *details, where])


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def seconds_of(run: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `run()`; on a GPU, whose kernels run asynchronously, the clock is read only
    once all queued work has finished."""
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
