"""Integrity: changed bytes are caught before they are used, a file's name never outweighs what it holds,
nothing is written through a symbolic link or into another run, only this repository's temporary files
are cleaned up, runs of other lengths never share a folder, and the last tracebacks are one line."""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import runs
import train
import validate_nc
from errors import UserError
from conftest import command, one_line_error, tiny_flags, validate

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags()
LOCKS = (runs.TRAIN_LOCK, runs.TABLES_LOCK)




def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the locks aside, which hold the id of their last holder) and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in LOCKS}


def flip_bytes(path: Path) -> None:
    """XOR 64 bytes in the middle of the largest record of a checkpoint's archive: a tensor's values."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2 - 32
    data[middle:middle + 64] = bytes(byte ^ 0xFF for byte in data[middle:middle + 64])
    path.write_bytes(data)



@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("once") / "run"
    assert train.main(train.parse_args([*TINY, "--run-dir", str(run_dir)])) == 0
    return run_dir


@pytest.fixture
def trained(trained_once, tmp_path) -> Path:
    """A copy of a finished 2-epoch run (checkpoints of epochs 1 and 2), its own to damage."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


# ------------------------------------------------------------------ 1-3: what a file holds decides

def test_flipped_bytes_in_last_pt_are_reported_as_corrupt_and_nothing_resumes(trained):
    flip_bytes(trained / "last.pt")
    before = snapshot(trained)
    with pytest.raises(UserError, match=r"last\.pt is corrupt \(Bad CRC-32 for file .*: its bytes changed after"):
        train.main(train.parse_args([*TINY, "--run-dir", str(trained)]))
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_checkpoint_with_flipped_bytes_is_skipped_and_validation_exits_1(trained, capsys):
    flip_bytes(runs.checkpoint_path(trained, 1))
    assert validate(trained) == 1
    assert "epoch_0001.pt is corrupt (Bad CRC-32" in capsys.readouterr().err
    assert [row["epoch"] for row in runs.read_nc_metrics(trained)] == [2]


@pytest.mark.slow
def test_a_checkpoint_under_another_epochs_name_is_skipped(trained, capsys):
    shutil.copy(runs.checkpoint_path(trained, 1), runs.checkpoint_path(trained, 99))
    assert validate(trained) == 1
    assert "epoch_0099.pt holds the checkpoint of epoch 1, not of epoch 99 as its name says" in capsys.readouterr().err
    assert [row["epoch"] for row in runs.read_nc_metrics(trained)] == [1, 2]


@pytest.mark.slow
def test_a_last_pt_ahead_of_the_log_is_refused(tmp_path):
    """A run of 4 epochs killed in epoch 3 holds last.pt and log.csv of epoch 2; the last.pt of epoch 4 of an
    identical run, copied in, would resume over the gap and leave checkpoints 3 and 4 unwritten."""
    flags = [*TINY, "--epochs", "4", "--num-checkpoints", "4"]
    stopped, finished = tmp_path / "stopped", tmp_path / "finished"
    killed = command("tests/kill_harness.py", "steps", "5", *flags, "--run-dir", str(stopped))
    assert killed.returncode == -9 and runs.load_checkpoint(stopped / "last.pt")["epoch"] == 2
    assert train.main(train.parse_args([*flags, "--run-dir", str(finished)])) == 0
    shutil.copy(finished / "last.pt", stopped / "last.pt")
    before = snapshot(stopped)
    result = command("train.py", *flags, "--run-dir", str(stopped))
    assert "last.pt is of epoch 4, but log.csv holds epochs up to 2 only" in one_line_error(result)
    assert snapshot(stopped) == before


# ------------------------------------------------------------------ 4-5: the flags decide, and the name says them

@pytest.mark.parametrize("milestones, message", [
    ([7], "config.json describes another run than the flags (lr_milestones: [7] -> [1]) and nothing has been trained"),
    (None, "config.json is corrupt (invalid settings: lr_milestones = None)"),
    (5, "config.json is corrupt (invalid settings: lr_milestones = 5)"),
])
@pytest.mark.slow
def test_without_last_pt_a_config_json_that_contradicts_the_flags_is_refused(trained, milestones, message):
    """Nothing was trained (no last.pt), but the folder's config.json names another schedule: the flags
    are not silently replaced by it, and an odd value is one line, not a traceback."""
    settings = json.loads((trained / "config.json").read_text())
    for path in [*trained.iterdir(), *trained.glob("checkpoints/*")]:
        if path.name != "config.json" and path.is_file():
            path.unlink()
    (trained / "config.json").write_text(json.dumps({**settings, "lr_milestones": milestones}))
    before = snapshot(trained)
    result = command("train.py", *TINY, "--run-dir", str(trained))
    assert message in one_line_error(result)
    assert snapshot(trained) == before


@pytest.mark.slow
def test_runs_of_other_lengths_have_their_own_folders_and_validate_finds_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", "synthetic", "--width", "4", "--samples-per-class", "20", "--device", "cpu"]
    assert train.main(train.parse_args([*flags, "--epochs", "1", "--num-checkpoints", "1"])) == 0
    assert train.main(train.parse_args([*flags, "--epochs", "2", "--num-checkpoints", "1"])) == 0
    short = tmp_path / "runs/synthetic-resnet18-ce-seed0-w4-spc20-ep1"
    longer = tmp_path / "runs/synthetic-resnet18-ce-seed0-w4-spc20-ep2"
    assert [row["epoch"] for row in runs.read_log(short)] == [1]
    assert [row["epoch"] for row in runs.read_log(longer)] == [1, 2]
    assert validate_nc.main(validate_nc.parse_args([*flags, "--epochs", "1"])) == 0
    assert [row["epoch"] for row in runs.read_nc_metrics(short)] == [1] and not runs.read_nc_metrics(longer)


def test_another_epochs_on_a_folder_is_refused_and_extending_is_explicit(trained, capsys):
    before = snapshot(trained)
    with pytest.raises(UserError, match=r"other settings \(lr_milestones: \[1\] -> \[1, 2\]; epochs: 2 -> 3\);.*"
                                        "add --extend-to E"):
        train.main(train.parse_args([*TINY, "--epochs", "3", "--run-dir", str(trained)]))
    with pytest.raises(UserError, match="holds a run of 2 epochs, which --extend-to 1 would shorten"):
        train.main(train.parse_args([*TINY, "--extend-to", "1", "--run-dir", str(trained)]))
    assert snapshot(trained) == before
    capsys.readouterr()
    assert train.main(train.parse_args([*TINY, "--extend-to", "3", "--run-dir", str(trained)])) == 0
    assert "extending it from 2 to 3 epochs (--extend-to), with its learning-rate milestones kept (1)" in \
        capsys.readouterr().out
    settings = json.loads((trained / "config.json").read_text())
    assert (settings["epochs"], settings["extended_from"], settings["lr_milestones"]) == (3, [2], [1])
    assert [row["epoch"] for row in runs.read_log(trained)] == [1, 2, 3]
    assert train.main(train.parse_args([*TINY, "--run-dir", str(trained)])) == 0  # the original command: done
    assert [row["epoch"] for row in runs.read_log(trained)] == [1, 2, 3]


def test_extend_to_needs_a_trained_run(tmp_path):
    with pytest.raises(UserError, match="--extend-to trains a run on, but .* has none trained yet"):
        train.main(train.parse_args([*TINY, "--extend-to", "4", "--run-dir", str(tmp_path / "new")]))
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 6-7: symbolic links and foreign files

@pytest.mark.slow
def test_a_lock_file_linked_to_another_file_is_not_written_through(trained, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (trained / runs.TRAIN_LOCK).unlink()
    (trained / runs.TRAIN_LOCK).symlink_to(precious)
    result = command("train.py", *TINY, "--run-dir", str(trained))
    assert ".train.lock is a symbolic link, which is never written through" in one_line_error(result)
    (trained / runs.TABLES_LOCK).unlink(missing_ok=True)
    (trained / runs.TABLES_LOCK).symlink_to(precious)
    result = command("validate_nc.py", "--run-dir", str(trained), "--device", "cpu", "--plots-dir", str(tmp_path / "p"))
    assert ".tables.lock is a symbolic link" in one_line_error(result)
    assert precious.read_text() == "keep me" and not (trained / "nc_metrics.csv").exists()


def test_a_temporary_name_taken_by_a_link_is_not_written_through(tmp_path, monkeypatch):
    """Were a temporary file's name guessed and a link planted there, the write fails instead of following it."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    monkeypatch.setattr("secrets.token_hex", lambda size: "0" * 2 * size)
    for name in (f"config.json.{os.getpid()}.tmp", f"config.json.{os.getpid()}.{'0' * 16}.tmp"):
        (tmp_path / name).symlink_to(precious)
    with pytest.raises(UserError, match=r"could not write .*config\.json: File exists"):
        runs.write_text(tmp_path / "config.json", "{}")
    assert precious.read_text() == "keep me" and not (tmp_path / "config.json").exists()


def test_a_checkpoints_folder_linked_out_of_the_run_is_refused(trained, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (trained / "checkpoints").rename(elsewhere)
    (trained / "checkpoints").symlink_to(elsewhere)
    left = elsewhere / f"epoch_0003.pt.{_dead_pid()}.tmp"
    left.write_text("not the run's to delete")
    before = snapshot(elsewhere)
    with pytest.raises(UserError, match=r"checkpoints is a symbolic link to .*elsewhere, outside the run folder"):
        train.main(train.parse_args([*TINY, "--run-dir", str(trained)]))
    assert snapshot(elsewhere) == before


def test_only_temporary_files_this_repository_named_are_cleaned_up(trained):
    dead = _dead_pid()
    mine = ["notes.tmp", "checkpoints/readme.tmp", f"draft.{dead}.tmp", f"checkpoints/readme.txt.{dead}.tmp"]
    for name in mine:
        (trained / name).write_text("a user's file")
    left = [trained / f"log.csv.{dead}.tmp", trained / f"last.pt.{dead}.0123456789abcdef.tmp",
            trained / f"checkpoints/epoch_0002.pt.{dead}.0123456789abcdef.tmp"]
    for path in left:
        path.write_text("cut")
    assert train.main(train.parse_args([*TINY, "--run-dir", str(trained)])) == 0
    assert all((trained / name).read_text() == "a user's file" for name in mine)
    assert not any(path.exists() for path in left)


# ------------------------------------------------------------------ 10-17: one line, exit 2, nothing written

@pytest.mark.parametrize("script", ["train.py", "validate_nc.py"])
@pytest.mark.slow
def test_a_run_dir_name_too_long_for_the_file_system_is_one_line(tmp_path, script):
    result = command(script, "--dataset", "synthetic", "--device", "cpu", "--run-dir", str(tmp_path / ("x" * 300)))
    assert "File name too long; choose a shorter name" in one_line_error(result)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_new_run_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path):
    result = command("train.py", *TINY, "--run-dir", str(tmp_path / "run"), file_size_limit=0)
    assert f"cannot use {tmp_path / 'run'} as a run folder (File too large" in one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_says_why_in_the_operating_systems_words(tmp_path):
    result = command("train.py", *TINY, "--run-dir", str(tmp_path / "run"), file_size_limit=100_000)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "inline_container" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("epoch_0001.pt: File too large; raise the file-size "
                                                           "limit (ulimit -f), then run the same command again")
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_validation_where_the_lock_file_should_be_a_folder_is_one_line(trained, tmp_path):
    (trained / runs.TABLES_LOCK).unlink(missing_ok=True)
    (trained / runs.TABLES_LOCK).mkdir()
    before = snapshot(trained)
    result = command("validate_nc.py", "--run-dir", str(trained), "--device", "cpu", "--plots-dir", str(tmp_path / "p"))
    assert "cannot lock" in one_line_error(result) and "Is a directory" in result.stderr
    assert snapshot(trained) == before and not (tmp_path / "p").exists()


def test_validation_of_a_read_only_run_folder_is_one_line_before_measuring(trained, tmp_path, monkeypatch):
    """A read-only file system answers every open for writing with EROFS, whoever asks."""
    opening = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).is_relative_to(trained) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return opening(path, flags, *args, **kwargs)

    before = snapshot(trained)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match=r"cannot lock .*\.tables\.lock \(Read-only file system; make the folder"):
        validate(trained)
    assert snapshot(trained) == before and not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_plots_dir_under_a_file_is_one_line_before_measuring(trained, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = command("validate_nc.py", "--run-dir", str(trained), "--device", "cpu",
                     "--plots-dir", str(tmp_path / "a_file" / "plots"))
    assert "a_file is a file, not a folder; pass --plots-dir" in one_line_error(result)
    assert not (trained / "nc_metrics.csv").exists()


@pytest.mark.slow
def test_a_last_pt_whose_config_lacks_settings_is_one_line(trained):
    (trained / "config.json").unlink()
    state = torch.load(trained / "last.pt", weights_only=True)
    del state["config"]["lr_milestones"]
    torch.save(state, trained / "last.pt")
    before = snapshot(trained)
    result = command("train.py", *TINY, "--run-dir", str(trained))
    assert "last.pt is not a checkpoint written by train.py (settings missing: lr_milestones)" in one_line_error(result)
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_config_json_naming_an_unknown_dataset_is_one_line_in_validation(trained, tmp_path):
    settings = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**settings, "dataset": "imagenet"}))
    before = snapshot(trained)
    result = command("validate_nc.py", "--run-dir", str(trained), "--device", "cpu", "--plots-dir", str(tmp_path / "p"))
    assert "config.json is corrupt (invalid settings: dataset = 'imagenet')" in one_line_error(result)
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_network_too_large_for_memory_is_one_line(tmp_path):
    """Width 100000 asks for 360 GB in one tensor of a ResNet-18's first stage."""
    result = command("train.py", *TINY, "--width", "100000", "--run-dir", str(tmp_path / "run"))
    assert "a resnet18 of width 100000 does not fit in memory" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def _dead_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)
