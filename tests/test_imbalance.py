"""Imbalanced training and its measurement: the class counts of both profiles against their formulas and the
published CIFAR-LT sizes, the seeded subset, the run's settings and folder, class-balanced statistics against a
two-pass computation, the Minority Collapse numbers of hand-built classifiers, and a tiny run end to end."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import config
import datasets
import engine
import losses
import reports
import runs
import studies
import sweep
import train
import validate_nc
from errors import UserError
from nc_metrics import OTHER_KEYS, FeatureStats, balancing_weights, group_cosines, mean_pair_cosine, metrics_from_stats
from test_distributed import torchrun
from test_nc_metrics import simplex_etf
from conftest import tiny_flags

TINY = tiny_flags(3)


# ---------------------------------------------------------------- the class counts

def test_step_keeps_n_of_the_first_half_and_n_over_r_rounded_up_of_the_rest():
    assert datasets.imbalanced_counts(10, 500, 10, "step") == [500] * 5 + [50] * 5
    assert datasets.imbalanced_counts(10, 500, 100, "step") == [500] * 5 + [5] * 5
    assert datasets.imbalanced_counts(10, 500, 3, "step") == [500] * 5 + [167] * 5  # ceil(166.67)
    assert datasets.imbalanced_counts(5, 9, 4, "step") == [9, 9, 9, 3, 3]  # ceil(5/2) majority classes, ceil(9/4)
    assert datasets.imbalanced_counts(10, 7, 1000, "step") == [7] * 5 + [1] * 5  # never an empty class


def test_exp_decays_geometrically_and_gives_the_published_long_tailed_cifar_sizes():
    # n R^(-c/(C-1)) exact in binary: 400, 400 / 2, 400 / 4.
    assert datasets.imbalanced_counts(3, 400, 4, "exp") == [400, 200, 100]
    # CIFAR-10-LT (Cao et al. 2019) at R = 100: 12,406 images; at R = 10: 20,431; CIFAR-100-LT at 100: 10,847.
    cifar10_lt = datasets.imbalanced_counts(10, 5000, 100, "exp")
    assert cifar10_lt == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and sum(cifar10_lt) == 12406
    assert sum(datasets.imbalanced_counts(10, 5000, 10, "exp")) == 20431
    assert sum(datasets.imbalanced_counts(100, 500, 100, "exp")) == 10847
    for c, count in enumerate(datasets.imbalanced_counts(10, 5000, 100, "exp")):
        assert count <= 5000 * 100 ** (-c / 9) < count + 1


@pytest.mark.parametrize("profile", ["step", "exp"])
def test_a_ratio_of_one_is_balanced_in_either_profile(profile):
    assert datasets.imbalanced_counts(10, 37, 1, profile) == [37] * 10


def test_impossible_requests_are_one_line_errors():
    with pytest.raises(UserError, match="--imbalance 0.5 is below 1"):
        datasets.imbalanced_counts(10, 100, 0.5, "step")
    with pytest.raises(UserError, match="leaves class 9 no sample"):
        datasets.imbalanced_counts(10, 5, 10, "exp")
    labels = torch.arange(10).repeat(8)
    with pytest.raises(UserError, match="--samples-per-class 9 is more than the data has: at most 8 per class"):
        datasets.subset_indices(labels, 9, 0, 10, "step")
    for ratio in ("0.5", "inf", "nan"):
        with pytest.raises(SystemExit):
            train.parse_args(["--imbalance", ratio])


# ---------------------------------------------------------------- the subset

def test_the_subset_is_drawn_from_the_seed_and_nested_in_the_balanced_one():
    labels = torch.randperm(300, generator=torch.Generator().manual_seed(0)) % 10  # 30 of each class, shuffled
    chosen = datasets.subset_indices(labels, 20, 3, 10, "step")
    assert torch.bincount(labels[chosen]).tolist() == [20] * 5 + [2] * 5
    assert torch.equal(chosen, torch.sort(chosen).values)
    assert torch.equal(chosen, datasets.subset_indices(labels, 20, 3, 10, "step"))
    assert not torch.equal(chosen, datasets.subset_indices(labels, 20, 4, 10, "step"))
    balanced = datasets.subset_indices(labels, 20, 3)
    assert set(chosen.tolist()) <= set(balanced.tolist())
    majority = labels[balanced] < 5
    assert torch.equal(balanced[majority], chosen[labels[chosen] < 5])


def test_the_run_data_keeps_the_whole_test_split():
    (_, train_labels), (_, test_labels), per_class, _ = datasets.load_run_data(
        {"dataset": "synthetic", "samples_per_class": 40, "seed": 0, "imbalance": 4, "imbalance_profile": "exp"},
        "ignored", False, torch.device("cpu"))
    assert torch.bincount(train_labels).tolist() == datasets.imbalanced_counts(10, 40, 4, "exp") and per_class == 40
    assert torch.bincount(test_labels).tolist() == [50] * 10


# ---------------------------------------------------------------- settings and the run folder

def test_the_folder_names_the_ratio_and_profile_and_a_ratio_of_one_names_nothing():
    def folder(*flags):
        args = train.parse_args(["--samples-per-class", "20", *flags])
        settings = config.resolve_config(args)
        return config.default_run_dir(settings, args).name, settings

    name, settings = folder("--imbalance", "100")
    assert name == "synthetic-resnet18-ce-seed0-spc20-imb100step"
    assert (settings["imbalance"], settings["imbalance_profile"]) == (100.0, "step")
    assert folder("--imbalance", "10", "--imbalance-profile", "exp")[0].endswith("-spc20-imb10exp")
    name, settings = folder("--imbalance", "1", "--imbalance-profile", "exp")
    assert name == "synthetic-resnet18-ce-seed0-spc20" and settings["imbalance_profile"] is None


def test_a_run_written_before_the_flag_is_the_balanced_run():
    settings = config.resolve_config(train.parse_args([]))
    older = {key: value for key, value in settings.items() if not key.startswith("imbalance")}
    assert config.result_differences(older, settings) == []
    imbalanced = config.resolve_config(train.parse_args(["--imbalance", "10"]))
    assert config.result_differences(older, imbalanced) == ["imbalance: 1.0 -> 10.0",
                                                            "imbalance_profile: None -> 'step'"]


def test_a_study_varies_the_ratio_and_leaves_the_profile_out_of_the_balanced_run():
    argv = ["--name", "imbalance", "--samples-per-class", "20", "--imbalance", "1", "10", "--imbalance-profile", "exp"]
    study = studies.plan(sweep.parse_args(argv), "imbalance", argv)
    assert [run.run_dir for run in study.runs] == ["runs/synthetic-resnet18-ce-seed0-spc20",
                                                   "runs/synthetic-resnet18-ce-seed0-spc20-imb10exp"]
    assert "--imbalance-profile" not in study.runs[0].train
    assert study.runs[1].train[-4:] == ["--imbalance", "10.0", "--imbalance-profile", "exp"]


# ---------------------------------------------------------------- class-balanced statistics

def imbalanced_problem(seed: int = 0):
    """Features of 4 classes with 40, 20, 6 and 3 samples, around means far from the origin."""
    generator = torch.Generator().manual_seed(seed)
    counts = [40, 20, 6, 3]
    means = 5 * torch.randn(4, 6, dtype=torch.float64, generator=generator) + 30
    labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    noise = torch.randn(len(labels), 6, dtype=torch.float64, generator=generator)
    features = means[labels] + noise * (1 + labels[:, None])  # each class its own spread
    return features, labels


def two_pass_class_balanced(features: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the class means, and the average over classes of each class's covariance (1/N_c), by numpy."""
    h, y = features.numpy(), labels.numpy()
    classes = sorted(set(y.tolist()))
    means = np.stack([h[y == c].mean(axis=0) for c in classes])
    covariances = [np.cov(h[y == c].T, bias=True) for c in classes]
    return means.mean(axis=0), np.mean(covariances, axis=0)


@pytest.mark.parametrize("batch_size", [1, 7, 69])
def test_class_balanced_sigma_w_and_centre_match_a_two_pass_computation(batch_size):
    features, labels = imbalanced_problem()
    stats = FeatureStats(4, 6, class_weights=balancing_weights(torch.bincount(labels)))
    for start in range(0, len(labels), batch_size):
        stats.update(features[start:start + batch_size], labels[start:start + batch_size])
    centre, sigma_w = two_pass_class_balanced(features, labels)
    np.testing.assert_allclose(stats.global_mean().numpy(), centre, rtol=1e-13)
    np.testing.assert_allclose(stats.within_class_covariance().numpy(), sigma_w, rtol=1e-11, atol=1e-13)
    plain = FeatureStats(4, 6)
    plain.update(features, labels)
    assert not np.allclose(plain.within_class_covariance().numpy(), sigma_w)  # the weights do matter here


def test_class_balanced_accumulators_merge_and_rebase_to_the_same_statistics():
    features, labels = imbalanced_problem(1)
    weights = balancing_weights(torch.bincount(labels))
    whole, first, second = (FeatureStats(4, 6, class_weights=weights) for _ in range(3))
    whole.update(features, labels)
    first.update(features[:30], labels[:30])
    second.update(features[30:], labels[30:])
    first.merge(second)
    first.rebase(torch.zeros(4, 6, dtype=torch.float64))
    torch.testing.assert_close(first.within_class_covariance(), whole.within_class_covariance(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(first.global_mean(), whole.global_mean(), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="different class weights"):
        whole.merge(FeatureStats(4, 6))


def test_balancing_weights_of_balanced_classes_are_exactly_one_and_change_no_bit():
    labels = torch.arange(7).repeat(13)
    weights = balancing_weights(torch.bincount(labels))
    assert torch.equal(weights, torch.ones(7, dtype=torch.float64))
    features = 100 + torch.randn(len(labels), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain, weighted = FeatureStats(7, 5), FeatureStats(7, 5, class_weights=weights)
    for stats in (plain, weighted):
        for start in range(0, len(labels), 10):
            stats.update(features[start:start + 10], labels[start:start + 10])
    classifier = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert metrics_from_stats(plain, classifier) == metrics_from_stats(weighted, classifier)
    np.testing.assert_array_equal(balancing_weights(torch.tensor([40, 20, 6, 3])).numpy(),
                                  69 / (4 * np.array([40, 20, 6, 3])))


# ---------------------------------------------------------------- Minority Collapse of hand-built classifiers

def test_equal_minority_rows_have_cosine_one_and_a_simplex_has_minus_one_over_c_minus_one():
    etf = simplex_etf(10, 12)
    cosines = group_cosines(etf, list(datasets.minority_classes(10)), list(datasets.majority_classes(10)))
    assert cosines["minority_cosine"] == pytest.approx(-1 / 9, abs=1e-12)
    assert cosines["majority_cosine"] == pytest.approx(-1 / 9, abs=1e-12)
    collapsed = etf.clone()
    collapsed[5:] = 3.0 * etf[5]  # every minority row one direction (norms may differ)
    collapsed[7] *= 0.2
    cosines = group_cosines(collapsed, [5, 6, 7, 8, 9], [0, 1, 2, 3, 4])
    assert cosines["minority_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert cosines["majority_cosine"] == pytest.approx(-1 / 9, abs=1e-12)
    # two rows at 60 degrees and one opposite the first: (0.5 - 1 - 0.5) / 3
    rows = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-2.0, 0.0]])
    assert mean_pair_cosine(rows) == pytest.approx(-1 / 3, abs=1e-12)
    assert math.isnan(mean_pair_cosine(rows[:1]))
    assert list(datasets.minority_classes(5)) == [3, 4] and list(datasets.majority_classes(5)) == [0, 1, 2]


@pytest.mark.parametrize("answer, minority, majority", [(0, 0.0, 1 / 3), (2, 0.0, 1 / 3), (3, 0.5, 0.0), (4, 0.5, 0.0)])
def test_the_measured_minority_numbers_are_those_of_the_last_classes_and_the_majority_s_of_the_first(
        answer, minority, majority):
    """Of 5 classes, 0-2 are the majority and 3-4 the minority (datasets.majority_classes, minority_classes). A
    classifier whose bias makes it answer one class whatever the image is right on all that class's test images
    and no other's: a third of the majority's (10 images of each class) or half the minority's. Its rows: the
    two minority rows equal (cosine 1), the three majority rows orthogonal (cosine 0)."""
    torch.manual_seed(0)
    settings = {"model": "resnet18", "num_classes": 5, "in_channels": 1, "width": 4, "seed": 0, "imbalance": 10.0,
                "normalization": {"mean": [0.5], "std": [0.25]}, "loss": "ce", "target_scale": None,
                "label_smoothing": None, "focal_gamma": None}
    model = engine.build_model(settings, torch.device("cpu")).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[[0, 1, 2, 3, 4], [0, 1, 2, 3, 3]] = 1.0
        model.fc.bias.copy_(1e4 * torch.nn.functional.one_hot(torch.tensor(answer), 5))
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(5).repeat(10)
    measured = engine.measure_collapse(model, losses.loss_from_config(settings), (images[:30], labels[:30]),
                                       (images, labels), settings, batch_size=16)
    assert (measured["test_acc_minority"], measured["test_acc_majority"]) == (minority, pytest.approx(majority))
    assert measured["test_acc"] == 0.2
    assert (measured["minority_cosine"], measured["majority_cosine"]) == (pytest.approx(1.0), pytest.approx(0.0))


# ---------------------------------------------------------------- a tiny imbalanced run end to end

@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imbalanced") / "run"
    assert train.main(train.parse_args([*TINY, "--imbalance", "10", "--run-dir", str(run_dir)])) == 0
    plots = run_dir.parent / "plots"
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(run_dir), "--plots-dir", str(plots),
                                                    "--device", "cpu"])) == 0
    return run_dir


@pytest.mark.slow
def test_the_run_records_its_counts_and_its_table_the_minority_collapse_columns(imbalanced_run):
    settings = json.loads((imbalanced_run / "config.json").read_text())
    assert settings["class_counts"] == [20] * 5 + [2] * 5
    assert (settings["imbalance"], settings["imbalance_profile"], settings["samples_per_class"]) == (10.0, "step", 20)
    rows = runs.read_nc_metrics(imbalanced_run)
    assert len(rows) == 3
    for row in rows:
        columns = ["minority_cosine", "majority_cosine", "test_acc_minority", "test_acc_majority",
                   *(f"weight_norm_{label}" for label in range(10))]
        assert all(math.isfinite(row[column]) for column in columns)
        # The synthetic test split has 50 images of every class: the two halves average to the whole.
        assert (row["test_acc_minority"] + row["test_acc_majority"]) / 2 == pytest.approx(row["test_acc"], abs=1e-12)
    assert (imbalanced_run.parent / "plots" / "minority_collapse.png").stat().st_size > 0


@pytest.mark.slow
def test_the_measurement_is_class_balanced_and_its_cosines_those_of_the_checkpoint(imbalanced_run):
    settings = runs.read_config(imbalanced_run)
    train_split, test_split, *_ = datasets.load_run_data(
        {"dataset": "synthetic", "samples_per_class": 20, "seed": 0, "imbalance": 10, "imbalance_profile": "step"},
        "ignored", False, torch.device("cpu"))
    state = runs.load_checkpoint(runs.checkpoint_path(imbalanced_run, 3))
    model = engine.build_model(settings, torch.device("cpu"))
    model.load_state_dict(state["model"])
    measured = engine.measure_collapse(model, losses.loss_from_config(settings), train_split, test_split, settings)
    with torch.inference_mode(), engine.strict_float32():
        model.eval()
        features = model.features(datasets.normalize(train_split[0], settings["normalization"]["mean"],
                                                   settings["normalization"]["std"])).double()
    centre, sigma_w = two_pass_class_balanced(features, train_split[1])
    means = np.stack([features[train_split[1] == c].numpy().mean(axis=0) for c in range(10)]) - centre
    between = means.T @ means / 10
    nc1 = np.trace(sigma_w @ np.linalg.pinv(between, rcond=1e-10, hermitian=True)) / 10
    assert measured["nc1"] == pytest.approx(nc1, rel=1e-6)
    weight = model.fc.weight.detach().double().numpy()
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    minority = unit[5:] @ unit[5:].T
    assert measured["minority_cosine"] == pytest.approx((minority.sum() - 5) / 20, abs=1e-12)
    assert measured["weight_norm_7"] == pytest.approx(np.linalg.norm(weight[7]), rel=1e-12)


@pytest.mark.slow
def test_changing_the_ratio_of_a_run_is_refused(imbalanced_run, tmp_path):
    run_dir = shutil.copytree(imbalanced_run, tmp_path / "run")
    with pytest.raises(UserError, match="imbalance: 10.0 -> 100.0"):
        train.main(train.parse_args([*TINY, "--imbalance", "100", "--run-dir", str(run_dir), "--epochs", "4"]))


@pytest.mark.slow
def test_a_balanced_run_measured_class_balanced_gives_the_same_bits(imbalanced_run):
    settings = {**runs.read_config(imbalanced_run), "imbalance": 1.0, "imbalance_profile": None}
    train_split, test_split, *_ = datasets.load_run_data(
        {"dataset": "synthetic", "samples_per_class": 20, "seed": 0}, "ignored", False, torch.device("cpu"))
    state = runs.load_checkpoint(runs.checkpoint_path(imbalanced_run, 2))
    model = engine.build_model(settings, torch.device("cpu"))
    model.load_state_dict(state["model"])
    loss = losses.loss_from_config(settings)
    plain = engine.measure_collapse(model, loss, train_split, test_split, settings, batch_size=64, layers=True,
                                    test_collapse=True)
    weighted = engine.measure_collapse(model, loss, train_split, test_split, {**settings, "imbalance": 2.0},
                                       batch_size=64, layers=True, test_collapse=True)
    assert "minority_cosine" not in plain
    assert {key: weighted[key] for key in plain} == plain


@pytest.mark.slow
def test_class_balanced_validation_under_torchrun_equals_one_process(imbalanced_run, tmp_path):
    """110 training and 500 test images in batches of 48: shards of 2 and 1 batches, and of 6 and 5."""
    alone = shutil.copytree(imbalanced_run, tmp_path / "alone")
    shared = shutil.copytree(imbalanced_run, tmp_path / "shared")
    (shared / "nc_metrics.csv").unlink()
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(alone), "--device", "cpu", "--recompute",
                                                    "--eval-batch-size", "48", "--plots-dir", str(tmp_path)])) == 0
    done = torchrun("validate_nc.py", "--run-dir", str(shared), "--device", "cpu", "--eval-batch-size", "48",
                    "--plots-dir", str(tmp_path / "shared_plots"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected, got = runs.read_nc_metrics(alone), runs.read_nc_metrics(shared)
    assert [row["epoch"] for row in got] == [1, 2, 3] and set(got[0]) == set(expected[0])
    for mine, theirs in zip(got, expected):
        for column in theirs:
            assert mine[column] == pytest.approx(theirs[column], rel=1e-9, abs=1e-300), column
    assert (tmp_path / "shared_plots" / "minority_collapse.png").is_file()


@pytest.mark.slow
def test_an_imbalanced_run_extends_and_trains_with_any_loss_and_mixup(imbalanced_run, tmp_path):
    run_dir = shutil.copytree(imbalanced_run, tmp_path / "run")
    assert train.main(train.parse_args([*TINY, "--imbalance", "10", "--run-dir", str(run_dir),
                                        "--extend-to", "4"])) == 0
    assert [row["epoch"] for row in runs.read_log(run_dir)] == [1, 2, 3, 4]
    assert runs.read_config(run_dir)["class_counts"] == [20] * 5 + [2] * 5
    mixed = tmp_path / "mixed"
    assert train.main(train.parse_args([*TINY, "--imbalance", "20", "--imbalance-profile", "exp", "--loss", "mse",
                                        "--mixup-alpha", "1", "--mixup-same-class", "--epochs", "1",
                                        "--run-dir", str(mixed)])) == 0
    assert runs.read_config(mixed)["class_counts"] == datasets.imbalanced_counts(10, 20, 20, "exp")
    with pytest.raises(UserError, match="keeps 1 of one of classes"):
        validate_nc.main(validate_nc.parse_args(["--run-dir", str(mixed), "--device", "cpu", "--representations",
                                                 "--classes", "0", "8", "9", "--plots-dir", str(tmp_path)]))


def test_a_row_without_the_minority_columns_lacks_them_only_for_an_imbalanced_run():
    # What validate_nc.py measures again and what a study counts as measured both ask this one question.
    row = {"epoch": 1, "nc1": 0.5, **{key: 0.1 for key in OTHER_KEYS}}
    assert reports.lacks_measurements(row, {"imbalance": 10.0}, False, False, False)
    assert not reports.lacks_measurements(row, {"imbalance": 1.0}, False, False, False)
    assert not reports.lacks_measurements(row, {}, False, False, False)  # a run written before --imbalance
    assert not reports.lacks_measurements({**row, "minority_cosine": -0.2}, {"imbalance": 10.0}, False, False, False)
