"""validate_nc.py end to end on tiny CPU runs: the metrics table, the figures, skipping and recomputing,
damaged checkpoints, and collapse on the synthetic dataset."""
import json
import math
import shutil

import pytest
import torch
from PIL import Image

import datasets
import engine
import runs
import train
import validate_nc
from errors import UserError
from conftest import tiny_flags, validate

TINY = tiny_flags(3)
FIGURES = ["fig2_equinorm.png", "fig3_equiangularity.png", "fig4_max_equiangularity.png", "fig5_self_duality.png",
           "fig6_nc1.png", "fig7_ncc_mismatch.png", "training_curves.png", "panel.png"]


@pytest.fixture
def run_dir(tiny_trained, tmp_path):
    """The tiny run of TINY's flags (trained once for the whole test run), copied afresh for each test so that
    tests cannot see each other's results."""
    return shutil.copytree(tiny_trained, tmp_path / "run")



@pytest.mark.slow
def test_the_table_has_a_row_per_checkpoint_with_every_column(run_dir):
    assert validate(run_dir) == 0
    rows = runs.read_nc_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(set(row) == set(runs.NC_COLUMNS) for row in rows)
    assert all(math.isfinite(row[column]) for row in rows for column in runs.NC_COLUMNS)
    assert all(0 <= row[column] <= 1 for row in rows
               for column in ("train_acc", "test_acc", "ncc_mismatch_train", "ncc_mismatch_test", "test_ece"))


@pytest.mark.slow
def test_every_figure_is_a_png_at_150_dpi(run_dir):
    validate(run_dir)
    plots = run_dir.parent / "plots"
    for name in FIGURES:
        with Image.open(plots / name) as image:
            assert image.format == "PNG"
            assert image.info["dpi"] == pytest.approx((150, 150), abs=0.1)
            assert image.width >= 525 and image.height >= 360  # at least 3.5 inches wide, 2.4 tall
    assert "| synthetic |" in (plots / "tpt_table.md").read_text()


@pytest.mark.slow
def test_measured_checkpoints_are_skipped_unless_recomputed(run_dir, capsys):
    validate(run_dir)
    table = (run_dir / "nc_metrics.csv").read_text()
    rows = runs.read_nc_metrics(run_dir)
    rows[0]["nc1"] = 12345.0
    runs.write_csv(run_dir / "nc_metrics.csv", rows, runs.NC_COLUMNS)
    capsys.readouterr()
    validate(run_dir)
    assert "0 checkpoint(s) measured" in capsys.readouterr().out
    assert runs.read_nc_metrics(run_dir)[0]["nc1"] == 12345.0
    validate(run_dir, "--recompute")
    assert "3 checkpoint(s) measured" in capsys.readouterr().out
    assert runs.read_nc_metrics(run_dir)[0]["nc1"] == pytest.approx(table_nc1(table), rel=1e-12)


@pytest.mark.slow
def test_new_checkpoints_of_a_run_still_training_are_added(run_dir, capsys):
    runs.checkpoint_path(run_dir, 3).unlink()
    validate(run_dir)
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 2]
    shutil.copy(run_dir / "last.pt", runs.checkpoint_path(run_dir, 3))
    capsys.readouterr()
    validate(run_dir)
    assert "1 checkpoint(s) measured" in capsys.readouterr().out
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 2, 3]


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_and_the_others_are_measured(run_dir, capsys):
    damaged = runs.checkpoint_path(run_dir, 2)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert validate(run_dir) == 1
    assert str(damaged) in capsys.readouterr().err
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 3]


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_reported_and_the_others_are_measured(run_dir, tmp_path, capsys):
    train.main(train.parse_args([*TINY, "--seed", "1", "--epochs", "1", "--num-checkpoints", "1",
                                 "--run-dir", str(tmp_path / "other")]))
    shutil.copy(runs.checkpoint_path(tmp_path / "other", 1), runs.checkpoint_path(run_dir, 1))
    assert validate(run_dir) == 1
    assert "belongs to another run" in capsys.readouterr().err
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [2, 3]


@pytest.mark.slow
def test_a_checkpoint_with_nan_weights_is_reported_and_the_others_are_measured(run_dir, capsys):
    state = torch.load(runs.checkpoint_path(run_dir, 2), weights_only=True)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, runs.checkpoint_path(run_dir, 2))
    assert validate(run_dir) == 1
    err = capsys.readouterr().err
    assert "epoch_0002.pt holds weights that are not finite" in err and "Traceback" not in err
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 3]


@pytest.mark.slow
def test_a_checkpoint_whose_features_overflow_is_reported_and_the_others_are_measured(run_dir, capsys):
    """Finite weights can still give NaN features: a diverged run's checkpoint (weights up to 1e27)."""
    state = torch.load(runs.checkpoint_path(run_dir, 2), weights_only=True)
    for key, tensor in state["model"].items():
        if key.endswith("conv1.weight"):
            tensor.mul_(1e30)
    torch.save(state, runs.checkpoint_path(run_dir, 2))
    assert validate(run_dir) == 1
    assert "are not finite (NaN or Inf): the network had diverged" in capsys.readouterr().err
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 3]


@pytest.mark.slow
def test_a_random_bytes_checkpoint_is_unreadable_not_malicious(run_dir, capsys):
    runs.checkpoint_path(run_dir, 3).write_bytes(bytes(range(256)) * 8)
    assert validate(run_dir) == 1
    err = capsys.readouterr().err
    assert "epoch_0003.pt is " in err and ("corrupt" in err or "truncated" in err) and "run code" not in err


def test_two_validations_writing_one_table_lose_no_rows(run_dir):
    """Each adds its row to the table as it is on disk: the one that writes last keeps the other's rows."""
    first = runs.merge_nc_metrics(run_dir, [{"epoch": 1, **dict.fromkeys(runs.NC_COLUMNS[1:], 0.5)}])
    second = runs.merge_nc_metrics(run_dir, [{"epoch": 2, **dict.fromkeys(runs.NC_COLUMNS[1:], 0.25)}])
    assert list(first) == [1] and sorted(second) == [1, 2]
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 2]


@pytest.mark.slow
def test_the_same_flags_find_the_folder_train_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", "Synthetic", "--width", "4", "--samples-per-class", "20", "--device", "cpu"]
    train.main(train.parse_args([*flags, "--epochs", "1", "--num-checkpoints", "1"]))
    assert validate_nc.main(validate_nc.parse_args([*flags, "--epochs", "1", "--eval-batch-size", "64"])) == 0
    run_dir = tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20-ep1"
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1]
    assert (tmp_path / "synthetic_plots" / run_dir.name / "fig6_nc1.png").is_file()
    train.main(train.parse_args([*flags, "--batch-size", "64", "--epochs", "1", "--num-checkpoints", "1"]))
    # the training batch
    assert validate_nc.main(validate_nc.parse_args([*flags, "--batch-size", "64", "--epochs", "1"])) == 0
    assert runs.read_nc_metrics(tmp_path / "runs" / "synthetic-resnet18-ce-seed0-w4-spc20-ep1-bs64")


def test_a_run_not_there_lists_the_runs_of_its_dataset_with_their_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(train.parse_args(["--dataset", "synthetic", "--width", "4", "--samples-per-class", "20",
                                 "--epochs", "1", "--num-checkpoints", "1", "--device", "cpu"]))
    with pytest.raises(UserError) as refused:
        validate_nc.main(validate_nc.parse_args(["--dataset", "synthetic", "--device", "cpu"]))
    message = str(refused.value)
    assert message.startswith("no run folder at runs/synthetic-resnet18-ce-seed0; runs of synthetic there: "
                               "runs/synthetic-resnet18-ce-seed0-w4-spc20-ep1 (--dataset synthetic --width 4 "
                               "--samples-per-class 20 --epochs 1)")
    assert message.endswith("train it with: python train.py --dataset synthetic")


@pytest.mark.parametrize("flags, message", [
    (["--num-checkpoints", "5"], "unrecognized arguments: --num-checkpoints 5"),
    (["--representation-epochs", "5"], "--representation-epochs, --classes and --bn-mode choose what"),
    (["--representations", "--layers"], "--representations draws a figure instead of measuring"),
])
def test_flags_that_mean_nothing_for_the_call_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        validate_nc.parse_args(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_run_folder_names_the_train_command(tmp_path):
    with pytest.raises(UserError, match=r"no run folder at .*missing.*python train\.py"):
        validate(tmp_path / "missing")


def test_a_run_without_checkpoints_names_the_train_command(run_dir):
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(UserError, match=r"no checkpoints yet.*python train\.py"):
        validate(run_dir)


@pytest.mark.slow
def test_the_synthetic_default_collapses(tmp_path):
    """The quick start's run: NC1 at the last checkpoint is at least 10x below NC1 at the first."""
    run_dir = tmp_path / "quick"
    train.main(train.parse_args(["--dataset", "synthetic", "--device", "cpu", "--run-dir", str(run_dir)]))
    assert validate(run_dir) == 0
    rows = runs.read_nc_metrics(run_dir)
    assert rows[-1]["nc1"] < rows[0]["nc1"] / 10
    assert rows[-1]["train_acc"] == 1.0


def table_nc1(table: str) -> float:
    header, first = table.splitlines()[:2]
    return float(first.split(",")[header.split(",").index("nc1")])


@pytest.mark.slow
def test_the_tpt_onset_is_the_clean_eval_mode_accuracy_not_the_running_one_of_a_mixup_run(tmp_path):
    """Under Mixup the running accuracy of log.csv scores mixed inputs and never reaches 1; the network
    in eval mode classifies the clean training set perfectly well before the run ends."""
    run_dir = tmp_path / "mixup"
    train.main(train.parse_args(["--dataset", "synthetic", "--width", "8", "--epochs", "10", "--num-checkpoints", "10",
                                 "--samples-per-class", "20", "--batch-size", "20", "--lr-milestones", "6",
                                 "--mixup-alpha", "1", "--device", "cpu", "--run-dir", str(run_dir)]))
    assert validate(run_dir) == 0
    measured, log = runs.read_nc_metrics(run_dir), runs.read_log(run_dir)
    onset = next(row["epoch"] for row in measured if row["train_acc"] == 1.0)
    assert all(row["train_acc"] < 1 for row in log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tpt_epoch"] == onset and summary["first_full_running_train_acc"] is None
    assert summary["tpt_test_acc"] == next(row["test_acc"] for row in measured if row["epoch"] == onset)
    table = (run_dir.parent / "plots" / "tpt_table.md").read_text().splitlines()[2]
    assert table.split("|")[3].strip() == str(onset)


@pytest.mark.slow
def test_test_samples_evaluates_and_measures_on_exactly_its_subset_of_the_test_split(tmp_path):
    """Trained and measured with --test-samples 30: the test accuracy of log.csv and nc_metrics.csv is that of
    the checkpoint's network on the 30 chosen test images (3 per class), counted here by hand."""
    run_dir = tmp_path / "run"
    flags = tiny_flags(1, 1, 20, "--test-samples", "30", "--seed", "3")
    assert train.main(train.parse_args([*flags, "--run-dir", str(run_dir)])) == 0
    assert validate(run_dir) == 0
    settings = runs.read_config(run_dir)
    assert settings["test_samples"] == 30 and run_dir.parent.joinpath("plots", "panel.png").is_file()
    whole = datasets.load_run_data({**settings, "test_samples": None}, settings["data_root"], False,
                                   torch.device("cpu")).test
    chosen = datasets.test_subset_indices(whole[1], 30, seed=3)
    assert torch.bincount(whole[1][chosen]).tolist() == [3] * 10
    state = runs.load_checkpoint(runs.checkpoint_path(run_dir, 1))
    model = engine.build_model(state["config"], torch.device("cpu"))
    model.load_state_dict(state["model"])
    with torch.no_grad():
        logits = model.eval()(datasets.normalize(whole[0][chosen], **settings["normalization"]))
    correct = int((logits.argmax(1) == whole[1][chosen]).sum())
    assert runs.read_nc_metrics(run_dir)[0]["test_acc"] == pytest.approx(correct / 30, abs=1e-12)
    assert runs.read_log(run_dir)[0]["test_acc"] == pytest.approx(correct / 30, abs=1e-12)
