"""One writer per run folder, resumes that check what they resume, and one line (never a traceback) for
anything a user can cause: concurrent starts, damaged or foreign folders, bad flags, cut tables."""
import contextlib
import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import runs
import train
import validate_nc
from errors import UserError
from conftest import command, one_line_error, start, tiny_flags

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags()



def wait_for_lock(run_dir: Path, process: subprocess.Popen) -> None:
    """Until `process` has written its id into the run folder's training lock (it then holds it)."""
    deadline = time.monotonic() + 120
    while f"process {process.pid} " not in _read(run_dir / runs.TRAIN_LOCK):
        assert process.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)



# ------------------------------------------------------------------ one writer per run folder

@pytest.mark.slow
def test_a_second_train_on_a_folder_being_trained_is_refused_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    first = start("train.py", *TINY, "--epochs", "40", "--num-checkpoints", "2", "--lr", "0.05",
                  "--run-dir", str(run_dir))
    try:
        wait_for_lock(run_dir, first)
        before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
        second = command("train.py", *TINY, "--epochs", "40", "--num-checkpoints", "2", "--lr", "0.01",
                         "--run-dir", str(run_dir))
        line = one_line_error(second)
        assert str(run_dir) in line and f"process {first.pid}" in line
        touched = [path for path, stamp in before.items() if path.exists() and path.stat().st_mtime_ns != stamp
                   and path.name in (runs.TRAIN_LOCK, "config.json")]
        assert not touched
    finally:
        assert first.wait(timeout=600) == 0, first.stderr.read()
    settings = json.loads((run_dir / "config.json").read_text())
    last = runs.load_checkpoint(run_dir / "last.pt")
    assert settings["lr"] == last["config"]["lr"] == 0.05 and last["epoch"] == 40
    assert [row["epoch"] for row in runs.read_log(run_dir)] == list(range(1, 41))


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    first = start("train.py", *TINY, "--epochs", "40", "--run-dir", str(run_dir))
    wait_for_lock(run_dir, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    again = command("train.py", *TINY, "--epochs", "40", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert runs.load_checkpoint(run_dir / "last.pt")["epoch"] == 40


def test_a_new_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    with pytest.raises(UserError, match="at most 100 per class"):
        train.main(train.parse_args([*TINY, "--samples-per-class", "101", "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_leftovers_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"log.csv.{dead.stdout.strip()}.tmp").write_text("cut")
    alive = tmp_path / f"nc_metrics.csv.{os.getppid()}.tmp"
    alive.write_text("being written")
    assert [path.name for path in runs.remove_leftovers(tmp_path)] == [f"log.csv.{dead.stdout.strip()}.tmp"]
    assert alive.exists()


# ------------------------------------------------------------------ resume checks what it resumes

@pytest.fixture
def trained(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(train.parse_args([*TINY, "--run-dir", str(run_dir)])) == 0
    return run_dir


@pytest.mark.parametrize("damage", ["delete", "null", "empty", "[1, 2]", "binary"])
def test_without_a_usable_config_json_last_pt_decides_what_may_resume(trained, damage):
    path = trained / "config.json"
    original = path.read_text()
    contents = {"null": "null", "empty": "{}", "[1, 2]": "[1, 2]", "binary": b"\x80\x81\xfe\xff"}.get(damage)
    if damage == "delete":
        path.unlink()
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        path.write_text(contents)
    state = path.read_bytes() if path.exists() else None
    with pytest.raises(UserError, match=r"other settings \(lr: 0\.0679 -> 0\.01\)"):
        train.main(train.parse_args([*TINY, "--lr", "0.01", "--run-dir", str(trained)]))
    assert (path.read_bytes() if path.exists() else None) == state  # nothing written
    assert train.main(train.parse_args([*TINY, "--run-dir", str(trained)])) == 0  # the original command
    assert json.loads(path.read_text()) == json.loads(original)


def test_a_last_pt_of_another_run_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    train.main(train.parse_args([*TINY, "--seed", "1", "--run-dir", str(other)]))
    (trained / "last.pt").write_bytes((other / "last.pt").read_bytes())
    with pytest.raises(UserError, match=r"last\.pt and config\.json belong to different runs \(seed: 1 -> 0;"):
        train.main(train.parse_args([*TINY, "--run-dir", str(trained)]))


@pytest.mark.slow
def test_a_last_pt_of_another_width_is_one_line(trained, tmp_path):
    other = tmp_path / "wide"
    train.main(train.parse_args([*TINY, "--width", "8", "--run-dir", str(other)]))
    state = runs.load_checkpoint(trained / "last.pt")
    state["model"] = runs.load_checkpoint(other / "last.pt")["model"]  # a width-8 network in a width-4 run
    torch.save(state, trained / "last.pt")
    before = (trained / "config.json").read_text()
    result = command("train.py", *TINY, "--run-dir", str(trained))
    assert "last.pt does not fit this run's network" in one_line_error(result)
    assert (trained / "config.json").read_text() == before


def test_a_failed_extension_leaves_the_folder_as_it_was(trained):
    before = {path.name: path.read_bytes() for path in trained.iterdir() if path.is_file()}
    with pytest.raises(UserError, match="--lr-milestones 5 is beyond the last epoch"):
        train.main(train.parse_args([*TINY, "--extend-to", "3", "--lr-milestones", "5", "--run-dir", str(trained)]))
    assert {path.name: path.read_bytes() for path in trained.iterdir() if path.is_file()} == before


# ------------------------------------------------------------------ divergence and a full disk

def test_a_nan_test_loss_stops_the_run_before_that_epoch_is_saved(tmp_path):
    """At --lr 1e4 the training loss of epoch 1 is still finite; the network it leaves gives NaN on the test set."""
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"diverged in epoch 1 \(loss [0-9.e+]+, test loss nan\).*--lr 5000"):
        train.main(train.parse_args([*TINY, "--lr", "1e4", "--run-dir", str(run_dir)]))
    assert not (run_dir / "last.pt").exists() and not list(run_dir.glob("checkpoints/*"))


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_files(trained, monkeypatch):
    """The disk fills after the first 100 bytes of a checkpoint: the operating system's reason is shown,
    not the "[enforce fail at inline_container.cc]" of torch's zip writer, which meets the failed write."""
    previous = (trained / "last.pt").read_bytes()
    save = torch.save

    class FullDisk(io.RawIOBase):
        def __init__(self, file):
            self.file, self.room = file, 100

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.file.write(data)

    def disk_full(state, file, *args, **kwargs):
        with contextlib.ExitStack() as opened:
            if isinstance(file, (str, os.PathLike)):
                file = opened.enter_context(open(file, "wb"))
            save(state, FullDisk(file), *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"could not write .*epoch_0003\.pt: No space left on device; free some space"):
        train.main(train.parse_args([*TINY, "--extend-to", "3", "--num-checkpoints", "1", "--run-dir", str(trained)]))
    assert (trained / "last.pt").read_bytes() == previous
    assert not list(trained.rglob("*.tmp"))


# ------------------------------------------------------------------ bad input: one line, exit 2

@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "argument --seed: must lie in 0 .. 2**32 - 1, got -1"),
    (["--seed", str(2 ** 32)], "argument --seed: must lie in 0 .. 2**32 - 1"),
    (["--lr", "inf"], "argument --lr: must be a positive finite number, got inf"),
    (["--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
    (["--lr-milestones", "3", "1"], "--lr-milestones 3 1: give each epoch once, in increasing order"),
    (["--lr-milestones", "1", "1"], "--lr-milestones 1 1: give each epoch once, in increasing order"),
    (["--lr-milestones", "500"], "--lr-milestones 500 is beyond the last epoch (30)"),
    (["--run-dir", "{tmp}/file.txt/run"], "file.txt is a file, not a folder"),
    (["--run-dir", "{tmp}/folder"], "folder/checkpoints is a file, not a folder"),
    (["--run-dir", "{tmp}/partial"], "config.json is corrupt (settings missing: dataset"),
])
@pytest.mark.slow
def test_bad_train_input_is_one_line(tmp_path, flags, message):
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "checkpoints").write_text("a file")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text('{"lr": 0.1}')
    result = command(str(REPO / "train.py"), "--dataset", "synthetic", "--device", "cpu",
                     *(flag.format(tmp=tmp_path) for flag in flags), cwd=tmp_path)
    assert message in one_line_error(result)


def write_cifar10(root: Path, labels: list[int], test_count: int = 20) -> Path:
    """A small CIFAR-10 copy in the published python layout: train images of the given labels split over
    the five batches, and a test batch cycling through the classes."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    parts = np.array_split(np.array(labels), 5)
    for index, part in enumerate([*parts, np.arange(test_count) % 10]):
        name = f"data_batch_{index + 1}" if index < 5 else "test_batch"
        data = rng.integers(0, 256, (len(part), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": part.tolist()}, protocol=4))
    return root


def test_an_unreadable_data_file_is_one_line(tmp_path, monkeypatch):
    root = write_cifar10(tmp_path / "data", list(range(10)) * 2)
    locked = root / "cifar-10-batches-py" / "data_batch_1"

    def refusing_open(path, *args, **kwargs):  # the operating system's answer for a file without read permission
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "open", refusing_open, raising=False)
    with pytest.raises(UserError, match=rf"cannot read {locked} \(Permission denied\); fix its permissions"):
        train.main(train.parse_args(["--dataset", "CIFAR10", "--data-root", str(root), "--device", "cpu",
                                     "--run-dir", str(tmp_path / "run")]))


def test_a_dataset_missing_a_class_is_one_line_when_validating(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SPLIT_SIZES, "CIFAR10", (30, 20))  # the copies below stand for the full splits
    complete = write_cifar10(tmp_path / "complete", list(range(10)) * 3)
    flags = ["--dataset", "CIFAR10", "--width", "4", "--epochs", "1", "--num-checkpoints", "1", "--device", "cpu",
             "--run-dir", str(tmp_path / "run")]
    assert train.main(train.parse_args([*flags, "--data-root", str(complete)])) == 0
    without_nine = write_cifar10(tmp_path / "without9", list(range(9)) * 3 + [0, 1, 2])
    with pytest.raises(UserError, match=r"has no images of class\(es\) 9; every class needs some"):
        validate_nc.main(validate_nc.parse_args(["--run-dir", str(tmp_path / "run"), "--device", "cpu",
                                                 "--data-root", str(without_nine)]))


# ------------------------------------------------------------------ cut tables

def test_a_log_row_cut_mid_number_is_left_out_with_a_warning(trained, capsys):
    text = (trained / "log.csv").read_text()
    (trained / "log.csv").write_text(text.rstrip("\n")[:-3])  # cut mid-number: what is left still parses
    assert [row["epoch"] for row in runs.read_log(trained)] == [1]
    assert f"{trained / 'log.csv'}, line 3: " in capsys.readouterr().err


def test_a_log_with_a_cut_header_or_extra_fields_is_not_read_as_data(trained, capsys):
    header, *rows = (trained / "log.csv").read_text().splitlines()
    (trained / "log.csv").write_text("\n".join([header[:20], *rows]) + "\n")
    assert runs.read_log(trained) == []
    assert "its header lacks" in capsys.readouterr().err
    (trained / "log.csv").write_text("\n".join([header, rows[0] + ",7", rows[1].replace("0.", "x.", 1)]) + "\n")
    assert runs.read_log(trained) == []
    err = capsys.readouterr().err
    assert "line 2: it has another number of fields" in err and "line 3: could not convert" in err


@pytest.mark.slow
def test_a_cut_value_in_nc_metrics_is_measured_again(trained):
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(trained), "--device", "cpu",
                                                    "--plots-dir", str(trained.parent / "plots")])) == 0
    good = runs.read_nc_metrics(trained)
    (trained / "nc_metrics.csv").write_text((trained / "nc_metrics.csv").read_text().rstrip("\n")[:-5])
    assert [row["epoch"] for row in runs.read_nc_metrics(trained)] == [1]
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(trained), "--device", "cpu",
                                                    "--plots-dir", str(trained.parent / "plots")])) == 0
    assert runs.read_nc_metrics(trained) == good


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
