"""The figures and Table 1 from hand-written run folders: files, PNG sizes, TPT values, labels, CLI."""
import json
import warnings
import re
from pathlib import Path

import numpy as np
import pytest

import plotting
import runs
from errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NC_FILES = {"fig2_equinorm.png", "fig3_equiangularity.png", "fig4_max_equiangularity.png",
            "fig5_self_duality.png", "fig6_nc1.png", "fig7_ncc_mismatch.png"}
NC_HEADER = ("epoch,train_acc,train_loss,test_acc,test_loss,test_ece,nc1,equinorm_means,equinorm_weights,"
             "equiangular_means,equiangular_weights,maxangle_means,maxangle_weights,self_duality,"
             "ncc_mismatch_train,ncc_mismatch_test")
# Made-up but plausible: everything shrinks with training; the classifiers' equiangularity reaches
# exactly 0 at epoch 20, which a log axis cannot show. The clean, eval-mode training accuracy first
# reaches 1 at checkpoint 10, while log.csv's running accuracy reaches 1 already at epoch 7.
NC_ROWS = ["1,0.31,1.9,0.30,1.95,0.05,3.1,0.40,0.20,0.30,0.25,0.50,0.45,0.90,0.40,0.45",
           "2,0.55,1.2,0.52,1.3,0.04,1.2,0.30,0.12,0.20,0.15,0.30,0.28,0.60,0.25,0.30",
           "5,0.90,0.4,0.78,0.7,0.06,0.3,0.15,0.05,0.10,0.06,0.12,0.10,0.30,0.05,0.12",
           "10,1.0,0.02,0.81,0.8,0.08,0.04,0.05,0.01,0.04,0.01,0.05,0.03,0.10,0.01,0.06",
           "20,1.0,0.003,0.84,0.9,0.09,0.005,0.02,0.004,0.02,0.0,0.02,0.01,0.04,0.0,0.04"]
TPT_EPOCH, TPT_TEST_ACC, LAST_EPOCH, LAST_TEST_ACC = 10, "81.00%", 20, "84.00%"
RUNNING_FULL_EPOCH = 7


def write_run(folder: Path, reaches_tpt: bool = True, **settings) -> Path:
    """A run folder of 20 epochs, measured at 5 checkpoints, whose clean training accuracy first reaches
    1 at checkpoint 10 (or never: 0.99 at best)."""
    folder.mkdir(parents=True)
    config = {"dataset": "synthetic", "model": "resnet18", "width": 16, "loss": "ce", "lr": 0.0679,
              "seed": 0, "mixup_alpha": 0.0, "epochs": LAST_EPOCH, "num_classes": 4, **settings}
    (folder / "config.json").write_text(json.dumps(config))
    lines = ["epoch,lr,train_loss,train_acc,test_loss,test_acc,test_ece,seconds"]
    for epoch in range(1, LAST_EPOCH + 1):
        train_acc = round(0.6 + 0.05 * epoch, 2) if epoch < RUNNING_FULL_EPOCH else 1.0
        lines.append(f"{epoch},0.0679,{2.0 / epoch ** 2},{train_acc},0.7,0.5,0.05,1.5")
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    rows = NC_ROWS if reaches_tpt else [row.replace(",1.0,", ",0.99,", 1) for row in NC_ROWS]
    (folder / "nc_metrics.csv").write_text("\n".join([NC_HEADER, *rows]) + "\n")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_run_writes_every_figure_as_a_png_of_its_size_in_inches_times_150_dpi(tmp_path):
    written = plotting.plot_run(write_run(tmp_path / "run"), tmp_path / "figures")
    assert {path.name for path in written} == NC_FILES | {"training_curves.png", "panel.png"}
    assert all(path.parent == tmp_path / "figures" for path in written)
    sizes = {"training_curves.png": (2250, 720), "panel.png": (1800, 1050)}  # 15x4.8 in, 12x7 in
    for path in written:
        assert png_size(path) == sizes.get(path.name, (1050, 750))  # 7x5 in
    assert not list((tmp_path / "figures").glob("*.tmp"))


def test_the_same_tables_give_byte_identical_figures(tmp_path):
    run = write_run(tmp_path / "run")
    first = plotting.plot_runs([run], tmp_path / "a")
    second = plotting.plot_runs([run], tmp_path / "b")
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]


def test_tpt_table_takes_the_onset_from_the_clean_eval_mode_accuracy_not_the_running_one(tmp_path):
    table = plotting.tpt_table(write_run(tmp_path / "run"))
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and set(rows[1]) <= set("|-")
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells == ["synthetic", "resnet18", str(TPT_EPOCH), TPT_TEST_ACC, str(LAST_EPOCH), LAST_TEST_ACC]


def test_tpt_table_says_when_zero_training_error_is_never_reached(tmp_path):
    table = plotting.tpt_table(write_run(tmp_path / "run", reaches_tpt=False))
    assert "not reached by epoch 20" in table and "99.00%" in table and "84.00%" in table


def test_tpt_onset_is_the_first_checkpoint_of_exactly_full_training_accuracy():
    measured = [{"epoch": 1, "train_acc": 0.9}, {"epoch": 2, "train_acc": 0.9999}, {"epoch": 3, "train_acc": 1.0},
                {"epoch": 4, "train_acc": 0.998}, {"epoch": 5, "train_acc": 1.0}]
    assert runs.tpt_row(measured)["epoch"] == 3
    assert runs.tpt_row(measured[:2]) is None


def test_run_labels_name_the_user_facing_settings_that_differ_never_derived_ones():
    base = {"dataset": "CIFAR10", "model": "resnet18", "lr": 0.13, "epochs": 150}
    configs = [{**base, "loss": "ce", "mixup_alpha": 0.0, "seed": 0, "samples_per_class": 100,
                "normalization": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}},
               {**base, "loss": "mse", "mixup_alpha": 1.0, "seed": 1, "samples_per_class": 50,
                "normalization": {"mean": [0.5, 0.47, 0.44], "std": [0.24, 0.25, 0.27]}}]
    assert plotting.run_labels(configs, ["a", "b"]) == ["spc=100, loss=ce, mixup=0, seed=0",
                                                       "spc=50, loss=mse, mixup=1, seed=1"]
    same = [{**base, "seed": 0}, {**base, "seed": 0}]
    assert plotting.run_labels(same, ["run-a", "run-b"]) == ["run-a", "run-b"]


def test_cli_overlays_two_runs_into_the_six_figures(tmp_path, capsys):
    first = write_run(tmp_path / "ce")
    second = write_run(tmp_path / "mse", reaches_tpt=False, loss="mse", mixup_alpha=1.0)
    out = tmp_path / "overlay"
    assert plotting.main(plotting.parse_args(["nc", str(first), str(second), "--out", str(out)])) == 0
    assert {path.name for path in out.iterdir()} == NC_FILES
    assert all(png_size(out / name) == (1050, 750) for name in NC_FILES)
    assert str(out / "fig2_equinorm.png") in capsys.readouterr().out


def test_cli_curves_of_two_runs(tmp_path):
    runs = [str(write_run(tmp_path / name, seed=seed)) for name, seed in (("s0", 0), ("s1", 1))]
    plotting.main(plotting.parse_args(["curves", *runs, "--out", str(tmp_path / "out")]))
    assert png_size(tmp_path / "out" / "training_curves.png") == (2250, 720)


def test_panel_of_three_long_noisy_runs_is_a_png_of_12_by_7_inches_under_300_kb(tmp_path):
    rng = np.random.default_rng(0)
    epochs = np.unique(np.round(np.logspace(0, np.log10(350), 60)).astype(int))  # 46 log-spaced checkpoints
    folders = []
    for k in range(3):
        folder = write_run(tmp_path / f"run{k}", seed=k)
        noisy = [",".join([str(epoch), *(f"{value:.6g}" for value in rng.uniform(0.5, 1.5, 15) / epoch ** 0.7)])
                 for epoch in epochs]  # jagged curves compress worst
        (folder / "nc_metrics.csv").write_text("\n".join([NC_HEADER, *noisy]) + "\n")
        folders.append(str(folder))
    out = tmp_path / "docs" / "panel.png"
    assert plotting.main(plotting.parse_args(["panel", *folders, "--out", str(out)])) == 0
    assert png_size(out) == (1800, 1050)
    assert out.stat().st_size < 300 * 1024


def test_a_run_without_nc_metrics_names_the_folder_and_validate_nc(tmp_path):
    run = write_run(tmp_path / "unvalidated")
    (run / "nc_metrics.csv").unlink()
    for command in (["nc", str(run), "--out", str(tmp_path / "out")],
                    ["panel", str(run), "--out", str(tmp_path / "panel.png")]):
        with pytest.raises(UserError, match=f"{re.escape(str(run))}.*python validate_nc.py --run-dir {re.escape(str(run))}"):
            plotting.main(plotting.parse_args(command))
    with pytest.raises(UserError, match="python validate_nc.py"):
        plotting.tpt_table(run)
    assert not (tmp_path / "out").exists() and not (tmp_path / "panel.png").exists()


def test_a_run_without_log_names_the_folder_and_train(tmp_path):
    run = write_run(tmp_path / "untrained")
    (run / "log.csv").unlink()
    with pytest.raises(UserError, match=f"{re.escape(str(run))}.*python train.py"):
        plotting.plot_curves([run], tmp_path / "out")


@pytest.mark.parametrize("suffix,magic", [(".png", PNG_SIGNATURE), (".pdf", b"%PDF-"), (".svg", b"<?xml")])
def test_each_suffix_writes_its_own_format(tmp_path, suffix, magic):
    out = tmp_path / f"panel{suffix}"
    plotting.main(plotting.parse_args(["panel", str(write_run(tmp_path / "run")), "--out", str(out)]))
    assert out.read_bytes().startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in out.read_bytes()[:1000]


def test_an_unknown_suffix_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match=r"\.png, \.pdf or \.svg"):
        plotting.plot_panel([write_run(tmp_path / "run")], tmp_path / "panel.jpg")
    assert not list(tmp_path.glob("panel*"))


def test_the_title_names_the_departures_from_the_protocol_and_a_run_that_never_reached_the_tpt(tmp_path):
    reached = tmp_path / "reached.svg"
    plotting.plot_panel([write_run(tmp_path / "a", precision="bf16")], reached)
    missed = tmp_path / "missed.svg"
    plotting.plot_panel([write_run(tmp_path / "b", reaches_tpt=False)], missed)
    title = "synthetic / resnet18 (width=16, epochs=20"
    assert title + ", bf16)" in reached.read_text() and "never zero" not in reached.read_text()
    assert title + ")" in missed.read_text() and "training error never zero" in missed.read_text()


def test_overlaid_subset_runs_are_labelled_by_their_flags_inside_the_figure_without_warnings(tmp_path):
    first = write_run(tmp_path / "a", seed=0, samples_per_class=100,
                      normalization={"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]})
    second = write_run(tmp_path / "b", seed=1, samples_per_class=50, dataset="CIFAR10",
                       normalization={"mean": [0.5, 0.47, 0.44], "std": [0.24, 0.25, 0.27]})
    out = tmp_path / "panel.svg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        plotting.plot_panel([first, second], out)
    text = out.read_text()
    assert "synthetic, spc=100, seed=0" in text and "CIFAR10, spc=50, seed=1" in text
    assert "normalization" not in text and "'mean'" not in text and "0.49" not in text


OTHER_COLUMNS = ",nc1_trace_ratio,cdnv,etf_error_means,etf_error_weights,wh_alignment,hyperspherical_energy_means"


def with_other_measures(folder: Path) -> Path:
    """A run folder of `write_run` whose table also has the field's other measures, shrinking with training
    (the energy towards the simplex value of its 4 classes, sqrt(3/8))."""
    rows = (folder / "nc_metrics.csv").read_text().splitlines()
    extended = [rows[0] + OTHER_COLUMNS] + [row + "," + ",".join(f"{value / (index + 1):.6g}" for value in
                                                                 (2.0, 5.0, 0.9, 0.5, 1.1, 0.3))
                                            for index, row in enumerate(rows[1:])]
    (folder / "nc_metrics.csv").write_text("\n".join(extended) + "\n")
    return folder


def test_figure_9_overlays_runs_and_groups_them(tmp_path):
    first = with_other_measures(write_run(tmp_path / "learned", seed=0))
    second = with_other_measures(write_run(tmp_path / "etf", classifier="etf", seed=1))
    third = with_other_measures(write_run(tmp_path / "etf1", classifier="etf", seed=2))
    out = tmp_path / "grouped"
    assert plotting.main(plotting.parse_args(["nc", str(first), str(second), str(third), "--out", str(out),
                                              "--group-by", "classifier"])) == 0
    assert {path.name for path in out.iterdir()} == NC_FILES | {"fig9_other_measures.png"}
    assert png_size(out / "fig9_other_measures.png") == (1800, 1050)  # 12x7 in
    # A table measured before these columns existed draws Figures 2-7 alone.
    assert {path.name for path in plotting.plot_runs([write_run(tmp_path / "old")], tmp_path / "old_out")} == NC_FILES


def test_a_log_axis_over_many_decades_keeps_labelled_ticks():
    """A fixed ETF classifier's Figure 2-4 values are ~1e-8 beside the means' ~0.1: matplotlib's LogLocator
    with several subs draws no tick at all over such a range."""
    import matplotlib.pyplot as plt
    for low in (1e-9, 0.05):
        fig, ax = plt.subplots()
        ax.plot([1, 10], [low, 1.0])
        ax.set_xscale("log")
        ax.set_yscale("log")
        plotting._plain_ticks(ax, log_y=True)
        bottom, top = ax.get_ylim()
        inside = [tick for tick in ax.yaxis.get_majorticklocs() if bottom <= tick <= top]
        plt.close(fig)
        assert len(inside) >= 2, low
