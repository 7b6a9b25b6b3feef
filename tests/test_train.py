"""train.py end to end on the CPU: the run folder it writes, reproducibility, and its refusals."""
import csv
import json
import math

import pytest
import torch

import config
import runs
import train
from errors import UserError
from conftest import tiny_flags, without_seconds

TINY = tiny_flags(3)


def run_train(run_dir, *flags: str) -> int:
    return train.main(train.parse_args([*TINY, "--run-dir", str(run_dir), *flags]))


@pytest.fixture
def tiny_run(tiny_trained):
    """The tiny run of TINY's flags, trained once for the whole test run (read only)."""
    return tiny_trained


def test_the_run_folder_holds_config_log_and_checkpoints(tiny_run):
    settings = json.loads((tiny_run / "config.json").read_text())
    assert settings["dataset"] == "synthetic" and settings["epochs"] == 3 and settings["width"] == 4
    assert settings["samples_per_class"] == 20 and settings["precision"] == "fp32"
    assert len(settings["normalization"]["mean"]) == 3
    with open(tiny_run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert list(rows[0]) == runs.LOG_COLUMNS
    assert all(math.isfinite(float(row[column])) for row in rows for column in runs.LOG_COLUMNS)
    assert sorted(path.name for path in (tiny_run / "checkpoints").iterdir()) == \
        ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    analysis = torch.load(tiny_run / "checkpoints" / "epoch_0002.pt", weights_only=True)
    assert set(analysis) == {"model", "epoch", "config"} and analysis["epoch"] == 2
    last = torch.load(tiny_run / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config"} <= set(last) and last["epoch"] == 3
    assert last["config"] == settings
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["last_epoch"]["train_acc"] == float(rows[-1]["train_acc"])
    first_perfect = next((int(row["epoch"]) for row in rows if float(row["train_acc"]) == 1.0), None)
    assert summary["first_full_running_train_acc"] == first_perfect
    assert summary["tpt_epoch"] is None and summary["measured_through"] is None  # validate_nc.py measures it
    assert not list(tiny_run.rglob("*.tmp"))


def test_the_learning_rate_follows_the_milestones(tmp_path):
    run_train(tmp_path / "run", "--lr", "0.08", "--lr-milestones", "1", "2", "--lr-gamma", "0.5")
    assert [row["lr"] for row in runs.read_log(tmp_path / "run")] == pytest.approx([0.08, 0.04, 0.02])


def test_the_same_seed_gives_identical_weights_and_log(tiny_run, tmp_path):
    assert run_train(tmp_path / "again") == 0
    first = torch.load(tiny_run / "last.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert without_seconds(runs.read_log(tiny_run)) == without_seconds(runs.read_log(tmp_path / "again"))


def test_another_seed_gives_other_weights(tiny_run, tmp_path):
    run_train(tmp_path / "other", "--seed", "1")
    first = torch.load(tiny_run / "last.pt", weights_only=True)["model"]
    other = torch.load(tmp_path / "other" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_dataset_names_are_case_insensitive_and_folders_use_the_canonical_spelling():
    args = train.parse_args(["--dataset", "SYNTHETIC", "--samples-per-class", "20"])
    settings = config.resolve_config(args)
    assert settings["dataset"] == "synthetic"
    assert config.default_run_dir(settings, args).name == "synthetic-resnet18-ce-seed0-spc20"


def test_too_many_samples_per_class_names_the_maximum(tmp_path):
    with pytest.raises(UserError, match="at most 100 per class"):
        run_train(tmp_path / "run", "--samples-per-class", "101")
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_keeps_what_it_saved(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="diverged in epoch 2.*--lr"):
        run_train(run_dir, "--lr-milestones", "1", "--lr-gamma", "1e30")
    saved = torch.load(runs.checkpoint_path(run_dir, 1), weights_only=True)["model"]
    assert all(tensor.isfinite().all() for tensor in saved.values())
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not runs.checkpoint_path(run_dir, 2).exists()
    assert [row["epoch"] for row in runs.read_log(run_dir)] == [1]


def test_a_missing_dataset_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR10 not found in .*data.*--download"):
        train.main(train.parse_args(["--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                                     "--run-dir", str(tmp_path / "run"), "--device", "cpu"]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train_on_the_cpu_and_record_theirs(precision, tmp_path):
    assert run_train(tmp_path / "run", "--precision", precision) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == precision
    assert all(math.isfinite(row["train_loss"]) for row in runs.read_log(tmp_path / "run"))


@pytest.mark.compile
def test_a_compiled_run_matches_the_eager_one_and_saves_plain_weights(tmp_path):
    try:
        torch.compile(lambda x: x + 1)(torch.ones(1))
    except Exception as err:  # no C compiler, unsupported platform: say so rather than fail
        pytest.skip(f"torch.compile is unavailable here: {err}")
    assert run_train(tmp_path / "eager", "--precision", "fp32", "--epochs", "2") == 0
    assert run_train(tmp_path / "compiled", "--precision", "fp32", "--epochs", "2", "--compile") == 0
    state = runs.load_checkpoint(tmp_path / "compiled" / "last.pt")
    eager = runs.load_checkpoint(tmp_path / "eager" / "last.pt")
    assert state["model"].keys() == eager["model"].keys()  # no torch.compile wrapper prefix
    for mine, theirs in zip(runs.read_log(tmp_path / "compiled"), runs.read_log(tmp_path / "eager")):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-3)


@pytest.mark.parametrize("eval_every, evaluated", [("3", [3, 4]), ("0", [])])
def test_evaluating_less_often_or_never_leaves_training_unchanged(tmp_path, eval_every, evaluated):
    # --eval-every 3: every third epoch and the last (the only analysis checkpoint); 0: never, test columns empty
    assert run_train(tmp_path / "every", "--epochs", "4", "--num-checkpoints", "1") == 0
    assert run_train(tmp_path / "sparse", "--epochs", "4", "--num-checkpoints", "1", "--eval-every", eval_every) == 0
    every, sparse = (runs.load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("every", "sparse"))
    assert all(torch.equal(every[key], sparse[key]) for key in every)
    log = runs.read_log(tmp_path / "sparse")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert [row["epoch"] for row in log if row["test_acc"] is not None] == evaluated
    dense = {row["epoch"]: row for row in runs.read_log(tmp_path / "every")}
    assert all(row[key] == dense[row["epoch"]][key] if row["epoch"] in evaluated else row[key] is None
               for row in log for key in ("test_loss", "test_acc", "test_ece"))

