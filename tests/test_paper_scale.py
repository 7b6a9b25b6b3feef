"""scripts/paper_scale.sh: its --tiny dry run end to end (the tables, panel, timings with the command and
the archive it packs), a run cut by its deadline packing what it measured, --prepare, and the choice of
precision and folder names from the known speeds."""
import importlib.util
import os
import subprocess
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

import runs

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TABLES = ["config.json", "log.csv", "summary.json", "nc_metrics.csv", "tpt_table.md", "timings.txt", "panel.png"]


def paper_scale(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, its runs under tmp_path/runs, its archive into tmp_path/out ($OUT)."""
    return subprocess.run([str(REPO / "scripts" / "paper_scale.sh"), "--tiny", "--runs-dir", str(tmp_path / "runs"),
                           *flags], cwd=tmp_path, env={**ONE_THREAD, "OUT": str(tmp_path / "out")},
                          capture_output=True, text=True, timeout=900)


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_scale_script", REPO / "scripts" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archived(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


@pytest.mark.slow
def test_the_tiny_dry_run_trains_measures_and_packs_every_table_the_panel_and_the_command(tmp_path):
    result = paper_scale(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20"
    assert sorted(path.name for path in results.iterdir()) == sorted(TABLES)
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20"
    log = runs.read_log(results)
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    # The test split is evaluated at the analysis checkpoints (1, 2, 4 of 4 epochs) only.
    assert [row["epoch"] for row in log if row["test_acc"] is not None] == [1, 2, 4]
    assert [row["epoch"] for row in runs.read_nc_metrics(results)] == [1, 2, 4]
    assert (results / "nc_metrics.csv").read_bytes() == (run_dir / "nc_metrics.csv").read_bytes()
    with Image.open(results / "panel.png") as image:
        assert image.format == "PNG"
    timings = (results / "timings.txt").read_text()
    assert timings.startswith(f"command: scripts/paper_scale.sh --tiny --runs-dir {tmp_path / 'runs'}\n")
    assert f"train.py --dataset synthetic --width 4 --samples-per-class 20 --device cpu --precision fp32 --seed 0 " \
           f"--epochs 4 --num-checkpoints 3 --eval-every 4 --run-dir {run_dir}" in timings
    assert f"validate_nc.py --run-dir {run_dir} --follow" in timings
    assert "eager only: torch.compile is left out on the CPU" in timings
    assert "seed 0 (fp32): epoch 4/4, 3/3 checkpoints measured" in timings
    assert "finished: every epoch trained and every checkpoint measured" in timings
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["panel.png", "paper_scale.tar.gz", "timings.txt"]
    assert (out / "timings.txt").read_text() == timings
    packed = archived(out / "paper_scale.tar.gz")
    assert {f"{results.name}/{name}" for name in TABLES} <= set(packed)
    assert packed[f"{results.name}/nc_metrics.csv"] == (results / "nc_metrics.csv").read_bytes()
    assert "plots-seed0/fig6_nc1.png" in packed and "logs/train-seed0-fp32.log" in packed
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_run_cut_by_its_deadline_packs_what_it_measured(tmp_path):
    result = paper_scale(tmp_path, "--epochs", "500", "--num-checkpoints", "500", "--deadline", "60")
    assert result.returncode == 1, result.stdout + result.stderr  # packed, but not finished
    assert "trainer stopped by the deadline" in result.stdout
    results = tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20"
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20"
    timings = (results / "timings.txt").read_text()
    assert "NOT finished: the tables hold what was reached" in timings
    assert len(runs.read_log(run_dir)) < 500
    packed = archived(tmp_path / "out" / "paper_scale.tar.gz")
    for name in ("log.csv", "nc_metrics.csv"):  # every row the runs had written when they were stopped
        if (run_dir / name).exists():
            assert packed[f"{results.name}/{name}"] == (run_dir / name).read_bytes()
    measured = runs.read_nc_metrics(run_dir)
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
    plan = module.Plan(tiny=False, device_name="GPU", compiled=True, precision=args.precision, why="", probe=None,
                       seeds=list(range(args.seeds)), epochs=350, num_checkpoints=50,
                       selection=["--dataset", "CIFAR10", "--data-root", str(tmp_path), *args.extra],
                       data_root=tmp_path, runs_dir=tmp_path, results=None, out=None, command="")
    assert plan.name() == name and plan.run_dir(0).name == run


def test_seeds_with_a_probe_of_the_precision_is_refused(capsys):
    with pytest.raises(SystemExit):
        script().parse_args(["--seeds", "3", "--probe"])
    assert "one probe decides one thing" in capsys.readouterr().err


@pytest.mark.compile
def test_the_tiny_dry_run_compiled_prints_eager_and_compiled_losses_that_agree(tmp_path):
    result = paper_scale(tmp_path, "--compile")
    assert result.returncode == 0, result.stdout + result.stderr
    timings = (tmp_path / "runs" / "results" / "synthetic-resnet18-w4-spc20" / "timings.txt").read_text()
    line = next(line for line in timings.splitlines() if "eager vs compiled (fp32), epochs 1-2" in line)
    assert float(line.rsplit("difference ", 1)[1].rstrip(")")) < 1e-3
