"""What tests of studies share: sweep.py run in-process in a folder, and the files its runs leave."""
import contextlib
import csv
import io
import os
from pathlib import Path

import torch

import sweep


def sweep_in(folder: Path, *flags: str) -> tuple[int, str]:
    """sweep.py's main in this process with `folder` as the working directory (its jobs are subprocesses,
    as always): its exit status and what it printed."""
    printed = io.StringIO()
    with working_directory(folder), contextlib.redirect_stdout(printed):
        code = sweep.main(sweep.parse_args(list(flags)))
    return code, printed.getvalue()


@contextlib.contextmanager
def working_directory(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def table_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def same_weights(mine: Path, theirs: Path) -> bool:
    """Whether two checkpoints hold bit-identical weights."""
    a, b = weights(mine), weights(theirs)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
