"""Every figure of the repo, drawn from the tables of run folders (never from a model): the paper's
Figures 2-7, the field's other measures (Figure 9), the training curves and the paper's Table 1 over
any number of runs.

    python plotting.py nc RUN_DIR [RUN_DIR ...] --out DIR          # fig2_equinorm.png ... fig7, fig9
    python plotting.py curves RUN_DIR [RUN_DIR ...] --out DIR      # training_curves.png (or --out FILE.pdf)
    python plotting.py panel RUN_DIR [RUN_DIR ...] --out FILE.pdf  # Figures 2-7 in one compact 2x3 panel
    python plotting.py panel RUN_DIR ... --group-by precision --out FILE.png   # mean and spread per group
    python plotting.py layers RUN_DIR --out FILE.svg               # NC1 after every stage (validate_nc.py --layers)
    python plotting.py representations CSV [--out FILE.png]        # the Mixup representation figure
    python plotting.py study studies/NAME [--out DIR]              # a study's panel and curves, seeds as bands
    python plotting.py table RUN_DIR|STUDY_DIR ... [--group-by KEY ...] [--out FILE.md]   # Table 1: .md .csv .tex

A figure is written as PNG (150 dpi), PDF or SVG (vectors, text kept as text): a file named by --out in
its suffix's format, the files of a folder in --format's (default png); --format and a suffix that
disagree, or a folder named like a file, are refused before anything is drawn. Every figure command takes
the options of FigureStyle, for a paper: --title TEXT (or '' for none), --label RUN_OR_GROUP LABEL, --size
WIDTH HEIGHT in inches, --font-size, --dpi, --style FILE and --number-figures; by default a figure of
several panels is 7 inches wide (a journal's text width), one of a single panel 3.5, with text at 8-9 pt.

    python plotting.py panel RUN_A RUN_B --label RUN_A SGD --label RUN_B Adam --title '' --out fig.pdf

Several runs are overlaid, one colour per run, labelled by the settings on which their configs differ and
which apply to them (a loss's parameter only under that loss; learning-rate milestones only where they
are not the default of the run's length); with `--group-by KEY ...` one colour per group of runs with
equal values of those config.json keys, drawn as the mean over the group's runs with a band from their
minimum to their maximum, on the epochs they all have. A line style means one thing in every figure,
named in one legend below the axes: solid the training set (its class means, its features), dashed the
classifier rows, dash-dot the test set, and a dotted vertical line the TPT onset: the first analysis
checkpoint of nc_metrics.csv whose clean training set is classified without error in eval mode (black
for one run, each run's colour for several). Every legend lies whole inside its figure: it takes as many
columns as fit the width, wraps long labels, and adds its height to the figure's, so the axes keep their
size whatever the number of runs. The title names the dataset and model and every setting that departs
from the paper's protocol, and says when a run never reached zero training error.

Epochs (steps for ufm.py's runs, as their config.json's time_unit says) are on a log axis (the analysis
checkpoints are log-spaced), and so are the quantities of Figures 2-6 and the losses, which fall towards 0
over orders of magnitude; Figure 7's mismatch, the accuracies and the ECE are proportions, on a linear axis.
A log axis is labelled at 1, 2 and 5 times powers of ten, more densely where that would leave fewer than
three labels (an axis spanning less than a decade). A log axis cannot show 0: such values are left out,
which breaks the line there, and the legend adds "zeros not shown" (a row of epoch 0 is likewise left off
the epoch axis). They are not clipped to a floor, which would draw a value that was never measured at a
height set by an arbitrary constant.

Table 1 (Papyan, Han & Donoho 2020) gives, per run, the TPT onset epoch and the test accuracy there and
at the last measured checkpoint, and the change between them; with --group-by, per group of runs (the
seeds of one setting) their mean with the range [minimum, maximum].
"""
from errors import ArgumentParser, UserError, interrupt_quietly, run_cli

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import argparse
import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: chosen before pyplot loads
import matplotlib.cm
import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from PIL import Image

import config
import reports
import runs
import study_files
from nc_metrics import tpt_row

DPI = 150  # of a PNG, unless --dpi says otherwise
FONT_SIZE = 9.0  # points at the saved size: tick labels and legends one point smaller, 8-9 pt in print
# Vector files keep text as text (searchable, editable, reproducible).
STYLE = {"svg.fonttype": "none", "pdf.fonttype": 42, "lines.linewidth": 1.2}
FORMATS = ("png", "pdf", "svg")
# Every suffix matplotlib could write: a folder named like one of these is taken for a mistyped file.
FIGURE_SUFFIXES = frozenset(FigureCanvasBase.get_supported_filetypes())
VECTOR_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}  # no timestamps: same tables, same bytes
# A journal's text width is about 7 inches: the wide figures take it, the single ones half of it. Each size
# is that of the figure without its legend, which adds its own height (unless --size fixes the whole).
SINGLE_SIZE = (3.5, 2.8)
CURVES_SIZE = (7.0, 2.4)  # per row of up to CURVES_PER_ROW panels
CURVES_PER_ROW = 3
PANEL_SIZE = (7.0, 5.0)
MINORITY_UNTESTED_SIZE = (7.0, 2.4)  # the Minority Collapse figure's top row alone
OTHER_SIZE = (7.0, 4.6)  # Figure 9's 2x4 panels
REPRESENTATIONS_SIZE = (3.5, 3.3)
MAX_LEGEND_COLUMNS = 4
MIN_WRAP = 12  # characters: a legend label or title is never wrapped narrower than this
SIDE_MARGIN = 0.02  # of the figure's width, kept clear of a legend or title on each side
MIN_LOG_TICKS = 3
MAX_SIZE_TICKS = 4  # class sizes labelled one by one on the row-norm panel, if no more than this
END_GAP, END_REACH = 0.15, 0.25  # of a log axis's height: see _label_the_ends
SOLID, DASHED, DASH_DOT = "-", "--", "-."
TPT_STYLE = {"linestyle": (0, (1, 2)), "linewidth": 1.5, "alpha": 0.8}  # dotted: unlike either quantity
TPT_COLOUR_ALONE = "black"  # a single run's onset, unlike its own curves' colour
REFERENCE_STYLE = {"color": "0.5", "linewidth": 1.0}  # a theory's value, such as the simplex ETF's, named in the legend
MARKER_SIZE = 2.5
LEGEND_MARKER_SIZE = 6
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
    figure: int | None = None  # the paper's figure it reproduces, named in its title with --number-figures

    def heading(self, style: "FigureStyle") -> str:
        """The axes' title: "Equinorm", or "Equinorm (Figure 2)" with --number-figures."""
        return f"{self.title} (Figure {self.figure})" if style.number_figures and self.figure else self.title


class _LabelPairs(argparse.Action):
    """--label's pairs in the order given. Unlike argparse's "append", it starts a new list over any value that
    is not one yet: validate_nc.py parses into a namespace of markers to learn which flags were given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*(given if isinstance(given, list) else []), tuple(values)])


def _option(flag: str, help: str, **argparse_options) -> dict:
    """A FigureStyle field's command-line flag, as its metadata: `add_figure_arguments` reads it."""
    return {"flag": flag, "help": help, **argparse_options}


@dataclass(frozen=True)
class FigureStyle:
    """How a figure is drawn and written, whatever it shows: every figure command takes these options (its
    flags are derived from the fields, by `add_figure_arguments`), and every figure function this object."""
    title: str | None = field(default=None, metadata=_option(
        "--title", "the figure's title (default: the dataset, the network and the settings that depart from the "
        "paper's protocol); --title '' for none", metavar="TEXT"))
    labels: Mapping[str, str] = field(default_factory=dict, metadata=_option(
        "--label", "the legend's label of a run (its folder, as given or by its name) or of a group (as the default "
        "legend names it, without its count of runs); repeat for each", nargs=2, action=_LabelPairs,
        metavar=("RUN_OR_GROUP", "LABEL")))
    size: tuple[float, float] | None = field(default=None, metadata=_option(
        "--size", "the whole figure's width and height in inches, legend included (default: 7 inches wide for "
        "figures of several panels, 3.5 for one, and as tall as the legend needs)", nargs=2,
        type=config.positive_float, metavar=("WIDTH", "HEIGHT")))
    font_size: float | None = field(default=None, metadata=_option(
        "--font-size", f"points at the saved size (default {FONT_SIZE:g}, or the style file's; tick labels and the "
        "legend one point smaller)", type=config.positive_float, metavar="PT"))
    dpi: int = field(default=DPI, metadata=_option(
        "--dpi", f"a PNG's dots per inch (default {DPI})", type=config.positive_int))
    style_file: str | None = field(default=None, metadata=_option(
        "--style", "a matplotlib style file, or the name of one of matplotlib's styles (seaborn-v0_8-paper); "
        "--font-size overrides its font sizes", metavar="FILE"))
    number_figures: bool = field(default=False, metadata=_option(
        "--number-figures", "name the paper's figure after each subplot's title: \"Equinorm (Figure 2)\"",
        action="store_true"))

    def rc(self) -> dict:
        """The matplotlib settings of a figure: the repo's, then the style file's, then the font size."""
        size = self.font_size or _style_params(self.style_file).get("font.size") or FONT_SIZE
        fonts = {"font.size": size, "axes.titlesize": size, "axes.labelsize": size, "figure.titlesize": size,
                 "xtick.labelsize": size - 1, "ytick.labelsize": size - 1, "legend.fontsize": size - 1}
        if self.font_size is None:
            fonts = {key: value for key, value in fonts.items() if key not in _style_params(self.style_file)}
        return {**STYLE, **_style_params(self.style_file), **fonts}


TRAINING, CLASSIFIERS, TEST = SOLID, DASHED, DASH_DOT
# One meaning per line style across every figure, so one legend below the axes serves them all.
STYLE_NAMES = {LOG_TABLE: {TRAINING: "training set (running average over the epoch, train mode)", TEST: "test set"},
               NC_TABLE: {TRAINING: r"training set: class means $\mu_c - \mu_G$, features $h$",
                          CLASSIFIERS: r"classifier rows $w_c$",
                          TEST: "test set (its own class means)"}}
# The prime of c′ is Unicode's (U+2032), drawn from DejaVu Sans: mathtext draws an ASCII ' from the Computer
# Modern font cmsy10, whose zero timestamps fontTools reports on stderr ("'created' timestamp seems very low")
# each time a PDF embeds it.
_X = r"\mathbf{x}_c"
NC_FIGURES = dict(zip(reports.NC_FIGURE_FILES, (
    Panel(
        "Equinorm", rf"$\mathrm{{Std}}_c\,\|{_X}\|\ /\ \mathrm{{Avg}}_c\,\|{_X}\|$",
        (Quantity("equinorm_means"), Quantity("equinorm_weights", CLASSIFIERS), Quantity("equinorm_means_test", TEST)),
        log_y=True, table=NC_TABLE, figure=2),
    Panel(
        "Equiangularity", rf"$\mathrm{{Std}}_{{c \neq c′}}\ \cos({_X}, \mathbf{{x}}_{{c′}})$",
        (Quantity("equiangular_means"), Quantity("equiangular_weights", CLASSIFIERS),
         Quantity("equiangular_means_test", TEST)), log_y=True, table=NC_TABLE, figure=3),
    Panel(
        "Maximal angle",
        rf"$\mathrm{{Avg}}_{{c \neq c′}}\ |\cos({_X}, \mathbf{{x}}_{{c′}}) + 1/(C-1)|$",
        (Quantity("maxangle_means"), Quantity("maxangle_weights", CLASSIFIERS), Quantity("maxangle_means_test", TEST)),
        log_y=True, table=NC_TABLE, figure=4),
    Panel(
        "Self-duality", r"$\|\,W / \|W\|_F - \tilde{M} / \|\tilde{M}\|_F\,\|_F^2$",
        (Quantity("self_duality"), Quantity("self_duality_test", TEST)), log_y=True, table=NC_TABLE, figure=5),
    Panel(
        "Within-class variation", r"$\mathrm{Tr}(\Sigma_W\,\Sigma_B^{+})\ /\ C$",
        (Quantity("nc1"), Quantity("nc1_test", TEST)), log_y=True, table=NC_TABLE, figure=6),
    Panel(
        "NCC mismatch",
        r"proportion with $\mathrm{argmax}_c\,(w_c \cdot h + b_c)$" "\n" r"$\neq \mathrm{argmin}_c\,\|h - \mu_c\|$",
        (Quantity("ncc_mismatch_train"), Quantity("ncc_mismatch_test", TEST)), log_y=False, table=NC_TABLE, figure=7,
        names={TEST: "test set (NCC mismatch: the training class means)"}),
)))
# Figure 8 is drawn when the table has it (validate_nc.py --adversarial); the 2x3 panel is Figures 2-7.
ROBUSTNESS_FIGURE = (reports.ROBUSTNESS_FILE, Panel(
    "Robustness to DeepFool", r"$\mathrm{Avg}_x\ \|r(x)\|_2\ /\ \|x\|_2$",
    (Quantity("deepfool_robustness", TEST),), log_y=False, table=NC_TABLE, figure=8,
    names={TEST: "a fixed sample of test images x (pixels in [0, 1]); r(x): DeepFool's step across the network's "
           "decision"}))
# Figure 9: the field's other measures (nc_metrics.py), one panel each, drawn when the table has them. Their
# papers (docs/other_measures.md), left out of titles that must fit a quarter of a page's width: the trace
# ratio Tirer et al. 2023, CDNV Galanti et al. 2022, ETF error and alignment Zhu et al. 2021, hyperspherical
# energy Liu et al. 2023, GNC2 and UNC3 Wu & Papyan 2024.
OTHER_FILE = reports.OTHER_FILE
OTHER_PANELS = (
    Panel("Trace ratio (NC1)", r"$\mathrm{Tr}(\Sigma_W)\ /\ \mathrm{Tr}(\Sigma_B)$",
          (Quantity("nc1_trace_ratio"), Quantity("nc1_trace_ratio_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("CDNV", r"$\mathrm{Avg}_{c < c′}\ \frac{V_c + V_{c′}}{2\,\|\mu_c - \mu_{c′}\|^2}$",
          (Quantity("cdnv"), Quantity("cdnv_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("ETF error (NC2)", r"$\|\,G / \|G\|_F - E\,\|_F$",  # G: the Gram matrix of the means or of W
          (Quantity("etf_error_means"), Quantity("etf_error_weights", CLASSIFIERS),
           Quantity("etf_error_means_test", TEST)),
          log_y=True, table=NC_TABLE),
    Panel("Alignment (NC3)",
          r"$\|\,W\tilde{M}^\top / \|W\tilde{M}^\top\|_F - E\,\|_F$",
          (Quantity("wh_alignment"), Quantity("wh_alignment_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("Hyperspherical energy", r"$\mathrm{Avg}_{c \neq c′}\ 1\ /\ \|m_c - m_{c′}\|$",
          (Quantity("hyperspherical_energy_means"), Quantity("hyperspherical_energy_means_test", TEST)), log_y=False,
          table=NC_TABLE),
    Panel("Uniformity (GNC2)",
          r"$\mathrm{Var}_{c \neq c′}\ \log\,(1\ /\ \|m_c - m_{c′}\|)$",
          (Quantity("gnc2_log_distance_var"), Quantity("gnc2_log_distance_var_test", TEST)), log_y=True,
          table=NC_TABLE),
    Panel("Uniform duality (UNC3)", r"$\mathrm{Var}_c\ \langle w_c, \mu_c - \mu_G \rangle$",
          (Quantity("unc3_dot_var"), Quantity("unc3_dot_var_test", TEST)), log_y=True, table=NC_TABLE),
    Panel("UNC3 of cosines", r"$\mathrm{Var}_c\ \cos(w_c, \mu_c - \mu_G)$",
          (Quantity("unc3_cosine_var"), Quantity("unc3_cosine_var_test", TEST)), log_y=True, table=NC_TABLE),
)
ENERGY_PANEL = 4  # the index in OTHER_PANELS of the energy, whose panel marks the simplex ETF's value
LAYERS_FILE = reports.LAYERS_FILE
CURVE_PANELS = (
    Panel("Loss", "loss", (Quantity("train_loss"), Quantity("test_loss", TEST)), log_y=True, table=LOG_TABLE),
    Panel("Accuracy", "accuracy (fraction correct)", (Quantity("train_acc"), Quantity("test_acc", TEST)),
          log_y=False, table=LOG_TABLE),
    Panel("Calibration", "expected calibration error (ECE)", (Quantity("test_ece", TEST),), log_y=False,
          table=LOG_TABLE),
)
CURVES_FILE = reports.CURVES_FILE
# Minority Collapse (Fang, He, Long & Su 2021), for runs on an imbalanced training subset; the sixth panel,
# the classifier row norms against the class sizes, is drawn by `_draw_norms`.
MINORITY_FILE = reports.MINORITY_FILE
_COSINE = r"$\mathrm{Avg}_{c \neq c′}\ \cos(w_c, w_{c′})$"
MINORITY_PANELS = (
    Panel("Minority classes' classifiers", _COSINE, (Quantity("minority_cosine", CLASSIFIERS),),
          log_y=False, table=NC_TABLE),
    Panel("Majority classes' classifiers", _COSINE, (Quantity("majority_cosine", CLASSIFIERS),),
          log_y=False, table=NC_TABLE),
    Panel("Test accuracy, minority classes", "accuracy (fraction correct)", (Quantity("test_acc_minority", TEST),),
          log_y=False, table=NC_TABLE, names={TEST: "test set"}),
    Panel("Test accuracy, majority classes", "accuracy (fraction correct)", (Quantity("test_acc_majority", TEST),),
          log_y=False, table=NC_TABLE, names={TEST: "test set"}),
    Panel("Test accuracy, all classes", "accuracy (fraction correct)", (Quantity("test_acc", TEST),),
          log_y=False, table=NC_TABLE, names={TEST: "test set"}),
)


def plot_run(run_dir: Path, out_dir: Path, suffix: str = ".png", style: FigureStyle = FigureStyle()) -> list[Path]:
    """Figures 2-7 (and 8 and the layer-wise figure when measured), the 2x3 panel and the training
    curves of one run, written into `out_dir` in the format of `suffix`; the paths written."""
    out_dir, folder = Path(out_dir), _folder(run_dir)  # its tables read once for all the figures
    written = plot_runs([folder], out_dir, suffix=suffix, style=style)
    written.append(plot_panel([folder], out_dir / Path(reports.PANEL_FILE).with_suffix(suffix), style=style))
    written.append(plot_curves([folder], out_dir / Path(CURVES_FILE).with_suffix(suffix), style=style))
    if runs.stage_columns(folder.measured):
        written.append(plot_layers(folder, out_dir / Path(LAYERS_FILE).with_suffix(suffix), style))
    if reports.has_minority_columns(folder.measured):
        written.append(plot_minority_collapse([folder], out_dir / Path(MINORITY_FILE).with_suffix(suffix),
                                              style=style))
    return written


def plot_runs(run_dirs: list[Path], out_dir: Path, group_by: list[str] = (), suffix: str = ".png",
              style: FigureStyle = FigureStyle()) -> list[Path]:
    """Figures 2-7 (and 8 when measured) with the runs (or groups of runs) overlaid, one file per figure
    in `out_dir`."""
    return [_save(fig, Path(out_dir) / Path(filename).with_suffix(suffix), style)
            for filename, fig in nc_figures(run_dirs, group_by, style)]


def plot_curves(run_dirs: list[Path], out_path: Path, group_by: list[str] = (),
                style: FigureStyle = FigureStyle()) -> Path:
    """The training curves (loss | accuracy | test ECE per epoch, from log.csv) at `out_path`."""
    return _save(curves_figure(run_dirs, group_by, style), out_path, style)


def plot_panel(run_dirs: list[Path], out_path: Path, group_by: list[str] = (),
               style: FigureStyle = FigureStyle()) -> Path:
    """Figures 2-7 as one compact 2x3 panel (the same content as the single figures) at `out_path`."""
    return _save(panel_figure(run_dirs, group_by, style), out_path, style)


def plot_other_measures(run_dirs: list[Path], out_path: Path, group_by: list[str] = (),
                        style: FigureStyle = FigureStyle()) -> Path:
    """Figure 9, the field's other measures (see `other_measures_figure`), at `out_path`."""
    return _save(other_measures_figure(_load_lines(run_dirs, NC_TABLE, group_by, style.labels), style), out_path,
                 style)


def plot_minority_collapse(run_dirs: list[Path], out_path: Path, group_by: list[str] = (),
                           style: FigureStyle = FigureStyle()) -> Path:
    """The Minority Collapse figure of imbalanced runs (see `minority_figure`) at `out_path`."""
    return _save(minority_figure(run_dirs, group_by, style), out_path, style)


def plot_layers(run_dir: Path, out_path: Path, style: FigureStyle = FigureStyle()) -> Path:
    """The layer-wise NC1 figure (see `layers_figure`) at `out_path`."""
    return _save(layers_figure(run_dir, style), out_path, style)


def plot_representations(table: Path, out_path: Path | None = None, style: FigureStyle = FigureStyle()) -> Path:
    """The Mixup representation figure (see `representations_figure`) at `out_path`, by default beside
    the CSV, as .png."""
    return _save(representations_figure(Path(table), style),
                 Path(out_path) if out_path else Path(table).with_suffix(".png"), style)


def nc_figures(run_dirs: list[Path], group_by: list[str] = (),
               style: FigureStyle = FigureStyle()) -> Iterator[tuple[str, plt.Figure]]:
    """Figures 2-7 (and 8 when measured) with the runs (or groups) overlaid: (file name, figure), one at a
    time, for the caller to save (which closes it)."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by, style.labels)
    figures = dict(NC_FIGURES)
    if _present(ROBUSTNESS_FIGURE[1], lines):
        figures[ROBUSTNESS_FIGURE[0]] = ROBUSTNESS_FIGURE[1]
    for filename, panel in figures.items():
        with plt.rc_context(style.rc()):
            fig, ax = plt.subplots(figsize=style.size or SINGLE_SIZE, layout="constrained")
            _finish(fig, lines, _draw(ax, panel, lines, style), style)
        yield filename, fig
    if any(_present(panel, lines) for panel in OTHER_PANELS):
        yield OTHER_FILE, other_measures_figure(lines, style)


def curves_figure(run_dirs: list[Path], group_by: list[str] = (), style: FigureStyle = FigureStyle()) -> plt.Figure:
    """Loss | accuracy | test ECE per epoch from log.csv, the runs (or groups) overlaid; runs trained with
    different losses get a loss panel each, since their values are not on one scale, and a panel that no run
    has numbers for (the test ECE of runs without a test split) is left out."""
    lines = _load_lines(run_dirs, LOG_TABLE, group_by, style.labels)
    losses = list(dict.fromkeys(_loss_name(line) for line in lines))
    loss_panels = [(CURVE_PANELS[0], lines)] if len(losses) == 1 else [
        (replace(CURVE_PANELS[0], title=f"Loss ({loss})"), [line for line in lines if _loss_name(line) == loss])
        for loss in losses]
    panels = [*loss_panels, *((panel, lines) for panel in CURVE_PANELS[1:] if _present(panel, lines))]
    rows = -(-len(panels) // CURVES_PER_ROW)
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(rows, min(len(panels), CURVES_PER_ROW), squeeze=False, layout="constrained",
                                 figsize=style.size or (CURVES_SIZE[0], CURVES_SIZE[1] * rows))
        for ax in axes.flat[len(panels):]:
            ax.remove()
        drawn = _merge(*(_draw(ax, panel, shown, style, overlay=len(lines) > 1)
                         for ax, (panel, shown) in zip(axes.flat, panels)))
        _finish(fig, lines, drawn, style)
    return fig


def panel_figure(run_dirs: list[Path], group_by: list[str] = (), style: FigureStyle = FigureStyle()) -> plt.Figure:
    """Figures 2-7 in one 2x3 panel, the runs (or groups) overlaid."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by, style.labels)
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(2, 3, figsize=style.size or PANEL_SIZE, layout="constrained")
        drawn = _merge(*(_draw(ax, panel, lines, style) for ax, panel in zip(axes.flat, NC_FIGURES.values())))
        _finish(fig, lines, drawn, style)
    return fig


def other_measures_figure(lines: list["_Line"], style: FigureStyle = FigureStyle()) -> plt.Figure:
    """Figure 9: the field's other measures, one panel each, the runs (or groups) of `lines` overlaid; the
    energy panel marks the simplex ETF's value, sqrt((C - 1) / (2 C)), its minimum."""
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(2, 4, figsize=style.size or OTHER_SIZE, layout="constrained")
        drawn = _merge(*(_draw(ax, panel, lines, style) for ax, panel in zip(axes.flat, OTHER_PANELS)))
        classes = sorted({run["num_classes"] for line in lines for run in line.configs if "num_classes" in run})
        for count in classes:
            axes.flat[ENERGY_PANEL].axhline(np.sqrt((count - 1) / (2 * count)), **REFERENCE_STYLE)
        reference = [Line2D([], [], **REFERENCE_STYLE, label=r"simplex ETF's energy $\sqrt{(C-1)/(2C)}$")]
        _finish(fig, lines, drawn, style, reference if classes else [])
    return fig


def layers_figure(run_dir: Path, style: FigureStyle = FigureStyle()) -> plt.Figure:
    """NC1 after each stage of the network (validate_nc.py --layers) against depth, on a log axis, one
    line per measured checkpoint coloured by its epoch; the TPT onset's checkpoint in black."""
    measured = _folder(run_dir).required(NC_TABLE)
    stages = runs.stage_columns(measured)
    if not stages:
        raise UserError(f"{run_dir} has no layer-wise NC1 yet; measure it with: python validate_nc.py --run-dir "
                        f"{run_dir} --layers")
    rows = [row for row in measured if all(row.get(column) is not None for column in stages) and row["epoch"] > 0]
    onset = (tpt_row(measured) or {}).get("epoch")
    norm = matplotlib.colors.LogNorm(vmin=rows[0]["epoch"], vmax=max(rows[-1]["epoch"], rows[0]["epoch"] + 1))
    colours = plt.get_cmap("viridis")
    depth = np.arange(1, len(stages) + 1)
    with plt.rc_context(style.rc()):
        fig, ax = plt.subplots(figsize=style.size or SINGLE_SIZE, layout="constrained")
        for row in rows:
            values = np.array([row[column] for column in stages], dtype=float)
            values[values <= 0] = np.nan
            tpt = row["epoch"] == onset
            ax.plot(depth, values, marker="o", markersize=MARKER_SIZE, linewidth=2.0 if tpt else 1.0,
                    color=TPT_COLOUR_ALONE if tpt else colours(norm(row["epoch"])), zorder=3 if tpt else 2)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colours), ax=ax,
                           label="epoch of the checkpoint")
        readable_log_ticks(bar.ax.yaxis)  # epochs as the integers they are, not powers of ten
        if any(np.nanmax(line.get_ydata(), initial=-np.inf) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")  # left linear if every value is 0 (one sample per class), or it could not draw
            readable_log_ticks(ax.yaxis)
        ax.set_xticks(depth, [column.removeprefix("nc1_") for column in stages], rotation=30)
        ax.set_xlabel("stage of the network, in depth order")
        ax.set_ylabel(r"$\mathrm{Tr}(\Sigma_W\,\Sigma_B^{+})\ /\ C$ after the stage")
        ax.set_title("Within-class variation by layer")
        ax.grid(True, which="major", alpha=0.3)
        if onset is not None:
            legend_below(fig, [Line2D([], [], color=TPT_COLOUR_ALONE, linewidth=2.0, marker="o", markersize=MARKER_SIZE,
                                      label=f"TPT onset (epoch {onset})")], style.size is None)
        _title(fig, style, lambda: _describe(_load_lines([run_dir], NC_TABLE, [], {})))
    return fig


def minority_figure(run_dirs: list[Path], group_by: list[str] = (), style: FigureStyle = FigureStyle()) -> plt.Figure:
    """Minority Collapse (Fang, He, Long & Su 2021): the mean cosine between the classifier rows
    of the minority classes and of the majority classes (the grey line: a simplex's -1/(C-1)), and the test
    accuracy on each and on all classes, against epochs with the TPT onset; and each classifier row's norm
    against its class's training samples at each run's last measured checkpoint. Balanced runs, which have
    no minority, show in the accuracy over all classes only; where no run has a test split (ufm.py's runs),
    the figure is the top row alone."""
    lines = _load_lines(run_dirs, NC_TABLE, group_by, style.labels)
    tested = any(_present(panel, lines) for panel in MINORITY_PANELS[2:])
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(2 if tested else 1, 3, layout="constrained", squeeze=False,
                                 figsize=style.size or (PANEL_SIZE if tested else MINORITY_UNTESTED_SIZE))
        epoch_axes = [*axes[0, :2], *(axes[1] if tested else [])]
        drawn = _merge(*(_draw(ax, panel, lines, style) for ax, panel in zip(epoch_axes, MINORITY_PANELS)))
        simplex = -1 / (lines[0].configs[0].get("num_classes", 2) - 1)
        for ax in axes[0, :2]:
            ax.axhline(simplex, **REFERENCE_STYLE)
        for row, floor in ((axes[0, :2], -1.0), *([(axes[1], 0.0)] if tested else [])):  # one scale to compare
            low, high = zip(*(ax.get_ylim() for ax in row))
            for ax in row:
                ax.set_ylim(max(min(low), floor), max(high))
        _draw_norms(axes[0, 2], lines)
        _finish(fig, lines, drawn, style, [Line2D([], [], **REFERENCE_STYLE, label=r"simplex ETF's $-1/(C-1)$")])
    return fig


def representations_figure(table: Path, style: FigureStyle = FigureStyle()) -> plt.Figure:
    """The Mixup representation figure (Fisher, Meng & Papyan 2024, Figure 1) from the CSV that
    `validate_nc.py --representations` writes.

    Same-class mixes are drawn in greens and mixes of two classes in purples, darker for larger lam
    (the weight of class_a); arrows are the centred classifier rows, crosses the clean class means."""
    rows = _read_representations(Path(table))
    points = [row for row in rows if row["kind"] in ("same", "mixed")]
    radius = max(np.hypot(row["x"], row["y"]) for row in points) or 1.0
    with plt.rc_context(style.rc()):
        fig, ax = plt.subplots(figsize=style.size or REPRESENTATIONS_SIZE, layout="constrained")
        handles = []
        for kind, colours, label in (("same", "Greens", "same-class mixes"), ("mixed", "Purples", "two-class mixes")):
            chosen = [row for row in points if row["kind"] == kind]
            ax.scatter([row["x"] for row in chosen], [row["y"] for row in chosen], s=4,
                       c=[0.25 + 0.75 * row["lam"] for row in chosen], cmap=colours, vmin=0, vmax=1, linewidths=0)
            # The points are specks in pale to dark shades; the legend shows one mid-dark, at a size one can read.
            handles.append(Line2D([], [], linestyle="none", marker="o", markersize=LEGEND_MARKER_SIZE,
                                  color=plt.get_cmap(colours)(0.75), label=label))
        arrows = [row for row in rows if row["kind"] == "classifier"]
        scale = radius / max(np.hypot(row["x"], row["y"]) for row in arrows)
        for row in arrows:
            ax.annotate("", xy=(scale * row["x"], scale * row["y"]), xytext=(0, 0),
                        arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 1.2})
            ax.annotate(f"$w_{{{row['class_a']}}}$", (1.1 * scale * row["x"], 1.1 * scale * row["y"]), ha="center",
                        va="center")
        means = [row for row in rows if row["kind"] == "mean"]
        ax.scatter([row["x"] for row in means], [row["y"] for row in means], marker="x", s=30, color="black")
        handles.append(Line2D([], [], linestyle="none", marker="x", markersize=LEGEND_MARKER_SIZE, markeredgewidth=1.5,
                              color="black", label="class means (clean)"))
        limit = 1.25 * radius  # room for the arrows' tips and labels, which are not drawn outside the axes
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")
        ax.set_xlabel("simplex plane, axis 1")
        ax.set_ylabel("simplex plane, axis 2")
        handles.append(Line2D([], [], linestyle="none", label="darker: larger weight of the first class of a pair"))
        legend_below(fig, handles, style.size is None)
        _title(fig, style, lambda: f"Mixup representations of classes "
                                   f"{', '.join(str(row['class_a']) for row in arrows)}")
    return fig


def legend_below(fig: plt.Figure, handles: list, grow: bool = True) -> Legend:
    """One legend of `handles`, centred below the axes of `fig` (a constrained layout), and whole inside
    the figure: in as many columns (up to MAX_LEGEND_COLUMNS) as fit the figure's width, its labels
    wrapped at spaces (never inside $math$) where even one column would not fit, and (with `grow`) the figure
    made taller by the legend's height, so that its axes keep their size whatever the legend holds; without,
    the axes make room for it in the figure's size. Every figure of the repo puts its legend here."""
    renderer = fig.canvas.get_renderer()
    labels = [handle.get_label() for handle in handles]
    chars = max(len(line) for label in labels for line in label.split("\n"))
    legend = _fitting_legend(fig, handles, labels, chars, renderer)
    while legend is None and chars > MIN_WRAP:
        chars = max(MIN_WRAP, chars - max(1, chars // 5))
        legend = _fitting_legend(fig, handles, labels, chars, renderer)
    if legend is None:  # a word longer than MIN_WRAP characters and the figure's width: as narrow as it goes
        legend = fig.legend(handles, [_wrap(label, MIN_WRAP) for label in labels], loc="outside lower center")
    if grow:
        fig.set_figheight(fig.get_figheight() + legend.get_window_extent(renderer).height / fig.dpi)
    return legend


def title_above(fig: plt.Figure, text: str) -> None:
    """`text` as the figure's title, wrapped at spaces to the figure's width."""
    renderer = fig.canvas.get_renderer()
    chars = max(len(line) for line in text.split("\n"))
    title = fig.suptitle(text)
    while title.get_window_extent(renderer).width > _room(fig) and chars > MIN_WRAP:
        chars = max(MIN_WRAP, chars - max(1, chars // 5))
        title.set_text(_wrap(text, chars))


def readable_log_ticks(axis: matplotlib.axis.Axis) -> None:
    """Label a log axis with plain numbers (2, 50, 0.005; epochs as integers), at least MIN_LOG_TICKS of
    them in view (see `_ReadableLogLocator`)."""
    axis.set_major_locator(_ReadableLogLocator())
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def figure_path(out: Path, figure_format: str | None) -> Path:
    """The file a figure named by --out `out` goes to: `out` in its suffix's format (with which
    `figure_format`, if given, must agree), or with the suffix of `figure_format` (default png) when it
    has none; a UserError for anything else."""
    out = Path(out)
    kind = out.suffix.lower().lstrip(".")
    if not kind:
        return out.with_name(f"{out.name}.{figure_format or FORMATS[0]}")
    if kind not in FORMATS:
        raise UserError(f"cannot write {out}: name a .png, .pdf or .svg file")
    if figure_format and figure_format != kind:
        raise UserError(f"--out {out} names a .{kind} file but --format is {figure_format}; make them agree or drop "
                        "--format")
    return out


def figure_folder(out: Path, command: str) -> Path:
    """`out` as the folder of a command that writes several figures; a UserError when it is named like
    a figure file (x.pdf) or is a file."""
    out = Path(out)
    kind = out.suffix.lower().lstrip(".")
    if kind in FIGURE_SUFFIXES:
        suggestion = f" --format {kind}" if kind in FORMATS else ""
        raise UserError(f"plotting.py {command} writes several figures into a folder, not into the file {out}: "
                        f"pass --out {out.with_suffix('')}{suggestion}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; plotting.py {command} writes into a folder: name a folder")
    return out


def add_figure_arguments(group: argparse._ActionsContainer) -> None:
    """The flags of FigureStyle's fields (their metadata), which every figure command takes."""
    for option in fields(FigureStyle):
        flag, settings = option.metadata["flag"], dict(option.metadata)
        del settings["flag"]
        group.add_argument(flag, dest=option.name, **settings)


def figure_style(args: argparse.Namespace) -> FigureStyle:
    """The FigureStyle that the flags of `add_figure_arguments` ask for; a UserError for a style file that
    cannot be read, before anything is drawn."""
    given = {option.name: getattr(args, option.name) for option in fields(FigureStyle)
             if getattr(args, option.name) is not None}
    given["labels"] = dict(given.get("labels") or [])
    if "size" in given:
        given["size"] = tuple(given["size"])
    _style_params(given.get("style_file"))
    return FigureStyle(**given)


# Studies (sweep.py): the runs of studies/<name>/, one line per group of runs equal in every varied
# setting but the seed, so that the seeds make the band.

def plot_study(study_dir: Path, out_dir: Path | None = None, suffix: str = ".png",
               style: FigureStyle = FigureStyle()) -> list[Path]:
    """A study's Figures 2-7 panel (panel.png) and training curves (training_curves.png), with its finished
    runs grouped by the study's varied settings except the seed (each group's mean over seeds, and their
    min-max band); for a learning-rate grid, each group at its chosen learning rate only, as the study's
    tables list them (its jobs rewrite them as each ends). The files go to the study's folder, or to
    `out_dir` with a copy of table.md, in the format of `suffix`. The run folders are read where sweep.py put
    them, relative to the folder it ran in."""
    study_dir = Path(study_dir)
    out_dir = Path(out_dir) if out_dir else study_dir
    study, run_dirs = study_runs(study_dir)
    group_by = [key for key in study["varied"] if key != "seed"] or ["dataset"]  # one group: every seed
    written = [plot_panel(run_dirs, out_dir / f"panel{suffix}", group_by, style),
               plot_curves(run_dirs, out_dir / Path(CURVES_FILE).with_suffix(suffix), group_by, style)]
    if _imbalanced(run_dirs):
        written.append(plot_minority_collapse(run_dirs, out_dir / Path(MINORITY_FILE).with_suffix(suffix), group_by,
                                              style))
    if any(row.get("cdnv") is not None for run_dir in run_dirs for row in runs.read_nc_metrics(run_dir)):
        written.append(plot_other_measures(run_dirs, out_dir / Path(OTHER_FILE).with_suffix(suffix), group_by,
                                           style))
    if out_dir != study_dir:
        written.append(out_dir / study_files.MARKDOWN_TABLE)
        runs.write_text(written[-1], (study_dir / study_files.MARKDOWN_TABLE).read_text())
    return written


def study_runs(study_dir: Path) -> tuple[dict, list[Path]]:
    """A study's study.json and the folders of its finished runs (for a learning-rate grid, those at the
    chosen rate only), as its tables list them."""
    study = study_files.read_study(study_dir)
    drawn = study_files.finished_runs(study_dir)
    if not drawn:
        raise UserError(f"{study_dir} has no finished run yet; run its sweep.py command (see its table.md)")
    return study, drawn


def group_series(run_dirs: list[Path], group_by: list[str], column: str,
                 table: str = NC_TABLE) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """What the grouped figures draw for `column` of `table`: per group of runs with equal `group_by`
    settings (per run if none), its label, the epochs all its runs have, and the mean, minimum and maximum
    over its runs at those epochs."""
    series = []
    for line in _load_lines(run_dirs, table, group_by, {}):
        epochs, values, _ = _aggregate([tables[table] for tables in line.tables], column, log_y=False)
        series.append((line.label, epochs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)))
    return series


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, out_help: str, required: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("--out", type=Path, required=required, help=out_help)
        if name != "table":
            sub.add_argument("--format", choices=FORMATS, help="png, pdf or svg (vectors, text kept as text); "
                             "default: the suffix of a file given to --out, else png")
            add_figure_arguments(sub.add_argument_group("figure options", "How the figure looks, whatever it shows."))
        return sub

    def runs_and_groups(sub: argparse.ArgumentParser, what: str,
                        per_group: str = "one line per group of runs with equal values, the mean over its runs and "
                        "a band from their minimum to their maximum") -> None:
        sub.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help=what)
        sub.add_argument("--group-by", nargs="+", default=[], metavar="KEY",
                         help=f"config.json keys (e.g. loss, precision): {per_group}")

    representations = command("representations", "the Mixup representation figure from its CSV",
                              "the file to write (default: beside the CSV)", required=False)
    representations.add_argument("table", type=Path, metavar="CSV", help="mixup_representations_epoch<E>.csv")
    layers = command("layers", "layerwise_nc1: NC1 after every stage, one line per checkpoint",
                     "the file to write (.png, .pdf or .svg)")
    layers.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder measured with --layers")
    runs_and_groups(command("nc", "Figures 2-7 (and 8 when measured), one file each, the runs overlaid",
                            "the folder for the figures"), "run folders to plot")
    runs_and_groups(command("curves", "training_curves: loss, accuracy and test ECE per epoch",
                            "a folder (for training_curves.<format>) or the file to write"), "run folders to plot")
    runs_and_groups(command("panel", "Figures 2-7 in one compact 2x3 panel", "the file to write (.png, .pdf or .svg)"),
                    "run folders to plot")
    study = command("study", "a study's panel and training curves, seeds as bands, and its table.md",
                    "folder for the files (default: the study's folder)", required=False)
    study.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="studies/NAME, as sweep.py wrote it")
    table = command("table", "the paper's Table 1 over runs: TPT onset, test accuracy there and at the last "
                    "epoch, and the change; printed as Markdown", "also write it to this file as Markdown (.md) and "
                    "beside it as CSV (.csv) and LaTeX (.tex, booktabs)", required=False)
    runs_and_groups(table, "run folders, or study folders (their finished runs)", "one row per group of runs with "
                    "equal values (the seeds of a setting): the mean over its runs and their range [minimum, maximum]")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if args.command == "table":
        return _print_table(args)
    figure_format = args.format
    suffix = f".{figure_format or FORMATS[0]}"
    style = figure_style(args)
    if args.command == "representations":
        out = figure_path(args.out, figure_format) if args.out else args.table.with_suffix(suffix)
        written = [plot_representations(args.table, out, style)]
    elif args.command == "layers":
        written = [plot_layers(args.run_dir, figure_path(args.out, figure_format), style)]
    elif args.command == "nc":
        written = plot_runs(args.run_dirs, figure_folder(args.out, "nc"), args.group_by, suffix, style)
    elif args.command == "study":
        written = plot_study(args.study_dir, args.out and figure_folder(args.out, "study"), suffix, style)
    elif args.command == "curves":
        named_file = args.out.suffix.lower().lstrip(".") in FIGURE_SUFFIXES
        out = (figure_path(args.out, figure_format) if named_file
               else figure_folder(args.out, "curves") / Path(CURVES_FILE).with_suffix(suffix))
        written = [plot_curves(args.run_dirs, out, args.group_by, style)]
    else:
        written = [plot_panel(args.run_dirs, figure_path(args.out, figure_format), args.group_by, style)]
    for path in written:
        print(path)
    return 0


def _print_table(args: argparse.Namespace) -> int:
    """`plotting.py table`: Table 1 of the runs (a study's finished ones for a study folder) printed as
    Markdown and, with --out, written as Markdown, CSV and LaTeX."""
    if args.out is not None and args.out.suffix.lower() not in ("", ".md", ".csv", ".tex"):
        raise UserError(f"--out {args.out}: Table 1 is written as FILE.md, FILE.csv and FILE.tex; name a .md, .csv or "
                        ".tex file")
    run_dirs = [run_dir for path in args.run_dirs
                for run_dir in (study_runs(path)[1] if (path / study_files.STUDY_FILE).is_file() else [path])]
    rows = reports.table1(run_dirs, args.group_by)
    print(reports.table1_markdown(rows, args.group_by), end="")
    if args.out is not None:
        print("\n".join(map(str, reports.write_table1(rows, args.out, args.group_by))))
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
        return [(tpt_row(tables[NC_TABLE]) or {}).get("epoch") for tables in self.tables]


def _load_lines(run_dirs: list[Path], needed: str, group_by: list[str], given: Mapping[str, str]) -> list[_Line]:
    """The runs' tables (`needed` must exist; the other is read if present), one line per run, or per
    group of runs with equal `group_by` settings, labelled as `given` (FigureStyle.labels) names them."""
    folders = [_folder(run_dir) for run_dir in run_dirs]
    for folder in folders:
        folder.required(needed)
    tables = [{NC_TABLE: folder.measured, LOG_TABLE: folder.log} for folder in folders]
    configs = [folder.config for folder in folders]
    if group_by:
        members = reports.groups(configs, group_by)
        names = [[reports.group_name(configs[group[0]], group_by)] for group in members]
        labels = [reports.group_label(configs[group[0]], group_by, len(group)) for group in members]
    else:
        members = [[i] for i in range(len(folders))]
        labels = reports.run_labels(configs, reports.folder_names([folder.path for folder in folders]))
        names = [[str(folder.path), folder.path.name, label] for folder, label in zip(folders, labels)]
    labels = _given_labels(labels, names, given, "group" if group_by else "run")
    colours = _colours(len(members))
    return [_Line(label, colour, [configs[i] for i in group], [tables[i] for i in group])
            for label, colour, group in zip(labels, colours, members)]


def _colours(count: int) -> list[tuple]:
    """`count` colours that tell lines apart: tab10's, tab20's beyond 10, evenly spaced hues beyond 20."""
    if count <= 10:
        return list(plt.get_cmap("tab10").colors[:count])
    if count <= 20:
        return list(plt.get_cmap("tab20").colors[:count])
    return [tuple(colour) for colour in plt.get_cmap("turbo")(np.linspace(0.05, 0.95, count))]


def _folder(run_dir: "Path | runs.RunFolder") -> runs.RunFolder:
    """A run folder as given (its tables read once for every figure drawn from it), or the one at a path."""
    return run_dir if isinstance(run_dir, runs.RunFolder) else runs.RunFolder(run_dir)


def _given_labels(labels: list[str], names: list[list[str]], given: Mapping[str, str], kind: str) -> list[str]:
    """`labels` with those of the lines that `given` names (by any of their `names`) replaced by its labels; a
    UserError for a name that is no line's."""
    unknown = [name for name in given if not any(name in line_names for line_names in names)]
    if unknown:
        raise UserError(f"--label {unknown[0]!r}: no {kind} of that name; name one of "
                        f"{', '.join(repr(line_names[-1 if kind == 'run' else 0]) for line_names in names)}")
    return [next((given[name] for name in line_names if name in given), label)
            for label, line_names in zip(labels, names)]


def _loss_name(line: _Line) -> str:
    """The loss (config.json's `loss`) of a line's runs, "ce" for a run from before the setting; several
    joined by "/"."""
    return "/".join(dict.fromkeys(run.get("loss") or "ce" for run in line.configs))


def _draw(ax: plt.Axes, panel: Panel, lines: list[_Line], style: FigureStyle, overlay: bool | None = None
          ) -> dict[str, list[str]]:
    """Draw every line's quantities of `panel` on `ax` (a group's mean with its min-max band) and the TPT
    onsets (in each line's colour when `overlay`, by default when there are several lines, else black);
    return what the legend must name: per line style drawn, its names, and "markers", "tpt" and "zeros"
    (a zero left off a log axis) when drawn. A test curve is drawn over the others with open markers, so
    that one equal to the training curve still shows. A panel with no positive value to show (NC1 of one
    sample per class is 0 at every checkpoint) keeps a linear axis."""
    overlay = len(lines) > 1 if overlay is None else overlay
    marker = _marker(panel)
    names = {**STYLE_NAMES[panel.table], **(panel.names or {})}
    drawn = {"markers": []} if marker else {}
    log_y = panel.log_y and _any_positive(panel, lines)
    for line in lines:
        for quantity in _present(panel, lines):
            epochs, values, hidden = _aggregate([tables[panel.table] for tables in line.tables], quantity.column,
                                                log_y)
            ax.plot(epochs, values.mean(axis=0), linestyle=quantity.style, color=line.colour,
                    **_marker_style(marker, quantity.style, line.colour))
            if len(values) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.colour, alpha=0.2,
                                linewidth=0)
            drawn = _merge(drawn, {quantity.style: [names[quantity.style]]}, {"zeros": []} if hidden else {})
    onsets = {}
    for line in lines:
        for epoch in sorted({epoch for epoch in line.tpt_epochs if epoch is not None}):
            onsets.setdefault(epoch, []).append(line.colour if overlay else TPT_COLOUR_ALONE)
    for epoch, colours in onsets.items():
        for k, colour in enumerate(colours):  # runs with one onset take turns along one dotted line
            ax.axvline(epoch, color=colour, **{**TPT_STYLE, "linestyle": _shared_dots(k, len(colours))})
        drawn["tpt"] = []
    ax.set_xscale("log")
    readable_log_ticks(ax.xaxis)
    if log_y:
        ax.set_yscale("log")
        readable_log_ticks(ax.yaxis)
    ax.set_xlabel(_time_axis(lines))
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.heading(style))
    ax.grid(True, which="major", alpha=0.3)
    return drawn


def _merge(*drawn: dict[str, list[str]]) -> dict[str, list[str]]:
    """What several calls of `_draw` drew, each name once, in the order first drawn."""
    merged = {}
    for entries in drawn:
        for key, names in entries.items():
            merged.setdefault(key, [])
            merged[key] += [name for name in names if name not in merged[key]]
    return merged


def _marker_style(marker: str, line_style: str, colour: tuple) -> dict:
    """The markers of a curve: open and over the others for a test curve, filled for the rest."""
    if not marker:
        return {}
    if line_style == TEST:
        return {"marker": marker, "markersize": MARKER_SIZE + 1.5, "markerfacecolor": "none",
                "markeredgecolor": colour, "zorder": 3}
    return {"marker": marker, "markersize": MARKER_SIZE}


def _shared_dots(k: int, count: int) -> tuple:
    """The dash pattern of the k-th of `count` onset lines at one epoch: every count-th dot of TPT_STYLE's,
    shifted by k dots, so that each run's colour shows along the line."""
    offset, (on, off) = TPT_STYLE["linestyle"]
    return (offset + k * (on + off), (on, count * (on + off) - on))


def _label_the_ends(ax: plt.Axes) -> None:
    """Widen a log y axis's view to its next labelled tick at an end where the curves rise (or fall) by more
    than END_GAP of the axis past the last label, if that tick is within END_REACH of it: the top decade of
    a curve is then labelled."""
    low, high = ax.get_ylim()
    span = np.log(high / low)
    ticks = ax.yaxis.get_major_locator().tick_values(low, high)
    inside = ticks[(ticks >= low) & (ticks <= high)]
    if not inside.size:
        return
    above, below = ticks[ticks > high], ticks[ticks < low]
    if above.size and np.log(high / inside.max()) > END_GAP * span and np.log(above.min() / high) < END_REACH * span:
        high = above.min()
    if below.size and np.log(inside.min() / low) > END_GAP * span and np.log(low / below.max()) < END_REACH * span:
        low = below.max()
    ax.set_ylim(low, high)


def _time_axis(lines: list[_Line]) -> str:
    """The name of the tables' `epoch` column for the runs drawn: config.json's time_unit ("step" for ufm.py's
    runs), "epoch" where it has none; both, "epoch / step", for a mix."""
    return " / ".join(sorted({run.get("time_unit", "epoch") for line in lines for run in line.configs}))


def _draw_norms(ax: plt.Axes, lines: list[_Line]) -> None:
    """Each classifier row's norm ||w_c|| (weight_norm_<c>) against its class's training samples (config.json's
    class_counts), at each run's last measured checkpoint, in its line's colour."""
    sizes = set()
    for line in lines:
        for run, tables in zip(line.configs, line.tables):
            last = tables[NC_TABLE][-1]
            counts = run.get("class_counts") or []
            norms = [last.get(f"weight_norm_{label}") for label in range(len(counts))]
            if counts and None not in norms:
                ax.plot(counts, norms, linestyle="none", marker="o", markersize=MARKER_SIZE + 1, color=line.colour,
                        alpha=0.7)
                sizes.update(counts)
    ax.set_xscale("log")
    if sizes and len(sizes) <= MAX_SIZE_TICKS:  # the few class sizes themselves, each labelled
        ax.set_xticks(sorted(sizes), [f"{size:g}" for size in sorted(sizes)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:
        readable_log_ticks(ax.xaxis)
    if sizes:  # the points off the frame: a tenth of the axis (or of a factor of 10) clear on each side
        low, high = min(sizes), max(sizes)
        margin = (high / low) ** 0.1 if high > low else 10 ** 0.1
        ax.set_xlim(low / margin, high * margin)
    ax.set_xlabel(r"training samples $N_c$")
    ax.set_ylabel(r"$\|w_c\|$")
    ax.set_title("Row norms, last checkpoint")
    ax.grid(True, which="major", alpha=0.3)


def _imbalanced(run_dirs: list[Path]) -> bool:
    """Whether some run's nc_metrics.csv has the Minority Collapse columns (an imbalanced run's)."""
    return any(reports.has_minority_columns(runs.read_nc_metrics(run_dir)) for run_dir in run_dirs)


def _any_positive(panel: Panel, lines: list[_Line]) -> bool:
    """Whether some run's table has a positive finite value of a quantity of `panel`, which a log axis shows."""
    return any(0 < (row.get(quantity.column) or 0) < np.inf for quantity in panel.quantities for line in lines
               for tables in line.tables for row in tables[panel.table])


def _present(panel: Panel, lines: list[_Line]) -> list[Quantity]:
    """The quantities of `panel` that some run's table has."""
    return [quantity for quantity in panel.quantities
            if any(row.get(quantity.column) is not None for line in lines for tables in line.tables
                   for row in tables[panel.table])]


class _ReadableLogLocator(matplotlib.ticker.LogLocator):
    """Ticks at 1, 2 and 5 times powers of ten where their labels fit along the axis (at powers of ten alone
    where they do not, and over more than 3 decades: there 1-2-5 labels run into one another, as on ufm.py's
    axis of thousands of steps, and over more than 4, such as a fixed ETF's 1e-8, matplotlib's LogLocator
    draws no tick at all given several subs); at every integer multiple of them where that fits and 1-2-5
    leaves fewer than MIN_LOG_TICKS in view (an axis spanning less than a decade); else, on an axis spanning
    less than a decade, at evenly spaced round values."""

    def tick_values(self, vmin: float, vmax: float) -> np.ndarray:
        low, high = sorted((vmin, vmax))
        room = max(self.axis.get_tick_space(), MIN_LOG_TICKS) if self.axis is not None else 9
        options = ((1.0,),) if high / low > 1e3 else ((1.0,), (1.0, 2.0, 5.0), tuple(np.arange(1.0, 10.0)))
        chosen = None
        for subs in options:  # sparse to dense: the densest whose labels fit
            self.set_params(subs=subs, numticks=room + 2)
            ticks = super().tick_values(vmin, vmax)
            shown = np.count_nonzero((ticks >= low) & (ticks <= high))
            if shown <= room and (chosen is None or shown > chosen[0]):
                chosen = (shown, ticks)
        if chosen is not None and (chosen[0] >= MIN_LOG_TICKS or high / low >= 10):
            return chosen[1]  # over a decade or more, powers of ten even where only two are in view
        ticks = matplotlib.ticker.MaxNLocator(nbins=min(room, MIN_LOG_TICKS + 1)).tick_values(low, high)
        return ticks[ticks > 0]


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


def _finish(fig: plt.Figure, lines: list[_Line], drawn: dict[str, list[str]], style: FigureStyle,
            extra: list[Line2D] = ()) -> None:
    """The figure's title (by default what was trained, and how it departs from the paper's protocol) and one
    legend below the axes: the line styles drawn, by their names, the TPT onset, the `extra` handles (a
    theory's value) and, for several lines or labels given, the lines' colours."""
    colour = lines[0].colour if len(lines) == 1 else "0.3"
    handles = [Line2D([], [], color=colour, linestyle=line_style, label=name,
                      **_marker_style("o" if "markers" in drawn else "", line_style, colour))
               for line_style in (TRAINING, CLASSIFIERS, TEST) for name in drawn.get(line_style, [])]
    if "tpt" in drawn:
        handles.append(Line2D([], [], color=TPT_COLOUR_ALONE if len(lines) == 1 else colour, **TPT_STYLE,
                              label="TPT onset"))
    handles += extra
    if "zeros" in drawn:
        handles.append(Line2D([], [], linestyle="none", label="(zeros are not shown on log axes)"))
    if len(lines) > 1 or style.labels:
        handles += [Line2D([], [], color=line.colour, linewidth=3, label=line.label + _no_tpt_note(line))
                    for line in lines]
    legend_below(fig, handles, style.size is None)
    _title(fig, style, lambda: _describe(lines))
    fig.get_layout_engine().execute(fig)  # the axes' final heights, which decide how many labels fit on them
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            _label_the_ends(ax)


def _title(fig: plt.Figure, style: FigureStyle, default: Callable[[], str]) -> None:
    """The figure's title: --title's text, none for --title '', else `default()`."""
    text = default() if style.title is None else style.title
    if text:
        title_above(fig, text)


def _describe(lines: list[_Line]) -> str:
    """Dataset / model of the runs (a folder dataset by its folder's name, never its path), the departures
    from the paper's protocol they share and, for one line, whether its training error never reached zero."""
    every = [run for line in lines for run in line.configs]
    pairs = "; ".join(dict.fromkeys(f"{reports.dataset_label(run.get('dataset', '?'))} / {run.get('model', '?')}"
                                    for run in every))
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


def _fitting_legend(fig: plt.Figure, handles: list, labels: list[str], chars: int, renderer) -> Legend | None:
    """The legend of the most columns that fits the figure's width with its labels wrapped at `chars`
    characters, or None (nothing left on the figure) if even one column is too wide."""
    wrapped = [_wrap(label, chars) for label in labels]
    for columns in range(min(len(handles), MAX_LEGEND_COLUMNS), 0, -1):
        legend = fig.legend(handles, wrapped, loc="outside lower center", ncols=columns)
        if legend.get_window_extent(renderer).width <= _room(fig):
            return legend
        legend.remove()
    return None


def _room(fig: plt.Figure) -> float:
    """The width, in display units, that a legend or title may take."""
    return fig.bbox.width * (1 - 2 * SIDE_MARGIN)


def _wrap(text: str, chars: int) -> str:
    """`text` with each line broken at spaces into lines of at most `chars` characters where it can be:
    a $math$ span is never broken, and a longer word without math is cut into pieces of `chars`."""
    wrapped = []
    for line in text.split("\n"):
        words = []
        for word in line.split(" "):
            if words and words[-1].count("$") % 2:  # inside a $math$ span: the space belongs to it
                words[-1] += " " + word
            elif "$" not in word and len(word) > chars:
                words += [word[i:i + chars] for i in range(0, len(word), chars)]
            else:
                words.append(word)
        rows = [""]
        for word in words:
            if rows[-1] and len(rows[-1]) + 1 + len(word) > chars:
                rows.append(word)
            else:
                rows[-1] = f"{rows[-1]} {word}" if rows[-1] else word
        wrapped += rows
    return "\n".join(wrapped)


def _save(fig: plt.Figure, path: Path, style: FigureStyle = FigureStyle()) -> Path:
    """Write `fig` in the format its suffix names and close it: .pdf or .svg as vectors (text kept as
    text), .png at the style's dpi with 256 colours: line art loses nothing visible, and the file is a third of
    the size of matplotlib's RGBA one (the 2x3 panel of three runs stays under 300 KB)."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    try:
        if kind not in FORMATS:
            raise UserError(f"cannot write {path}: name a .png, .pdf or .svg file")
        with runs.atomic_path(path) as tmp, plt.rc_context(style.rc()):
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "png":
                fig.set_dpi(style.dpi)
                fig.canvas.draw()
                pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
                image = Image.fromarray(pixels).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
                image.save(tmp, format="png", optimize=True, dpi=(style.dpi, style.dpi))
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


@functools.lru_cache(maxsize=None)
def _style_params(style_file: str | None) -> dict:
    """The settings of a matplotlib style file, or of one of matplotlib's named styles ({} for None); a
    UserError if it is neither."""
    if style_file is None:
        return {}
    if Path(style_file).is_file():
        try:
            params = matplotlib.rc_params_from_file(style_file, use_default_template=False)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"--style {style_file}: not a matplotlib style file ({err})") from None
    elif style_file in plt.style.library:
        params = plt.style.library[style_file]
    else:
        raise UserError(f"--style {style_file}: no such file, nor one of matplotlib's styles "
                        f"({', '.join(sorted(plt.style.library)[:5])}, ...)")
    return {key: value for key, value in params.items() if key != "backend"}


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
