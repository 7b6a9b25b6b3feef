"""sweep.py end to end on the CPU: a study's folder and tables, skipping what is done, a killed study
resumed to the same bits, failed and busy runs, the Slurm submission without a cluster, the learning-rate
grid and its choice, and the grouped figures."""
import contextlib
import csv
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import submitit
import torch

import config
import plotting
import runs
import studies
import sweep
import train
from errors import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--samples-per-class", "20", "--epochs", "2", "--num-checkpoints", "2", "--device", "cpu",
        "--deterministic"]
GRID = ["--loss", "ce", "mse", "--seed", "0", "1"]
SETTINGS = [("ce", 0), ("ce", 1), ("mse", 0), ("mse", 1)]  # the grid's order: the last flag varies fastest
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The jobs' subprocesses get one OpenMP thread, as the tests do (and the same bits in every sweep)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    """The folder in which `sweep.py --name grid TINY GRID` ran, with its exit status and output."""
    folder = tmp_path_factory.mktemp("study")
    code, output = sweep_in(folder, "--name", "grid", *TINY, *GRID, "--parallel", "2")
    return folder, code, output


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


def run_folder(loss: str, seed: int, *flags: str) -> Path:
    """The folder `python train.py TINY --loss LOSS --seed SEED FLAGS` uses, as train.py computes it."""
    args = train.parse_args([*TINY, "--loss", loss, "--seed", str(seed), *flags])
    return config.default_run_dir(config.resolve_config(args), args)


def table_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_a_study_writes_its_tables_and_each_run_is_the_run_train_py_alone_makes(study):
    folder, code, output = study
    assert code == 0
    study_dir = folder / "studies" / "grid"
    recorded = json.loads((study_dir / "study.json").read_text())
    assert recorded["argv"] == ["--name", "grid", *TINY, *GRID, "--parallel", "2"]
    assert recorded["grid"]["loss"] == ["ce", "mse"] and recorded["grid"]["seed"] == [0, 1]
    assert recorded["varied"] == ["loss", "seed"]
    rows = table_rows(study_dir / "runs.csv")
    assert [(row["loss"], int(row["seed"])) for row in rows] == SETTINGS
    assert [row["status"] for row in rows] == ["done"] * 4
    for row, (loss, seed) in zip(rows, SETTINGS):
        assert row["run_dir"] == str(run_folder(loss, seed))
        measured = table_rows(folder / row["run_dir"] / "nc_metrics.csv")
        assert [int(line["epoch"]) for line in measured] == [1, 2]
        onset = next((line for line in measured if float(line["train_acc"]) == 1.0), None)
        assert row["tpt_epoch"] == (onset["epoch"] if onset else "")
        assert row["last_epoch"] == "2" and row["last_test_acc"] == measured[-1]["test_acc"]
        assert all(float(row[key]) == float(measured[-1][key]) for key in ("nc1", "self_duality", "ncc_mismatch_test"))
        assert (study_dir / "logs" / f"{Path(row['run_dir']).name}.log").is_file()
    table = (study_dir / "table.md").read_text()
    assert "4 runs: 4 done, 0 failed, 0 busy, 0 pending." in table
    assert sum(line.startswith("| ce |") or line.startswith("| mse |") for line in table.splitlines()) == 4
    assert sum(line.startswith("start ") for line in output.splitlines()) == 4 and "4 done, 0 failed, 0 busy, 0 interrupted, 0 skipped" in output


def test_the_same_command_again_starts_nothing(study):
    folder, _, _ = study
    study_dir = folder / "studies" / "grid"
    files = [*(study_dir / "logs").iterdir(), *(folder / "runs").glob("*/last.pt")]
    before = {path: path.stat().st_mtime_ns for path in files}
    table = (study_dir / "runs.csv").read_text()
    code, output = sweep_in(folder, "--name", "grid", *TINY, *GRID, "--parallel", "2")
    assert code == 0
    assert [line.split()[0] for line in output.splitlines()] == ["skipped"] * 4 + ["study"]
    assert {path: path.stat().st_mtime_ns for path in files} == before
    assert (study_dir / "runs.csv").read_text() == table


def test_a_killed_study_resumes_to_the_tables_and_bits_of_an_uninterrupted_one(study, tmp_path):
    reference, _, _ = study
    flags = ["--name", "grid", *TINY, "--loss", "ce", "--seed", "0", "1"]
    first, second = run_folder("ce", 0), run_folder("ce", 1)
    killed = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *flags], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ((tmp_path / second / "last.pt").exists() and _status(tmp_path / "studies/grid/runs.csv", 0) == "done"):
            assert killed.poll() is None, "the sweep ended before the second run had begun"
            time.sleep(0.02)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the sweep, its job's train.py and all
        killed.wait()
    assert _status(tmp_path / "studies/grid/runs.csv", 1) == "pending"
    assert not (tmp_path / second / "nc_metrics.csv").exists()  # killed before its measurement

    code, output = sweep_in(tmp_path, *flags)
    assert code == 0
    assert f"skipped  {first} (done)" in output and f"done     {second}" in output
    rows = table_rows(tmp_path / "studies/grid/runs.csv")
    expected = [row for row in table_rows(reference / "studies/grid/runs.csv") if row["loss"] == "ce"]
    assert [{key: row[key] for key in row if key != "loss"} for row in expected] == rows  # loss is not varied here
    for run in (first, second):
        for name in ("last.pt", "checkpoints/epoch_0001.pt", "checkpoints/epoch_0002.pt"):
            mine, theirs = weights(tmp_path / run / name), weights(reference / run / name)
            assert all(torch.equal(mine[key], theirs[key]) for key in theirs), f"{run}/{name}"


def _status(table: Path, index: int) -> str | None:
    rows = table_rows(table) if table.exists() else []
    return rows[index]["status"] if len(rows) > index else None


def test_a_failing_run_is_recorded_with_its_reason_and_the_others_still_run(tmp_path):
    code, output = sweep_in(tmp_path, "--name", "diverging", *TINY, "--lr", "1e4", "0.05")
    assert code == 1
    rows = table_rows(tmp_path / "studies/diverging/runs.csv")
    assert [row["lr"] for row in rows] == ["10000.0", "0.05"]
    assert rows[0]["status"] == "failed" and rows[0]["reason"].startswith("training diverged in epoch 1")
    assert rows[1]["status"] == "done" and rows[1]["reason"] == ""
    assert "1 done, 1 failed" in output
    assert "training diverged in epoch 1" in (tmp_path / "studies/diverging/table.md").read_text()


def test_a_run_that_another_process_trains_is_reported_busy_and_left_alone(study):
    folder, _, _ = study
    with working_directory(folder), runs.training_lock(run_folder("ce", 7)):
        code, output = sweep_in(folder, "--name", "busy", *TINY, "--seed", "7")
        assert not (run_folder("ce", 7) / "log.csv").exists()
    assert code == 0 and "0 done, 0 failed, 1 busy" in output
    [row] = table_rows(folder / "studies/busy/runs.csv")
    assert row["status"] == "busy" and f"is being trained by process {os.getpid()}" in row["reason"]


def test_a_slurm_dry_run_shows_the_submission_and_writes_nothing(tmp_path):
    code, output = sweep_in(tmp_path, "--name", "grid", *TINY, *GRID, "--executor", "slurm", "--partition", "gpu",
                            "--time", "30", "--max-parallel", "2", "--dry-run")
    assert code == 0
    assert "4 jobs, array 0-3%2" in output and "partition=gpu" in output and "time=30" in output
    jobs = [line for line in output.splitlines() if line.startswith("  job ")]
    assert len(jobs) == 4
    for line, (loss, seed) in zip(jobs, SETTINGS):
        assert "train.py" in line and f"validate_nc.py --run-dir {run_folder(loss, seed)} --device cpu" in line
    assert output.count("  new ") == 4
    assert list(tmp_path.iterdir()) == []


def test_a_slurm_submission_is_one_array_of_checkpointable_jobs(tmp_path, monkeypatch):
    """Through submitit's own SlurmExecutor, with stand-ins for Slurm's commands that keep the job script."""
    bin_dir = _stand_in_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "work").mkdir()
    code, output = sweep_in(tmp_path / "work", "--name", "grid", *TINY, *GRID, "--executor", "slurm",
                            "--partition", "gpu", "--time", "30", "--max-parallel", "2", "--sbatch", "account=nc")
    assert code == 0 and "submitted Slurm job 4242: 4 runs, at most 2 at a time" in output
    script = (bin_dir / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --signal=USR2@90", "#SBATCH --account=nc",
                 f"cd {tmp_path / 'work'}", f"export PYTHONPATH={REPO}"):
        assert line in script
    for index, (loss, seed) in enumerate(SETTINGS):
        pickle = tmp_path / f"work/studies/grid/slurm/4242_{index}/4242_{index}_submitted.pkl"
        submission = submitit.helpers.DelayedSubmission.load(pickle)
        job, [run] = submission.function, submission.args
        assert isinstance(job, studies.Job) and job.study_dir == "studies/grid" and job.threads == 4
        assert run.run_dir == str(run_folder(loss, seed))
        requeued = job.checkpoint(run)  # what submitit submits again after a pre-emption or time-out
        assert requeued.function == job and requeued.args == (run,)
    assert [row["status"] for row in table_rows(tmp_path / "work/studies/grid/runs.csv")] == ["pending"] * 4


def test_a_submitted_job_runs_under_submitit_and_a_requeue_resumes_it(study, tmp_path, monkeypatch):
    """The job submitit would start on a node, run here by submitit's own runner: pre-empted (SIGUSR2) while
    training, it asks Slurm to requeue it; started again, it resumes and ends with the uninterrupted run's bits."""
    reference, _, _ = study
    bin_dir = _stand_in_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "work").mkdir()
    assert sweep_in(tmp_path / "work", "--name", "one", *TINY, "--executor", "slurm", "--time", "30",
                    "--cpus-per-job", "1")[0] == 0  # one thread, as the reference run had
    node = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-u", "-m", "submitit.core._submit", "studies/one/slurm/%j"]
    run = tmp_path / "work" / run_folder("ce", 0)
    job = subprocess.Popen(command, cwd=tmp_path / "work", env=node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "last.pt").exists():
        assert job.poll() is None, "the job ended before its run had begun"
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR2)
    assert job.wait() != 0
    assert (bin_dir / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert not (run / "nc_metrics.csv").exists()
    assert subprocess.run(command, cwd=tmp_path / "work", env=node, capture_output=True).returncode == 0
    [row] = table_rows(tmp_path / "work/studies/one/runs.csv")
    assert row["status"] == "done"
    log = (tmp_path / "work/studies/one/logs" / f"{run.name}.log").read_text()
    assert log.count("=== ") == 2 and "resuming after epoch 1" in log
    mine, theirs = weights(run / "last.pt"), weights(reference / run_folder("ce", 0) / "last.pt")
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def _stand_in_slurm(bin_dir: Path) -> Path:
    """sbatch (keeps the job script, answers as Slurm does), srun (submitit only looks for it) and scontrol
    (keeps its arguments)."""
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" {bin_dir}/submitted.sh\necho "Submitted batch job 4242"',
               "srun": "exit 0", "scontrol": f'echo "$@" > {bin_dir}/scontrol.args'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def test_the_grouped_mean_and_band_are_those_of_the_runs_own_tables(study):
    folder, _, _ = study
    run_dirs = [folder / run_folder(loss, seed) for loss, seed in SETTINGS]
    series = plotting.group_series(run_dirs, ["loss"], "nc1")
    assert [label for label, *_ in series] == ["loss=ce (2 runs)", "loss=mse (2 runs)"]
    for (label, epochs, mean, low, high), members in zip(series, (run_dirs[:2], run_dirs[2:])):
        values = np.array([[float(row["nc1"]) for row in table_rows(run / "nc_metrics.csv")] for run in members])
        assert epochs.tolist() == [1, 2]
        np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-15)
        assert low.tolist() == values.min(axis=0).tolist() and high.tolist() == values.max(axis=0).tolist()
    test_loss = plotting.group_series(run_dirs, ["loss"], "test_loss", table="log.csv")
    values = np.array([[float(row["test_loss"]) for row in table_rows(run / "log.csv")] for run in run_dirs[2:]])
    np.testing.assert_allclose(test_loss[1][2], values.mean(axis=0), rtol=1e-15)


def test_plotting_study_draws_the_grouped_panel_and_curves(study, tmp_path):
    folder, _, _ = study
    with working_directory(folder):
        assert plotting.main(plotting.parse_args(["study", "studies/grid", "--out", str(tmp_path / "figures")])) == 0
    panel = (tmp_path / "figures" / "panel.png").read_bytes()
    assert panel.startswith(PNG_SIGNATURE)
    assert (tmp_path / "figures" / "training_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "figures" / "table.md").read_text() == (folder / "studies/grid/table.md").read_text()


def test_every_flag_of_train_py_but_run_dir_is_a_flag_of_a_study():
    assert set(vars(train.parse_args([]))) - {"run_dir"} <= set(vars(sweep.parse_args(["--name", "any"])))
    several = sweep.parse_args(["--name", "any", "--batch-size", "64", "128", "--augment", "--epochs", "3"])
    assert several.batch_size == [64, 128] and several.augment is True and several.epochs == [3]


@pytest.mark.parametrize("flags, message", [
    (["--loss", "ce", "hinge"], "error: argument --loss: unknown loss 'hinge'"),
    (["--model", "resnet18", "resnet19"], "error: argument --model: unknown model 'resnet19'"),
    (["--seed", "0", "-1"], "error: argument --seed: must lie in 0 .. 2**32 - 1"),
    (["--lr", "0.1", "--lr-grid"], "error: give --lr or --lr-grid, not both"),
    (["--lr-milestones", "5"], "error: --lr-milestones 5 is beyond the last epoch (2)"),
    (["--lr", "0.1234567", "0.1234568"],  # folder names keep 6 digits of a learning rate
     "error: two runs of the grid would share the folder runs/synthetic-resnet18-ce-seed0-w4-spc20-ep2-lr0.123457"),
])
def test_bad_values_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, flags, message):
    with working_directory(tmp_path):
        try:
            code = run_cli(sweep.main, lambda: sweep.parse_args(["--name", "bad", *TINY, *flags]))
        except SystemExit as exit:  # argparse's refusal, as the script ends with it
            code = exit.code
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_a_setting_that_a_run_does_not_use_is_left_out_of_it_and_the_same_run_is_planned_once(tmp_path):
    code, output = sweep_in(tmp_path, "--name", "focal", *TINY, "--loss", "ce", "focal", "--focal-gamma", "1", "3",
                            "--seed", "0", "0", "--dry-run")
    assert code == 0
    folders = [line.split()[1] for line in output.splitlines() if line.startswith("  new ")]
    assert folders == [str(run_folder("ce", 0)), str(run_folder("focal", 0, "--focal-gamma", "1")),
                       str(run_folder("focal", 0, "--focal-gamma", "3"))]


def test_the_lr_grid_is_the_papers_and_holds_the_authors_learning_rates(tmp_path):
    grid = studies.lr_grid()
    assert grid == np.logspace(np.log10(1e-4), np.log10(0.25), 25).tolist()
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(0.25)
    assert np.allclose(np.diff(np.log(grid)), np.log(2500) / 24)  # log-spaced: a constant ratio
    assert all(lr in grid for lr in config.PAPER_LR.values())  # exactly, not nearly
    assert min(abs(lr / config.OTHER_LR - 1) for lr in grid) < 1e-3  # 0.0679 is 0.06786... rounded
    code, output = sweep_in(tmp_path, "--name", "lr", "--dataset", "CIFAR10", "--lr-grid", "--dry-run")
    assert code == 0 and "25 runs (25 lr)" in output
    folders = [line.split()[1] for line in output.splitlines() if line.startswith("  new ")]
    assert len(set(folders)) == 25 and "runs/CIFAR10-resnet18-ce-seed0" in folders  # the paper's run is a point


def test_the_chosen_learning_rate_has_the_lowest_final_test_error_averaged_over_seeds():
    def row(loss, lr, seed, accuracy, status="done"):
        return {"loss": loss, "lr": lr, "seed": seed, "status": status, "last_test_acc": accuracy}
    rows = [row("ce", 0.1, 0, 0.90), row("ce", 0.1, 1, 0.50),  # the best seed, but errors 0.1 and 0.5: mean 0.3
            row("ce", 0.01, 0, 0.80), row("ce", 0.01, 1, 0.80),  # mean error 0.2: chosen
            row("mse", 0.1, 0, 0.95), row("mse", 0.1, 1, None, "failed"),  # a seed diverged: out
            row("mse", 0.01, 0, 0.60), row("mse", 0.01, 1, 0.70)]
    chosen = studies.select_lr(rows, ["loss", "lr", "seed"])
    assert [(choice["loss"], choice["lr"], choice["runs"]) for choice in chosen] == [("ce", 0.01, 2), ("mse", 0.01, 2)]
    assert [choice["test_error"] for choice in chosen] == pytest.approx([0.2, 0.35])


def test_an_lr_grid_table_marks_the_chosen_learning_rate_of_each_group(tmp_path):
    """Tables from hand-made run folders: two learning rates x two seeds, final test accuracies as given."""
    accuracies = {(0.1, 0): 0.9, (0.1, 1): 0.5, (0.01, 0): 0.8, (0.01, 1): 0.8}
    entries = []
    for (lr, seed), accuracy in accuracies.items():
        run_dir = tmp_path / f"run-lr{lr}-seed{seed}"
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "last.pt").touch()
        (run_dir / "checkpoints" / "epoch_0002.pt").touch()
        (run_dir / "summary.json").write_text(json.dumps({"epochs_done": 2}))
        row = {column: 0.5 for column in runs.NC_COLUMNS} | {"epoch": 2, "train_acc": 1.0, "test_acc": accuracy}
        runs.write_csv(run_dir / "nc_metrics.csv", [row], runs.NC_COLUMNS)
        entries.append({"run_dir": str(run_dir), "settings": {"lr": lr, "seed": seed}, "train": [], "validate": [],
                        "epochs": 2})
    study_dir = tmp_path / "studies" / "lr"
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({"name": "lr", "argv": ["--lr", "0.1", "0.01"], "grid": {},
                                                      "varied": ["lr", "seed"], "runs": entries}))
    studies.refresh_tables(study_dir)
    rows = table_rows(study_dir / "runs.csv")
    assert [row["selected"] for row in rows] == ["False", "False", "True", "True"]
    assert [row["tpt_epoch"] for row in rows] == ["2"] * 4
    table = (study_dir / "table.md").read_text()
    assert table.count("**best lr**") == 2 and "| 0.01 | 20.00% | 2 |" in table
