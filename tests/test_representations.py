"""The Mixup representation figure end to end: a short MSE + Mixup run on synthetic, its validation, the
projected features, the CSV and PNG, and redrawing them with plotting.py."""
import copy
import math

import pytest
import torch

import datasets
import engine
import plotting
import runs
import train
import validate_nc
from errors import UserError
from conftest import validate

CLASSES = [1, 4, 7]


@pytest.fixture(scope="module")
def mixup_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixup") / "run"
    flags = ["--dataset", "synthetic", "--width", "4", "--epochs", "4", "--num-checkpoints", "2",
             "--samples-per-class", "20", "--device", "cpu", "--loss", "mse", "--mixup-alpha", "1",
             "--run-dir", str(run_dir)]
    assert train.main(train.parse_args(flags)) == 0
    return run_dir



def loaded(run_dir, epoch: int):
    state = runs.load_checkpoint(runs.checkpoint_path(run_dir, epoch))
    model = engine.build_model(state["config"], torch.device("cpu"))
    model.load_state_dict(state["model"])
    train_split = datasets.load_run_data(state["config"], state["config"]["data_root"], False,
                                         torch.device("cpu")).train
    return model, train_split, state["config"]


@pytest.mark.slow
def test_the_run_validates_on_clean_data_and_draws_the_representation_figure(mixup_run):
    assert validate(mixup_run) == 0
    assert [row["epoch"] for row in runs.read_nc_metrics(mixup_run)] == [1, 4]
    assert validate(mixup_run, "--representations", "--classes", *map(str, CLASSES)) == 0
    table = mixup_run.parent / "plots" / "mixup_representations_epoch4.csv"
    assert table.with_suffix(".png").stat().st_size > 10_000
    rows = runs.read_csv(table)
    kinds = {kind: [row for row in rows if row["kind"] == kind] for kind in ("same", "mixed", "classifier", "mean")}
    assert {float(row["lam"]) for row in kinds["same"]} == set(validate_nc.REPRESENTATION_LAMBDAS)
    assert {(row["class_a"], row["class_b"]) for row in kinds["mixed"]} == {("1", "4"), ("1", "7"), ("4", "7")}
    assert all(row["class_a"] == row["class_b"] for row in kinds["same"])
    assert sorted(int(row["class_a"]) for row in kinds["classifier"]) == CLASSES
    # The centred classifier rows sum to zero, in the plane as in feature space.
    assert sum(float(row["x"]) for row in kinds["classifier"]) == pytest.approx(0, abs=1e-9)
    assert sum(float(row["y"]) for row in kinds["classifier"]) == pytest.approx(0, abs=1e-9)

    redrawn = mixup_run.parent / "redrawn.png"
    assert plotting.main(plotting.parse_args(["representations", str(table), "--out", str(redrawn)])) == 0
    assert redrawn.stat().st_size > 10_000


def test_unmixed_points_average_to_the_class_means(mixup_run):
    """At lam = 1 a same-class pair is the clean image itself, so its points average to the class mean."""
    model, train_split, settings = loaded(mixup_run, 4)
    rows = engine.mixup_representations(model, train_split, settings, CLASSES, [1.0], per_class=10)
    for label in CLASSES:
        points = torch.tensor([[row["x"], row["y"]] for row in rows
                               if row["kind"] == "same" and row["class_a"] == label], dtype=torch.float64)
        mean = next(row for row in rows if row["kind"] == "mean" and row["class_a"] == label)
        assert points.mean(dim=0).tolist() == pytest.approx([mean["x"], mean["y"]], abs=1e-9)


def test_batch_statistics_mode_leaves_the_model_untouched(mixup_run):
    model, train_split, settings = loaded(mixup_run, 4)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    rows_train = engine.mixup_representations(model, train_split, settings, CLASSES, [0.5], per_class=5,
                                              bn_mode="train")
    assert not model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    rows_eval = engine.mixup_representations(model, train_split, settings, CLASSES, [0.5], per_class=5)
    assert all(math.isfinite(row["x"]) for row in rows_train)
    assert [row["x"] for row in rows_train if row["kind"] == "mixed"] != [
        row["x"] for row in rows_eval if row["kind"] == "mixed"]


def test_bad_choices_are_refused_with_the_valid_ones(mixup_run):
    with pytest.raises(UserError, match="three different classes in 0..9"):
        validate(mixup_run, "--representations", "--classes", "1", "1", "2")
    with pytest.raises(UserError, match=r"no checkpoint of epoch 3; choose among \[1, 4\]"):
        validate(mixup_run, "--representations", "--representation-epochs", "3")
    with pytest.raises(UserError, match="not found"):
        plotting.plot_representations(mixup_run / "missing.csv")
