"""sweep.py end to end on the CPU: a study's folder and tables, skipping what is done, a killed study
resumed to the same bits, failed and busy runs, "done" as what a run folder holds (and repaired), study
files of the wrong shape, the measurement flags, the Slurm submission without a cluster (test_slurm.py
submits to a real one), the learning-rate grid and its choice, and the grouped figures."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import config
import plotting
import reports
import runs
import studies
import sweep
import train
from errors import run_cli
from sweep_helpers import same_weights, sweep_in, table_rows, working_directory

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


def run_folder(loss: str, seed: int, *flags: str) -> Path:
    """The folder `python train.py TINY --loss LOSS --seed SEED FLAGS` uses, as train.py computes it."""
    args = train.parse_args([*TINY, "--loss", loss, "--seed", str(seed), *flags])
    return config.default_run_dir(config.resolve_config(args), args)


@pytest.mark.slow
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
    assert sum(line.startswith("start ") for line in output.splitlines()) == 4
    assert "4 done, 0 failed, 0 busy, 0 interrupted, 0 skipped" in output


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_study_grown_by_a_seed_runs_the_new_runs_and_leaves_the_old_ones_and_their_rows_as_they_were(
        study, tmp_path):
    folder = copy_of(study[0], tmp_path)
    study_dir = folder / "studies" / "grid"
    # Every file but the study's own (study.json, its tables, outcomes.json): the runs, their figures and logs.
    before = {path: value for path, value in snapshot(folder).items() if path.parent != study_dir}
    assert all(folder / run_folder(loss, seed) / "last.pt" in before for loss, seed in SETTINGS)
    old_rows = table_rows(study_dir / "runs.csv")
    old_outcomes = json.loads((study_dir / "outcomes.json").read_text())
    grown = ["--name", "grid", *TINY, "--loss", "ce", "mse", "--seed", "0", "1", "2", "--parallel", "2"]
    code, output = sweep_in(folder, *grown)
    assert code == 0, output
    assert sorted(line.split()[0] for line in output.splitlines()[:-1] if not line.startswith("start ")) == \
        ["done"] * 2 + ["skipped"] * 4
    assert {path: value for path, value in snapshot(folder).items() if path in before} == before  # bytes and times
    rows = table_rows(study_dir / "runs.csv")
    assert [(row["loss"], int(row["seed"])) for row in rows] == [(loss, seed) for loss in ("ce", "mse")
                                                                for seed in (0, 1, 2)]
    assert [row for row in rows if row["seed"] != "2"] == old_rows
    assert [row["run_dir"] for row in rows if row["seed"] == "2"] == [str(run_folder(loss, 2))
                                                                     for loss in ("ce", "mse")]
    assert all(row["status"] == "done" for row in rows)
    outcomes = json.loads((study_dir / "outcomes.json").read_text())
    assert {key: outcomes[key] for key in old_outcomes} == old_outcomes and len(outcomes) == 6
    assert json.loads((study_dir / "study.json").read_text())["argv"] == grown
    assert "6 runs: 6 done, 0 failed, 0 busy, 0 pending." in (study_dir / "table.md").read_text()


@pytest.mark.parametrize("flags, conflict", [
    (["--seed", "1"], "this command leaves out 1 of its 2 runs (runs/synthetic-resnet18-ce-seed0-w4-spc20-ep2), and "
                      "a study grows but does not shrink"),
    (["--seed", "0", "1", "2", "--num-checkpoints", "1"], "for its run runs/synthetic-resnet18-ce-seed1-w4-spc20-ep2, "
     "train.py gets --num-checkpoints 2 in it and --num-checkpoints 1 in this command"),
    (["--seed", "0", "1", "--layers"], "for its run runs/synthetic-resnet18-ce-seed1-w4-spc20-ep2, validate_nc.py "
                                       "gets no other flag in it and --layers in this command"),
    (["--script", "ufm.py"], "its runs are train.py's and this command's ufm.py's (--script)"),
])
def test_a_study_grows_by_values_and_a_command_that_is_not_it_grown_is_refused_saying_what_differs(
        tmp_path, capsys, flags, conflict):
    """Planned and recorded, not run: growing writes study.json and the tables; a conflict writes nothing."""
    first = ["--name", "grid", *TINY, "--seed", "0"]
    grown = ["--name", "grid", *TINY, "--seed", "1", "0"]  # values in another order, a setting fixed before varied
    with working_directory(tmp_path):
        for command in (first, grown):
            studies.start(studies.plan(sweep.parse_args(command), "grid", command))
        recorded = json.loads(Path("studies/grid/study.json").read_text())
        assert recorded["argv"] == grown and recorded["varied"] == ["seed"]
        assert [run["run_dir"] for run in recorded["runs"]] == [str(run_folder("ce", seed)) for seed in (1, 0)]
        assert [row["status"] for row in table_rows(Path("studies/grid/runs.csv"))] == ["pending"] * 2
        before = snapshot(tmp_path)
        command = ["--name", "grid", *(TINY if "--script" not in flags else []), *flags]
        assert run_cli(sweep.main, lambda: sweep.parse_args(command)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"error: studies/grid holds another study: {conflict}. Repeat the command that made it, adding "
                    f"values to grow it (python sweep.py {' '.join(grown)}), or choose another --name (the runs "
                    "done already are found in their folders and skipped)")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_tables_and_bits_of_an_uninterrupted_one(study, tmp_path):
    reference, _, _ = study
    flags = ["--name", "grid", *TINY, "--loss", "ce", "--seed", "0", "1"]
    first, second = run_folder("ce", 0), run_folder("ce", 1)
    killed = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *flags], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ((tmp_path / second / "last.pt").exists()
                   and _status(tmp_path / "studies/grid/runs.csv", 0) == "done"):
            assert killed.poll() is None, "the sweep ended before the second run had begun"
            time.sleep(0.02)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the sweep, its job's train.py and all
        killed.wait()
    deadline = time.monotonic() + 60
    while runs.training_process(tmp_path / second) is not None:  # the killed train.py may take a moment to end
        assert time.monotonic() < deadline, "the killed train.py still holds its run's lock"
        time.sleep(0.05)
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
            assert same_weights(tmp_path / run / name, reference / run / name), f"{run}/{name}"


def _status(table: Path, index: int) -> str | None:
    rows = table_rows(table) if table.exists() else []
    return rows[index]["status"] if len(rows) > index else None


@pytest.mark.slow
def test_a_failing_run_is_recorded_with_its_reason_and_the_others_still_run(tmp_path):
    code, output = sweep_in(tmp_path, "--name", "diverging", *TINY, "--lr", "1e4", "0.05")
    assert code == 1
    rows = table_rows(tmp_path / "studies/diverging/runs.csv")
    assert [row["lr"] for row in rows] == ["10000.0", "0.05"]
    assert rows[0]["status"] == "failed" and rows[0]["reason"].startswith("training diverged in epoch 1")
    assert rows[1]["status"] == "done" and rows[1]["reason"] == ""
    assert "1 done, 1 failed" in output
    assert "training diverged in epoch 1" in (tmp_path / "studies/diverging/table.md").read_text()


@pytest.mark.slow
def test_a_run_that_another_process_trains_is_busy_whatever_lands_in_its_log(study):
    """As when two sweeps of one study run at once: the other's job holds the run's training lock and its
    progress bar keeps writing into the run's log, around any line this sweep's job would write there."""
    folder, _, _ = study
    log = folder / "studies/busy/logs" / f"{run_folder('ce', 7).name}.log"
    log.parent.mkdir(parents=True)
    stop = threading.Event()

    def progress_bar():
        with open(log, "a") as bar:
            while not stop.is_set():
                bar.write("\rsynthetic-resnet18-ce-seed7:  40%|####      | 2/5 [00:01<00:01]")
                bar.flush()
                time.sleep(0.001)
    writer = threading.Thread(target=progress_bar)
    with working_directory(folder), runs.training_lock(run_folder("ce", 7)):
        writer.start()
        try:
            code, output = sweep_in(folder, "--name", "busy", *TINY, "--seed", "7")
        finally:
            stop.set()
            writer.join()
        assert not (run_folder("ce", 7) / "log.csv").exists()
    assert code == 0 and "0 done, 0 failed, 1 busy" in output
    [row] = table_rows(folder / "studies/busy/runs.csv")
    assert row["status"] == "busy" and f"is being trained by process {os.getpid()} on " in row["reason"]


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


def test_the_requeue_signal_comes_a_tenth_of_the_limit_early_and_no_jitter_can_take_a_jobs_whole_time(tmp_path):
    """Slurm sends --signal up to 60 s earlier than asked (sbatch(1)): every accepted --time keeps time to
    train; --time 1 is refused (test_bad_values...)."""
    assert all(0 < sweep.signal_lead(minutes) <= 90 and sweep.signal_lead(minutes) + 60 < 60 * minutes
               for minutes in range(2, 10_000))
    assert [sweep.signal_lead(minutes) for minutes in (2, 10, 15, 240)] == [12, 60, 90, 90]
    code, output = sweep_in(tmp_path, "--name", "short", *TINY, "--executor", "slurm", "--time", "2", "--dry-run")
    assert code == 0 and "time=2, signal_delay_s=12" in output


def test_without_slurm_a_submission_is_one_line_after_the_study_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no srun
    with working_directory(tmp_path):
        code = run_cli(sweep.main, lambda: sweep.parse_args(["--name", "grid", *TINY, "--executor", "slurm"]))
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: could not submit to Slurm (") and "--dry-run shows the submission" in line
    assert [row["status"] for row in table_rows(tmp_path / "studies/grid/runs.csv")] == ["pending"]


def copy_of(study_folder: Path, tmp_path: Path) -> Path:
    """A copy of the folder a study ran in: its runs, their figures and the study's folder."""
    return shutil.copytree(study_folder, tmp_path / "copy", symlinks=True)


def job_commands(log: Path) -> list[str]:
    """The scripts the last job of a run's study log ran, in order."""
    last = log.read_text().rsplit("\n=== ", 1)[-1]
    return [Path(line.split()[2]).name for line in last.splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_done_is_what_the_run_folder_holds_and_a_partial_finish_is_completed_by_validate_nc_alone(study, tmp_path):
    """Killed while validate_nc.py drew its figures, or with summary.json lost, a run is not done, and the
    same command completes it by running validate_nc.py only; then it is done and skipped."""
    folder = copy_of(study[0], tmp_path)
    command = ["--name", "grid", *TINY, *GRID, "--parallel", "2"]
    drawn, summarised = folder / run_folder("ce", 0), folder / run_folder("ce", 1)
    plots = folder / "synthetic_plots" / drawn.name
    figures = sorted(path.name for path in plots.iterdir())
    assert len(figures) == 10 and "tpt_table.md" in figures  # Figures 2-7 and 9, the panel, the curves
    for name in figures[1:]:
        (plots / name).unlink()  # as if killed after the first figure
    (summarised / "summary.json").unlink()
    trained = {path: path.stat().st_mtime_ns for path in folder.glob("runs/*/*.pt")}
    with working_directory(folder):
        assert [studies.run_state(run) for run in studies.plan(sweep.parse_args(command), "grid", command).runs] == [
            "trained", "trained", "done", "done"]

    code, output = sweep_in(folder, *command)
    assert code == 0 and "2 done, 0 failed, 0 busy, 0 interrupted, 2 skipped" in output
    for run in (drawn, summarised):
        assert job_commands(folder / "studies/grid/logs" / f"{run.name}.log") == ["validate_nc.py"]
    assert sorted(path.name for path in plots.iterdir()) == figures
    assert json.loads((summarised / "summary.json").read_text()) == json.loads(
        (study[0] / run_folder("ce", 1) / "summary.json").read_text())
    assert {path: path.stat().st_mtime_ns for path in folder.glob("runs/*/*.pt")} == trained
    assert [row["status"] for row in table_rows(folder / "studies/grid/runs.csv")] == ["done"] * 4
    code, output = sweep_in(folder, *command)
    assert [line.split()[0] for line in output.splitlines()] == ["skipped"] * 4 + ["study"]


@pytest.mark.parametrize("path, text, message", [
    ("studies/grid/outcomes.json", "[1, 2]", "studies/grid/outcomes.json is not an outcomes.json written by sweep.py"),
    ("studies/grid/study.json", "[]", "studies/grid/study.json is not a study.json written by sweep.py"),
    ("studies/grid/study.json", "{}", "studies/grid/study.json is not a study.json written by sweep.py"),
    (f"{run_folder('mse', 1)}/summary.json", "[1]", f"{run_folder('mse', 1)}/summary.json is not a run's summary"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.slow
def test_a_study_file_of_the_wrong_shape_is_one_line_and_nothing_is_written(study, tmp_path, capsys, path, text,
                                                                          message, dry_run):
    folder = copy_of(study[0], tmp_path)
    (folder / path).write_text(text)
    before = snapshot(folder)
    with working_directory(folder):
        code = run_cli(sweep.main, lambda: sweep.parse_args(["--name", "grid", *TINY, *GRID, *dry_run]))
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {message}")
    assert snapshot(folder) == before


def snapshot(folder: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and contents."""
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_the_measurement_flags_reach_each_runs_validate_nc_and_the_tables_carry_their_columns(study, tmp_path):
    """A done run asked for --layers, --test-collapse and --adversarial again lacks them: validate_nc.py alone
    measures them, the study's tables hold the last checkpoint's values, and the figures it draws are the
    ones the study counts on."""
    folder = copy_of(study[0], tmp_path)
    shutil.rmtree(folder / "studies")
    command = ["--name", "measured", *TINY, "--layers", "--test-collapse", "--adversarial",
               "--adversarial-samples", "5"]
    code, output = sweep_in(folder, *command, "--executor", "slurm", "--dry-run")
    assert f"  trained  {run_folder('ce', 0)}" in output
    assert (f"validate_nc.py --run-dir {run_folder('ce', 0)} --device cpu --layers --test-collapse --adversarial "
            "--adversarial-samples 5") in output and "train.py" not in output.split("  job 0: ")[1]

    code, output = sweep_in(folder, *command)
    assert code == 0 and "1 done" in output
    run = folder / run_folder("ce", 0)
    assert job_commands(folder / "studies/measured/logs" / f"{run.name}.log") == ["validate_nc.py"]
    [row] = table_rows(folder / "studies/measured/runs.csv")
    last = table_rows(run / "nc_metrics.csv")[-1]
    extra = [column for column in last if column not in runs.NC_COLUMNS]
    assert {"nc1_test", "nc1_layer1", "nc1_layer4", "deepfool_robustness", "deepfool_steps"} <= set(extra)
    assert list(row)[-len(extra) - 1:-1] == extra and all(row[column] == last[column] for column in extra)
    assert " | deepfool_robustness | " in (folder / "studies/measured/table.md").read_text()
    plots = sorted(path.name for path in (folder / "synthetic_plots" / run.name).iterdir())
    with working_directory(folder):
        assert plots == sorted([*reports.figure_files(runs.read_nc_metrics(run_folder("ce", 0))), "tpt_table.md"])
    assert {"fig8_adversarial_robustness.png", "layerwise_nc1.png"} <= set(plots)


@pytest.mark.slow
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


@pytest.mark.slow
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
    (["--executor", "slurm", "--time", "1"], "error: argument --time: must be at least 2 minutes"),
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
        runs.write_config(run_dir, {"dataset": "synthetic"})
        runs.write_log(run_dir, [{column: 0.5 for column in runs.LOG_COLUMNS} | {"epoch": epoch} for epoch in (1, 2)])
        row = {column: 0.5 for column in runs.NC_COLUMNS} | {"epoch": 2, "train_acc": 1.0, "test_acc": accuracy}
        runs.merge_nc_metrics(run_dir, [row])  # and summary.json
        plots = tmp_path / "synthetic_plots" / run_dir.name
        plots.mkdir(parents=True)
        for name in [*reports.figure_files(runs.read_nc_metrics(run_dir)), "tpt_table.md"]:
            (plots / name).touch()
        entries.append({"run_dir": str(run_dir), "settings": {"lr": lr, "seed": seed}, "train": [], "validate": [],
                        "epochs": 2})
    study_dir = tmp_path / "studies" / "lr"
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({"name": "lr", "argv": ["--lr", "0.1", "0.01"], "grid": {},
                                                      "varied": ["lr", "seed"], "runs": entries}))
    with working_directory(tmp_path):  # where the figures are
        studies.refresh_tables(study_dir)
    rows = table_rows(study_dir / "runs.csv")
    assert [row["selected"] for row in rows] == ["False", "False", "True", "True"]
    assert [row["tpt_epoch"] for row in rows] == ["2"] * 4
    table = (study_dir / "table.md").read_text()
    assert table.count("**best lr**") == 2 and "| 0.01 | 20.00% | 2 |" in table
