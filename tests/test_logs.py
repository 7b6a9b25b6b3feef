"""What the scripts print as they go: redirected to a file (a log), one line per epoch, checkpoint or measured
step and not a carriage return; on a terminal (a pseudo-terminal here), tqdm's bars."""
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import progress
import runs
from conftest import ONE_THREAD, tiny_flags

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags(4, 3)


def run_on_a_terminal(command: list[str], cwd: Path = REPO) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal (40 rows of 200 columns) as its stdout and stderr: its exit status
    and everything it wrote there."""
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, env=ONE_THREAD, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal)
    os.close(terminal)
    written = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the command (and whatever else held the terminal) has closed it
            break
        if not chunk:
            break
        written.append(chunk)
    os.close(master)
    return process.wait(), b"".join(written).decode(errors="replace")


def run_into_a_file(log: Path, script: str, *flags: str) -> str:
    """Run the script with its stdout and stderr redirected to the file `log`, as `> log 2>&1` does; the file."""
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=log.parent, env=ONE_THREAD,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()
    return log.read_bytes().decode()  # not read_text, which would turn a carriage return into a newline


def lines_starting(text: str, start: str) -> list[str]:
    """The lines of `text` that begin with `start`, a carriage return (a terminal's bar redrawn) ending one too."""
    return [line for line in re.split("[\r\n]", text) if line.startswith(start)]


def test_bars_are_drawn_only_when_stdout_and_stderr_are_both_terminals(monkeypatch):
    master, terminal = os.openpty()
    with open(terminal, "w") as tty, open(os.devnull, "w") as log:
        for stdout, stderr, drawn in [(tty, tty, True), (tty, log, False), (log, tty, False), (log, log, False)]:
            monkeypatch.setattr(sys, "stdout", stdout)
            monkeypatch.setattr(sys, "stderr", stderr)
            assert progress.on_terminal() is drawn
            with progress.bar(range(3), file=log) as bar:
                assert bar.disable is not drawn
            with progress.bar(range(3), shown=False, file=log) as bar:
                assert bar.disable  # a process other than torchrun's first never draws
    os.close(master)


@pytest.mark.slow
def test_redirected_the_scripts_write_one_line_per_epoch_checkpoint_and_step_and_no_carriage_return(tmp_path):
    trained = run_into_a_file(tmp_path / "train.log", "train.py", *TINY, "--run-dir", "run")
    assert "\r" not in trained
    assert [line.split()[1] for line in lines_starting(trained, "epoch ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert trained.endswith("python validate_nc.py --run-dir run\n")

    measured = run_into_a_file(tmp_path / "validate.log", "validate_nc.py", "--run-dir", "run", "--device", "cpu")
    assert "\r" not in measured
    epochs = [row["epoch"] for row in runs.read_nc_metrics(tmp_path / "run")]
    assert len(epochs) == 3
    assert [int(line.split()[1].rstrip(":")) for line in lines_starting(measured, "checkpoint ")] == epochs

    stepped = run_into_a_file(tmp_path / "ufm.log", "ufm.py", "--classes", "3", "--dim", "4", "--per-class", "5",
                              "--steps", "40", "--num-checkpoints", "6", "--device", "cpu", "--run-dir", "ufm")
    assert "\r" not in stepped
    logged = [row["epoch"] for row in runs.read_log(tmp_path / "ufm")]  # its `epoch` column counts steps
    assert len(logged) == 6
    assert [line.split()[1] for line in lines_starting(stepped, "step ")] == [f"{step}/40" for step in logged]


@pytest.mark.slow
def test_on_a_terminal_training_draws_its_bars_and_still_writes_its_lines(tmp_path):
    code, drawn = run_on_a_terminal([sys.executable, str(REPO / "train.py"), *TINY, "--run-dir", "run"], tmp_path)
    assert code == 0, drawn
    assert "4/4 [" in drawn and "epoch/s" in drawn and "batch/s" in drawn  # the epochs' bar and the batches'
    assert len(lines_starting(drawn, "epoch ")) == 4
