"""Seconds per epoch of train.py itself against the bare training step over the same data, in one process.

    python bench/epoch.py                       # CPU: resnet18 width 16, synthetic, eager
    python bench/epoch.py --device cuda --dataset CIFAR10 --data-root DATA --width 64   # compiled, CUDA graphs

    train.py    train.py's main on a new run folder for --epochs epochs, with --eval-every and the analysis
                checkpoints of scripts/paper_scale.sh (the test split evaluated at the checkpoints
                only): everything an epoch costs through train.py, i.e. the training epoch (each batch
                indexed from the uint8 split on the device and normalised there, the running sums),
                the host's one read of the device per epoch, the divergence check, the evaluation and
                the files where the epoch has a checkpoint (written in the background) and the progress
                bars. An epoch's cost is log.csv's `seconds`, the wall time from one row to the next.
    bare step   a fresh copy of the model, compiled as train.py compiles it (or eager, as train.py runs
                without --compile), over the training split normalised once beforehand, in stored
                order: forward, loss, backward, optimizer step and nothing else; timed per epoch
                with the device's queued work finished.

The first epoch of each (which compiles) is left out; bare epochs are timed before and after the
train.py run, and the medians compared. On a GPU both compile by default (--no-compile: eager); on the
CPU both run eagerly by default, since torch.compile takes about 45 s per graph there (--compile to
compile anyway). Target: train.py's epoch at most 1.2x the bare compiled step, over the paper's
protocol (300 epochs without a checkpoint and 50 with one, in 350).
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import config  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from bench import common  # noqa: E402

TARGET = 1.2
# The paper's protocol: 350 epochs, 50 of them analysis checkpoints.
PROTOCOL_EPOCHS, PROTOCOL_CHECKPOINTS = config.EPOCHS.default, config.NUM_CHECKPOINTS.default
DEFAULT_EPOCHS, QUICK_EPOCHS = (8, 3), (4, 2)  # (epochs, analysis checkpoints) of the train.py run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    add = parser.add_argument
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="as train.py's --precision (default fp32)")
    add("--epochs", type=config.positive_int, help=f"epochs of the train.py run (default {DEFAULT_EPOCHS[0]}; "
        f"{QUICK_EPOCHS[0]} with --quick); the first is left out")
    add("--num-checkpoints", type=config.positive_int, help="its analysis checkpoints, log-spaced, the last "
        f"epoch one of them (default {DEFAULT_EPOCHS[1]}; {QUICK_EPOCHS[1]} with --quick)")
    add("--compile", action=argparse.BooleanOptionalAction, help="compile train.py's step and the bare one "
        "(default: on CUDA, not on the CPU)")
    args = common.parse(parser, argv)
    epochs, checkpoints = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    args.epochs = args.epochs or epochs
    args.num_checkpoints = args.num_checkpoints or min(checkpoints, args.epochs)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first is left out, and one more has no checkpoint")
    return args


def main(args: argparse.Namespace) -> int:
    work = common.load_workload(args, args.precision)
    settings, device = work.settings, work.device
    compiled = device.type == "cuda" if args.compile is None else args.compile
    loss_fn = losses.loss_from_config(settings)
    torch.manual_seed(settings["seed"])
    model = engine.build_model(settings, device)
    optimizer = engine.make_optimizer(model, settings, device)
    step_model = engine.FullBatchesCompiled(model, device, settings["batch_size"]) if compiled else model
    batches = common.fixed_batches(work.train, settings, settings["batch_size"])

    def bare_epochs(count: int) -> list[float]:
        return [common.seconds_of(lambda: common.bare_train_epoch(step_model, optimizer, loss_fn, batches,
                                                                  settings["precision"]), device)
                for _ in range(count)]

    bare_epochs(1)  # compiles, and the allocator and cuDNN settle
    bare = bare_epochs(args.repeats)
    plain, checkpointed = _train_py_epochs(args, compiled)
    bare = statistics.median(bare + bare_epochs(args.repeats))

    plain_s, checkpointed_s = statistics.median(plain), statistics.median(checkpointed)
    protocol = ((PROTOCOL_EPOCHS - PROTOCOL_CHECKPOINTS) * plain_s + PROTOCOL_CHECKPOINTS * checkpointed_s) \
        / PROTOCOL_EPOCHS
    how = "compiled" + (" with CUDA graphs" if device.type == "cuda" else "") if compiled else \
        "eager" + ("" if device.type == "cuda" else " (torch.compile takes ~45 s per graph on a CPU; --compile)")
    what = common.describe(work, f"batch {settings['batch_size']}", settings["precision"], how,
                           f"medians of {args.repeats * 2} bare epochs and of {len(plain)} + {len(checkpointed)} "
                           f"of train.py's {args.epochs}")
    print(f"train.py epoch ({what}): {plain_s:.3g} s without a checkpoint ({common.ratio(plain_s, bare)}), "
          f"{checkpointed_s:.3g} s with its evaluation and files ({common.ratio(checkpointed_s, bare)}) vs the "
          f"bare step {bare:.3g} s; over the protocol's {PROTOCOL_EPOCHS} epochs with {PROTOCOL_CHECKPOINTS} "
          f"checkpoints {protocol:.3g} s ({common.ratio(protocol, bare)}, target <= {TARGET:.2f}x)")
    return 0


def _train_py_epochs(args: argparse.Namespace, compiled: bool) -> tuple[list[float], list[float]]:
    """The seconds of train.py's epochs after the first, without and with an analysis checkpoint."""
    with tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as sink:
        run_dir = Path(folder) / "run"
        argv = ["--dataset", args.dataset, "--data-root", args.data_root, "--model", args.model,
                "--width", str(args.width), "--samples-per-class", str(args.samples_per_class),
                "--precision", args.precision, "--seed", str(args.seed), "--device", args.device,
                "--epochs", str(args.epochs), "--num-checkpoints", str(args.num_checkpoints),
                "--eval-every", str(args.epochs), "--run-dir", str(run_dir)] + (["--compile"] if compiled else [])
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            train.main(train.parse_args(argv))
        log = runs.read_log(run_dir)
    analysed = set(config.checkpoint_epochs(args.epochs, args.num_checkpoints))
    later = [row for row in log if row["epoch"] > 1]
    return ([row["seconds"] for row in later if row["epoch"] not in analysed],
            [row["seconds"] for row in later if row["epoch"] in analysed])


if __name__ == "__main__":
    sys.exit(main(parse_args()))
