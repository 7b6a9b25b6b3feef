"""The run folder on disk: atomic writes, `config.json`, the CSV tables and the checkpoints.

A run folder holds everything about one training run:

    config.json            every resolved setting of the run
    log.csv                one row per epoch
    checkpoints/epoch_0001.pt ...   the analysis checkpoints (model weights, epoch, config)
    last.pt                everything needed to resume, rewritten every epoch
    nc_metrics.csv         the collapse metrics of every analysis checkpoint (validate_nc.py)
    summary.json           a glance at both tables: epochs done, the TPT onset, the last numbers

Every file is written to a temporary file in the same folder and renamed into place, so a kill
never leaves a half-written file where a complete one is expected.

The terminal phase of training (TPT) begins at the first analysis checkpoint whose network, in eval
mode and strict float32, classifies every clean training sample correctly: `train_acc` == 1 in
nc_metrics.csv. log.csv's `train_acc` is the running train-mode accuracy over each epoch (of mixed
inputs under Mixup), which is not the paper's training error.
"""
import contextlib
import csv
import fcntl
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

import torch

from errors import UserError
from nc_metrics import STATS_KEYS

TMP_SUFFIX = ".tmp"
SUMMARY_LOCK = ".summary.lock"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {err.strerror or err}; free some space or fix the "
                        "folder's permissions, then run the same command again") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """Write `rows` (dicts keyed by `columns`) as a CSV table, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV table as dicts of strings; an empty list if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_ece", "seconds"]
NC_COLUMNS = ["epoch", "train_acc", "train_loss", "test_acc", "test_loss", "test_ece", *STATS_KEYS,
              "ncc_mismatch_train", "ncc_mismatch_test"]


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete analysis checkpoints of a run as (epoch, path), in epoch order (files being
    written have a temporary name and are not listed)."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("epoch_*.pt"):
        stem = path.stem.removeprefix("epoch_")
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint (tensors and plain Python values only) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`: a file that would run code while loading is refused
    before anything runs, and a truncated or foreign file gets a message naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise UserError(f"{path} is corrupt or not a checkpoint ({err}); delete it") from None
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        name = culprit.group(1) if culprit else "a global that is not a tensor"
        raise UserError(f"{path} asks to run code while loading ({name}) and was refused; "
                        "only load checkpoints written by train.py") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        reason = str(err).split(". ")[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is truncated or not a checkpoint ({reason}); delete it") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint written by train.py (no model or config in it)")
    return state


def read_config(run_dir: Path) -> dict | None:
    """The run's config.json, or None if the folder has none."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a folder; pass --run-dir a new folder or a run's folder")
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err}); restore it or start the run in a new --run-dir") from None


def write_config(run_dir: Path, config: dict) -> None:
    write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2) + "\n")


def write_summary(run_dir: Path) -> dict:
    """Rewrite summary.json from log.csv and nc_metrics.csv as they are now, and return it: epochs done,
    the TPT onset (null until a measured checkpoint reaches it) with the test accuracy there, the last
    measured checkpoint, the first epoch whose running accuracy was 100%, and the last row of log.csv. train.py and validate_nc.py both call this after
    writing their table; the lock makes the last writer see both tables' latest rows."""
    run_dir = Path(run_dir)
    with locked(run_dir / SUMMARY_LOCK):
        log, measured = read_log(run_dir), read_nc_metrics(run_dir)
        onset = tpt_row(measured)
        summary = {"epochs_done": log[-1]["epoch"] if log else 0,
                   "tpt_epoch": onset and onset["epoch"], "tpt_test_acc": onset and onset["test_acc"],
                   "measured_through": measured[-1]["epoch"] if measured else None,
                   "first_full_running_train_acc": next((row["epoch"] for row in log if row["train_acc"] == 1.0), None),
                   "last_epoch": log[-1] if log else None}
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def tpt_row(measured: list[dict]) -> dict | None:
    """The row of nc_metrics.csv (in epoch order) where the TPT begins: the first with `train_acc`
    exactly 1, or None."""
    return next((row for row in measured if row.get("train_acc") == 1.0), None)


@contextlib.contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock (flock) on `path`, created if missing; the kernel releases it when the
    holder exits, however it dies. With wait=False raise BlockingIOError if another process holds it."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield


def read_log(run_dir: Path) -> list[dict]:
    """The rows of log.csv with numbers parsed (epoch as int)."""
    return [_parse_row(row) for row in read_csv(Path(run_dir) / "log.csv")]


def write_log(run_dir: Path, rows: list[dict]) -> None:
    write_csv(Path(run_dir) / "log.csv", rows, LOG_COLUMNS)


def read_nc_metrics(run_dir: Path) -> list[dict]:
    """The rows of nc_metrics.csv with numbers parsed, in epoch order."""
    return sorted((_parse_row(row) for row in read_csv(Path(run_dir) / "nc_metrics.csv")),
                  key=lambda row: row["epoch"])


def write_nc_metrics(run_dir: Path, rows: list[dict]) -> None:
    write_csv(Path(run_dir) / "nc_metrics.csv", sorted(rows, key=lambda row: row["epoch"]), NC_COLUMNS)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed process left in the run folder; return them."""
    leftovers = [*Path(run_dir).glob(f"*{TMP_SUFFIX}"), *Path(run_dir).glob(f"checkpoints/*{TMP_SUFFIX}")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _parse_row(row: dict[str, str]) -> dict:
    parsed = {}
    for key, text in row.items():
        if key == "epoch":
            parsed[key] = int(text)
        else:
            parsed[key] = float(text) if text not in ("", None) else None
    return parsed
