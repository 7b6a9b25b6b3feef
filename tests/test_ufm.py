"""ufm.py against the optima of the unconstrained-features model that docs/ufm.md derives, each worked out
here from the run's own tensors (final.pt): the stationarity identity lamW ||W||^2 = lamH ||H||^2 (checked at
the end of every converged run), the simplex ETF of cross-entropy, focal loss and label smoothing with its
scale sqrt(lamW / (n lamH)), the closed form of MSE without bias (Tirer & Bruna 2022) in both of its regimes,
and an independent optimiser, scipy's L-BFGS on a numpy objective, reaching the same minimum. Then Mixup and
SGD by invariances, and the run folder as every tool of the repo reads it."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch

import config
import plotting
import reports
import runs
import studies
import study_files
import sweep
import ufm
import unconstrained
from errors import UserError, run_cli
from nc_metrics import PAPER_KEYS
from sweep_helpers import sweep_in, table_rows

SMALL = ["--classes", "4", "--dim", "5", "--per-class", "3"]
# Weight decays large enough for the optimum to be reached in a few hundred steps (docs/ufm.md: the slowest
# direction contracts by (1 - lr lam) per step), and different, so that the scale checks are not symmetric.
DECAYS = ["--weight-decay-classifier", "0.02", "--weight-decay-features", "0.05"]
LAM_W, LAM_H = 0.02, 0.05


def train_ufm(folder: Path, *flags: str, converged: bool = True) -> tuple[Path, unconstrained.Model, dict]:
    """Run ufm.py with `flags` on the CPU into `folder`; its final tensors and config. A run that converged
    (gd without Mixup) is first checked to be stationary: lamW ||W||^2 = lamH ||H||^2."""
    assert ufm.main(ufm.parse_args([*flags, "--device", "cpu", "--run-dir", str(folder)])) == 0
    model = unconstrained.load_final(folder)
    run = json.loads((folder / "config.json").read_text())
    if converged:
        weight_term = run["weight_decay_classifier"] * model.weight.pow(2).sum().item()
        feature_term = run["weight_decay_features"] * model.features.pow(2).sum().item()
        assert abs(weight_term - feature_term) <= 1e-9 * (weight_term + feature_term)
    return folder, model, run


def last_row(folder: Path) -> dict:
    return runs.read_nc_metrics(folder)[-1]


def class_means(model: unconstrained.Model, classes: int) -> torch.Tensor:
    return torch.stack([model.features[model.labels == label].mean(dim=0) for label in range(classes)])


def cosines(rows: torch.Tensor) -> torch.Tensor:
    unit = rows / rows.norm(dim=1, keepdim=True)
    return unit @ unit.T


# ---------------------------------------------------------------- the optimum: simplex ETF

@pytest.mark.parametrize("flags", [["--loss", "ce"], ["--loss", "focal"], ["--loss", "label_smoothing"],
                                   ["--loss", "ce", "--no-bias"], ["--loss", "focal", "--dim", "3"]],
                         ids=["ce", "focal", "label_smoothing", "ce-no-bias", "focal-K=d+1"])
def test_cross_entropy_focal_and_label_smoothing_collapse_to_a_simplex_etf_of_the_predicted_scale(tmp_path, flags):
    classes, per_class = 4, 3
    folder, model, run = train_ufm(tmp_path / "run", *SMALL, *DECAYS, "--lr", "2", "--steps", "800", *flags)
    row = last_row(folder)
    assert all(row[key] <= 1e-6 for key in PAPER_KEYS), {key: row[key] for key in PAPER_KEYS}
    means = class_means(model, classes)
    scale = means.norm(dim=1).mean()
    assert (model.features - means[model.labels]).norm(dim=1).max() <= 1e-6 * scale  # NC1, by hand
    assert means.mean(dim=0).norm() <= 1e-6 * scale  # centred: the means are their own centred means
    off_diagonal = ~torch.eye(classes, dtype=torch.bool)
    for rows in (means, model.weight):  # a simplex ETF: equal norms, every cosine -1/(K - 1)
        norms = rows.norm(dim=1)
        assert (norms - norms.mean()).abs().max() <= 1e-6 * norms.mean()
        assert (cosines(rows)[off_diagonal] + 1 / (classes - 1)).abs().max() <= 1e-6
    ratio = means.norm(dim=1) / model.weight.norm(dim=1)  # ||h_c|| / ||w_c|| = sqrt(lamW / (n lamH))
    assert (ratio / math.sqrt(LAM_W / (per_class * LAM_H)) - 1).abs().max() <= 1e-6
    assert (cosines(torch.cat([means, model.weight]))[:classes, classes:].diagonal() - 1).abs().max() <= 1e-9


# ---------------------------------------------------------------- the optimum: MSE without bias, in closed form

@pytest.mark.parametrize("lam_w, lam_h, kappa", [(0.02, 0.05, 2.0), (0.01, 0.03, 1.0)])
def test_mse_without_bias_reaches_the_closed_form_of_tirer_and_bruna(tmp_path, lam_w, lam_h, kappa):
    """c = 1 - K^2 sqrt(n lamW lamH) / (2 kappa): W h_i = c kappa e_{y_i}, ||w_k||^2 = sqrt(lamH / lamW) c kappa
    sqrt(n), ||h_i||^2 = sqrt(lamW / lamH) c kappa / sqrt(n), the rows of W orthogonal, f = (kappa^2 / K)(1 - c^2)."""
    classes, per_class = 4, 3
    c = 1 - classes ** 2 * math.sqrt(per_class * lam_w * lam_h) / (2 * kappa)
    assert 0 < c < 1
    folder, model, run = train_ufm(tmp_path / "run", *SMALL, "--loss", "mse", "--no-bias", "--target-scale",
                                   str(kappa), "--weight-decay-classifier", str(lam_w), "--weight-decay-features",
                                   str(lam_h), "--lr", "2", "--steps", "1500")
    predicted = c * kappa * torch.eye(classes, dtype=torch.float64)[model.labels]
    assert (model.features @ model.weight.T - predicted).abs().max() <= 1e-6 * kappa
    assert (model.weight.pow(2).sum(dim=1) / (math.sqrt(lam_h / lam_w) * c * kappa * math.sqrt(per_class)) - 1
            ).abs().max() <= 1e-6
    assert (model.features.pow(2).sum(dim=1) / (math.sqrt(lam_w / lam_h) * c * kappa / math.sqrt(per_class)) - 1
            ).abs().max() <= 1e-6
    off_diagonal = ~torch.eye(classes, dtype=torch.bool)
    assert cosines(model.weight)[off_diagonal].abs().max() <= 1e-6  # an orthogonal frame, not a simplex
    objective = runs.read_log(folder)[-1]["objective"]
    assert objective == pytest.approx(kappa ** 2 / classes * (1 - c ** 2), rel=1e-9)
    # As Figures 2-5 measure it: the centred means are a simplex, the (uncentred) rows of W are not.
    row = last_row(folder)
    assert max(row[key] for key in ("nc1", "equinorm_means", "equinorm_weights", "equiangular_means",
                                    "equiangular_weights", "maxangle_means")) <= 1e-6
    assert row["maxangle_weights"] == pytest.approx(1 / (classes - 1), abs=1e-6)
    assert row["self_duality"] == pytest.approx(2 - 2 * math.sqrt((classes - 1) / classes), abs=1e-6)


def test_mse_without_bias_has_the_zero_optimum_where_the_closed_form_says(tmp_path):
    classes, per_class, lam = 4, 3, 0.1
    assert classes ** 2 * math.sqrt(per_class) * lam / 2 > 1  # c < 0: W = 0 and H = 0 is the minimum
    folder, model, _ = train_ufm(tmp_path / "run", *SMALL, "--loss", "mse", "--no-bias", "--weight-decay-classifier",
                                 str(lam), "--weight-decay-features", str(lam), "--lr", "2", "--steps", "1500")
    assert model.weight.norm() <= 1e-8 and model.features.norm() <= 1e-8
    assert runs.read_log(folder)[-1]["objective"] == pytest.approx(1 / classes, rel=1e-12)  # (1/K) ||0 - e_y||^2


# ---------------------------------------------------------------- an independent optimiser

def numpy_objective(params: np.ndarray, labels: np.ndarray, classes: int, dim: int) -> tuple[float, np.ndarray]:
    """f and its gradient for cross-entropy with an unregularised bias, written with numpy and scipy alone."""
    count = len(labels)
    weight = params[:classes * dim].reshape(classes, dim)
    bias = params[classes * dim:classes * (dim + 1)]
    features = params[classes * (dim + 1):].reshape(count, dim)
    logits = features @ weight.T + bias
    normaliser = scipy.special.logsumexp(logits, axis=1)
    value = (normaliser - logits[np.arange(count), labels]).mean() \
        + LAM_W / 2 * (weight ** 2).sum() + LAM_H / 2 * (features ** 2).sum()
    residual = np.exp(logits - normaliser[:, None])
    residual[np.arange(count), labels] -= 1
    residual /= count
    gradient = np.concatenate([(residual.T @ features + LAM_W * weight).ravel(), residual.sum(axis=0),
                               (residual @ weight + LAM_H * features).ravel()])
    return value, gradient


def test_scipy_lbfgs_on_a_numpy_objective_reaches_the_same_minimum_and_geometry(tmp_path):
    classes, dim, per_class = 3, 4, 2
    folder, model, _ = train_ufm(tmp_path / "run", "--classes", "3", "--dim", "4", "--per-class", "2", *DECAYS,
                                 "--lr", "2", "--steps", "800")
    labels = np.repeat(np.arange(classes), per_class)
    start = np.random.default_rng(7).normal(size=classes * (dim + 1) + len(labels) * dim)
    found = scipy.optimize.minimize(numpy_objective, start, args=(labels, classes, dim), jac=True, method="L-BFGS-B",
                                    options={"maxiter": 10000, "gtol": 1e-13, "ftol": 1e-16})
    assert np.abs(found.jac).max() <= 1e-8
    assert runs.read_log(folder)[-1]["objective"] == pytest.approx(found.fun, rel=1e-12)
    weight = torch.from_numpy(found.x[:classes * dim].reshape(classes, dim))
    features = torch.from_numpy(found.x[classes * (dim + 1):].reshape(-1, dim))
    # The optimum is unique up to a rotation of R^d: rotation-invariant quantities agree.
    assert torch.allclose(weight @ weight.T, model.weight @ model.weight.T, rtol=0, atol=1e-6)
    assert torch.allclose(features @ features.T, model.features @ model.features.T, rtol=0, atol=1e-6)
    assert torch.allclose(features @ weight.T, model.features @ model.weight.T, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- Mixup on features, and SGD

def steps_of(run_flags: list[str], start: unconstrained.Model, steps: int) -> unconstrained.Model:
    """`start` after `steps` steps of the run the flags describe (without writing anything)."""
    run = unconstrained.resolve_config(ufm.parse_args([*run_flags, "--steps", str(steps)]))
    model = unconstrained.Model(*(tensor.clone() if tensor is not None else None for tensor in
                                  (start.weight, start.bias, start.features, start.labels)))
    unconstrained.train(model, run, set(), lambda step, seconds: None)
    return model


def test_mixup_mixes_the_features_and_a_same_class_mix_of_collapsed_features_changes_nothing():
    run = unconstrained.resolve_config(ufm.parse_args(SMALL))
    start = unconstrained.initial_model(run)
    start.features = start.features[::3][start.labels]  # every feature is its class's first: collapsed
    plain = steps_of(SMALL, start, 20)
    same_class = steps_of([*SMALL, "--mixup-alpha", "1", "--mixup-same-class"], start, 20)
    mixed = steps_of([*SMALL, "--mixup-alpha", "1"], start, 20)
    assert torch.allclose(same_class.features, plain.features, rtol=0, atol=1e-14)
    assert torch.allclose(same_class.weight, plain.weight, rtol=0, atol=1e-14)
    assert (mixed.weight - plain.weight).abs().max() > 1e-4  # pairs of two classes: another loss, another step


def test_sgd_on_batches_of_the_whole_set_is_gradient_descent():
    run = unconstrained.resolve_config(ufm.parse_args(SMALL))
    start = unconstrained.initial_model(run)
    descent = steps_of(SMALL, start, 50)
    stochastic = steps_of([*SMALL, "--optimizer", "sgd", "--batch-size", "12"], start, 50)  # 12 = N: one batch
    assert torch.allclose(stochastic.features, descent.features, rtol=0, atol=1e-13)
    assert torch.allclose(stochastic.weight, descent.weight, rtol=0, atol=1e-13)


def test_sgd_trains_only_the_batch_s_features_beyond_their_weight_decay():
    run = unconstrained.resolve_config(ufm.parse_args([*SMALL, "--optimizer", "sgd", "--batch-size", "5"]))
    start = unconstrained.initial_model(run)
    after = steps_of([*SMALL, "--optimizer", "sgd", "--batch-size", "5"], start, 1)
    decayed = start.features * (1 - run["lr"] * run["weight_decay_features"])
    moved = (after.features - decayed).abs().amax(dim=1) > 1e-12
    assert moved.sum() == 5


# ---------------------------------------------------------------- the run folder

def test_the_run_folder_holds_the_tables_at_log_spaced_steps_and_final_pt(tmp_path, capsys):
    folder, model, run = train_ufm(tmp_path / "run", *SMALL, "--steps", "100", "--num-checkpoints", "7",
                                   converged=False)
    steps = config.checkpoint_epochs(100, 7)
    assert [row["epoch"] for row in runs.read_log(folder)] == steps
    measured = runs.read_nc_metrics(folder)
    assert [row["epoch"] for row in measured] == steps
    assert list(runs.read_csv(folder / "nc_metrics.csv")[0]) == runs.NC_COLUMNS
    assert all(row[key] is None for row in measured for key in ("test_acc", "test_loss", "test_ece"))
    assert run["time_unit"] == "step" and run["class_counts"] == [3] * 4 and run["precision"] == "fp64"
    assert model.weight.shape == (4, 5) and model.bias.shape == (4,) and model.features.shape == (12, 5)
    assert model.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and model.weight.dtype == torch.float64
    assert json.loads((folder / "summary.json").read_text())["epochs_done"] == 100
    capsys.readouterr()
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert ufm.main(ufm.parse_args([*SMALL, "--steps", "100", "--num-checkpoints", "7", "--run-dir", str(folder)])) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == files


def test_fp32_no_bias_and_an_imbalanced_run_write_what_they_are(tmp_path):
    _, model, _ = train_ufm(tmp_path / "fp32", *SMALL, "--steps", "5", "--precision", "fp32", "--no-bias",
                            converged=False)
    assert model.weight.dtype == torch.float32 and model.bias is None
    folder, model, run = train_ufm(tmp_path / "imbalanced", "--classes", "4", "--dim", "5", "--per-class", "10",
                                   "--imbalance", "5", "--steps", "5", converged=False)
    assert run["class_counts"] == [10, 10, 2, 2] and len(model.labels) == 24
    row = last_row(folder)
    assert row["minority_cosine"] == pytest.approx(cosines(model.weight)[2, 3].item(), abs=1e-12)
    assert row["weight_norm_3"] == pytest.approx(model.weight[3].norm().item(), abs=1e-12)


def test_mistakes_end_with_one_line_and_leave_what_was_written(tmp_path, capsys):
    folder, _, _ = train_ufm(tmp_path / "run", *SMALL, "--steps", "5", converged=False)
    written = (folder / "final.pt").read_bytes()

    def run_ufm(*flags: str) -> str:
        code = run_cli(ufm.main, lambda: ufm.parse_args([*flags, "--device", "cpu"]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ")
        return lines[-1]

    assert "holds another run (steps: 5 -> 6)" in run_ufm(*SMALL, "--steps", "6", "--run-dir", str(folder))
    assert (folder / "final.pt").read_bytes() == written
    assert "--batch-size 13 is more than the 12" in run_ufm(*SMALL, "--optimizer", "sgd", "--batch-size", "13",
                                                            "--run-dir", str(tmp_path / "other"))
    diverged = run_ufm(*SMALL, "--lr", "1e6", "--run-dir", str(tmp_path / "diverged"))
    assert "diverged at step" in diverged and not (tmp_path / "diverged" / "final.pt").exists()
    (folder / "final.pt").write_bytes(written[:100])
    with pytest.raises(UserError, match="final.pt is truncated or not a checkpoint"):
        unconstrained.load_final(folder)


# ---------------------------------------------------------------- every figure and table, and a study

def test_the_panel_the_minority_figure_and_table1_draw_a_ufm_run_with_steps_on_the_x_axis(tmp_path):
    folder, _, _ = train_ufm(tmp_path / "run", *SMALL, "--imbalance", "3", "--steps", "30", converged=False)
    for figure in (plotting.panel_figure([folder]), plotting.minority_figure([folder])):
        assert {ax.get_xlabel() for ax in figure.axes if ax.get_xlabel() and "N_c" not in ax.get_xlabel()} == {"step"}
        plotting.plt.close(figure)
    row = reports.table1([folder])[0]
    assert (row["dataset"], row["model"], row["last_epoch"]) == ("UFM", "K=4, d=5", 30)
    assert row["last_test_acc"] is None and row["change"] is None


@pytest.mark.slow
def test_every_figure_of_a_run_draws_a_ufm_run(tmp_path):
    folder, _, _ = train_ufm(tmp_path / "run", *SMALL, "--imbalance", "3", "--steps", "30", converged=False)
    written = plotting.plot_run(folder, tmp_path / "plots")
    assert {path.name for path in written} == {*plotting.NC_FIGURES, plotting.OTHER_FILE, "panel.png",
                                               plotting.CURVES_FILE, plotting.MINORITY_FILE}
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)


def test_study_json_accepts_the_scripts_a_study_can_run():
    assert set(study_files.SCRIPTS) == set(studies.TRAINERS)


@pytest.mark.parametrize("flags", [[], ["--no-bias", "--weight-decay-bias", "1"]])
def test_a_ufm_study_plans_ufm_py_commands_in_the_folders_ufm_py_chooses(flags):
    args = sweep.parse_args(["--script", "ufm.py", "--name", "grid", *SMALL, "--loss", "ce", "mse", "--steps", "9",
                             "--batch-size", "4", *flags])  # --batch-size: gd's runs leave it out, as ufm.py does
    study = studies.plan(args, "grid", args.argv)
    assert study.varied == ["loss"]
    for run, loss in zip(study.runs, ("ce", "mse")):
        alone = ufm.parse_args([*SMALL, "--loss", loss, "--steps", "9", *flags[:1]])
        assert run.run_dir == str(unconstrained.default_run_dir(unconstrained.resolve_config(alone), alone))
        assert studies.commands(run) == [[studies.sys.executable, str(studies.UFM), *run.train]]
        assert "--batch-size" not in run.train and "--weight-decay-bias" not in run.train
        assert run.epochs == 9 and run.script == "ufm.py" and studies.run_state(run) == "new"


@pytest.mark.slow
def test_sweep_runs_a_ufm_grid_and_plotting_draws_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = ["--script", "ufm.py", "--name", "minority", *SMALL, "--imbalance", "1", "3", "--steps", "20"]
    code, output = sweep_in(tmp_path, *flags)
    assert code == 0, output
    rows = table_rows(tmp_path / "studies" / "minority" / "runs.csv")
    assert [(row["imbalance"], row["status"]) for row in rows] == [("1.0", "done"), ("3.0", "done")]
    assert "last_test_acc" not in rows[0] and rows[1]["minority_cosine"] and not rows[0]["minority_cosine"]
    code, output = sweep_in(tmp_path, *flags)
    assert code == 0 and output.count("(done)") == 2
    monkeypatch.chdir(tmp_path)
    written = plotting.plot_study(Path("studies/minority"))
    assert {path.name for path in written} >= {"panel.png", "training_curves.png", "minority_collapse.png"}
