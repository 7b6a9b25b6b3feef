"""The run folder on disk: atomic writes, `config.json`, the CSV tables and the checkpoints.

A run folder holds everything about one training run:

    config.json            every resolved setting of the run
    log.csv                one row per epoch
    checkpoints/epoch_0001.pt ...   the analysis checkpoints (model weights, epoch, config)
    last.pt                everything needed to resume, rewritten every epoch
    nc_metrics.csv         the collapse metrics of every analysis checkpoint (validate_nc.py)
    summary.json           a glance at both tables: epochs done, the TPT onset, the last numbers

Every file is written to a temporary file in the same folder and renamed into place, so a kill
never leaves a half-written file where a complete one is expected. A run folder has one writer of its
training files: train.py holds an OS lock on `.train.lock` for the whole run (the kernel releases it
when the process ends, however it ends), and only the holder removes temporary files left by dead
writers. Table updates that read before they write (nc_metrics.csv, summary.json) hold `.tables.lock`
for the moment of the update, so processes measuring the same run never lose each other's rows. The
tables are read row by row: a row that does not parse completely (a cut or edited file) is left out
with a warning naming the file and line.

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
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from errors import UserError
from nc_metrics import FEATURE_KEYS, OTHER_KEYS, PAPER_KEYS

TMP_SUFFIX = ".tmp"
TRAIN_LOCK, TABLES_LOCK = ".train.lock", ".tables.lock"


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
    """The rows of a CSV table as dicts of strings; an empty list if the file does not exist. Every
    table here ends with a newline, so a last line without one was cut: it is left out, with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text()
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path} ({err}); restore or delete it") from None
    if text and not text.endswith("\n") and rows:
        _warn(f"{path}, line {len(rows) + 1}: cut off before its end; the row is ignored")
        rows.pop()
    return rows


LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_ece", "seconds"]
NC_COLUMNS = ["epoch", "train_acc", "train_loss", "test_acc", "test_loss", "test_ece", *PAPER_KEYS,
              "ncc_mismatch_train", "ncc_mismatch_test", *OTHER_KEYS]
# Tables measured before the field's other measures existed lack their columns: their rows are read (those
# columns empty) and validate_nc.py measures them again.
_NC_REQUIRED = [column for column in NC_COLUMNS if column not in OTHER_KEYS]
# log.csv leaves the test columns empty on epochs --eval-every skips.
_MAY_BE_EMPTY = {"log.csv": {"test_loss", "test_acc", "test_ece"}, "nc_metrics.csv": set()}
# What a run's config.json must hold for the scripts to rebuild its network and data.
CONFIG_KEYS = ("dataset", "num_classes", "in_channels", "model", "width", "epochs", "num_checkpoints", "loss",
               "lr_milestones", "seed", "precision")


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
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # how torch's zip writer reports a full disk
            raise OSError(str(err).split("\n")[0]) from err


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`: a file that would run code while loading is refused
    before anything runs, and a truncated or foreign file gets a message naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        if culprit is None:
            raise UserError(f"{path} is corrupt or not a checkpoint written by train.py; delete it") from None
        raise UserError(f"{path} asks to run code while loading ({culprit.group(1)}) and was refused; "
                        "only load checkpoints written by train.py") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as err:
        reason = str(err).split(". ")[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is truncated or not a checkpoint ({reason}); delete it") from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (no model or config in it)")
    return state


def read_config(run_dir: Path, required: tuple[str, ...] = CONFIG_KEYS) -> dict | None:
    """The run's config.json, or None if the folder has none; a file that is not a run's config (bad
    JSON, binary, not an object, a `required` setting missing) is a UserError."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass --run-dir a new folder or a run's folder")
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is corrupt ({err}); restore it or start the run in a new --run-dir") from None
    missing = [key for key in required if key not in config] if isinstance(config, dict) else ["all"]
    if missing:
        raise UserError(f"{path} is corrupt (settings missing: {', '.join(missing)}); restore it or start the run "
                        "in a new --run-dir")
    return config


def write_config(run_dir: Path, config: dict) -> None:
    write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2) + "\n")


def read_log(run_dir: Path) -> list[dict]:
    """The complete rows of log.csv with numbers parsed (epoch as int)."""
    return _read_numbers(Path(run_dir) / "log.csv", LOG_COLUMNS)


def write_log(run_dir: Path, rows: list[dict]) -> None:
    write_csv(Path(run_dir) / "log.csv", rows, LOG_COLUMNS)


def read_nc_metrics(run_dir: Path) -> list[dict]:
    """The complete rows of nc_metrics.csv with numbers parsed, in epoch order."""
    return sorted(_read_numbers(Path(run_dir) / "nc_metrics.csv", _NC_REQUIRED), key=lambda row: row["epoch"])


def merge_nc_metrics(run_dir: Path, rows: list[dict]) -> dict[int, dict]:
    """Add `rows` to nc_metrics.csv as it is on disk now (a row's values replace those of its epoch there),
    rewrite it and summary.json, and return the merged table by epoch: rows another process added
    meanwhile stay."""
    run_dir = Path(run_dir)
    with locked(run_dir / TABLES_LOCK):
        table = {row["epoch"]: row for row in read_nc_metrics(run_dir)}
        for row in rows:  # columns the new measurement did not ask for stay
            table[row["epoch"]] = {**table.get(row["epoch"], {}), **row}
        ordered = [table[epoch] for epoch in sorted(table)]
        extra = [key for row in ordered for key in row if key not in NC_COLUMNS]
        write_csv(run_dir / "nc_metrics.csv", ordered, NC_COLUMNS + list(dict.fromkeys(extra)))
        _write_summary(run_dir)
    return table


def write_summary(run_dir: Path) -> dict:
    """Rewrite summary.json from log.csv and nc_metrics.csv as they are now, and return it (see
    `_write_summary`); under the tables' lock, so the last writer sees both tables' latest rows."""
    with locked(Path(run_dir) / TABLES_LOCK):
        return _write_summary(Path(run_dir))


def stage_columns(measured: list[dict]) -> list[str]:
    """The nc1_<stage> columns of nc_metrics.csv rows (validate_nc.py --layers), in depth order (the
    order they were written), that hold a value in some row."""
    columns = dict.fromkeys(key for row in measured for key, value in row.items() if value is not None)
    measures = {*NC_COLUMNS, *(f"{key}_test" for key in FEATURE_KEYS)}
    return [key for key in columns if key.startswith("nc1_") and key not in measures]


def tpt_row(measured: list[dict]) -> dict | None:
    """The row of nc_metrics.csv (in epoch order) where the TPT begins: the first with `train_acc`
    exactly 1, or None."""
    return next((row for row in measured if row.get("train_acc") == 1.0), None)


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's training lock for the duration (creating the folder if it is new, and removing
    it again if the run fails before writing anything), with this process's id and host in the lock file;
    if another process holds it, a UserError naming that process."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / TRAIN_LOCK, "a+")
    except OSError as err:
        raise UserError(f"cannot use {run_dir} as a run folder ({err.strerror or err}); pass --run-dir a folder "
                        "you can write to") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir} is being trained by {holder}; wait for it to finish (or stop it), or "
                            "pass another --run-dir") from None
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and [path.name for path in run_dir.iterdir()] == [TRAIN_LOCK]:
                shutil.rmtree(run_dir)  # a new run that failed before writing anything leaves no folder
            raise


def tensorboard_writer(run_dir: Path):
    """A TensorBoard SummaryWriter of <run>/tensorboard/ (the --tensorboard flag); the CSV tables stay the
    record, this is for watching a run live."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard==2.21.0, "
                        "or drop the flag") from None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


def log_scalars(writer, group: str, row: dict) -> None:
    """Every number of a table row as the scalar <group>/<column> at the row's epoch."""
    for key, value in row.items():
        if key != "epoch" and value is not None:
            writer.add_scalar(f"{group}/{key}", value, row["epoch"])
    writer.flush()


def log_figures(writer, paths: list[Path], step: int) -> None:
    """The PNG figures among `paths` as TensorBoard images named after their files, at `step`."""
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                writer.add_image(path.stem, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    writer.flush()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (flock) on `path`, created if missing, waiting for any other holder."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files that dead processes left in the run folder; return them. Files of a
    process still alive (a validate_nc.py writing its table) are its own to finish."""
    leftovers = [path for path in [*Path(run_dir).glob(f"*{TMP_SUFFIX}"), *Path(run_dir).glob(f"checkpoints/*{TMP_SUFFIX}")]
                 if not _writer_alive(path)]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _write_summary(run_dir: Path) -> dict:
    """summary.json: epochs done, the TPT onset (null until a measured checkpoint reaches it) with the test
    accuracy there, the last measured checkpoint, the first epoch whose running accuracy was 100%, and
    the last row of log.csv. train.py and validate_nc.py both call it after writing their table."""
    log, measured = read_log(run_dir), read_nc_metrics(run_dir)
    onset = tpt_row(measured)
    summary = {"epochs_done": log[-1]["epoch"] if log else 0,
               "tpt_epoch": onset and onset["epoch"], "tpt_test_acc": onset and onset["test_acc"],
               "measured_through": measured[-1]["epoch"] if measured else None,
               "first_full_running_train_acc": next((row["epoch"] for row in log if row["train_acc"] == 1.0), None),
               "last_epoch": log[-1] if log else None}
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _read_numbers(path: Path, required: list[str]) -> list[dict]:
    """The rows of a numeric table whose every field parses (epoch as int, the rest as floats, empty as
    None where the table allows it); each other row is left out with a warning naming its line."""
    rows = read_csv(path)
    if not rows:
        return []
    header = list(rows[0])
    missing = [column for column in required if column not in header]
    if missing:
        _warn(f"{path}: its header lacks {', '.join(missing)}; its rows are ignored")
        return []
    optional = _MAY_BE_EMPTY[path.name] | (set(header) - set(required))
    parsed = []
    for line, row in enumerate(rows, start=2):
        try:
            parsed.append(_parse_row(row, optional))
        except (TypeError, ValueError) as err:
            _warn(f"{path}, line {line}: {err}; the row is ignored")
    return parsed


def _parse_row(row: dict[str | None, str | None], optional: set[str]) -> dict:
    if None in row or None in row.values():
        raise ValueError("it has another number of fields than the header")
    parsed = {}
    for key, text in row.items():
        if text == "" and key in optional:
            parsed[key] = None
        elif key == "epoch":
            parsed[key] = int(text)
        else:
            parsed[key] = float(text)
    return parsed


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _writer_alive(path: Path) -> bool:
    """Whether the process whose id names the temporary file (name.<pid>.tmp) is running."""
    pid = path.name.removesuffix(TMP_SUFFIX).rsplit(".", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
