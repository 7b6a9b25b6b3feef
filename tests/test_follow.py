"""validate_nc.py --follow beside train.py: each checkpoint measured while the run still trains, the same
numbers as a plain validation afterwards, a stop when training ends or dies, and a kill of the follower
that leaves the table whole; runs.training_process, which tells it whether the run is being trained."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runs
import validate_nc
from errors import UserError
from conftest import start, ONE_THREAD
from test_logs import run_on_a_terminal

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--width", "4", "--samples-per-class", "20", "--device", "cpu"]


def follower_args(run_dir: Path, grace: str) -> list[str]:
    return ["--run-dir", str(run_dir), "--plots-dir", str(run_dir.parent / "plots"), "--device", "cpu",
            "--follow", grace]


def wait_until(condition, what: str, limit: float = 300) -> None:
    """Poll `condition` until it holds; a generous limit only stops a test that would hang."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.1)


def measured_epochs(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in runs.read_nc_metrics(run_dir)]


def logged_epochs(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in runs.read_log(run_dir)]


def plain_measurement(run_dir: Path, tmp_path: Path) -> list[dict]:
    """The table a plain validate_nc.py writes for the same checkpoints, in a copy of the run folder."""
    copy = tmp_path / "plain"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("nc_metrics.csv", "summary.json", "plots"))
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(copy), "--device", "cpu",
                                                    "--plots-dir", str(tmp_path / "plain-plots")])) == 0
    return runs.read_nc_metrics(copy)


@pytest.mark.slow
def test_each_checkpoint_is_measured_while_the_run_trains_and_as_a_plain_validation_measures_it(tmp_path):
    run_dir = tmp_path / "run"
    follower = start("validate_nc.py", *follower_args(run_dir, "60"))  # before the run exists: it waits
    # Stopped at the first step of epoch 3, its lock held, until continued: epochs 1 and 2 are there.
    trainer = start("tests/kill_harness.py", "pause", "5", *TINY, "--epochs", "5", "--num-checkpoints", "5",
                    "--run-dir", str(run_dir))
    try:
        wait_until(lambda: measured_epochs(run_dir) == [1, 2], "the follower to measure epochs 1 and 2")
        assert follower.poll() is None  # measured while the run is still being trained, and waiting for more
        assert logged_epochs(run_dir) == [1, 2]
    finally:
        os.kill(trainer.pid, signal.SIGCONT)
    assert trainer.wait(timeout=600) == 0, trainer.stderr.read()
    assert follower.wait(timeout=600) == 0, follower.stderr.read()
    assert "followed" in follower.stderr.read() and (tmp_path / "plots" / "panel.png").is_file()
    followed = runs.read_nc_metrics(run_dir)
    assert [row["epoch"] for row in followed] == [1, 2, 3, 4, 5]
    assert followed == plain_measurement(run_dir, tmp_path)
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_follower_stops_once_its_trainer_has_died_and_the_checkpoints_it_left_are_measured(tmp_path):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "kill_harness.py"), "steps", "7", *TINY,
                             "--epochs", "6", "--num-checkpoints", "6", "--run-dir", str(run_dir)],
                            cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9  # in epoch 4 (two steps an epoch): checkpoints 1-3 are there
    # On a terminal, to see its bar: it counts the 6 checkpoints the run was to write, of which it measured 3.
    code, drawn = run_on_a_terminal([sys.executable, str(REPO / "validate_nc.py"), *follower_args(run_dir, "1")])
    assert code == 1, drawn  # it could not follow the run to its end
    assert measured_epochs(run_dir) == [1, 2, 3]
    bars = [line for line in re.split("[\r\n]", drawn) if "%|" in line]  # drawn once config.json was read
    assert bars and all("/6 [" in line for line in bars) and "3/6 [" in bars[-1]
    assert "it stopped before its last epoch (6), and its checkpoints through epoch 3 are measured" in \
        drawn.splitlines()[-1]


@pytest.mark.slow
def test_killing_a_follower_leaves_its_table_whole_and_a_new_one_finishes_it(tmp_path):
    run_dir = tmp_path / "run"
    trainer = start("train.py", *TINY, "--epochs", "6", "--num-checkpoints", "6", "--run-dir", str(run_dir))
    follower = start("validate_nc.py", *follower_args(run_dir, "60"))
    wait_until(lambda: len(measured_epochs(run_dir)) >= 1, "a first measured checkpoint")
    follower.kill()
    follower.wait()
    assert measured_epochs(run_dir) == sorted(set(measured_epochs(run_dir)))  # whole rows, each epoch once
    assert validate_nc.main(validate_nc.parse_args(follower_args(run_dir, "60"))) == 0
    assert trainer.wait(timeout=600) == 0, trainer.stderr.read()
    assert runs.read_nc_metrics(run_dir) == plain_measurement(run_dir, tmp_path)


@pytest.mark.slow
def test_a_follower_of_a_finished_and_measured_run_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    trained = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "2", "--num-checkpoints",
                              "2", "--run-dir", str(run_dir)], cwd=REPO, env=ONE_THREAD, capture_output=True)
    assert trained.returncode == 0
    # With an hour's grace, a follower that waited for a trainer would still be waiting when the bound ends it.
    follower = start("validate_nc.py", *follower_args(run_dir, "3600"))
    try:
        code = follower.wait(timeout=300)
    except subprocess.TimeoutExpired:
        follower.kill()
        pytest.fail("the follower of a finished run was still waiting after 300 s (its grace is 3600 s): it did not "
                    f"see that the run's last checkpoint was there; it wrote: {follower.communicate()[1]}")
    assert code == 0, follower.stderr.read()
    assert measured_epochs(run_dir) == [1, 2]


def test_a_follower_of_a_folder_no_one_trains_gives_up_after_its_grace(tmp_path, capsys):
    with pytest.raises(UserError, match=r"has no config.json, and no train.py has held its lock for 1 s; start"):
        validate_nc.main(validate_nc.parse_args(follower_args(tmp_path / "typo", "1")))
    assert not (tmp_path / "typo").exists()


def test_the_training_process_is_the_holder_of_the_lock_and_none_without_one(tmp_path):
    run_dir = tmp_path / "run"
    assert runs.training_process(run_dir) is None  # no folder yet
    with runs.training_lock(run_dir):
        assert runs.training_process(run_dir) == f"process {os.getpid()} on {socket.gethostname()}"
        assert runs.training_process(run_dir) is not None  # looking took nothing from the holder
    assert runs.training_process(run_dir) is None  # the lock file stays, free


def test_follow_is_refused_with_representations(capsys):
    with pytest.raises(SystemExit):
        validate_nc.parse_args(["--follow", "--representations"])
    assert "drop --follow" in capsys.readouterr().err
