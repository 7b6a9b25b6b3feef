"""The run folder on disk: atomic writes, `config.json`, the CSV tables and the checkpoints.

A run folder holds everything about one training run:

    config.json            every resolved setting of the run
    log.csv                one row per epoch
    checkpoints/epoch_0001.pt ...   the analysis checkpoints (model weights, epoch, config)
    last.pt                everything needed to resume, rewritten every epoch
    nc_metrics.csv         the collapse metrics of every analysis checkpoint (validate_nc.py)
    summary.json           a glance at both tables: epochs done, the TPT onset, the last numbers

A run of ufm.py, the unconstrained-features model, has the same config.json, tables and summary.json (the
tables' `epoch` column counting its steps, their test columns empty) and, instead of checkpoints, final.pt.

Every file is written to a temporary file in the same folder, <name>.<process id>.<random>.tmp, created
anew (never an existing file, never through a symbolic link), and renamed into place, so a kill never
leaves a half-written file where a complete one is expected and a link planted in the folder is replaced,
not written through. Checkpoints are zip archives whose every record carries a CRC-32; each is checked
before a checkpoint is used, so changed bytes are reported as corrupt instead of read as weights. A run
folder has one writer of its training files: train.py holds an OS lock on `.train.lock` for the whole run
(the kernel releases it when the process ends, however it ends), and only the holder removes temporary
files left by dead writers, only those named as this module names them. It writes each epoch's files on
a background thread (`BackgroundWriter`) while the next epoch trains, one epoch's files at a time;
`training_process` tells another process (validate_nc.py --follow) whether a trainer holds the lock. Table updates
that read before
they write (nc_metrics.csv, summary.json) hold `.tables.lock` for the moment of the update, so processes
measuring the same run never lose each other's rows. The tables are read row by row: a row that does not
parse completely (a cut or edited file) is left out with a warning naming the file and line.

The terminal phase of training (TPT) begins at the first analysis checkpoint whose network, in eval
mode and strict float32, classifies every clean training sample correctly: `train_acc` == 1 in
nc_metrics.csv. log.csv's `train_acc` is the running train-mode accuracy over each epoch (of mixed
inputs under Mixup), which is not the paper's training error.
"""
import contextlib
import csv
import errno
import fcntl
import functools
import io
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import threading
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image

import config
import datasets
from errors import UserError
from nc_metrics import CLASSIFIER_KEYS, FEATURE_KEYS, OTHER_KEYS, PAPER_KEYS, tpt_row

TMP_SUFFIX = ".tmp"
TRAIN_LOCK, TABLES_LOCK = ".train.lock", ".tables.lock"
WRITER_THREAD = "run-files-writer"
# The files this module writes into a run folder; a temporary file of one of them (or of a checkpoint) is
# named <name>.<process id>.<random hex>.tmp (<name>.<process id>.tmp before the random part was added).
RUN_FILES = ("config.json", "log.csv", "last.pt", "summary.json", "nc_metrics.csv")
_TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<pid>\d+)(\.[0-9a-f]{16})?" + re.escape(TMP_SUFFIX))
_CHECKPOINT = re.compile(r"epoch_\d+\.pt")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`, a name no other writer uses; on success rename it onto
    `path` (which replaces a symbolic link there rather than writing through it), on failure remove it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise UserError(f"could not write {path}: {_os_reason(err)}") from err
    except BaseException:
        _discard(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(_create(tmp), "w") as handle:
        handle.write(text)


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
# log.csv leaves the test columns empty on epochs --eval-every skips; nc_metrics.csv those that need a classifier
# or held-out features where measure_features.py had none (validate_nc.py fills them all), and the test columns
# of ufm.py's runs, which have no test split (both tables' `epoch` column counts its steps: config.json's time_unit).
_MAY_BE_EMPTY = {"log.csv": {"test_loss", "test_acc", "test_ece"},
                 "nc_metrics.csv": {"train_acc", "train_loss", "test_acc", "test_loss", "test_ece",
                                    "ncc_mismatch_train",
                                    "ncc_mismatch_test", *CLASSIFIER_KEYS}}


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
    """Write a checkpoint (tensors and plain Python values only) atomically: a zip archive in which torch
    stores a CRC-32 of every record, which `load_checkpoint` checks."""
    with atomic_path(path) as tmp:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(_create(tmp), "wb") as handle:
            try:
                torch.save(state, handle)
            except RuntimeError as err:  # torch's zip writer reports the OS's error as "enforce fail at ..."
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise


def load_checkpoint(path: Path, epoch: int | None = None) -> dict:
    """Load a checkpoint written by `save_checkpoint` into host memory (see `load_archive`); a corrupt,
    truncated or foreign file, one whose config is not a run's, or one that holds another epoch than `epoch`
    (the one its name says), gets a message naming it.

    Always to the CPU, whatever device the run trains on: the caller moves what it uses (weights by
    `load_state_dict`, which copies onto the parameters' device), and what must stay on the host stays
    there (the RNG states, which torch.set_rng_state takes only as CPU tensors)."""
    state = load_archive(path)
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (no model or config in it)")
    problems = config.settings_problems(state["config"], config.CONFIG_KEYS)
    if type(state.get("epoch")) is not int or state["epoch"] < 1:
        problems.append(f"its epoch is {state.get('epoch')!r}")
    if problems:
        raise UserError(f"{path} is not a checkpoint written by train.py ({'; '.join(problems)}); delete it")
    if epoch is not None and state["epoch"] != epoch:
        raise UserError(f"{path} holds the checkpoint of epoch {state['epoch']}, not of epoch {epoch} as its name "
                        "says; give it back its own name, or delete it")
    return state


def load_archive(path: Path, writer: str = "train.py"):
    """What a file written by `save_checkpoint` holds, loaded into host memory once every record of its
    archive matches the CRC-32 stored at write time, with `weights_only=True` (a file that would run code
    while loading is refused before anything runs); a corrupt, truncated or foreign file gets a message naming
    it and `writer`, the script that writes such files. The caller checks what it holds."""
    try:
        with open(path, "rb") as handle:  # one open file: what is checked is what is loaded
            damage = _damage(handle)
            if damage:
                raise UserError(f"{path} is corrupt ({damage}: its bytes changed after it was written); restore "
                                "it from a copy or delete it")
            handle.seek(0)
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        if culprit is None:
            raise UserError(f"{path} is corrupt or not a checkpoint written by {writer}; delete it") from None
        raise UserError(f"{path} asks to run code while loading ({culprit.group(1)}) and was refused; "
                        f"only load checkpoints written by {writer}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile,
            NotImplementedError) as err:
        reason = str(err).split(". ")[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is truncated or not a checkpoint ({reason}); delete it") from None


def read_config(run_dir: Path, required: tuple[str, ...] = config.CONFIG_KEYS) -> dict | None:
    """The run's config.json, or None if the folder has none; a file that is not a run's config (bad
    JSON, binary, not an object, a `required` setting missing or holding a value no command line gives)
    is a UserError."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass --run-dir a new folder or a run's folder")
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is corrupt ({err}); restore it or start the run in a new --run-dir") from None
    problems = config.settings_problems(settings, required)
    if problems:
        raise UserError(f"{path} is corrupt ({'; '.join(problems)}); restore it or start the run in a new --run-dir")
    return settings


def write_config(run_dir: Path, settings: dict) -> None:
    write_text(Path(run_dir) / "config.json", json.dumps(settings, indent=2) + "\n")


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


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's training lock for the duration (creating the folder if it is new, and removing
    it again if the run fails before writing anything), with this process's id and host in the lock file;
    if another process holds it, a UserError naming that process."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = _open_lock(run_dir / TRAIN_LOCK)
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # if it is still empty
        raise UserError(f"cannot use {run_dir} as a run folder ({_os_reason(err)})") from None
    with open(descriptor, "r+b", buffering=0) as lock:  # unbuffered: a failed write is not tried again on close
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read(200).decode(errors="replace").strip() or "another process"
            raise UserError(f"{run_dir} is being trained by {holder}; wait for it to finish (or stop it), or "
                            "pass another --run-dir") from None
        try:
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as err:
            _remove_if_new(run_dir, created)
            raise UserError(f"cannot use {run_dir} as a run folder ({_os_reason(err)})") from None
        try:
            yield
        except BaseException:
            _remove_if_new(run_dir, created)
            raise


def training_process(run_dir: Path) -> str | None:
    """The process training the run now, as the lock file names it ("process <id> on <host>"), or None
    if no process holds the training lock. The lock is tested with a shared lock, taken without waiting
    and dropped at once: a train.py that tried to take the lock in that very instant would find the
    folder busy and stop, so callers (validate_nc.py --follow) look at most once a second, and at a
    run whose config.json is written: its trainer has the lock already or has ended."""
    try:
        descriptor = os.open(Path(run_dir) / TRAIN_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"cannot read {Path(run_dir) / TRAIN_LOCK} ({_os_reason(err)})") from None
    with os.fdopen(descriptor) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def usable_run_dir(run_dir: Path) -> Path:
    """`run_dir`, once it can be a run folder: a name the file system takes, folders (or nothing yet) where
    it, its parents and its checkpoints/ are, and no checkpoints/ that is a symbolic link leading out of
    it (checkpoint writes and the clean-up of temporary files would land there)."""
    run_dir = usable_folder(run_dir, "--run-dir")
    checkpoints = run_dir / "checkpoints"
    usable_folder(checkpoints, "--run-dir", " (or move that file away)")
    try:
        target = checkpoints.resolve() if checkpoints.is_symlink() else None
        inside = target is None or target.is_relative_to(run_dir.resolve())
    except (OSError, RuntimeError) as err:  # RuntimeError: a loop of symbolic links
        raise UserError(f"cannot use {checkpoints} ({_os_reason(err)}); pass --run-dir another folder") from None
    if not inside:
        raise UserError(f"{checkpoints} is a symbolic link to {target}, outside the run folder, where checkpoints "
                        "would be written and temporary files cleaned up; replace the link by a folder of its "
                        "own, or pass --run-dir another folder")
    return run_dir


def usable_folder(folder: Path, flag: str, remedy: str = "") -> Path:
    """`folder`, once it can be a folder to write into: a name the file system takes, and no file where
    it or one of its parents should be; else a UserError saying to pass `flag` another folder."""
    folder = Path(folder)
    try:
        blocked = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    except OSError as err:  # a name too long, a loop of symbolic links
        raise UserError(f"cannot use {folder} ({_os_reason(err)}); pass {flag} another folder") from None
    if blocked is not None:
        raise UserError(f"{blocked} is a file, not a folder; pass {flag} a new folder or a run's folder{remedy}")
    return folder


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
    """Hold an exclusive OS lock (flock) on `path`, created if missing (not through a symbolic link),
    waiting for any other holder; a UserError if it cannot be opened."""
    try:
        descriptor = _open_lock(path)
    except OSError as err:
        raise UserError(f"cannot lock {path} ({_os_reason(err)})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


class RunFolder:
    """One run folder and its files. Its tables and config.json are read once, when first asked for: a figure
    or a table made from them reads the disk once however many of them use it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @functools.cached_property
    def config(self) -> dict:
        """config.json (every key as written; {} where there is none)."""
        return read_config(self.path, required=()) or {}

    @functools.cached_property
    def log(self) -> list[dict]:
        return read_log(self.path)

    @functools.cached_property
    def measured(self) -> list[dict]:
        return read_nc_metrics(self.path)

    @property
    def plots_dir(self) -> Path:
        """Where validate_nc.py draws the run (see `default_plots_dir`)."""
        return default_plots_dir(self.config, self.path)

    def checkpoints(self) -> list[tuple[int, Path]]:
        return checkpoint_files(self.path)

    def required(self, table: str) -> list[dict]:
        """The rows of `table` (log.csv or nc_metrics.csv), or a UserError saying how to make them."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a run folder (no such directory); check the path")
        rows = self.measured if table == "nc_metrics.csv" else self.log
        if not rows:
            command = "python validate_nc.py --run-dir {}" if table == "nc_metrics.csv" else \
                "python train.py --run-dir {} (with the run's --dataset and other flags)"
            raise UserError(f"{self.path} has no {table} (or it has no rows yet); make it with: "
                            f"{command.format(self.path)}")
        return rows


def default_plots_dir(run_config: dict, run_dir: Path) -> Path:
    """Where validate_nc.py draws a run: <DATASET>_plots/ for the paper-default run, <DATASET>_plots/<run
    name>/ for any other."""
    base = Path(f"{datasets.label(run_config['dataset'])}_plots")
    return base if Path(run_dir).name == config.paper_run_name(run_config["dataset"]) else base / Path(run_dir).name


class BackgroundWriter:
    """Runs a training process's file writes on a thread, one job at a time and in the order submitted,
    so that the training thread, and the GPU it feeds, never wait for the disk. `submit` first waits for
    the job before it (one write in flight: each epoch's files are complete before the next epoch's
    begin), raising its error there; `wait` waits for the last one. Jobs write through the atomic
    writers of this module, so a kill at any moment leaves each file as it was or as it became."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[..., None], *args) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job, args), name=WRITER_THREAD)
        self._thread.start()

    def wait(self) -> None:
        """Return once the job in flight, if any, is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, job: Callable[..., None], args: tuple) -> None:
        try:
            job(*args)
        except BaseException as err:  # handed to the training thread, which raises it
            self._error = err


@contextlib.contextmanager
def background_writer() -> Iterator[BackgroundWriter]:
    """A `BackgroundWriter` whose last job is finished on leaving, however the block is left."""
    writer = BackgroundWriter()
    try:
        yield writer
    finally:
        writer.wait()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files that dead writers left in the run folder and its checkpoints/; return
    them. Only files named as `atomic_path` names them, after a file this module writes where they lie,
    are touched; files of a process still alive (a validate_nc.py writing its table) are its own to finish."""
    run_dir = Path(run_dir)
    leftovers = [path for path in [*run_dir.glob(f"*{TMP_SUFFIX}"), *run_dir.glob(f"checkpoints/*{TMP_SUFFIX}")]
                 if _left_by_dead_writer(path, run_dir)]
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


def _left_by_dead_writer(path: Path, run_dir: Path) -> bool:
    """Whether `path` is the temporary file of a run file (in `run_dir`) or of a checkpoint (in its
    checkpoints/) whose writing process, named by the id in it, is no longer running."""
    match = _TEMPORARY.fullmatch(path.name)
    if match is None:
        return False
    ours = match["name"] in RUN_FILES if path.parent == run_dir else bool(_CHECKPOINT.fullmatch(match["name"]))
    return ours and not _process_alive(int(match["pid"]))


def _process_alive(pid: int) -> bool:
    """Whether another process of this id is running (this process's own id on a file means a process
    before it left the file)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_if_new(run_dir: Path, created: bool) -> None:
    """A new run that failed before writing anything leaves no folder (called while holding its lock)."""
    if created and [path.name for path in run_dir.iterdir()] == [TRAIN_LOCK]:
        shutil.rmtree(run_dir)


def _create(path: Path) -> int:
    """A descriptor of a new file at `path`, open for writing: never an existing file, never through a
    symbolic link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file at `path`, created if missing, not through a symbolic link."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _discard(path: Path) -> None:
    """Remove a temporary file if it is there; a failure here must not hide the error being reported."""
    with contextlib.suppress(OSError):
        path.unlink()


def _damage(handle: BinaryIO) -> str | None:
    """What is wrong with the first record of a zip archive whose bytes or header do not match what was
    stored when it was written (its CRC-32 above all), or None if every record matches; zipfile.BadZipFile
    if the archive's own directory is broken."""
    with zipfile.ZipFile(handle) as archive:
        for record in archive.infolist():
            try:
                with archive.open(record) as stream:
                    while stream.read(1 << 24):
                        pass
            except zipfile.BadZipFile as err:
                return str(err)
    return None


def _os_reason(err: BaseException) -> str:
    """The operating system's reason for a failed file operation, and what to do about it."""
    if not isinstance(err, OSError):
        return str(err)
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}; free some space, then run the same command again"
    if err.errno == errno.EFBIG:
        return f"{reason}; raise the file-size limit (ulimit -f), then run the same command again"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason}; make the folder writable, or choose another one"
    if err.errno == errno.ELOOP:
        return f"{err.filename} is a symbolic link, which is never written through; remove it, then run the " \
               "same command again"
    if err.errno == errno.ENAMETOOLONG:
        return f"{reason}; choose a shorter name"
    return f"{reason}; move what is in the way, or choose another folder"
