"""Run train.py in this process and SIGKILL it at a chosen moment, as a pre-empted job dies.

    python tests/kill_harness.py steps N TRAIN_ARGS...   # killed right after the N-th optimizer step, the
                                                         # files of the epochs before it written
    python tests/kill_harness.py save N TRAIN_ARGS...    # killed half-way through writing the N-th file
                                                         # torch.save writes
    python tests/kill_harness.py pause N TRAIN_ARGS...   # as `steps`, but stopped (SIGSTOP) until sent SIGCONT

Nothing of train.py is changed: the harness wraps torch's optimizer step and torch.save, which is
where a real kill lands (in the middle of an epoch, or while a checkpoint is being written). train.py
writes an epoch's files on a background thread while the next epoch trains; a kill in the middle of
an epoch waits for that thread first, so that the test knows which last.pt the kill leaves (a kill
while the thread writes is the `save` mode).
"""
import io
import os
import signal
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runs  # noqa: E402
import train  # noqa: E402
from errors import run_cli  # noqa: E402


def kill_after(calls: int, before_dying=lambda *args: None, sent: signal.Signals = signal.SIGKILL):
    """A wrapper factory: the wrapped function runs normally until its `calls`-th call, which runs
    `before_dying` with the call's arguments and then sends the process `sent` (SIGKILL: it dies there;
    SIGSTOP: it goes on once continued)."""
    seen = 0

    def wrap(function):
        def wrapped(*args, **kwargs):
            nonlocal seen
            seen += 1
            if seen == calls:
                before_dying(function, *args, **kwargs)
                os.kill(os.getpid(), sent)
            return function(*args, **kwargs)
        return wrapped
    return wrap


def files_written(*args, **kwargs):
    """Wait for train.py's background writes of the epochs before this one to finish."""
    for thread in threading.enumerate():
        if thread.name == runs.WRITER_THREAD:
            thread.join()


def write_half(save, state, file, *args, **kwargs):
    """Write the first half of the file torch.save would write (to a path or an open file), as a kill during
    the write leaves it."""
    buffer = io.BytesIO()
    save(state, buffer)
    half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
    if isinstance(file, (str, os.PathLike)):
        Path(file).write_bytes(half)
    else:
        file.write(half)
        file.flush()


if __name__ == "__main__":
    mode, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if mode in ("steps", "pause"):
        sent = signal.SIGKILL if mode == "steps" else signal.SIGSTOP
        torch.optim.SGD.step = kill_after(count, files_written, sent)(torch.optim.SGD.step)
    else:
        torch.save = kill_after(count, write_half)(torch.save)
    sys.argv = ["train.py", *argv]
    sys.exit(run_cli(train.main, train.parse_args))
