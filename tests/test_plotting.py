"""The figures and Table 1 from hand-written run folders: files, formats, PNG sizes, whole legends, ticks,
labels, TPT values, Table 1 over runs and groups, CLI."""
import csv
import json
import re
import sys
import warnings
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

import nc_metrics
import plotting
import reports
import runs
import studies
import study_files
from errors import UserError, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAGIC = {"png": PNG_SIGNATURE, "pdf": b"%PDF-", "svg": b"<?xml"}
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


@pytest.mark.slow
def test_plot_run_writes_every_figure_as_a_png_of_its_width_in_inches_times_150_dpi(tmp_path):
    written = plotting.plot_run(write_run(tmp_path / "run"), tmp_path / "figures")
    assert {path.name for path in written} == NC_FILES | {"training_curves.png", "panel.png"}
    assert all(path.parent == tmp_path / "figures" for path in written)
    sizes = {"training_curves.png": (1050, 360), "panel.png": (1050, 750)}  # 7x2.4 in, 7x5 in
    for path in written:
        width, height = png_size(path)
        nominal = sizes.get(path.name, (525, 420))  # 3.5x2.8 in, and the legend's height below
        assert width == nominal[0] and nominal[1] < height < nominal[1] + 250
    assert not list((tmp_path / "figures").glob("*.tmp"))


@pytest.mark.slow
def test_the_same_tables_give_byte_identical_figures(tmp_path):
    run = write_run(tmp_path / "run")
    first = plotting.plot_runs([run], tmp_path / "a")
    second = plotting.plot_runs([run], tmp_path / "b")
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]


def test_tpt_table_takes_the_onset_from_the_clean_eval_mode_accuracy_not_the_running_one(tmp_path):
    table = reports.tpt_table(write_run(tmp_path / "run"))
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and set(rows[1]) <= set("|-")
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells == ["synthetic", "resnet18", str(TPT_EPOCH), TPT_TEST_ACC, str(LAST_EPOCH), LAST_TEST_ACC, "+3.00"]


def test_tpt_table_says_when_zero_training_error_is_never_reached(tmp_path):
    table = reports.tpt_table(write_run(tmp_path / "run", reaches_tpt=False))
    assert "not reached by epoch 20" in table and "99.00%" in table and "84.00%" in table


def test_tpt_onset_is_the_first_checkpoint_of_exactly_full_training_accuracy():
    measured = [{"epoch": 1, "train_acc": 0.9}, {"epoch": 2, "train_acc": 0.9999}, {"epoch": 3, "train_acc": 1.0},
                {"epoch": 4, "train_acc": 0.998}, {"epoch": 5, "train_acc": 1.0}]
    assert nc_metrics.tpt_row(measured)["epoch"] == 3
    assert nc_metrics.tpt_row(measured[:2]) is None


def test_run_labels_name_the_user_facing_settings_that_differ_never_derived_ones():
    base = {"dataset": "CIFAR10", "model": "resnet18", "lr": 0.13, "epochs": 150}
    configs = [{**base, "loss": "ce", "mixup_alpha": 0.0, "seed": 0, "samples_per_class": 100,
                "normalization": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}},
               {**base, "loss": "mse", "mixup_alpha": 1.0, "seed": 1, "samples_per_class": 50,
                "normalization": {"mean": [0.5, 0.47, 0.44], "std": [0.24, 0.25, 0.27]}}]
    assert reports.run_labels(configs, ["a", "b"]) == ["spc=100, loss=ce, mixup=0, seed=0",
                                                       "spc=50, loss=mse, mixup=1, seed=1"]
    same = [{**base, "seed": 0}, {**base, "seed": 0}]
    assert reports.run_labels(same, ["run-a", "run-b"]) == ["run-a", "run-b"]


def test_cli_overlays_two_runs_into_the_six_figures(tmp_path, capsys):
    first = write_run(tmp_path / "ce")
    second = write_run(tmp_path / "mse", reaches_tpt=False, loss="mse", mixup_alpha=1.0)
    out = tmp_path / "overlay"
    assert plotting.main(plotting.parse_args(["nc", str(first), str(second), "--out", str(out)])) == 0
    assert {path.name for path in out.iterdir()} == NC_FILES
    assert all(png_size(out / name)[0] == 525 for name in NC_FILES)
    assert str(out / "fig2_equinorm.png") in capsys.readouterr().out


def test_cli_curves_of_two_runs(tmp_path):
    runs = [str(write_run(tmp_path / name, seed=seed)) for name, seed in (("s0", 0), ("s1", 1))]
    plotting.main(plotting.parse_args(["curves", *runs, "--out", str(tmp_path / "out")]))
    assert png_size(tmp_path / "out" / "training_curves.png")[0] == 1050


def test_panel_of_three_long_noisy_runs_is_a_png_7_inches_wide_under_300_kb(tmp_path):
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
    assert png_size(out)[0] == 1050
    assert out.stat().st_size < 300 * 1024


def test_a_run_without_nc_metrics_names_the_folder_and_validate_nc(tmp_path):
    run = write_run(tmp_path / "unvalidated")
    (run / "nc_metrics.csv").unlink()
    for command in (["nc", str(run), "--out", str(tmp_path / "out")],
                    ["panel", str(run), "--out", str(tmp_path / "panel.png")]):
        with pytest.raises(UserError,
                           match=f"{re.escape(str(run))}.*python validate_nc.py --run-dir {re.escape(str(run))}"):
            plotting.main(plotting.parse_args(command))
    with pytest.raises(UserError, match="python validate_nc.py"):
        reports.tpt_table(run)
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


# Runs measured with --layers and --adversarial, differing in several settings so that overlay labels
# are long; a Mixup representation table; a finished study of hand-written runs.

STAGES = ("nc1_layer1", "nc1_layer2", "nc1_layer3", "nc1_layer4")
LOSSES = ("ce", "mse", "label_smoothing", "focal")


def set_columns(run: Path, **columns: list[float]) -> Path:
    """Set (or add) columns of a run's nc_metrics.csv, one value per row."""
    rows = runs.read_csv(run / "nc_metrics.csv")
    for k, row in enumerate(rows):
        row.update({column: str(values[k]) for column, values in columns.items()})
    runs.write_csv(run / "nc_metrics.csv", rows, list(rows[0]))
    return run


def fully_measured(run: Path) -> Path:
    """The run as validate_nc.py --layers --adversarial leaves it: NC1 after each of four stages, falling
    with depth, and Figure 8's column."""
    nc1 = [3.1, 1.2, 0.3, 0.04, 0.005]
    return set_columns(run, deepfool_robustness=[0.02, 0.015, 0.012, 0.011, 0.010],
                       **{stage: [value * (len(STAGES) - depth) for value in nc1]
                          for depth, stage in enumerate(STAGES)})


def overlay_runs(root: Path, count: int) -> list[Path]:
    """`count` fully measured runs differing in loss, learning rate, seed and training-set size; the
    second never reaches zero training error."""
    return [fully_measured(write_run(root / f"run{k}", reaches_tpt=k != 1, loss=LOSSES[k % 4], seed=k,
                                     lr=0.01 * (k + 1), samples_per_class=100 + k,
                                     target_scale=1.0 if LOSSES[k % 4] == "mse" else None))
            for k in range(count)]


def write_representations(path: Path) -> Path:
    """A representation table of classes 1, 4 and 7: mixes around three directions, classifier rows and means."""
    angles = {1: 0.0, 4: 2.1, 7: 4.2}
    rows = []
    for lam in (0.0, 0.5, 1.0):
        for a, b in ((1, 1), (4, 4), (7, 7), (1, 4), (1, 7), (4, 7)):
            angle = lam * angles[a] + (1 - lam) * angles[b]
            rows.append({"kind": "same" if a == b else "mixed", "lam": lam, "class_a": a, "class_b": b,
                         "x": np.cos(angle), "y": np.sin(angle)})
    for label, angle in angles.items():
        rows.append({"kind": "classifier", "lam": 1.0, "class_a": label, "class_b": label,
                     "x": 2 * np.cos(angle), "y": 2 * np.sin(angle)})
        rows.append({"kind": "mean", "lam": 1.0, "class_a": label, "class_b": label, "x": np.cos(angle),
                     "y": np.sin(angle)})
    runs.write_csv(path, rows, ["kind", "lam", "class_a", "class_b", "x", "y"])
    return path


def write_study(root: Path, run_dirs: list[Path], varied: list[str]) -> Path:
    """studies/hand/ as sweep.py leaves it when every run is done: study.json naming the run folders, each
    trained to its last epoch (last.pt, summary.json) with every checkpoint on disk measured and its figures
    drawn (empty files, in the plots folder under `root`, which must be the working folder)."""
    for run in run_dirs:
        if runs.read_nc_metrics(run)[0].get("cdnv") is None:
            with_other_measures(run)  # validate_nc.py measures every row with them
    settings = [json.loads((run / "config.json").read_text()) for run in run_dirs]
    epochs = [runs.read_nc_metrics(run)[-1]["epoch"] for run in run_dirs]
    for run, run_settings, last in zip(run_dirs, settings, epochs):
        (run / "last.pt").write_bytes(b"")
        if not (run / "log.csv").exists():
            runs.write_log(run, [{**dict.fromkeys(runs.LOG_COLUMNS, 0.5), "epoch": last}])
        (run / "summary.json").write_text(json.dumps({"epochs_done": last}))
        plots = root / runs.default_plots_dir(run_settings, run)
        plots.mkdir(parents=True, exist_ok=True)
        for name in [*reports.figure_files(runs.read_nc_metrics(run)), "tpt_table.md"]:
            (plots / name).write_bytes(b"")
        (run / "checkpoints").mkdir()
        for row in runs.read_nc_metrics(run):
            runs.checkpoint_path(run, row["epoch"]).write_bytes(b"")
    folder = root / "studies" / "hand"
    folder.mkdir(parents=True)
    study = {"name": "hand", "argv": ["--name", "hand"], "varied": varied,
             "grid": {key: list(dict.fromkeys(run[key] for run in settings)) for key in varied},
             "runs": [{"run_dir": str(run), "settings": {key: values[key] for key in varied}, "train": [],
                       "validate": [], "epochs": last} for run, values, last in zip(run_dirs, settings, epochs)]}
    (folder / study_files.STUDY_FILE).write_text(json.dumps(study))
    studies.refresh_tables(folder)  # the tables a study's jobs write, which plotting reads
    return folder


def assert_whole_legends(name: str, fig: plt.Figure) -> None:
    """Every legend of `fig`, drawn at the PNG's resolution, lies inside the figure and below its axes
    (their tick labels and axis labels included)."""
    try:
        fig.set_dpi(plotting.DPI)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert legends, f"{name}: no legend"
        page = fig.bbox
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, \
                f"{name}: legend {box.bounds} outside the figure {page.bounds}"
            assert all(box.y1 <= ax.get_tightbbox(renderer).y0 + 1 for ax in fig.axes), f"{name}: legend over the axes"
    finally:
        plt.close(fig)


def labelled_y_ticks(ax: plt.Axes) -> list[str]:
    """The texts of the y axis's labelled ticks within its view (of a drawn figure)."""
    low, high = sorted(ax.get_ylim())
    return [text.get_text() for text in ax.get_yticklabels()
            if text.get_text() and low <= text.get_position()[1] <= high]


@pytest.mark.parametrize("count", [1, 2, 3, 24])
@pytest.mark.slow
def test_every_figure_keeps_its_whole_legend_inside_the_image_below_the_axes(tmp_path, count):
    run_dirs = overlay_runs(tmp_path, count)
    figures = dict(plotting.nc_figures(run_dirs))
    assert set(figures) == NC_FILES | {"fig8_adversarial_robustness.png"}
    figures |= {"panel": plotting.panel_figure(run_dirs), "curves": plotting.curves_figure(run_dirs),
                "study panel": plotting.panel_figure(run_dirs, ["loss"]),  # what plot_study draws
                "study curves": plotting.curves_figure(run_dirs, ["loss"])}
    if count == 1:  # figures of one run
        figures |= {"layerwise": plotting.layers_figure(run_dirs[0]),
                    "representations": plotting.representations_figure(write_representations(tmp_path / "r.csv"))}
    for name, fig in figures.items():
        assert_whole_legends(f"{count} runs, {name}", fig)


def test_a_legend_of_labels_wider_than_the_figure_is_wrapped_inside_it(tmp_path):
    """Runs whose folders share a name are labelled by the last parts of their paths that tell them apart (never
    the absolute path); labels given longer than the figure are wrapped inside it."""
    deep = [tmp_path / ("a" * 60) / letter / "run" for letter in "xyz"]
    for folder in deep:
        write_run(folder)
    fig = plotting.panel_figure(deep)
    assert [text.get_text() for text in fig.legends[0].get_texts()][-3:] == ["x/run", "y/run", "z/run"]
    plt.close(fig)
    wide = ", ".join(["a label longer than the figure"] * 6)
    long = {f"{folder.parent.name}/run": f"run {folder.parent.name}, {wide}" for folder in deep}
    fig = plotting.panel_figure(deep, style=plotting.FigureStyle(labels={str(deep[0]): long["x/run"],
                                                                        "y/run": long["y/run"]}))
    texts = [text.get_text() for text in fig.legends[0].get_texts()][-3:]
    assert [text.replace("\n", " ") for text in texts[:2]] == [long["x/run"], long["y/run"]]
    assert texts[2] == "z/run" and "\n" in texts[0]
    assert_whole_legends("long labels", fig)


@pytest.mark.slow
def test_every_subcommand_writes_the_format_asked_for(tmp_path, monkeypatch):
    """Each subcommand with --format, each format in turn (they share one writer), and a file's suffix."""
    monkeypatch.chdir(tmp_path)
    run = str(overlay_runs(tmp_path / "runs", 1)[0])
    study = str(write_study(tmp_path, [Path(run)], ["seed"]))
    table = write_representations(tmp_path / "mixup.csv")
    out = tmp_path / "out"
    commands = {"nc": ["nc", run, "--out", f"{out}/nc"], "curves": ["curves", run, "--out", f"{out}/curves"],
                "panel": ["panel", run, "--out", f"{out}/panel"], "layers": ["layers", run, "--out", f"{out}/layers"],
                "representations": ["representations", str(table)], "study": ["study", study, "--out", f"{out}/study"]}
    formats = dict(zip(commands, plotting.FORMATS * 2))
    for name, command in commands.items():
        assert plotting.main(plotting.parse_args([*command, "--format", formats[name]])) == 0
    assert plotting.main(plotting.parse_args(["curves", run, "--out", f"{out}/curves.svg"])) == 0
    assert plotting.main(plotting.parse_args(["panel", run, "--out", f"{out}/named.pdf"])) == 0
    expected = {out / "curves.svg": "svg", out / "named.pdf": "pdf",
                table.with_suffix(f".{formats['representations']}"): formats["representations"]}
    expected |= {out / "nc" / Path(name).with_suffix(f".{formats['nc']}"): formats["nc"]
                 for name in NC_FILES | {"fig8_adversarial_robustness.png", "fig9_other_measures.png"}}
    expected |= {out / "curves" / f"training_curves.{formats['curves']}": formats["curves"],
                 out / f"panel.{formats['panel']}": formats["panel"],
                 out / f"layers.{formats['layers']}": formats["layers"],
                 out / "study" / f"panel.{formats['study']}": formats["study"],
                 out / "study" / f"training_curves.{formats['study']}": formats["study"],
                 out / "study" / f"fig9_other_measures.{formats['study']}": formats["study"]}
    assert {path for path in out.rglob("*") if path.is_file()} == {*expected, out / "study" / "table.md"} - {
        table.with_suffix(f".{formats['representations']}")}
    for path, figure_format in expected.items():
        assert path.read_bytes().startswith(MAGIC[figure_format]), path
        if figure_format == "svg":
            assert b"<svg" in path.read_bytes()[:1000]


@pytest.mark.parametrize("command,message", [
    (["nc", "RUN", "--out", "x.pdf"],
     "writes several figures into a folder, not into the file x.pdf: pass --out x --format pdf"),
    (["study", "STUDY", "--out", "x.jpg"], "writes several figures into a folder"),
    (["panel", "RUN", "--out", "x.jpg"], r"name a .png, .pdf or .svg file"),
    (["layers", "RUN", "--out", "x.eps"], r"name a .png, .pdf or .svg file"),
    (["panel", "RUN", "--out", "x.pdf", "--format", "svg"], "names a .pdf file but --format is svg"),
    (["curves", "RUN", "--out", "x.png", "--format", "pdf"], "names a .png file but --format is pdf"),
    (["representations", "CSV", "--out", "x.svg", "--format", "png"], "names a .svg file but --format is png"),
    (["table", "RUN", "--out", "x.png"], "name a .md, .csv or .tex file"),
])
def test_an_output_name_that_cannot_be_honoured_is_a_one_line_error_and_nothing_is_written(
        tmp_path, monkeypatch, capsys, command, message):
    monkeypatch.chdir(tmp_path)
    run = overlay_runs(tmp_path, 1)[0]
    names = {"RUN": str(run), "STUDY": str(write_study(tmp_path, [run], ["seed"])),
             "CSV": str(write_representations(tmp_path / "mixup.csv"))}
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    monkeypatch.setattr(sys, "argv", ["plotting.py", *(names.get(word, word) for word in command)])
    assert run_cli(plotting.main, plotting.parse_args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert not list(out.iterdir()) and not list(tmp_path.glob("mixup.[ps]*"))


def test_overlay_labels_name_only_the_settings_that_differ_and_apply():
    ce = {"dataset": "CIFAR10", "model": "resnet18", "epochs": 30, "lr_milestones": [10, 20], "seed": 0, "lr": 0.0679,
          "optimizer": "sgd", "momentum": 0.9, "loss": "ce", "target_scale": None, "label_smoothing": None}
    mse = {**ce, "loss": "mse", "target_scale": 1.0}
    names = ["a", "b", "c"]
    assert reports.run_labels([ce, mse], names[:2]) == ["loss=ce", "loss=mse"]
    assert reports.run_labels([ce, mse, {**mse, "target_scale": 10.0}], names) == [
        "loss=ce", "loss=mse, kappa=1", "loss=mse, kappa=10"]
    # Each length's default milestones (floor(E/3), floor(2E/3)) are derived, not chosen: not named.
    assert reports.run_labels([ce, {**ce, "epochs": 60, "lr_milestones": [20, 40]}], names[:2]) == [
        "epochs=30", "epochs=60"]
    assert reports.run_labels([ce, {**ce, "lr_milestones": [5, 25]}], names[:2]) == ["a", "milestones=5,25"]
    assert reports.run_labels([ce, {**ce, "optimizer": "adam", "momentum": None, "lr": 0.001}], names[:2]) == [
        "sgd, lr=0.0679", "adam, lr=0.001"]
    assert reports.run_labels([{**ce, "samples_per_class": None}, {**ce, "samples_per_class": 100}], names[:2]) == [
        "spc=all", "spc=100"]


def test_the_legend_of_cross_entropy_against_mse_reads_loss_ce_and_loss_mse(tmp_path):
    ce = write_run(tmp_path / "ce", target_scale=None)
    mse = write_run(tmp_path / "mse", loss="mse", target_scale=1.0)
    for group_by, expected in (([], ["loss=ce", "loss=mse"]),
                               (["loss", "target_scale"], ["loss=ce (1 run)", "loss=mse, kappa=1 (1 run)"])):
        fig = plotting.panel_figure([ce, mse], group_by)
        texts = [text.get_text() for text in fig.legends[0].get_texts()]
        plt.close(fig)
        assert texts[-2:] == expected and not any("None" in text for text in texts)


@pytest.mark.parametrize("first,last", [(1.4, 0.6), (0.99, 0.95)])
def test_a_log_axis_spanning_less_than_a_decade_shows_at_least_three_labelled_ticks(tmp_path, first, last):
    """Figure 5 of a short run whose self-duality falls from `first` to `last`: once only "1" was labelled."""
    run = set_columns(write_run(tmp_path / "short"), self_duality=np.geomspace(first, last, len(NC_ROWS)).tolist())
    fig = dict(plotting.nc_figures([run]))["fig5_self_duality.png"]
    fig.set_dpi(plotting.DPI)
    fig.canvas.draw()
    labels = labelled_y_ticks(fig.axes[0])
    low, high = sorted(fig.axes[0].get_ylim())
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels)
    assert all(low <= float(label) <= high for label in labels)


def test_the_layerwise_colour_bar_labels_epochs_as_integers(tmp_path):
    fig = plotting.layers_figure(fully_measured(write_run(tmp_path / "run")))
    fig.canvas.draw()
    labels = labelled_y_ticks(fig.axes[1])
    plt.close(fig)
    assert len(labels) >= 3 and all(re.fullmatch(r"[0-9]+", label) for label in labels)
    assert {int(label) for label in labels} <= set(range(1, LAST_EPOCH + 1))


def test_a_single_runs_tpt_line_differs_in_colour_from_its_curves(tmp_path):
    fig = plotting.panel_figure([write_run(tmp_path / "run")])
    for ax in fig.axes:
        vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
        curves = [line for line in ax.get_lines() if line not in vertical]
        assert [line.get_xdata()[0] for line in vertical] == [TPT_EPOCH] and curves
        colours = {matplotlib.colors.to_rgb(line.get_color()) for line in curves}
        assert matplotlib.colors.to_rgb(vertical[0].get_color()) not in colours
    plt.close(fig)


def test_the_representation_legend_shows_its_markers_large_and_dark_enough_to_read(tmp_path):
    fig = plotting.representations_figure(write_representations(tmp_path / "mixup.csv"))
    legend = fig.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["same-class mixes", "two-class mixes",
                                                                "class means (clean)",
                                                                "darker: larger weight of the first class of a pair"]
    for handle in legend.legend_handles[:3]:
        red, green, blue = matplotlib.colors.to_rgb(handle.get_color())
        assert handle.get_markersize() >= 6 and 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.6
    plt.close(fig)


# Table 1 over runs: (epoch, clean training accuracy, test accuracy) at three checkpoints.
CE_RUNS = [[(1, 0.5, 0.40), (5, 1.0, 0.70), (10, 1.0, 0.76)],    # onset 5: 70% -> 76%
           [(1, 0.6, 0.42), (5, 0.98, 0.71), (10, 1.0, 0.75)],   # onset 10: 75% -> 75%
           [(1, 0.55, 0.41), (5, 1.0, 0.72), (10, 1.0, 0.80)]]   # onset 5: 72% -> 80%
MSE_RUNS = [[(1, 0.3, 0.30), (5, 0.9, 0.50), (10, 0.99, 0.60)],  # never: 60% at the end
            [(1, 0.3, 0.30), (5, 1.0, 0.55), (10, 1.0, 0.65)]]   # onset 5: 55% -> 65%


def write_accuracies(folder: Path, checkpoints: list[tuple[int, float, float]], **settings) -> Path:
    """A run folder whose nc_metrics.csv has these clean training and test accuracies (0.5 elsewhere)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "synthetic", "model": "resnet18", **settings}))
    rows = [{**dict.fromkeys(runs.NC_COLUMNS, 0.5), "epoch": epoch, "train_acc": train, "test_acc": test}
            for epoch, train, test in checkpoints]
    runs.write_csv(folder / "nc_metrics.csv", rows, runs.NC_COLUMNS)
    return folder


def table_runs(root: Path) -> list[Path]:
    return ([write_accuracies(root / f"ce{seed}", rows, loss="ce", seed=seed) for seed, rows in enumerate(CE_RUNS)]
            + [write_accuracies(root / f"mse{seed}", rows, loss="mse", seed=seed)
               for seed, rows in enumerate(MSE_RUNS)])


def markdown_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_table_1_gives_each_runs_onset_accuracies_and_change_as_markdown_and_csv(tmp_path, capsys):
    run_dirs = table_runs(tmp_path / "runs")
    out = tmp_path / "tables" / "table1.md"
    assert plotting.main(plotting.parse_args(["table", *map(str, run_dirs), "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(out.read_text()) and str(out.with_suffix(".csv")) in printed
    assert markdown_rows(out.read_text()) == [
        ["loss=ce, seed=0", "synthetic", "resnet18", "5", "70.00%", "10", "76.00%", "+6.00"],
        ["loss=ce, seed=1", "synthetic", "resnet18", "10", "75.00%", "10", "75.00%", "+0.00"],
        ["loss=ce, seed=2", "synthetic", "resnet18", "5", "72.00%", "10", "80.00%", "+8.00"],
        ["loss=mse, seed=0", "synthetic", "resnet18", "not reached by epoch 10 (best train accuracy 99.00%)", "n/a",
         "10", "60.00%", "n/a"],
        ["loss=mse, seed=1", "synthetic", "resnet18", "5", "55.00%", "10", "65.00%", "+10.00"]]
    assert str(tmp_path) not in out.read_text()  # runs named as the figures name them, never by their paths
    with open(out.with_suffix(".csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run_dir"] for row in rows] == [str(run) for run in run_dirs]
    assert [row["tpt_epoch"] for row in rows] == ["5", "10", "5", "", "5"]
    assert [float(row["last_test_acc"]) for row in rows] == [0.76, 0.75, 0.80, 0.60, 0.65]
    assert [float(row["change"]) if row["change"] else None for row in rows] == pytest.approx(
        [0.06, 0.0, 0.08, None, 0.10])


def test_table_1_as_latex_has_booktabs_rules_and_names_each_run_by_its_figure_label_escaped(tmp_path, capsys):
    run_dirs = [write_accuracies(tmp_path / "runs/a_run", CE_RUNS[0], loss="label_smoothing", seed=0),
                write_accuracies(tmp_path / "runs/b_run", MSE_RUNS[0], loss="ce", seed=0)]
    out = tmp_path / "t1"
    assert plotting.main(plotting.parse_args(["table", *map(str, run_dirs), "--out", str(out)])) == 0
    assert str(out.with_suffix(".tex")) in capsys.readouterr().out
    tex = out.with_suffix(".tex").read_text().splitlines()
    assert tex[0].startswith("% TPT onset: ") and tex[1] == r"\begin{tabular}{lllrrrrr}"
    assert tex[2:] == [
        r"\toprule",
        r"run & dataset & network & TPT onset epoch & test accuracy at the TPT onset & last epoch & test accuracy at "
        r"the last epoch & change (points) \\",
        r"\midrule",
        r"loss=label\_smoothing & synthetic & resnet18 & 5 & 70.00\% & 10 & 76.00\% & +6.00 \\",
        r"loss=ce & synthetic & resnet18 & not reached by epoch 10 (best train accuracy 99.00\%) & n/a & 10 & 60.00\% "
        r"& n/a \\",
        r"\bottomrule", r"\end{tabular}"]
    same = [write_accuracies(tmp_path / "same/x_1", CE_RUNS[0], loss="ce"),
            write_accuracies(tmp_path / "same/y_2", CE_RUNS[1], loss="ce")]
    assert plotting.main(plotting.parse_args(["table", *map(str, same), "--out", str(out)])) == 0
    assert [line.split(" & ")[0] for line in out.with_suffix(".tex").read_text().splitlines()[5:7]] == [
        r"x\_1", r"y\_2"]  # runs that differ in nothing are named by their folders, as in the figures
    assert plotting.main(plotting.parse_args(["table", *map(str, table_runs(tmp_path / "runs")), "--group-by", "loss",
                                              "--out", str(out)])) == 0
    grouped = out.with_suffix(".tex").read_text().splitlines()
    assert grouped[1] == r"\begin{tabular}{lrrllrrrrr}" and grouped[3].startswith("group & runs & ")
    assert [line.split(" & ")[:3] for line in grouped[5:7]] == [["loss=ce (3 runs)", "3", "3"],
                                                                ["loss=mse (2 runs)", "2", "1"]]


def test_reports_latex_text_escapes_what_latex_would_read_as_commands():
    assert reports.latex_text(r"a_b 5% & #1 $x$ {y} ~^\z") == \
        r"a\_b 5\% \& \#1 \$x\$ \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}z"


def test_table_1_grouped_gives_the_mean_over_seeds_with_their_range(tmp_path, capsys):
    out = tmp_path / "by_loss"
    command = ["table", *map(str, table_runs(tmp_path / "runs")), "--group-by", "loss", "--out", str(out)]
    assert plotting.main(plotting.parse_args(command)) == 0
    assert markdown_rows(out.with_suffix(".md").read_text()) == [
        ["ce", "3", "3", "synthetic", "resnet18", "6.7 [5, 10]", "72.33% [70.00%, 75.00%]", "10",
         "77.00% [75.00%, 80.00%]", "+4.67 [+0.00, +8.00]"],
        ["mse", "2", "1", "synthetic", "resnet18", "5", "55.00%", "10", "62.50% [60.00%, 65.00%]", "+10.00"]]
    with open(out.with_suffix(".csv"), newline="") as handle:
        ce, mse = csv.DictReader(handle)
    assert (ce["runs"], ce["runs_tpt"], mse["runs"], mse["runs_tpt"]) == ("3", "3", "2", "1")
    assert float(ce["tpt_epoch_mean"]) == pytest.approx(20 / 3)
    assert (ce["tpt_epoch_min"], ce["tpt_epoch_max"]) == ("5", "10")
    assert float(ce["tpt_test_acc_mean"]) == pytest.approx(0.72333333)
    assert float(ce["change_max"]) == pytest.approx(0.08)
    assert float(mse["last_test_acc_mean"]) == pytest.approx(0.625) and float(mse["change_min"]) == pytest.approx(0.10)


def test_table_1_of_a_study_folder_is_that_of_its_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dirs = table_runs(tmp_path / "runs")[:3]
    study = write_study(tmp_path, run_dirs, ["seed"])
    assert plotting.main(plotting.parse_args(["table", str(study)])) == 0
    assert [row[0] for row in markdown_rows(capsys.readouterr().out)] == ["seed=0", "seed=1", "seed=2"]
    assert plotting.main(plotting.parse_args(["table", str(study), "--group-by", "loss"])) == 0
    assert markdown_rows(capsys.readouterr().out)[0][:6] == ["ce", "3", "3", "synthetic", "resnet18", "6.7 [5, 10]"]


def test_the_help_offers_table_1_as_the_table_subcommand(capsys):
    with pytest.raises(SystemExit):
        plotting.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "plotting.py table" in text and "Table 1" in text
    with pytest.raises(SystemExit):
        plotting.parse_args(["table", "--help"])
    assert "Table 1" in capsys.readouterr().out


OTHER_COLUMNS = (",nc1_trace_ratio,cdnv,etf_error_means,etf_error_weights,wh_alignment,hyperspherical_energy_means,"
                 "gnc2_log_distance_var,unc3_dot_var,unc3_cosine_var")


def with_other_measures(folder: Path) -> Path:
    """A run folder of `write_run` whose table also has the field's other measures, shrinking with training
    (the energy towards the simplex value of its 4 classes, sqrt(3/8))."""
    rows = (folder / "nc_metrics.csv").read_text().splitlines()
    extended = [rows[0] + OTHER_COLUMNS] + [row + "," + ",".join(f"{value / (index + 1):.6g}" for value in
                                                                 (2.0, 5.0, 0.9, 0.5, 1.1, 0.3, 0.2, 4.0, 0.1))
                                            for index, row in enumerate(rows[1:])]
    (folder / "nc_metrics.csv").write_text("\n".join(extended) + "\n")
    return folder


@pytest.mark.slow
def test_figure_9_overlays_runs_and_groups_them(tmp_path):
    first = with_other_measures(write_run(tmp_path / "learned", seed=0))
    second = with_other_measures(write_run(tmp_path / "etf", classifier="etf", seed=1))
    third = with_other_measures(write_run(tmp_path / "etf1", classifier="etf", seed=2))
    out = tmp_path / "grouped"
    assert plotting.main(plotting.parse_args(["nc", str(first), str(second), str(third), "--out", str(out),
                                              "--group-by", "classifier"])) == 0
    assert {path.name for path in out.iterdir()} == NC_FILES | {"fig9_other_measures.png"}
    width, height = png_size(out / "fig9_other_measures.png")
    assert width == 1050 and height >= 690  # 7x4.6 in, taller by its legend
    # A table measured before these columns existed draws Figures 2-7 alone.
    assert {path.name for path in plotting.plot_runs([write_run(tmp_path / "old")], tmp_path / "old_out")} == NC_FILES


@pytest.mark.parametrize("last, expected", [(350, [1, 2, 5, 10, 20, 50, 100, 200]), (5000, [1, 10, 100, 1000])])
def test_a_log_axis_labels_1_2_5_over_three_decades_and_powers_of_ten_beyond(last, expected):
    """The paper's 350 epochs keep their 1-2-5 labels; ufm.py's 5000 steps would get 13, running into one another."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1, last], [1, 2])
    ax.set_xscale("log")
    plotting.readable_log_ticks(ax.xaxis)
    left, right = ax.get_xlim()
    assert [tick for tick in ax.xaxis.get_majorticklocs() if left <= tick <= right] == expected
    plt.close(fig)


def test_a_log_axis_over_many_decades_keeps_labelled_ticks():
    """A fixed ETF classifier's Figure 2-4 values are ~1e-8 beside the means' ~0.1: matplotlib's LogLocator
    with several subs draws no tick at all over such a range."""
    import matplotlib.pyplot as plt
    for low in (1e-9, 0.05):
        fig, ax = plt.subplots()
        ax.plot([1, 10], [low, 1.0])
        ax.set_xscale("log")
        ax.set_yscale("log")
        plotting.readable_log_ticks(ax.yaxis)
        bottom, top = ax.get_ylim()
        inside = [tick for tick in ax.yaxis.get_majorticklocs() if bottom <= tick <= top]
        plt.close(fig)
        assert len(inside) >= 2, low
