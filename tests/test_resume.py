"""Reliability and safety: a run killed at any moment resumes to the run it would have been, files are
never half-written, checkpoints cannot run code, and every user error is one line and a non-zero exit."""
import copy
import errno
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import config
import errors
import runs
import train
from errors import UserError
from conftest import command, tiny_flags, without_seconds, ONE_THREAD

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags(4, 3, 20, "--deterministic")
# 200 images in batches of 128: two optimizer steps per epoch. Saves per epoch: the analysis
# checkpoint (epochs 1, 2, 4) and last.pt.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert command("train.py", *TINY, "--run-dir", str(run_dir)).returncode == 0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode, count", [
    ("steps", 3),  # in the middle of epoch 2
    ("steps", 4),  # after the last step of epoch 2, before its evaluation and files
    ("save", 4),   # while writing epoch 2's last.pt, its analysis checkpoint already written
    ("save", 3),   # while writing epoch 2's analysis checkpoint
])
def test_a_killed_run_resumes_to_the_uninterrupted_one(uninterrupted, tmp_path, mode, count):
    run_dir = tmp_path / "run"
    killed = command("tests/kill_harness.py", mode, str(count), *TINY, "--run-dir", str(run_dir))
    assert killed.returncode == -9, killed.stderr
    assert runs.load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # the previous last.pt is intact
    resumed = command("train.py", *TINY, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    assert not list(run_dir.rglob("*.tmp"))
    assert without_seconds(runs.read_log(run_dir)) == without_seconds(runs.read_log(uninterrupted))
    for name in ["last.pt", *(f"checkpoints/epoch_{epoch:04d}.pt" for epoch in (1, 2, 4))]:
        expected = torch.load(uninterrupted / name, weights_only=True)["model"]
        got = torch.load(run_dir / name, weights_only=True)["model"]
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == \
        ["epoch_0001.pt", "epoch_0002.pt", "epoch_0004.pt"]


@pytest.mark.slow
def test_last_pt_at_the_checkpoints_only_resumes_to_the_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = command("tests/kill_harness.py", "steps", "7", *TINY, "--save-last", "checkpoint",
                     "--run-dir", str(run_dir))  # at the first step of epoch 4, epoch 3's files written
    assert killed.returncode == -9, killed.stderr
    assert runs.load_checkpoint(run_dir / "last.pt")["epoch"] == 2  # epoch 3 has no analysis checkpoint
    assert runs.read_log(run_dir)[-1]["epoch"] == 3
    resumed = command("train.py", *TINY, "--save-last", "checkpoint", "--run-dir", str(run_dir))
    assert resumed.returncode == 0 and "resuming after epoch 2" in resumed.stdout, resumed.stderr
    assert without_seconds(runs.read_log(run_dir)) == without_seconds(runs.read_log(uninterrupted))
    expected = torch.load(uninterrupted / "last.pt", weights_only=True)["model"]
    got = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.slow
@pytest.mark.parametrize("save_last", ["epoch", "checkpoint"])
def test_sigterm_stops_after_the_epoch_in_progress_with_its_files_and_the_run_resumes(tmp_path, save_last):
    flags = [*TINY, "--epochs", "12", "--num-checkpoints", "2", "--save-last", save_last]
    reference = tmp_path / "reference"
    assert command("train.py", *flags, "--run-dir", str(reference)).returncode == 0
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags, "--run-dir", str(run_dir)],
                               env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not runs.read_log(run_dir) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == errors.STOPPED, stderr
    stopped = runs.read_log(run_dir)[-1]["epoch"]
    assert 1 <= stopped < 12 and f"stopped by SIGTERM after epoch {stopped} of 12" in stdout
    assert runs.load_checkpoint(run_dir / "last.pt")["epoch"] == stopped
    resumed = command("train.py", *flags, "--run-dir", str(run_dir))
    assert resumed.returncode == 0 and f"resuming after epoch {stopped}" in resumed.stdout, resumed.stderr
    expected = torch.load(reference / "last.pt", weights_only=True)["model"]
    got = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.slow
def test_a_kill_while_writing_leaves_the_previous_file_readable(tmp_path):
    run_dir = tmp_path / "run"
    killed = command("tests/kill_harness.py", "save", "2", *TINY, "--epochs", "1", "--run-dir", str(run_dir))
    assert killed.returncode == -9
    assert not (run_dir / "last.pt").exists() and list(run_dir.glob("last.pt.*.tmp"))
    assert runs.load_checkpoint(runs.checkpoint_path(run_dir, 1))["epoch"] == 1


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    settings = {**config.resolve_config(train.parse_args(TINY)), "samples_per_class": 20, "data_root": "data"}
    runs.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": settings, "epoch": 1})

    def disk_full(state, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="could not write .*last.pt: No space left on device; free some space"):
        runs.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": settings, "epoch": 2})
    assert runs.load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_background_writes_leave_the_training_thread_and_run_in_order_one_at_a_time(tmp_path):
    released, written = threading.Event(), []

    def write(name: str, wait_for: threading.Event | None = None) -> None:
        assert wait_for is None or wait_for.wait(timeout=60)  # a writer in the training thread would hang here
        assert len(written) == len(list(tmp_path.iterdir()))  # the previous job's file is complete
        runs.write_text(tmp_path / name, name)
        written.append(name)

    with runs.background_writer() as writer:
        writer.submit(write, "first", released)
        released.set()  # reached only because submit returned before the job ended
        writer.submit(write, "second")
    assert written == ["first", "second"]
    assert (tmp_path / "second").read_text() == "second"


def test_a_failed_background_write_is_raised_at_the_next_hand_over_and_what_follows_is_not_written(tmp_path):
    def full_disk() -> None:
        raise UserError("could not write last.pt: No space left on device")

    writer = runs.BackgroundWriter()
    writer.submit(full_disk)
    with pytest.raises(UserError, match="No space left"):
        writer.submit(runs.write_text, tmp_path / "next", "next")
    assert not (tmp_path / "next").exists()
    writer.wait()  # the error was reported once


def test_the_state_handed_to_the_writer_is_a_copy_that_the_next_epoch_cannot_change(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4])

    def step() -> None:
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        scheduler.step()

    step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    before = copy.deepcopy(state)
    copied = train._host_copy(state)
    step()  # the weights, running statistics and momentum change in place
    assert not torch.equal(state["model"]["0.weight"], before["model"]["0.weight"])
    assert all(torch.equal(copied["model"][key], before["model"][key]) for key in before["model"])
    assert torch.equal(copied["optimizer"]["state"][0]["momentum_buffer"],
                       before["optimizer"]["state"][0]["momentum_buffer"])
    assert copied["model"]._metadata == before["model"]._metadata  # what load_state_dict reads versions from
    settings = {**config.resolve_config(train.parse_args([])), "samples_per_class": 100, "data_root": "data"}
    runs.save_checkpoint(tmp_path / "last.pt", {**copied, "epoch": 1, "config": settings})
    loaded = runs.load_checkpoint(tmp_path / "last.pt")
    scheduler.load_state_dict(loaded["scheduler"])
    assert scheduler.get_last_lr() == pytest.approx([0.1]) and scheduler.milestones[3] == 0  # still a Counter
    model.load_state_dict(loaded["model"])
    assert all(torch.equal(value, before["model"][key]) for key, value in model.state_dict().items())


class Payload:
    """An object whose unpickling calls open(marker, "w"), i.e. runs code of the file's choosing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"model": Payload(marker), "epoch": 1, "config": {}}
    pickle.loads(pickle.dumps(Payload(marker))).close()  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    run_dir = tmp_path / "run"
    assert command("train.py", *TINY, "--epochs", "1", "--num-checkpoints", "1",
                   "--run-dir", str(run_dir)).returncode == 0
    torch.save(evil, runs.checkpoint_path(run_dir, 1))
    result = command("validate_nc.py", "--run-dir", str(run_dir), "--device", "cpu",
                     "--plots-dir", str(tmp_path / "plots"))
    assert result.returncode == 1
    assert "asks to run code while loading (io.open) and was refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        runs.load_checkpoint(runs.checkpoint_path(run_dir, 1))
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_types(tmp_path):
    run_dir = tmp_path / "run"
    train.main(train.parse_args([*TINY[:-1], "--epochs", "1", "--num-checkpoints", "1", "--run-dir", str(run_dir)]))
    for path in (run_dir / "last.pt", runs.checkpoint_path(run_dir, 1)):
        _assert_plain(torch.load(path, weights_only=True))


def test_a_config_clash_is_refused_and_an_extended_run_continues(tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY[:-1], "--epochs", "2", "--num-checkpoints", "2", "--run-dir", str(run_dir)]
    train.main(train.parse_args(flags))
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(UserError, match=r"other settings \(lr: 0\.0679 -> 0\.01\); pass --run-dir"):
        train.main(train.parse_args([*flags, "--lr", "0.01"]))
    with pytest.raises(UserError, match=r"epochs: 2 -> 1\); pass --run-dir"):
        train.main(train.parse_args([*flags, "--epochs", "1"]))
    assert (run_dir / "config.json").read_text() == config_before
    train.main(train.parse_args([*flags, "--extend-to", "3"]))
    assert [row["epoch"] for row in runs.read_log(run_dir)] == [1, 2, 3]
    assert runs.load_checkpoint(run_dir / "last.pt")["config"]["lr_milestones"] == [1]


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--dataset", "imagenet"], "argument --dataset: unknown dataset 'imagenet'; choose one of: CIFAR10"),
    ("train.py", ["--model", "resnet19"], "argument --model: unknown model 'resnet19'; choose one of: resnet18"),
    ("train.py", ["--loss", "hinge"], "argument --loss: unknown loss 'hinge'; choose one of: ce"),
    ("train.py", ["--dataset", "CIFAR10", "--data-root", "{tmp}/none"], "CIFAR10 not found in"),
    ("train.py", ["--samples-per-class", "500"], "at most 100 per class"),
    ("train.py", ["--run-dir", "{tmp}/file.txt"], "is a file, not a folder"),
    ("train.py", ["--run-dir", "{tmp}/bad"], "config.json is corrupt"),
    ("validate_nc.py", ["--run-dir", "{tmp}/nothing"], "no run folder at"),
    ("validate_nc.py", ["--dataset", "MNIST"],
     "no run folder at runs/MNIST-resnet18-ce-seed0; train it with: python train.py --dataset MNIST --download"),
])
@pytest.mark.slow
def test_user_errors_are_one_line_and_a_non_zero_exit(tmp_path, script, args, message):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{half")
    result = command(str(REPO / script), *(arg.format(tmp=tmp_path) for arg in args), "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]  # argparse prints its usage above it
    assert "error: " in last_line and message in last_line
    assert "Traceback" not in result.stderr


def _assert_plain(value) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int))
            _assert_plain(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _assert_plain(item)
    else:
        assert value is None or isinstance(value, (torch.Tensor, str, int, float, bool)), type(value)
