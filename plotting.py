"""Every figure of the repo, drawn from the tables of run folders (never from a model): the paper's
Figures 2-7, the field's other measures (fig9_other_measures.png), the training curves and Table 1.

    python plotting.py nc RUN_DIR [RUN_DIR ...] --out DIR          # fig2_equinorm.png ... fig7, fig9
    python plotting.py curves RUN_DIR [RUN_DIR ...] --out DIR      # training_curves.png
    python plotting.py panel RUN_DIR [RUN_DIR ...] --out FILE.png  # Figures 2-7 in one compact 2x3 panel
    python plotting.py panel RUN_DIR ... --group-by precision --out FILE.png   # mean and spread per group
    python plotting.py representations CSV [--out FILE.png]        # the Mixup representation figure
    python plotting.py study studies/NAME [--out DIR]              # a study's panel and curves, seeds as bands

Several runs are overlaid, one colour per run, labelled by the settings on which their configs differ;
with `--group-by KEY ...` one colour per group of runs with equal values of those config.json keys,
drawn as the mean over the group's runs with a band from their minimum to their maximum, on the epochs
they all have. A line style means one thing in every figure, named in one legend below the axes: solid
the training set (its class means, its features), dashed the classifier rows, dash-dot the test set,
and a dotted vertical line in the run's colour its TPT onset: the first analysis checkpoint of
nc_metrics.csv whose clean training set is classified without error in eval mode. The title names the dataset and model and every setting that departs from the paper's
protocol, and says when a run never reached zero training error.

Epochs are on a log axis (the analysis checkpoints are log-spaced), and so are the quantities of
Figures 2-6 and the losses, which fall towards 0 over orders of magnitude; Figure 7's mismatch, the
accuracies and the ECE are proportions, on a linear axis. A log axis cannot show 0: such values are
left out, which breaks the line there, and the legend adds "zeros not shown" (a row of epoch 0 is
likewise left off the epoch axis). They are not clipped to a floor, which would draw a value that was
never measured at a height set by an arbitrary constant.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: chosen before pyplot loads
import matplotlib.cm
import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

import config
import runs
import studies
from errors import ArgumentParser, UserError, run_cli

DPI = 150
# >= 10 pt at the saved size; vector files keep text as text (searchable, editable, reproducible).
STYLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10, "svg.fonttype": "none", "pdf.fonttype": 42}
FORMATS = ("png", "pdf", "svg")
VECTOR_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}  # no timestamps: same tables, same bytes
SINGLE_SIZE = (7.0, 5.0)
CURVES_SIZE = (15.0, 4.8)
PANEL_SIZE = (12.0, 7.0)
SOLID, DASHED, DASH_DOT = "-", "--", "-."
TPT_STYLE = {"linestyle": (0, (1, 2)), "linewidth": 1.5, "alpha": 0.8}  # dotted: unlike either quantity
MARKER_SIZE = 3
NC_TABLE, LOG_TABLE = "nc_metrics.csv", "log.csv"


@dataclass(frozen=True)
class Quantity:
    """A column, drawn in the line style of what it describes (TRAINING, CLASSIFIERS or TEST); figures
    draw the columns their table has."""
    column: str
    style: str = SOLID


@dataclass(frozen=True)
class Panel:
    """One axes' worth of a figure: what it shows, from which table of the run folder, and how."""
    title: str
    ylabel: str
    quantities: tuple[Quantity, ...]
    log_y: bool
    table: str
    names: dict[str, str] | None = None  # the legend's name of each line style, if not the table's usual ones


TRAINING, CLASSIFIERS, TEST = SOLID, DASHED, DASH_DOT
# One meaning per line style across every figure, so one legend below the axes serves them all.
STYLE_NAMES = {LOG_TABLE: {TRAINING: "training set (running average over the epoch, train mode)", TEST: "test set"},
               NC_TABLE: {TRAINING: r"training set: class means $\mu_c - \mu_G$, features $h$",
                          CLASSIFIERS: r"classifier rows $w_c$",
                          TEST: "test set (its own class means; Figure 7: the training means)"}}
_X = r"\mathbf{x}_c"
NC_FIGURES = {
    "fig2_equinorm.png": Panel(
        "Equinorm (Figure 2)", rf"$\mathrm{{Std}}_c\,\|{_X}\|\ /\ \mathrm{{Avg}}_c\,\|{_X}\|$",
        (Quantity("equinorm_means"), Quantity("equinorm_weights", CLASSIFIERS), Quantity("equinorm_means_test", TEST)),
        log_y=True, table=NC_TABLE),
    "fig3_equiangularity.png": Panel(
        "Equiangularity (Figure 3)", rf"$\mathrm{{Std}}_{{c \neq c'}}\ \cos({_X}, \mathbf{{x}}_{{c'}})$",
        (Quantity("equiangular_means"), Quantity("equiangular_weights", CLASSIFIERS),
         Quantity("equiangular_means_test", TEST)), log_y=True, table=NC_TABLE),
    "fig4_max_equiangularity.png": Panel(
        "Maximal angle (Figure 4)",
        rf"$\mathrm{{Avg}}_{{c \neq c'}}\ |\cos({_X}, \mathbf{{x}}_{{c'}}) + 1/(C-1)|$",
        (Quantity("maxangle_means"), Quantity("maxangle_weights", CLASSIFIERS), Quantity("maxangle_means_test", TEST)),
        log_y=True, table=NC_TABLE),
    "fig5_self_duality.png": Panel(
        "Self-duality (Figure 5)", r"$\|\,W / \|W\|_F - \tilde{M} / \|\tilde{M}\|_F\,\|_F^2$",
        (Quantity("self_duality"), Quantity("self_duality_test", TEST)), log_y=True, table=NC_TABLE),
    "fig6_nc1.png": Panel(
        "Within-class variation (Figure 6)", r"$\mathrm{Tr}(\Sigma_W\,\Sigma_B^{+})\ /\ C$",
        (Quantity("nc1"), Quantity("nc1_test", TEST)), log_y=True, table=NC_TABLE),
    "fig7_ncc_mismatch.png": Panel(
        "NCC mismatch (Figure 7)",
        r"proportion with $\mathrm{argmax}_c\,(w_c \cdot h + b_c)$" "\n" r"$\neq \mathrm{argmin}_c\,\|h - \mu_c\|$",
        (Quantity("ncc_mismatch_train"), Quantity("ncc_mismatch_test", TEST)), log_y=False, table=NC_TABLE),
}
# Figure 8 is drawn when the table has it (validate_nc.py --adversarial); the 2x3 panel is Figures 2-7.
ROBUSTNESS_FIGURE = ("fig8_adversarial_robustness.png", Panel(
    "Adversarial robustness (Figure 8)", r"DeepFool $\mathrm{Avg}_x\ \|r(x)\|_2\ /\ \|x\|_2$ (pixels in [0, 1])",
    (Quantity("deepfool_robustness", TEST),), log_y=False, table=NC_TABLE,
    names={TEST: "a fixed sample of test images, attacked away from the network's decision"}))
# Figure 9: the field's other measures (nc_metrics.py), one panel each, drawn when the table has them.
OTHER_FILE = "fig9_other_measures.png"
OTHER_PANELS = (
    Panel("Trace ratio (Tirer et al. 2023)", r"$\mathrm{Tr}(\Sigma_W)\ /\ \mathrm{Tr}(\Sigma_B)$",
          (Quantity("nc1_trace_ratio"), Quantity("nc1_trace_ratio_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("CDNV (Galanti et al. 2022)", r"$\mathrm{Avg}_{c < c'}\ (V_c + V_{c'})\ /\ (2\,\|\mu_c - \mu_{c'}\|^2)$",
          (Quantity("cdnv"), Quantity("cdnv_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("ETF error (Zhu et al. 2021, NC2)",
          "$\\|\\,G / \\|G\\|_F - E\\,\\|_F$\n" r"$G = \tilde{M}\tilde{M}^\top,\ W W^\top$",
          (Quantity("etf_error_means"), Quantity("etf_error_weights", CLASSIFIERS), Quantity("etf_error_means_test", TEST)),
          log_y=True, table=NC_TABLE),
    Panel("Alignment of W and means (Zhu et al., NC3)",
          r"$\|\,W\tilde{M}^\top / \|W\tilde{M}^\top\|_F - E\,\|_F$",
          (Quantity("wh_alignment"), Quantity("wh_alignment_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("Hyperspherical energy (Liu et al. 2023)",
          r"$\mathrm{Avg}_{c \neq c'}\ 1\ /\ \|m_c - m_{c'}\|$" "\n" r"(grey: the simplex ETF's $\sqrt{(C-1)/2C}$)",
          (Quantity("hyperspherical_energy_means"), Quantity("hyperspherical_energy_means_test", TEST)), log_y=False,
          table=NC_TABLE),
)
LAYERS_FILE = "layerwise_nc1.png"
CURVE_PANELS = (
    Panel("Loss", "loss", (Quantity("train_loss"), Quantity("test_loss", TEST)), log_y=True, table=LOG_TABLE),
    Panel("Accuracy", "accuracy (fraction correct)", (Quantity("train_acc"), Quantity("test_acc", TEST)),
          log_y=False, table=LOG_TABLE),
    Panel("Calibration", "expected calibration error (ECE)", (Quantity("test_ece", TEST),), log_y=False,
          table=LOG_TABLE),
)
CURVES_FILE = "training_curves.png"


def plot_run(run_dir: Path, out_dir: Path, suffix: str = ".png") -> list[Path]:
    """Figures 2-7 (and 8 and the layer-wise figure when measured), the 2x3 panel and the training
    curves of one run, written into `out_dir` in the format of `suffix`; the paths written."""
    out_dir = Path(out_dir)
    written = plot_runs([run_dir], out_dir, suffix=suffix)
    written.append(plot_panel([run_dir], out_dir / f"panel{suffix}"))
    written.append(plot_curves([run_dir], out_dir, suffix=suffix))
    if runs.stage_columns(runs.read_nc_metrics(run_dir)):
        written.append(plot_layers(run_dir, out_dir / Path(LAYERS_FILE).with_suffix(suffix)))
    return written


def plot_runs(run_dirs: list[Path], out_dir: Path, group_by: list[str] = (), suffix: str = ".png") -> list[Path]:
    """Figures 2-7 (and 8 when measured) with the runs (or groups of runs) overlaid, one file per figure
    in `out_dir`."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by)
    figures = dict(NC_FIGURES)
    if _present(ROBUSTNESS_FIGURE[1], lines):
        figures[ROBUSTNESS_FIGURE[0]] = ROBUSTNESS_FIGURE[1]
    written = []
    for filename, panel in figures.items():
        with plt.rc_context(STYLE):
            fig, ax = plt.subplots(figsize=SINGLE_SIZE, layout="constrained")
            _finish(fig, lines, _draw(ax, panel, lines), panel.names or STYLE_NAMES[panel.table])
            written.append(_save(fig, Path(out_dir) / Path(filename).with_suffix(suffix)))
    if any(_present(panel, lines) for panel in OTHER_PANELS):
        written.append(plot_other_measures(run_dirs, Path(out_dir) / Path(OTHER_FILE).with_suffix(suffix), group_by))
    return written


def plot_curves(run_dirs: list[Path], out_dir: Path, group_by: list[str] = (), suffix: str = ".png") -> Path:
    """training_curves.png in `out_dir`: loss | accuracy | test ECE per epoch from log.csv."""
    lines = _load_lines(run_dirs, LOG_TABLE, group_by)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=CURVES_SIZE, layout="constrained")
        styles = set().union(*(_draw(ax, panel, lines) for ax, panel in zip(axes, CURVE_PANELS)))
        _finish(fig, lines, styles, STYLE_NAMES[LOG_TABLE])
        return _save(fig, Path(out_dir) / Path(CURVES_FILE).with_suffix(suffix))


def plot_panel(run_dirs: list[Path], out_path: Path, group_by: list[str] = ()) -> Path:
    """Figures 2-7 as one compact 2x3 panel (the same content as the single figures) at `out_path`."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=PANEL_SIZE, layout="constrained")
        styles = set().union(*(_draw(ax, panel, lines) for ax, panel in zip(axes.flat, NC_FIGURES.values())))
        _finish(fig, lines, styles, STYLE_NAMES[NC_TABLE])
        return _save(fig, Path(out_path))


def plot_other_measures(run_dirs: list[Path], out_path: Path, group_by: list[str] = ()) -> Path:
    """Figure 9: the field's other measures, one panel each, the runs (or groups) overlaid; the energy
    panel marks the simplex ETF's value, sqrt((C - 1) / (2 C)), its minimum."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=PANEL_SIZE, layout="constrained")
        styles = set().union(*(_draw(ax, panel, lines) for ax, panel in zip(axes.flat, OTHER_PANELS)))
        for classes in sorted({run["num_classes"] for line in lines for run in line.configs if "num_classes" in run}):
            energy = np.sqrt((classes - 1) / (2 * classes))
            axes.flat[len(OTHER_PANELS) - 1].axhline(energy, color="0.5", linewidth=1)
        axes.flat[-1].axis("off")
        _finish(fig, lines, styles, STYLE_NAMES[NC_TABLE])
        return _save(fig, Path(out_path))


def plot_layers(run_dir: Path, out_path: Path) -> Path:
    """NC1 after each stage of the network (validate_nc.py --layers) against depth, on a log axis, one
    line per measured checkpoint coloured by its epoch; the TPT onset's checkpoint in black."""
    measured = _read_required(Path(run_dir), NC_TABLE)
    stages = runs.stage_columns(measured)
    if not stages:
        raise UserError(f"{run_dir} has no layer-wise NC1 yet; measure it with: python validate_nc.py --run-dir "
                        f"{run_dir} --layers")
    rows = [row for row in measured if all(row.get(column) is not None for column in stages) and row["epoch"] > 0]
    onset = (runs.tpt_row(measured) or {}).get("epoch")
    norm = matplotlib.colors.LogNorm(vmin=rows[0]["epoch"], vmax=max(rows[-1]["epoch"], rows[0]["epoch"] + 1))
    colours = plt.get_cmap("viridis")
    depth = np.arange(1, len(stages) + 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=SINGLE_SIZE, layout="constrained")
        for row in rows:
            values = np.array([row[column] for column in stages], dtype=float)
            values[values <= 0] = np.nan
            tpt = row["epoch"] == onset
            ax.plot(depth, values, marker="o", markersize=MARKER_SIZE, linewidth=2.5 if tpt else 1.2,
                    color="black" if tpt else colours(norm(row["epoch"])),
                    label=f"TPT onset (epoch {onset})" if tpt else None, zorder=3 if tpt else 2)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colours), ax=ax, label="epoch of the checkpoint")
        ax.set_yscale("log")
        ax.set_xticks(depth, [column.removeprefix("nc1_") for column in stages], rotation=30)
        ax.set_xlabel("stage of the network (its globally averaged output), in depth order")
        ax.set_ylabel(r"$\mathrm{Tr}(\Sigma_W\,\Sigma_B^{+})\ /\ C$ after the stage")
        ax.set_title("Within-class variation layer by layer")
        ax.grid(True, which="major", alpha=0.3)
        if onset is not None:
            ax.legend()
        fig.suptitle(_describe(_load_lines([run_dir], NC_TABLE, [])))
        return _save(fig, Path(out_path))


def plot_representations(table: Path, out_path: Path | None = None) -> Path:
    """The Mixup representation figure (Fisher, Meng & Papyan 2024, Figure 1) from the CSV that
    `validate_nc.py --representations` writes; by default beside it, as .png.

    Same-class mixes are drawn in greens and mixes of two classes in purples, darker for larger lam
    (the weight of class_a); arrows are the centred classifier rows, crosses the clean class means."""
    rows = _read_representations(Path(table))
    points = [row for row in rows if row["kind"] in ("same", "mixed")]
    radius = max(np.hypot(row["x"], row["y"]) for row in points) or 1.0
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 6.0), layout="constrained")
        for kind, colours, label in (("same", "Greens", "same-class mixes"), ("mixed", "Purples", "two-class mixes")):
            chosen = [row for row in points if row["kind"] == kind]
            ax.scatter([row["x"] for row in chosen], [row["y"] for row in chosen], s=6, label=label,
                       c=[0.25 + 0.75 * row["lam"] for row in chosen], cmap=colours, vmin=0, vmax=1, linewidths=0)
        arrows = [row for row in rows if row["kind"] == "classifier"]
        scale = radius / max(np.hypot(row["x"], row["y"]) for row in arrows)
        for row in arrows:
            ax.annotate("", xy=(scale * row["x"], scale * row["y"]), xytext=(0, 0),
                        arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 1.5})
            ax.annotate(f"$w_{{{row['class_a']}}}$", (1.08 * scale * row["x"], 1.08 * scale * row["y"]), ha="center")
        means = [row for row in rows if row["kind"] == "mean"]
        ax.scatter([row["x"] for row in means], [row["y"] for row in means], marker="x", s=60, color="black",
                   label="class means (clean)")
        limit = 1.2 * radius  # room for the arrows' tips and labels, which are not drawn outside the axes
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")
        ax.set_xlabel("simplex plane, axis 1")
        ax.set_ylabel("simplex plane, axis 2")
        ax.set_title(f"Mixup representations of classes {', '.join(str(row['class_a']) for row in arrows)}\n"
                     "(darker: larger weight of the first class of the pair)")
        fig.legend(loc="outside lower center", ncols=3)
        return _save(fig, Path(out_path) if out_path else Path(table).with_suffix(".png"))


def tpt_table(run_dir: Path) -> str:
    """The paper's Table 1 for one run, as Markdown, from nc_metrics.csv: the test accuracy at the TPT
    onset (the first checkpoint whose clean training set is classified without error in eval mode) and
    at the last measured checkpoint, with their epochs."""
    run_dir = Path(run_dir)
    measured = _read_required(run_dir, NC_TABLE)
    settings = runs.read_config(run_dir, required=()) or {}
    onset, last = runs.tpt_row(measured), measured[-1]
    if onset is None:
        best = max(row["train_acc"] for row in measured)
        onset_cells = [f"not reached by epoch {last['epoch']} (best train accuracy {_percent(best)})", "n/a"]
    else:
        onset_cells = [str(onset["epoch"]), _percent(onset["test_acc"])]
    cells = [settings.get("dataset", "?"), settings.get("model", "?"), *onset_cells,
             str(last["epoch"]), _percent(last["test_acc"])]
    header = ["dataset", "model", "TPT onset epoch (zero training error)", "test accuracy at TPT onset",
              "last epoch", "test accuracy at last epoch"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      "| " + " | ".join(cells) + " |"]) + "\n"


def run_labels(configs: list[dict], names: list[str]) -> list[str]:
    """A legend label per run: the user-facing settings whose values are not all equal across
    `configs`, in short form ("seed=1, spc=50"); the run folder `names` if none differ."""
    differing = [key for key in config.SETTING_NAMES if len({str(run.get(key)) for run in configs}) > 1]
    if not differing:
        return list(names)
    return [", ".join(config.setting_text(key, run.get(key)) for key in differing) for run in configs]


# Studies (sweep.py): the runs of studies/<name>/, one line per group of runs equal in every varied
# setting but the seed, so that the seeds make the band.

def plot_study(study_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """A study's Figures 2-7 panel (panel.png) and training curves (training_curves.png), with its finished
    runs grouped by the study's varied settings except the seed (each group's mean over seeds, and their
    min-max band); for a learning-rate grid, each group at its chosen learning rate only. Its tables are
    refreshed first; the files go to the study's folder, or to `out_dir` with a copy of table.md. The run
    folders are read where sweep.py put them, relative to the folder it ran in."""
    study_dir = Path(study_dir)
    out_dir = Path(out_dir) if out_dir else study_dir
    study = studies.read_study(study_dir)
    drawn = [row for row in studies.refresh_tables(study_dir) if row["status"] == "done" and row.get("selected", True)]
    if not drawn:
        raise UserError(f"{study_dir} has no finished run yet; run its sweep.py command (see its table.md)")
    group_by = [key for key in study["varied"] if key != "seed"] or ["dataset"]  # one group: every seed
    run_dirs = [Path(row["run_dir"]) for row in drawn]
    written = [plot_panel(run_dirs, out_dir / "panel.png", group_by), plot_curves(run_dirs, out_dir, group_by)]
    if any(row.get("cdnv") is not None for row in drawn):
        written.append(plot_other_measures(run_dirs, out_dir / OTHER_FILE, group_by))
    if out_dir != study_dir:
        written.append(out_dir / studies.MARKDOWN_TABLE)
        runs.write_text(written[-1], (study_dir / studies.MARKDOWN_TABLE).read_text())
    return written


def group_series(run_dirs: list[Path], group_by: list[str], column: str,
                 table: str = NC_TABLE) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """What the grouped figures draw for `column` of `table`: per group of runs with equal `group_by`
    settings (per run if none), its label, the epochs all its runs have, and the mean, minimum and maximum
    over its runs at those epochs."""
    series = []
    for line in _load_lines(run_dirs, table, group_by):
        epochs, values, _ = _aggregate([tables[table] for tables in line.tables], column, log_y=False)
        series.append((line.label, epochs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)))
    return series


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    representations = commands.add_parser("representations", help="the Mixup representation figure from its CSV",
                                          description="the Mixup representation figure from its CSV")
    representations.add_argument("table", type=Path, metavar="CSV", help="mixup_representations_epoch<E>.csv")
    representations.add_argument("--out", type=Path, help="the PNG file to write (default: beside the CSV)")
    layers = commands.add_parser("layers", help="layerwise_nc1: NC1 after every stage, one line per checkpoint",
                                 description="NC1 after every stage (validate_nc.py --layers), one line per checkpoint")
    layers.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder measured with --layers")
    layers.add_argument("--out", type=Path, required=True, help="the file to write (.png, .pdf or .svg)")
    for name, summary, out_help in (
            ("nc", "Figures 2-7 (and 8 when measured), one file each, the runs overlaid", "folder for the figures"),
            ("curves", "training_curves.png: loss, accuracy and test ECE per epoch", "folder for the figure"),
            ("panel", "Figures 2-7 in one compact 2x3 panel", "the file to write (.png, .pdf or .svg)")):
        command = commands.add_parser(name, help=summary, description=summary)
        command.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders to plot")
        command.add_argument("--out", type=Path, required=True, help=out_help)
        command.add_argument("--group-by", nargs="+", default=[], metavar="KEY",
                             help="config.json keys (e.g. loss, precision): one line per group of runs with equal "
                             "values, the mean over its runs and a band from their minimum to their maximum")
    study = commands.add_parser("study", help="a study's panel and training curves, seeds as bands",
                                description="a study's panel and training curves, seeds as bands, and its table.md")
    study.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="studies/NAME, as sweep.py wrote it")
    study.add_argument("--out", type=Path, help="folder for the files (default: the study's folder)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if args.command == "representations":
        written = [plot_representations(args.table, args.out)]
    elif args.command == "layers":
        written = [plot_layers(args.run_dir, args.out)]
    elif args.command == "nc":
        written = plot_runs(args.run_dirs, args.out, args.group_by)
    elif args.command == "study":
        written = plot_study(args.study_dir, args.out)
    elif args.command == "curves":
        written = [plot_curves(args.run_dirs, args.out, args.group_by)]
    else:
        written = [plot_panel(args.run_dirs, args.out, args.group_by)]
    for path in written:
        print(path)
    return 0


@dataclass(frozen=True)
class _Line:
    """What one colour of a figure shows: one run, or the runs of one group drawn as their mean and band."""
    label: str
    colour: tuple
    configs: list[dict]
    tables: list[dict[str, list[dict]]]  # per run: its rows of log.csv and nc_metrics.csv

    @property
    def tpt_epochs(self) -> list[int | None]:
        return [(runs.tpt_row(tables[NC_TABLE]) or {}).get("epoch") for tables in self.tables]


# What makes each table, for the message when a run folder lacks it.
_READERS = {NC_TABLE: (runs.read_nc_metrics, "python validate_nc.py --run-dir {}"),
            LOG_TABLE: (runs.read_log, "python train.py --run-dir {} (with the run's --dataset and other flags)")}


def _load_lines(run_dirs: list[Path], needed: str, group_by: list[str]) -> list[_Line]:
    """The runs' tables (`needed` must exist; the other is read if present), one line per run, or per
    group of runs with equal `group_by` settings."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    tables = []
    for run_dir in run_dirs:
        rows = _read_required(run_dir, needed)
        tables.append({table: rows if table == needed else reader(run_dir) for table, (reader, _) in _READERS.items()})
    configs = [runs.read_config(run_dir, required=()) or {} for run_dir in run_dirs]
    if group_by:
        unknown = sorted(set(group_by) - {key for run in configs for key in run})
        if unknown:
            raise UserError(f"--group-by {' '.join(unknown)}: no such key in the runs' config.json; "
                            f"choose among {', '.join(config.SETTING_NAMES)}")
        keys = [tuple(str(run.get(key)) for key in group_by) for run in configs]
        members = [[i for i, key in enumerate(keys) if key == group] for group in dict.fromkeys(keys)]
        labels = [", ".join(config.setting_text(key, configs[group[0]].get(key)) for key in group_by)
                  + f" ({len(group)} run{'s' * (len(group) > 1)})" for group in members]
    else:
        members = [[i] for i in range(len(run_dirs))]
        labels = run_labels(configs, _folder_names(run_dirs))
    colours = plt.get_cmap("tab10").colors
    return [_Line(label, colours[k % len(colours)], [configs[i] for i in group], [tables[i] for i in group])
            for k, (label, group) in enumerate(zip(labels, members))]


def _read_required(run_dir: Path, filename: str) -> list[dict]:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder (no such directory); check the path")
    reader, command = _READERS[filename]
    rows = reader(run_dir)
    if not rows:
        raise UserError(f"{run_dir} has no {filename} (or it has no rows yet); make it with: {command.format(run_dir)}")
    return rows


def _folder_names(run_dirs: list[Path]) -> list[str]:
    """The runs' folder names, or their full paths where two folders share a name."""
    names = [run_dir.resolve().name for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def _draw(ax: plt.Axes, panel: Panel, lines: list[_Line]) -> set[str]:
    """Draw every line's quantities of `panel` on `ax` (a group's mean with its min-max band) and the TPT
    onsets; return the line styles drawn ("zeros" too where a zero was left off a log axis)."""
    marker = _marker(panel)
    drawn = set()
    for line in lines:
        for quantity in _present(panel, lines):
            epochs, values, hidden = _aggregate([tables[panel.table] for tables in line.tables], quantity.column,
                                                panel.log_y)
            ax.plot(epochs, values.mean(axis=0), linestyle=quantity.style, color=line.colour, marker=marker,
                    markersize=MARKER_SIZE)
            if len(values) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.colour, alpha=0.2,
                                linewidth=0)
            drawn |= {quantity.style} | ({"zeros"} if hidden else set())
        for epoch in sorted({epoch for epoch in line.tpt_epochs if epoch is not None}):
            ax.axvline(epoch, color=line.colour, **TPT_STYLE)
            drawn.add("tpt")
    ax.set_xscale("log")
    if panel.log_y:
        ax.set_yscale("log")
    _plain_ticks(ax, panel.log_y)
    ax.set_xlabel("epoch")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.grid(True, which="major", alpha=0.3)
    return drawn


def _present(panel: Panel, lines: list[_Line]) -> list[Quantity]:
    """The quantities of `panel` that some run's table has."""
    return [quantity for quantity in panel.quantities
            if any(row.get(quantity.column) is not None for line in lines for tables in line.tables
                   for row in tables[panel.table])]


def _plain_ticks(ax: plt.Axes, log_y: bool) -> None:
    """Log axes labelled at 1, 2, 5 times powers of ten with plain numbers (2, 50, 0.005), not 2x10^0; at
    powers of ten alone over more than 4 decades (a fixed ETF's 1e-8), where matplotlib's LogLocator draws
    no tick at all when given several subs."""
    axes = [ax.xaxis, ax.yaxis] if log_y else [ax.xaxis]
    for axis, (low, high) in zip(axes, (ax.get_xlim(), ax.get_ylim())):
        subs = (1.0, 2.0, 5.0) if high / low <= 1e4 else (1.0,)
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _aggregate(tables: list[list[dict]], column: str, log_y: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """The epochs at which every table has a value of `column` (epoch 0 left off the log axis), the
    values (runs, epochs) there, NaN where not finite or, on a log axis, not positive (which breaks the
    line there); and whether a zero or negative value was hidden."""
    shared = sorted(set.intersection(*({row["epoch"] for row in rows if row.get(column) is not None}
                                       for rows in tables)) - {0})
    by_epoch = [{row["epoch"]: row.get(column) for row in rows} for rows in tables]
    values = np.array([[run[epoch] for epoch in shared] for run in by_epoch], dtype=float).reshape(len(tables), -1)
    hidden = log_y & np.isfinite(values) & (values <= 0)
    return np.array(shared, dtype=float), np.where(hidden, np.nan, values), bool(hidden.any())


def _marker(panel: Panel) -> str:
    """Dots on the analysis checkpoints, which are few and log-spaced, to show where collapse was
    measured; none on log.csv's every epoch, where they would merge into a thick line."""
    return "o" if panel.table == NC_TABLE else ""


def _finish(fig: plt.Figure, lines: list[_Line], drawn: set[str], names: dict[str, str]) -> None:
    """The figure's title (what was trained, and how it departs from the paper's protocol) and one legend
    below the axes: the line styles drawn, by their `names`, the TPT onset and, for several lines, their
    colours."""
    colour = lines[0].colour if len(lines) == 1 else "0.3"
    handles = [Line2D([], [], color=colour, linestyle=style, label=name)
               for style, name in names.items() if style in drawn]
    if "tpt" in drawn:
        handles.append(Line2D([], [], color=colour, **TPT_STYLE, label="TPT onset"))
    if "zeros" in drawn:
        handles.append(Line2D([], [], linestyle="none", label="(zeros are not shown on log axes)"))
    if len(lines) > 1:
        handles += [Line2D([], [], color=line.colour, linewidth=3, label=line.label + _no_tpt_note(line))
                    for line in lines]
    fig.legend(handles=handles, loc="outside lower center", ncols=2 if len(handles) > 3 else len(handles))
    fig.suptitle(_describe(lines))


def _describe(lines: list[_Line]) -> str:
    """Dataset / model of the runs, the departures from the paper's protocol they share and, for one
    line, whether its training error never reached zero."""
    every = [run for line in lines for run in line.configs]
    pairs = "; ".join(dict.fromkeys(f"{run.get('dataset', '?')} / {run.get('model', '?')}" for run in every))
    shared = [text for text in config.protocol_departures(every[0])
              if all(text in config.protocol_departures(run) for run in every[1:])]
    title = pairs + (f" ({', '.join(shared)})" if shared else "")
    return title + ("\n" + _no_tpt_note(lines[0]).strip(" ()") if len(lines) == 1 and _no_tpt_note(lines[0]) else "")


def _no_tpt_note(line: _Line) -> str:
    """" (training error never zero)" when a measured run of the line never reached the TPT."""
    missing = sum(1 for tables, epoch in zip(line.tables, line.tpt_epochs) if tables[NC_TABLE] and epoch is None)
    if not missing:
        return ""
    share = "" if len(line.tables) == 1 else f" in {missing} of {len(line.tables)} runs"
    return f" (training error never zero at a measured checkpoint{share})"


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` in the format its suffix names: .pdf or .svg as vectors (text kept as text), .png at
    150 dpi with 256 colours: line art loses nothing visible, and the file is a third of the size of
    matplotlib's RGBA one (the 2x3 panel of three runs stays under 300 KB)."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    try:
        if kind not in FORMATS:
            raise UserError(f"cannot write {path}: name a .png, .pdf or .svg file")
        with runs.atomic_path(path) as tmp:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "png":
                fig.set_dpi(DPI)
                fig.canvas.draw()
                pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
                image = Image.fromarray(pixels).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
                image.save(tmp, format="png", optimize=True, dpi=(DPI, DPI))
            else:
                fig.savefig(tmp, format=kind, metadata=VECTOR_METADATA[kind])
    finally:
        plt.close(fig)
    return path


def _read_representations(table: Path) -> list[dict]:
    if not table.is_file():
        raise UserError(f"{table} not found; make it with: python validate_nc.py --run-dir RUN --representations")
    try:
        return [{**row, **{key: float(row[key]) for key in ("lam", "x", "y")}, "class_a": int(row["class_a"]),
                 "class_b": int(row["class_b"])} for row in runs.read_csv(table)]
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{table} is not a representation table written by validate_nc.py --representations") from None


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None or np.isnan(fraction) else f"{100 * fraction:.2f}%"


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
