"""scripts/paper_scale.sh: its --tiny dry run end to end (the tables, panel, timings with the command and
the archive it packs), a run cut by its deadline packing what it measured, --prepare, and the choice of
precision and folder names from the known speeds."""
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

import runs
from conftest import load_script, ONE_THREAD

REPO = Path(__file__).resolve().parents[1]
TABLES = ["config.json", "log.csv", "summary.json", "nc_metrics.csv", "tpt_table.md", "timings.txt", "panel.png"]


def paper_scale(tmp_path: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The script as a user runs it, its runs under tmp_path/runs, its archive into tmp_path/out ($OUT)."""
    return subprocess.run([str(REPO / "scripts" / "paper_scale.sh"), "--tiny", "--runs-dir", str(tmp_path / "runs"),
                           *flags], cwd=tmp_path, env={**ONE_THREAD, "OUT": str(tmp_path / "out"), **(env or {})},
                          capture_output=True, text=True, timeout=900)


def script():
    return load_script("scripts/paper_scale.py")


def archived(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


@pytest.mark.slow
def test_the_tiny_dry_run_checks_trains_measures_and_packs_every_table_the_panel_and_the_command(
        tmp_path, design_packages_only):
    result = paper_scale(tmp_path, env=design_packages_only)  # the optional packages unimportable, as on the GPU
    assert result.returncode == 0, result.stdout + result.stderr
    results = tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20-ep4"
    assert sorted(path.name for path in results.iterdir()) == sorted(TABLES)
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20-ep4"
    log = runs.read_log(results)
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert all(row["test_acc"] is None for row in log)  # the test split is the follower's, measured once
    measured = runs.read_nc_metrics(results)
    assert [row["epoch"] for row in measured] == [1, 2, 4] and all(row["test_acc"] > 0 for row in measured)
    assert (results / "nc_metrics.csv").read_bytes() == (run_dir / "nc_metrics.csv").read_bytes()
    with Image.open(results / "panel.png") as image:
        assert image.format == "PNG"
    timings = (results / "timings.txt").read_text()
    assert timings.startswith(f"command: scripts/paper_scale.sh --tiny --runs-dir {tmp_path / 'runs'}\n")
    for line in ("preflight: python ", "preflight: packages imported: ", "preflight: data: synthetic 1000 training "
                 "and 500 test images", "check: PASS resume ", "check: SKIP compile ", "check: PASS bf16 ",
                 "check: PASS follow ", "check: PASS deepfool ", "check: PASS torchrun ",
                 "check: gpu_check: 5 passed, 0 failed, 1 left out"):
        assert f"\n{line}" in timings, line
    assert "torch " in timings.split("packages imported: ")[1].splitlines()[0]
    assert f"train.py --dataset synthetic --width 4 --samples-per-class 20 --device cpu --precision fp32 --seed 0 " \
           f"--epochs 4 --num-checkpoints 3 --eval-every 0 --save-last checkpoint --run-dir {run_dir}" in timings
    assert f"validate_nc.py --run-dir {run_dir} --follow" in timings
    assert "seed 0 (fp32): epoch 4/4, 3/3 checkpoints measured" in timings
    assert "finished: every epoch trained and every checkpoint measured" in timings
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["panel.png", "paper_scale.tar.gz", "timings.txt"]
    assert (out / "timings.txt").read_text() == timings
    packed = archived(out / "paper_scale.tar.gz")
    assert {f"{results.name}/{name}" for name in TABLES} <= set(packed)
    assert packed[f"{results.name}/nc_metrics.csv"] == (results / "nc_metrics.csv").read_bytes()
    assert packed[f"{results.name}/panel.png"] == (out / "panel.png").read_bytes()
    assert "plots-seed0/fig6_nc1.png" in packed and "logs/train-seed0-fp32.log" in packed
    assert "logs/gpu_check.log" in packed
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_run_cut_by_its_deadline_packs_what_it_measured(tmp_path):
    result = paper_scale(tmp_path, "--skip-check", "--epochs", "500", "--num-checkpoints", "500", "--deadline", "60")
    assert result.returncode == 1, result.stdout + result.stderr  # packed, but not finished
    assert "trainer stopped by the deadline" in result.stdout
    results = tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20-ep500"
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20-ep500"
    timings = (results / "timings.txt").read_text()
    assert "NOT finished: the tables hold what was reached" in timings
    # Its epochs take a fraction of a second, each a checkpoint: the 48 s before the trainer is stopped reach
    # dozens of them, measured, even on 2 busy cores; the archive must hold both tables as the run left them.
    measured = runs.read_nc_metrics(run_dir)
    assert 0 < len(runs.read_log(run_dir)) < 500 and measured, "no epoch trained or measured before the deadline"
    packed = archived(tmp_path / "out" / "paper_scale.tar.gz")
    for name in ("log.csv", "nc_metrics.csv"):  # every row the runs had written when they were stopped
        assert packed[f"{results.name}/{name}"] == (run_dir / name).read_bytes(), name
    checkpoints = [epoch for epoch, _ in runs.checkpoint_files(run_dir)]
    assert [row["epoch"] for row in measured] == checkpoints[:len(measured)]  # in order, none half-written


def test_prepare_copies_the_data_and_its_maker_and_checks_what_travels(tmp_path, capsys):
    source = tmp_path / "shared"
    source.mkdir()
    (source / "cifar10-jpeg.zip").write_bytes(b"zip" * 1000)
    (source / "make_cifar10.py").write_text("print('unpack')\n")
    assert script().prepare(source, tmp_path / ".gpu") == 0
    assert (tmp_path / ".gpu" / "cifar10-jpeg.zip").read_bytes() == b"zip" * 1000
    printed = capsys.readouterr().out
    assert "MiB of the 64 MiB that travel" in printed and "scripts/paper_scale.sh --deadline 540" in printed
    (source / "make_cifar10.py").unlink()
    with pytest.raises(Exception, match="make_cifar10.py is missing; pass --source"):
        script().prepare(source, tmp_path / ".gpu")


def test_git_ignores_the_carried_data():
    ignored = subprocess.run(["git", "check-ignore", ".gpu/cifar10-jpeg.zip", ".gpu/data/cifar-10-batches-py"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 0 and len(ignored.stdout.splitlines()) == 2


def test_the_known_speeds_choose_fp32_only_where_it_finishes():
    known = script().known_precision
    # 350 epochs and 50 checkpoints: fp32 at its estimated 2.6 s per epoch needs 1,001 + 112 s, bf16 at its
    # measured 1.30 s 500.5 + 112 s; each checkpoint's measurement 2.24 s.
    assert known(350, 50, 435)[0] == "bf16" and "it may not finish" in known(350, 50, 435)[1]
    assert known(350, 50, 1114)[0] == "fp32" and "it may not finish" not in known(350, 50, 1114)[1]
    assert known(350, 50, 1112)[0] == "bf16" and "fp32 an estimate" in known(350, 50, 1112)[1]


def test_the_time_needed_adds_a_tenth_to_the_epochs_and_the_measurements_after():
    assert script().needed_seconds(1.0, 100, 2.0, 5) == pytest.approx(120.0)
    assert script().finishes(1.0, 100, 2.0, 5, 120.5) and not script().finishes(1.0, 100, 2.0, 5, 119.5)


@pytest.mark.parametrize("flags, name, run", [
    (["--precision", "fp32"], "CIFAR10-resnet18", "CIFAR10-resnet18-ce-seed0"),
    (["--precision", "bf16"], "CIFAR10-resnet18-bf16", "CIFAR10-resnet18-ce-seed0-bf16"),
    (["--precision", "bf16", "--seeds", "3"], "CIFAR10-resnet18-bf16-3seeds", "CIFAR10-resnet18-ce-seed0-bf16"),
    (["--precision", "fp32", "--", "--width", "32"], "CIFAR10-resnet18-w32", "CIFAR10-resnet18-ce-seed0-w32"),
])
def test_the_results_folder_names_the_precision_and_the_seeds(flags, name, run, tmp_path):
    module = script()
    args = module.parse_args(["--data-root", str(tmp_path), *flags])
    plan = module.Plan(tiny=False, device_name="GPU", compiled=True, precision=args.precision, why="",
                       seeds=list(range(args.seeds)), epochs=350, num_checkpoints=50,
                       selection=["--dataset", "CIFAR10", "--data-root", str(tmp_path), *args.extra],
                       data_root=tmp_path, runs_dir=tmp_path, results=None, out=None, command="", compile_grace=1.0)
    assert plan.name() == name and plan.run_dir(0).name == run


@pytest.mark.slow
@pytest.mark.parametrize("how, environment, flags, why", [
    ("still compiling", {}, ["--compile-grace", "1"], "had not logged its first epoch 1 s after it started"),
    ("failing", {"CXX": "/bin/false"}, [], "failed (exit 1: "),  # inductor finds no C++ compiler
])
def test_a_compiled_trainer_that_fails_or_is_still_compiling_is_restarted_eagerly(tmp_path, how, environment, flags,
                                                                                   why):
    result = paper_scale(tmp_path, "--skip-check", "--compile", *flags, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    timings = (tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20-ep4" / "timings.txt").read_text()
    decision = next(line for line in timings.splitlines() if "the compiled trainer" in line)
    assert decision.startswith(f"decision: seed 0: the compiled trainer {why}") and "restarted eagerly" in decision
    commands = [line for line in timings.splitlines() if line.startswith("seed 0 ran: ") and "train.py" in line]
    assert len(commands) == 2 and commands[0].endswith(" --compile") and not commands[1].endswith(" --compile")
    assert "seed 0 (fp32, eager): epoch 4/4, 3/3 checkpoints measured" in timings
    assert "finished: every epoch trained and every checkpoint measured" in timings


@pytest.mark.slow
def test_sigterm_stops_every_process_at_once_and_a_second_command_resumes_the_run_and_packs_it_whole(tmp_path):
    flags = ["--tiny", "--runs-dir", str(tmp_path / "runs"), "--skip-check", "--epochs", "12"]
    process = subprocess.Popen([str(REPO / "scripts" / "paper_scale.sh"), *flags], cwd=tmp_path,
                               env={**ONE_THREAD, "OUT": str(tmp_path / "out")}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20-ep12"
    while len(runs.read_log(run_dir)) < 2 and process.poll() is None:
        time.sleep(0.1)
    trainer = int((run_dir / runs.TRAIN_LOCK).read_text().split()[1])
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert not Path(f"/proc/{trainer}").exists()  # stopped with the command, not left running
    results = tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20-ep12"
    timings = (results / "timings.txt").read_text()
    assert "decision: interrupted at " in timings and "scripts/paper_scale.sh --resume continues it" in timings
    stopped = runs.read_log(run_dir)[-1]["epoch"]
    assert stopped < 12 and runs.load_checkpoint(run_dir / "last.pt")["epoch"] == stopped  # its epoch finished
    assert (tmp_path / "out" / "timings.txt").read_text() == timings

    second = paper_scale(tmp_path, "--resume", "--deadline", "400")
    assert second.returncode == 0, second.stdout + second.stderr
    assert [row["epoch"] for row in runs.read_log(results)] == list(range(1, 13))
    checkpoints = [epoch for epoch, _ in runs.checkpoint_files(run_dir)]
    assert [row["epoch"] for row in runs.read_nc_metrics(results)] == checkpoints and checkpoints[-1] == 12
    resumed = (results / "timings.txt").read_text()
    assert resumed.startswith(timings)  # the first command's lines, then the second's
    assert f"\ncommand: scripts/paper_scale.sh --tiny --runs-dir {tmp_path / 'runs'} --resume" in resumed
    assert "check: not run again: --resume" in resumed
    assert resumed.rstrip().endswith("finished: every epoch trained and every checkpoint measured")
    assert (tmp_path / "out" / "timings.txt").read_text() == resumed


def test_a_panel_that_cannot_be_drawn_leaves_the_tables_and_the_archive_packed(tmp_path, monkeypatch, capsys):
    module = script()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.write_config(run_dir, {"dataset": "synthetic"})
    runs.write_csv(run_dir / "nc_metrics.csv", [{**dict.fromkeys(runs.NC_COLUMNS, 0.5), "epoch": 1}], runs.NC_COLUMNS)
    plan = module.Plan(tiny=True, device_name="CPU", compiled=False, precision="fp32", why="", seeds=[0], epochs=1,
                       num_checkpoints=1, selection=module.TINY["flags"], data_root=None, runs_dir=tmp_path,
                       results=tmp_path / "results", out=tmp_path / "out", command="paper_scale.sh", compile_grace=1.0)
    job = module.Job(0, run_dir, subprocess.Popen(["true"]), False, [], 0.0)
    job.trainer.wait()

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(module.plotting, "plot_panel", broken)
    monkeypatch.setattr(module.reports, "tpt_table", lambda folder: "table\n")
    module.pack(plan, module.Outcome(jobs=[job]), module._Clock(60))
    assert "the panel could not be drawn (RuntimeError: no fonts); the tables are packed" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["paper_scale.tar.gz", "timings.txt"]
    assert "results/config.json" in archived(tmp_path / "out" / "paper_scale.tar.gz")


def test_a_failed_check_trains_nothing_and_packs_its_lines(tmp_path, monkeypatch):
    module = script()

    def failing(plan, outcome, clock):
        outcome.check = ["FAIL resume    DIFFERENT"]
        outcome.decisions.append("the GPU check failed: nothing was trained")
        return False

    monkeypatch.setattr(module, "gpu_check", failing)
    monkeypatch.setattr(module, "run_everything", lambda *args: pytest.fail("trained after a failed check"))
    args = module.parse_args(["--tiny", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert module.main(args) == 1
    timings = (tmp_path / "out" / "timings.txt").read_text()
    assert "check: FAIL resume    DIFFERENT" in timings and "decision: the GPU check failed: nothing was trained" \
        in timings
