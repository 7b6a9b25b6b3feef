"""The run folder on disk: atomic writes, `config.json`, the CSV tables and the checkpoints.

A run folder holds everything about one training run:

    config.json            every resolved setting of the run
    log.csv                one row per epoch
    checkpoints/epoch_0001.pt ...   the analysis checkpoints (model weights, epoch, config)
    last.pt                everything needed to resume, rewritten every epoch
    nc_metrics.csv         the collapse metrics of every analysis checkpoint (validate_nc.py)

Every file is written to a temporary file in the same folder and renamed into place, so a kill
never leaves a half-written file where a complete one is expected.
"""
import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Iterator

from errors import UserError

TMP_SUFFIX = ".tmp"


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
