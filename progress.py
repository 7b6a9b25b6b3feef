"""Progress on the console: tqdm bars on a terminal, plain lines in a log.

A bar redraws itself with carriage returns and cursor moves several times a second: on a terminal that is
one line updated in place, but a log file (`> train.log 2>&1`, `| tee`, a study's job) keeps every redraw,
and nested bars become one unreadable line. So bars are drawn only when both stdout and stderr are
terminals; otherwise the scripts' own lines (one per epoch, checkpoint or measured step) are the progress.
"""
import sys
from typing import Iterable

from tqdm import tqdm


def on_terminal() -> bool:
    """Whether progress bars are drawn: stdout and stderr both terminals (a redirected one is a log)."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def bar(iterable: Iterable | None = None, shown: bool = True, **options) -> tqdm:
    """A tqdm bar (tqdm's `options`), drawn on a terminal only: elsewhere, or without `shown` (a process
    other than torchrun's first), a disabled one, which iterates and counts but writes nothing."""
    return tqdm(iterable, dynamic_ncols=True, disable=not (shown and on_terminal()), **options)


def say(text: str, file=None) -> None:
    """Print a line (to stdout, or `file`): above the bars on a terminal, as it is in a log."""
    tqdm.write(text, file=file)
