"""Seconds to write and to load a last.pt with the integrity checks (runs.save_checkpoint and
runs.load_checkpoint) against torch.save and torch.load of the same state.

    python bench/checkpoints.py                      # ResNet-18 width 64, CIFAR-10's 10 classes
    python bench/checkpoints.py --folder /scratch    # on another disk

The state is what train.py writes every epoch: the model's weights, the SGD optimizer with its momentum
buffers, the scheduler, the epoch, the RNG states and the settings. Contenders, timed in turn:

    torch.save        torch.save(state, path): the file's zip records carry a CRC-32 (torch's default)
    save and rename   torch.save to a temporary path, renamed onto the file: the atomic write as it was
                      before the integrity checks
    save_checkpoint   runs.save_checkpoint: torch.save through a file this repo opened (a new file, not
                      through a symbolic link), renamed into place
    save, no CRC      torch.save with torch.serialization.set_crc32_options(False): what the CRCs cost
    torch.load        torch.load(path, weights_only=True)
    load_checkpoint   runs.load_checkpoint: every record's CRC-32 checked, then torch.load of the same file

And what a write on train.py's background thread (runs.BackgroundWriter) costs the training thread when
that thread is launch-bound, as it is on a GPU: a loop of tiny torch operations, each a call through
Python and torch's dispatcher as a kernel launch is, runs alone and then while save_checkpoint writes
on the background thread; the loop's lost rate times the write's duration is the training thread's
time lost per write (the write holds Python's lock for part of it). On a GPU that time leaves the GPU
idle once its queue runs dry, which is what train.py --save-last checkpoint saves at most epochs.

The files go to a temporary folder in --folder, so the disk's cache holds them: the numbers are the CPU's
work, which a slow disk only adds to.
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import config  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from bench import common  # noqa: E402

FULL = {"width": 64, "repeats": 5}
QUICK = {"width": 4, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--width", type=config.positive_int, help=f"the ResNet-18's width (default {FULL['width']}, the paper's)")
    add("--repeats", type=config.positive_int, help=f"timed rounds, interleaved (default {FULL['repeats']})")
    add("--folder", type=Path, help="where the temporary files go (default: the system's temporary folder)")
    add("--quick", action="store_true", help=f"width {QUICK['width']}, {QUICK['repeats']} round, no warm-up: "
        "for the test suite")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    state = _last_pt(args.width)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        plain, ours = Path(folder) / "plain.pt", Path(folder) / "last.pt"
        torch.save(state, plain)
        size = plain.stat().st_size
        seconds = common.interleaved_seconds({
            "torch.save": lambda: torch.save(state, plain),
            "save and rename": lambda: _save_and_rename(state, Path(folder) / "renamed.pt"),
            "save_checkpoint": lambda: runs.save_checkpoint(ours, state),
            "save, no CRC": lambda: _without_crc(state, Path(folder) / "no_crc.pt"),
            "torch.load": lambda: torch.load(plain, weights_only=True),
            "load_checkpoint": lambda: runs.load_checkpoint(ours),
        }, args.repeats, not args.quick, cpu)
        lost, during = zip(*(_background_cost(state, Path(folder) / "background.pt") for _ in range(args.repeats)))
    median = {name: common.median(series) for name, series in seconds.items()}
    print(f"last.pt (resnet18 width {args.width}, {size / 2 ** 20:.1f} MiB, median of {args.repeats}, cpu): "
          f"save_checkpoint {median['save_checkpoint']:.3g} s vs torch.save and rename "
          f"{median['save and rename']:.3g} s "
          f"({common.ratio(median['save_checkpoint'], median['save and rename'])}; torch.save alone "
          f"{median['torch.save']:.3g} s, without its CRCs {median['save, no CRC']:.3g} s); load_checkpoint "
          f"{median['load_checkpoint']:.3g} s vs torch.load "
          f"{median['torch.load']:.3g} s ({common.ratio(median['load_checkpoint'], median['torch.load'])}); "
          f"on the background thread a write took {statistics.median(during):.3g} s and cost a launch-bound "
          f"training thread {statistics.median(lost):.3g} s")
    return 0


def _last_pt(width: int) -> dict:
    """A last.pt's state after one SGD step of a fresh ResNet-18 (so the momentum buffers exist)."""
    settings = config.resolve_config(train.parse_args(["--dataset", "CIFAR10", "--width", str(width)]))
    settings |= {"samples_per_class": 5000, "data_root": "data"}
    model = models.get_model("resnet18", 10, 3, width)
    optimizer = engine.make_optimizer(model, settings, torch.device("cpu"))
    scheduler = engine.make_scheduler(optimizer, settings)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": 1, "rng": {"torch": torch.get_rng_state()}, "config": settings}


def _background_cost(state: dict, path: Path) -> tuple[float, float]:
    """(seconds the loop lost, seconds the background write took): the loop's rate alone, for as long as a
    write takes, then while runs.BackgroundWriter writes the state."""
    alone = _loop_rate(seconds=common.seconds_of(lambda: runs.save_checkpoint(path, state), torch.device("cpu")))
    done = threading.Event()
    with runs.background_writer() as writer:
        began = time.perf_counter()
        writer.submit(lambda: (runs.save_checkpoint(path, state), done.set()))
        during = _loop_rate(until=done.is_set)
        seconds = time.perf_counter() - began
    return seconds * max(0.0, 1 - during / alone), seconds


def _loop_rate(until=None, seconds: float = 0.0) -> float:
    """Tiny in-place additions per second, a hundred at a time, until `until()` is true (or for `seconds`)."""
    counter, calls, began = torch.zeros(1), 0, time.perf_counter()
    while not (until() if until else time.perf_counter() - began >= seconds):
        for _ in range(100):
            counter.add_(1)
        calls += 100
    return calls / (time.perf_counter() - began)


def _save_and_rename(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _without_crc(state: dict, path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
