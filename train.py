"""Train a network with the protocol of Papyan, Han & Donoho (2020), saving log-spaced checkpoints.

    python train.py --dataset CIFAR10      # ResNet-18, SGD, 350 epochs: the paper's run
    python train.py --dataset CIFAR100     # ResNet-50
    python train.py --dataset synthetic    # the offline quick start (its time: README.md)

The run folder (default runs/<DATASET>-<model>-<loss>-seed<seed>[-<non-default settings>], a non-default
--epochs included) receives config.json, log.csv, checkpoints/epoch_XXXX.pt at log-spaced epochs, and
last.pt every epoch. Running the same command again continues from last.pt; adding --extend-to E trains
the run on to epoch E (keeping its learning-rate milestones), which config.json records.

    torchrun --nproc_per_node=K train.py ...   # DistributedDataParallel over K processes (GPUs)

Under torchrun the protocol is the same: the global batch is still --batch-size (each process takes
its share of it), with the same learning rate and schedule; process 0 alone writes the run folder and
prints. Batch norm is synchronised across the processes on CUDA (--sync-bn); on the CPU torch's
SyncBatchNorm cannot run, so each process normalises with its own share of the batch there.

Each epoch prints a line. On a terminal, progress bars (of the epochs and of each epoch's batches) are drawn
below; with stdout or stderr redirected to a file or a pipe there are none, so that a log holds the lines alone.
"""
from errors import STOPPED, ArgumentParser, UserError, interrupt_quietly, run_cli

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import argparse
import contextlib
import copy
import functools
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import config
import datasets
import devices
import distributed
import engine
import losses
import progress
import runs
from models import user


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    config.add_selection_arguments(parser.add_argument_group(
        "which run", "The run's settings, which name its folder: the same flags continue the run, and select it "
        "for validate_nc.py."))
    config.add_training_arguments(
        parser.add_argument_group("training", "How the run is trained; none of these names another run."),
        parser.add_argument_group("data and device"),
        parser.add_argument_group("output and monitoring", "What is written besides the run folder."))
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    with distributed.process_group(config.resolve_device(args.device)) as device:
        return 0 if train_run(args, device) else STOPPED


def train_run(args: argparse.Namespace, device: torch.device) -> bool:
    """Start or continue the run the flags select, on `device`, in this process's part under torchrun;
    whether it reached its last epoch (False: stopped by SIGTERM, see `train_for`).

    Process 0 holds the run folder's training lock throughout. Nothing in the folder is written until
    every check has passed: the settings against the run's last.pt and config.json, the data (against the
    fingerprint of the data it was trained on), the memory it needs, the network's output on a first batch,
    and the saved state loading into the network."""
    if args.download:
        distributed.on_rank_zero(datasets.fetch, args.dataset, args.data_root)  # once, then all read it
    settings = distributed.on_every_rank(config.resolve_config, args)
    distributed.on_every_rank(config.refuse_inapplicable, args, settings)
    run_dir = distributed.on_every_rank(runs.usable_run_dir, config.default_run_dir(settings, args))
    with contextlib.ExitStack() as held:
        distributed.on_rank_zero(held.enter_context, runs.training_lock(run_dir))
        previous, last = distributed.on_every_rank(_previous_run, run_dir)
        train, test = distributed.on_every_rank(_prepare, settings, previous, last is not None, run_dir, args, device)
        sync_bn = distributed.on_every_rank(_sync_bn, args.sync_bn, device)
        _set_determinism(args.deterministic, device)
        distributed.on_every_rank(_refuse_too_large, settings, train, device)

        torch.manual_seed(settings["seed"])
        model = engine.build_model(settings, device)
        distributed.on_every_rank(_check_output, model, train, settings)
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state-dict keys
        optimizer = engine.make_optimizer(model, settings, device)
        scheduler = engine.make_scheduler(optimizer, settings)
        loss_fn = losses.loss_from_config(settings)
        start, log = distributed.on_every_rank(_resume, run_dir, last, model, optimizer, scheduler,
                                               min(config.analysis_epochs(settings)))
        extension = _extension_note(last["config"]["epochs"], settings) if last else ""
        del last
        distributed.on_rank_zero(_start_folder, run_dir, settings)
        writer = held.enter_context(runs.background_writer())  # closed (its last write done) before the lock goes
        board = distributed.on_rank_zero(runs.tensorboard_writer, run_dir) if args.tensorboard else None
        if board is not None:
            held.callback(board.close)
        if distributed.world_size() > 1:
            step_model = _parallel(model, device, args.compile)
        else:
            step_model = engine.FullBatchesCompiled(model, device, settings["batch_size"]) if args.compile else model

        processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
        _say(f"run {run_dir}: {settings['dataset']} ({len(train[1])} train / {len(test[1])} test images), "
             f"{settings['model']} width {settings['width']}, {settings['loss']}, {settings['precision']} on "
             f"{device.type if processes else device}{processes}" + (f"; resuming after epoch {start}" if start else "")
             + extension)
        stop = held.enter_context(StopRequest())
        return train_for(settings, run_dir, step_model, model, optimizer, scheduler, loss_fn, train, test, start,
                         log, writer, board, stop, every_epoch=args.save_last == "epoch")


def load_data(settings: dict, args: argparse.Namespace, device: torch.device,
              check: Callable[[dict], None] | None = None) -> tuple[engine.Split, engine.Split]:
    """The training subset and the test split on the device; records in `settings` the subset's size (of its
    largest class, and of each class), the normalisation (per-channel statistics of the training subset) and
    the fingerprint of the data (`datasets.data_fingerprint`, which `check` is given first)."""
    train, test, per_class, fingerprint = datasets.load_run_data(settings, args.data_root, args.download, device,
                                                                 check)
    mean, std = datasets.channel_stats(train[0])
    config.DataFacts(settings["num_classes"], settings["in_channels"], per_class,
                     torch.bincount(train[1], minlength=settings["num_classes"]).tolist(), train[0].shape[-1],
                     {"mean": mean, "std": std}, str(args.data_root), fingerprint).record(settings)
    return train, test


def train_for(settings: dict, run_dir: Path, step_model: nn.Module, model: nn.Module,
              optimizer: torch.optim.Optimizer, scheduler, loss_fn: losses.LossFn,
              train: engine.Split, test: engine.Split, start: int, log: list[dict],
              writer: runs.BackgroundWriter, board=None, stop: "StopRequest | None" = None,
              every_epoch: bool = True) -> bool:
    """Train epochs start+1 .. epochs, saving the log each epoch, the analysis checkpoints, and last.pt
    each epoch (or, without `every_epoch`, at the analysis checkpoints and the last epoch) through
    `writer` (and the log row to TensorBoard's `board`, if any). Once `stop` is asked (SIGTERM), the epoch
    in progress is finished and saved with its last.pt, and training stops there: False is returned,
    True once the last epoch is done.

    `step_model` trains (compiled, or under torchrun the DDP wrapper); `model` itself evaluates (the
    wrapper's forward would wait for the other processes; evaluation is a small part of an epoch) and is
    what is checked and saved. The host reads the device once per epoch, after its last step (the
    loss and accuracy sums, then the evaluation, if any, and the check for divergence); the epoch's
    files are written while the next epoch trains. A row's `seconds` is the wall time since the
    previous row: the epoch, its evaluation and the hand-over of the previous epoch's files."""
    epochs = settings["epochs"]
    analysed = set(config.analysis_epochs(settings))
    running_full = any(row["train_acc"] == 1.0 for row in log)
    began = tick = time.perf_counter()
    shown = distributed.is_main()
    bar = progress.bar(range(start + 1, epochs + 1), shown, initial=start, total=epochs, unit="epoch",
                       desc=run_dir.name)
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        with progress.bar(None, shown, total=datasets.num_batches(len(train[1]), settings["batch_size"]),
                          leave=False, unit="batch") as batches:
            row = engine.train_epoch(step_model, optimizer, loss_fn, train, settings, epoch, batches.update)
        distributed.broadcast_buffers(model)  # per-process batch norm: all evaluate and save process 0's statistics
        every = settings["eval_every"]
        evaluated = every > 0 and (epoch in analysed or epoch == epochs or epoch % every == 0)
        row |= engine.evaluate(model, loss_fn, test, settings) if evaluated else dict.fromkeys(engine.EVALUATION_KEYS)
        distributed.on_every_rank(_refuse_divergence, model, row, epoch, settings["lr"])
        scheduler.step()
        now = time.perf_counter()
        row = {"epoch": epoch, "lr": lr, **row, "seconds": now - tick}
        tick = now
        log.append(row)
        stopping = stop is not None and stop.asked_everywhere(train[0].device)
        resumable = every_epoch or stopping or epoch in analysed or epoch == epochs
        distributed.on_rank_zero(_save_epoch, writer, run_dir, settings, epoch in analysed, resumable, model,
                                 optimizer, scheduler, log)
        if board is not None:
            runs.log_scalars(board, "train", row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_acc']:.2%}", lr=f"{lr:.3g}")
        _say(_epoch_line(row, epochs))
        if not running_full and row["train_acc"] == 1.0:
            running_full = True
            _say(f"epoch {epoch}: the running training accuracy (train mode, averaged over the epoch) reached "
                 "100%; validate_nc.py measures the TPT onset on the clean training set in eval mode")
        if stopping:
            break
    bar.close()
    distributed.on_rank_zero(writer.wait)  # the last epoch's files, before saying they are there
    spent = f"{time.perf_counter() - began:.0f} s this session{_peak_memory(train[0].device)}"
    if log[-1]["epoch"] < epochs:
        _say(f"stopped by SIGTERM after epoch {log[-1]['epoch']} of {epochs} ({spent}), its files written: run the "
             "same command again to continue")
        return False
    _say(f"done: {epochs} epochs in {run_dir} ({spent}). "
         f"Next, to measure collapse and the TPT onset: python validate_nc.py --run-dir {run_dir}")
    return True


def _previous_run(run_dir: Path) -> tuple[dict | None, dict | None]:
    """The settings of the run already in `run_dir` (from its last.pt, which is what a resume continues,
    checked against config.json) and its last.pt, or (None, None) for a new run."""
    path = run_dir / "last.pt"
    last = runs.load_checkpoint(path) if path.exists() else None
    try:
        written = runs.read_config(run_dir)
    except UserError:
        if last is None:
            raise
        written = None  # rewritten from the settings once they are found to be last.pt's
    if last is None:
        return written, None
    differences = config.result_differences(last["config"], written) if written else []
    if differences:
        raise UserError(f"{run_dir}: its last.pt and config.json belong to different runs ({'; '.join(differences)}); "
                        "move one of them away, or start the run in a new --run-dir")
    return last["config"], last


def _prepare(settings: dict, previous: dict | None, trained: bool, run_dir: Path, args: argparse.Namespace,
             device: torch.device) -> tuple[engine.Split, engine.Split]:
    """The run's data, once the flags are checked against the run already in the folder (`trained` if it
    has a last.pt; without one nothing was trained, and its config.json must agree with the flags), and
    the epochs to train to settled."""
    check = functools.partial(_refuse_other_data, previous, settings["dataset"], run_dir) if trained else None
    train, test = load_data(settings, args, device, check)
    if previous:
        _refuse_clash(previous, settings, run_dir, trained)
    if not trained:
        datasets.refuse_inexact_imbalance(settings["num_classes"], settings["samples_per_class"],
                                          settings["imbalance"], settings["imbalance_profile"])
    _settle_length(settings, previous if trained else None, run_dir, args.extend_to)
    _refuse_empty_shares(len(train[1]), settings["batch_size"])
    return train, test


def _start_folder(run_dir: Path, settings: dict) -> None:
    runs.remove_leftovers(run_dir)
    runs.write_config(run_dir, settings)


def _sync_bn(asked: bool | None, device: torch.device) -> bool:
    """Whether batch norm is synchronised across processes: by default under torchrun on CUDA; never on
    the CPU, where torch's SyncBatchNorm refuses to run."""
    if distributed.world_size() == 1:
        return False  # one process normalises over the whole batch already
    if device.type == "cuda":
        return asked is not False
    if asked:
        raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm refuses CPU tensors; drop the flag to train "
                        "on the CPU with each process normalising over its own share of the batch")
    if asked is None:
        _say("note: batch norm is not synchronised across processes on the CPU (torch's SyncBatchNorm needs "
             "CUDA): each process normalises over its own share of the batch")
    return False


def _parallel(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """The model wrapped for DistributedDataParallel (compiled around the wrapper if asked); checkpoints
    keep holding `model` itself, so they load in a single process."""
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if compile_model else wrapped


def _save_epoch(writer: runs.BackgroundWriter, run_dir: Path, settings: dict, analysed: bool, resumable: bool,
                model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, log: list[dict]) -> None:
    """Hand the epoch's files to `writer`: its analysis checkpoint if it has one, log.csv, last.pt if
    `resumable`, and summary.json, in that order, from a copy of the state taken now (see `_host_copy`).
    The previous epoch's files are finished first; a failure to write them is raised here."""
    state = {"model": model.state_dict()} if analysed or resumable else {}
    if resumable:
        state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_states()}
    copied = _host_copy(state)
    on_host = torch.cuda.Event() if any(p.is_cuda for p in model.parameters()) else None
    if on_host is not None:
        on_host.record()
    writer.submit(_write_epoch, on_host, run_dir, settings, analysed, copied, list(log))


def _write_epoch(on_host, run_dir: Path, settings: dict, analysed: bool, state: dict, log: list[dict]) -> None:
    """The writer's job: the files of the epoch of log's last row, once the copies to the host are done."""
    if on_host is not None:
        on_host.synchronize()
    epoch = log[-1]["epoch"]
    if analysed:
        runs.save_checkpoint(runs.checkpoint_path(run_dir, epoch),
                             {"model": state["model"], "epoch": epoch, "config": settings})
    runs.write_log(run_dir, log)  # before last.pt: a resume drops rows past last.pt's epoch
    if "optimizer" in state:
        runs.save_checkpoint(run_dir / "last.pt", {**state, "epoch": epoch, "config": settings})
    runs.write_summary(run_dir)


def _host_copy(value):
    """`value` (nested dicts, lists and tuples of tensors and plain values) with every tensor copied to
    the host, every container copied with its type and attributes: the next epoch changes the weights
    and the optimizer's buffers in place while the writer saves them. A CUDA tensor is copied
    asynchronously into pinned memory, behind the epoch's kernels (the writer waits for an event
    recorded after the copies), so the GPU goes on to the next epoch without waiting for the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", non_blocking=True) if value.is_cuda else value.detach().clone()
    if isinstance(value, dict):
        copied = copy.copy(value)  # an OrderedDict state dict keeps its _metadata, a Counter stays one
        for key, item in value.items():
            copied[key] = _host_copy(item)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item) for item in value)
    return copy.deepcopy(value)


def _resume(run_dir: Path, last: dict | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler, first_saved: int) -> tuple[int, list[dict]]:
    """Restore last.pt if the run has one: (epochs done, log rows up to them). Without one, the run starts
    over, unless log.csv goes past `first_saved`, the first epoch that writes last.pt whatever --save-last
    says (the first analysis checkpoint): a run that got no further was stopped (or met a full disk) before
    it had anything to resume, and its rows are rewritten; one that did had its last.pt taken away."""
    log = runs.read_log(run_dir)
    if last is None:
        if any(row["epoch"] > first_saved for row in log):
            raise UserError(f"{run_dir} has a log.csv up to epoch {log[-1]['epoch']} but no last.pt to resume from; "
                            "put its last.pt back, or start the run in a new --run-dir")
        return 0, []
    epoch = last["epoch"]
    kept = [row for row in log if row["epoch"] <= epoch]
    if [row["epoch"] for row in kept] != list(range(1, epoch + 1)):
        logged = kept[-1]["epoch"] if kept else 0
        raise UserError(f"{run_dir / 'last.pt'} is of epoch {epoch}, but log.csv holds "
                        + (f"epochs up to {logged} only" if logged < epoch else "not every epoch before it")
                        + ": that last.pt is not the one this folder's training wrote. Put its own last.pt back, "
                        "or start the run in a new --run-dir")
    try:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        _set_rng_states(last["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{run_dir / 'last.pt'} does not fit this run's network and optimizer ({reason}); "
                        "start the run in a new --run-dir") from None
    return epoch, kept


def _refuse_clash(previous: dict, settings: dict, run_dir: Path, trained: bool) -> None:
    """Refuse flags that select another run than the one in the folder: a result-changing setting, or the
    --epochs it was started with, that differs. Without a last.pt nothing was trained, but the folder's
    config.json still names a run; the flags never silently adopt its settings."""
    differences = config.result_differences(previous, settings)
    planned = config.planned_epochs(previous)
    if planned != settings["epochs"]:
        differences.append(f"epochs: {planned!r} -> {settings['epochs']!r}")
    if not differences:
        return
    if not trained:
        raise UserError(f"{run_dir / 'config.json'} describes another run than the flags ({'; '.join(differences)}) "
                        "and nothing has been trained there yet; delete that config.json to start this run "
                        "there, or pass --run-dir another folder")
    longer = " (add --extend-to E to train it on to epoch E)" if differences[-1].startswith("epochs") else ""
    raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(differences)}); pass --run-dir to "
                    f"start a new run, or repeat the original flags to continue it{longer}")


def _refuse_other_data(trained: dict, dataset: str, run_dir: Path, fingerprint: dict) -> None:
    """Refuse to continue a run on data (of `fingerprint`) other than it was trained on (`trained`, its last.pt's
    settings), naming what changed; a run trained before runs recorded their data is continued with a warning."""
    warning = datasets.refuse_other_data(trained.get("data_fingerprint"), fingerprint, dataset, run_dir, "continued")
    if warning and distributed.is_main():
        print(f"warning: {warning} (it is recorded from now on)", file=sys.stderr)


def _refuse_too_large(settings: dict, train: engine.Split, device: torch.device) -> None:
    """Refuse, before building it, a network whose training would not fit in the memory left on the device
    besides the data, which is there already (see `engine.training_memory`)."""
    needed = engine.training_memory(settings, min(settings["batch_size"], len(train[1])), train[0].shape[-1])
    free = devices.available_memory(device)
    if needed is None or free is None or sum(needed.values()) <= free:
        return
    parts = ", ".join(f"{name} {size / 2 ** 30:,.1f}" for name, size in needed.items())
    raise UserError(f"a {settings['model']} of width {settings['width']} does not fit in memory: training it needs "
                    f"at least {sum(needed.values()) / 2 ** 30:,.1f} GiB on {device.type} ({parts} GiB), and "
                    f"{free / 2 ** 30:,.1f} GiB are available; choose a smaller --width or --batch-size")


def _check_output(model: nn.Module, train: engine.Split, settings: dict) -> None:
    """A network of one's own must output its last nn.Linear's output: checked on the first training images
    before anything trains, instead of by validate_nc.py after the whole run."""
    if isinstance(model, user.HookedNetwork):
        model.check_output(datasets.normalize(train[0][:2], **settings["normalization"]))


def _settle_length(settings: dict, trained: dict | None, run_dir: Path, extend_to: int | None) -> None:
    """Set the epochs to train to: those of the run in the folder (`trained`, its last.pt's settings: its
    --epochs and any extension since), or with --extend-to E a longer run, whose earlier lengths
    `extended_from` lists."""
    reached = trained["epochs"] if trained else settings["epochs"]
    history = list(trained.get("extended_from", [])) if trained else []
    if extend_to is not None and extend_to != reached:
        if trained is None:
            raise UserError(f"--extend-to trains a run on, but {run_dir} has none trained yet; start it with "
                            f"--epochs {extend_to} instead, or drop --extend-to")
        if extend_to < reached:
            raise UserError(f"{run_dir} holds a run of {reached} epochs, which --extend-to {extend_to} would "
                            "shorten; a run can only be extended")
        history.append(reached)
        reached = extend_to
    settings["epochs"] = reached
    if history:
        settings["extended_from"] = history


def _extension_note(epochs_before: int, settings: dict) -> str:
    """The run line's announcement of an extension that begins now, or ""."""
    if settings["epochs"] == epochs_before:
        return ""
    milestones = ", ".join(map(str, settings["lr_milestones"])) or "none"
    return (f"; extending it from {epochs_before} to {settings['epochs']} epochs (--extend-to), with its "
            f"learning-rate milestones kept ({milestones}), as config.json's extended_from records")


def _refuse_empty_shares(count: int, batch_size: int) -> None:
    """Under torchrun every process needs a part of every batch: one without would stall the others."""
    processes = distributed.world_size()
    smallest = min(batch_size, count % batch_size or batch_size)
    if smallest < processes:
        raise UserError(f"{processes} processes need batches of at least {processes} images, but --batch-size "
                        f"{batch_size} on {count} images gives a batch of {smallest}; choose another --batch-size "
                        "or fewer processes")


def _refuse_divergence(model: torch.nn.Module, row: dict, epoch: int, lr: float) -> None:
    """Stop before the epoch is saved if its training or test loss or any weight is not finite; `lr` is
    the run's initial learning rate, of which the message suggests half."""
    weights_finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    losses_finite = all(math.isfinite(row[key]) for key in ("train_loss", "test_loss") if row[key] is not None)
    if not (losses_finite and weights_finite):
        what = f"loss {row['train_loss']}" + (f", test loss {row['test_loss']}" if row["test_loss"] is not None else "")
        raise UserError(f"training diverged in epoch {epoch} ({what}); nothing of that epoch was saved. Lower "
                        f"the learning rate, e.g. --lr {lr / 2:g}, in a new --run-dir")


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _rng_states() -> dict:
    """Every global random state, as tensors and plain values (weights_only loads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


class StopRequest:
    """While held, SIGTERM asks the run to stop after the epoch in progress, its files written (a second
    SIGTERM stops the process at once, as without it). Under torchrun every process learns at the end of
    each epoch whether any of them was asked, so that all stop after the same epoch."""

    def __enter__(self) -> "StopRequest":
        self.asked = False
        # Python lets the main thread alone set handlers; a run trained on another thread (a test's) keeps them.
        self._previous = signal.signal(signal.SIGTERM, self._ask) if _main_thread() else None
        return self

    def __exit__(self, *exception) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def asked_everywhere(self, device: torch.device) -> bool:
        if distributed.world_size() == 1:
            return self.asked
        return bool(distributed.all_reduce_sum(torch.tensor(float(self.asked), device=device)).item())

    def _ask(self, signum: int, frame) -> None:
        self.asked = True
        signal.signal(signal.SIGTERM, self._previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _peak_memory(device: torch.device) -> str:
    """"; peak GPU memory X GiB" on CUDA (what this process's tensors took at most), else ""."""
    if device.type != "cuda":
        return ""
    return f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"


def _say(text: str) -> None:
    """Print a line (above the progress bars on a terminal), from process 0 only."""
    if distributed.is_main():
        progress.say(text)


def _epoch_line(row: dict, epochs: int) -> str:
    test = (f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%} ece {row['test_ece']:.3f}"
            if row["test_loss"] is not None else "(test split not evaluated)")
    return (f"epoch {row['epoch']:>4}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%}  {test}  {row['seconds']:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
