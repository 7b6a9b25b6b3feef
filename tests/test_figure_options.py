"""The figure options (title, legend labels, size in inches, font size, dpi, style file, figure numbers) on every
figure command, read back from the files written; the defaults' size and fonts; the figure flaws fixed (log axes
labelled at both ends without crowding, one onset line per run, one loss per axis, Figure 7's test curve on top,
the row-norm panel's points off the frame); no absolute path in a title; nothing on stderr."""
import itertools
import re
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.text
import numpy as np
import pytest

import plotting
import validate_nc
from conftest import command
from errors import UserError
from test_plotting import (NC_ROWS, TPT_EPOCH, fully_measured, png_size, set_columns, write_representations,
                           write_run, write_study)

TITLE, LABEL = "Collapse of a toy run", "the toy run"


def svg_inches(path: Path) -> tuple[float, float]:
    """The width and height of an SVG file matplotlib wrote, from its root's attributes in points."""
    head = path.read_text()[:2000]
    width, height = (float(re.search(rf'{key}="([0-9.]+)pt"', head).group(1)) for key in ("width", "height"))
    return width / 72, height / 72


def png_dpi(path: Path) -> tuple[int, int]:
    """The pixels per inch of a PNG's pHYs chunk (stored per metre)."""
    data = path.read_bytes()
    chunk = data.index(b"pHYs")
    per_metre = [int.from_bytes(data[chunk + 4 + 4 * k:chunk + 8 + 4 * k], "big") for k in (0, 1)]
    assert data[chunk + 12] == 1, "pHYs not in metres"
    return tuple(round(value * 0.0254) for value in per_metre)


def svg_texts(path: Path) -> str:
    """The SVG's text, as matplotlib keeps it with svg.fonttype none: its <text> elements' contents."""
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


@pytest.fixture(autouse=True)
def no_figure_left_open():
    """Figures drawn but not saved (the others of `nc_figures`, a failed assertion's) closed after each test."""
    yield
    plt.close("all")


@pytest.fixture
def measured_run(tmp_path, monkeypatch) -> Path:
    """A run measured with --layers and --adversarial and the field's other measures, in a study, from the
    folder the study's commands run in."""
    monkeypatch.chdir(tmp_path)
    return fully_measured(write_run(tmp_path / "runs" / "toy"))


@pytest.mark.slow
def test_every_figure_command_writes_the_title_label_and_size_asked_for(tmp_path, measured_run):
    study = write_study(tmp_path, [measured_run], ["seed"])
    table = write_representations(tmp_path / "mixup.csv")
    out = tmp_path / "out"
    run = str(measured_run)
    commands = {"nc": ["nc", run, "--out", f"{out}/nc"], "curves": ["curves", run, "--out", f"{out}/curves.svg"],
                "panel": ["panel", run, "--out", f"{out}/panel.svg"],
                "layers": ["layers", run, "--out", f"{out}/l.svg"],
                "representations": ["representations", str(table), "--out", f"{out}/r.svg"],
                "study": ["study", str(study), "--out", f"{out}/study"]}
    for name, argv in commands.items():
        group = "synthetic" if name == "study" else run  # a study of seeds is one group, named by its dataset
        label = [] if name in ("layers", "representations") else ["--label", group, LABEL]
        options = ["--title", TITLE, "--size", "5", "3.2", "--format", "svg", *label]
        assert plotting.main(plotting.parse_args([*argv, *options])) == 0, name
    written = sorted(out.rglob("*.svg"))
    assert len(written) == 15  # Figures 2-9, curves, panel, layers, representations; the study's panel, curves, fig9
    for path in written:
        assert svg_inches(path) == pytest.approx((5, 3.2), abs=0.01), path
        texts = svg_texts(path)
        assert TITLE in texts and "(Figure" not in texts and str(tmp_path) not in texts, path
        assert LABEL in texts or path.name in ("l.svg", "r.svg"), path


def test_a_png_has_the_size_in_inches_and_the_dpi_asked_for(tmp_path):
    out = tmp_path / "panel.png"
    command = ["panel", str(write_run(tmp_path / "run")), "--out", str(out), "--size", "6", "4", "--dpi", "200"]
    assert plotting.main(plotting.parse_args(command)) == 0
    assert png_size(out) == (1200, 800) and png_dpi(out) == (200, 200)


def test_no_title_with_an_empty_title_and_figure_numbers_only_when_asked(tmp_path):
    run = write_run(tmp_path / "run")
    plain = tmp_path / "plain.svg"
    numbered = tmp_path / "numbered.svg"
    plotting.main(plotting.parse_args(["panel", str(run), "--out", str(plain), "--title", ""]))
    plotting.main(plotting.parse_args(["panel", str(run), "--out", str(numbered), "--number-figures"]))
    assert "synthetic / resnet18" not in svg_texts(plain) and "(Figure" not in svg_texts(plain)
    assert "synthetic / resnet18" in svg_texts(numbered)
    assert [f"(Figure {n})" in svg_texts(numbered) for n in range(2, 8)] == [True] * 6


def test_the_font_size_is_that_of_every_text_and_a_style_file_applies_under_it(tmp_path):
    run = write_run(tmp_path / "run")
    style = tmp_path / "paper.mplstyle"
    style.write_text("font.size: 12\nlines.linewidth: 3\n")
    sizes = {}
    for name, options in (("flag", ["--font-size", "7"]), ("file", ["--style", str(style)]),
                          ("both", ["--style", str(style), "--font-size", "7"])):
        fig = plotting.panel_figure([run], style=plotting.figure_style(plotting.parse_args(
            ["panel", str(run), "--out", "x.png", *options])))
        fig.canvas.draw()
        sizes[name] = {text.get_fontsize() for text in fig.findobj(matplotlib.text.Text) if text.get_text()}
        widths = {line.get_linewidth() for ax in fig.axes for line in ax.get_lines() if len(set(line.get_xdata())) > 1}
        plt.close(fig)
        assert widths == ({1.2} if name == "flag" else {3.0}), name
    assert sizes == {"flag": {6.0, 7.0}, "file": {11.0, 12.0}, "both": {6.0, 7.0}}


def test_the_defaults_fit_a_7_inch_text_width_at_8_to_9_points(tmp_path):
    run_dirs = [fully_measured(write_run(tmp_path / name, seed=seed)) for name, seed in (("a", 0), ("b", 1))]
    table = write_representations(tmp_path / "r.csv")
    figures = itertools.chain(plotting.nc_figures(run_dirs), (
        (name, draw()) for name, draw in (("panel", lambda: plotting.panel_figure(run_dirs)),
                                          ("curves", lambda: plotting.curves_figure(run_dirs)),
                                          ("layers", lambda: plotting.layers_figure(run_dirs[0])),
                                          ("representations", lambda: plotting.representations_figure(table)))))
    for name, fig in figures:  # one at a time, each closed before the next is drawn
        fig.canvas.draw()
        sizes = {text.get_fontsize() for text in fig.findobj(matplotlib.text.Text) if text.get_text()}
        width = fig.get_size_inches()[0]
        plt.close(fig)
        assert width <= 7.0 and sizes <= {8.0, 9.0}, (name, width, sizes)


def test_a_folder_datasets_title_names_the_folder_not_its_path(tmp_path):
    folder = tmp_path / "images" / "flowers"
    runs_ = [write_run(tmp_path / name, dataset=f"folder:{folder}", seed=seed) for name, seed in (("a", 0), ("b", 1))]
    other = write_run(tmp_path / "c", dataset=f"folder:{tmp_path / 'images' / 'birds'}")
    out = tmp_path / "panel.svg"
    plotting.plot_panel([*runs_, other], out)
    texts = svg_texts(out)
    assert "flowers / resnet18; birds / resnet18" in texts and "flowers, seed=0" in texts
    assert str(tmp_path) not in texts and "folder:" not in texts


def test_a_label_for_no_run_is_refused_on_one_line_naming_the_runs(tmp_path):
    run = write_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"--label 'nothing': no run of that name; name one of 'run'"):
        plotting.main(plotting.parse_args(["panel", str(run), "--out", str(tmp_path / "p.png"), "--label", "nothing",
                                           "x"]))
    with pytest.raises(UserError, match=r"--style no-such-style: no such file"):
        plotting.main(plotting.parse_args(["panel", str(run), "--out", str(tmp_path / "p.png"), "--style",
                                           "no-such-style"]))
    assert not list(tmp_path.glob("p*"))


def test_validate_nc_takes_the_figure_options():
    args = validate_nc.parse_args(["--title", TITLE, "--size", "4", "3", "--dpi", "300", "--number-figures",
                                   "--label", "runs/a", "A", "--label", "runs/b", "B"])
    assert plotting.figure_style(args) == plotting.FigureStyle(
        title=TITLE, size=(4.0, 3.0), dpi=300, number_figures=True, labels={"runs/a": "A", "runs/b": "B"})
    assert args.given >= {"title", "size", "dpi", "number_figures", "labels"}


def test_a_pdf_is_written_without_a_warning_or_a_line_on_stderr(tmp_path, capsys, caplog):
    """fontTools printed "'created' timestamp seems very low" twice when a PDF embedded mathtext's prime."""
    out = tmp_path / "panel.pdf"
    with caplog.at_level("DEBUG", logger="fontTools"):
        plotting.plot_panel([write_run(tmp_path / "run")], out)
    assert out.read_bytes().startswith(b"%PDF-")
    assert capsys.readouterr().err == "" and not [record for record in caplog.records if record.levelname == "WARNING"]


@pytest.mark.slow
def test_a_pdf_from_the_command_line_leaves_stderr_empty(tmp_path):
    out = tmp_path / "panel.pdf"
    done = command("plotting.py", "panel", str(write_run(tmp_path / "run")), "--out", str(out))
    assert done.returncode == 0 and done.stderr == "" and out.read_bytes().startswith(b"%PDF-")


# The flaws: each figure rendered, then read back from its artists.

def labelled_ticks(ax: plt.Axes) -> list[matplotlib.text.Text]:
    low, high = sorted(ax.get_ylim())
    return [text for text in ax.get_yticklabels() if text.get_text() and low <= text.get_position()[1] <= high]


@pytest.mark.parametrize("top,bottom", [(1.5, 0.2), (40.0, 0.13), (1.6, 0.005)])
def test_a_log_axis_labels_the_decade_its_curves_reach_and_its_labels_never_crowd(tmp_path, top, bottom):
    """Self-duality from 1.5 to 0.2 was labelled at 0.2, 0.5 and 1 only, the curve's top 20% of the axis above
    its last label; NC1 from 40 down, at 1-2-5 from 0.1 to 20, labels touching, on the 7-inch panel."""
    values = np.geomspace(top, bottom, len(NC_ROWS)).tolist()
    run = set_columns(write_run(tmp_path / "run"), self_duality=values, nc1=values)
    fig = plotting.panel_figure([run])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[3:5]:  # Figures 5 and 6
        texts = labelled_ticks(ax)
        low, high = ax.get_ylim()
        highest = max(float(text.get_text()) for text in texts)
        assert len(texts) >= 2 and np.log(top / highest) <= plotting.END_GAP * np.log(high / low), ax.get_title()
        boxes = sorted((text.get_window_extent(renderer) for text in texts), key=lambda box: box.y0)
        assert all(upper.y0 - lower.y1 >= 0.5 * lower.height for lower, upper in zip(boxes, boxes[1:])), ax.get_title()
    plt.close(fig)


def test_runs_with_one_onset_each_show_their_colour_along_its_line(tmp_path):
    run_dirs = [write_run(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))]
    fig = plotting.panel_figure(run_dirs)
    onsets = [line for line in fig.axes[0].get_lines() if len(set(line.get_xdata())) == 1]
    assert [line.get_xdata()[0] for line in onsets] == [TPT_EPOCH] * 3
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in onsets}) == 3
    patterns = [line._unscaled_dash_pattern for line in onsets]  # (offset, (on, off)) as drawn
    offsets = {pattern[0] for pattern in patterns}
    on, off = patterns[0][1]
    assert len(offsets) == 3 and off >= 2 * on  # each dot of the three in turn
    plt.close(fig)


def test_cross_entropy_and_mse_losses_get_an_axis_each(tmp_path):
    ce, mse = write_run(tmp_path / "ce"), write_run(tmp_path / "mse", loss="mse", target_scale=1.0)
    fig = plotting.curves_figure([ce, mse])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["Loss (ce)", "Loss (mse)"]
    colours = [{matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()
                if len(set(line.get_xdata())) > 1} for ax in fig.axes[:2]]
    assert len(colours[0]) == len(colours[1]) == 1 and colours[0] != colours[1]
    plt.close(fig)
    fig = plotting.curves_figure([ce])
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy", "Calibration"]
    plt.close(fig)


def test_figure_7s_test_curve_is_drawn_over_its_training_curve_with_open_markers(tmp_path):
    run = set_columns(write_run(tmp_path / "run"), ncc_mismatch_test=[0.40, 0.25, 0.05, 0.01, 0.0])  # = training
    fig = dict(plotting.nc_figures([run]))["fig7_ncc_mismatch.png"]
    curves = {line.get_linestyle(): line for line in fig.axes[0].get_lines() if len(set(line.get_xdata())) > 1}
    train, test = curves["-"], curves["-."]
    assert list(train.get_ydata()) == list(test.get_ydata())
    assert test.get_zorder() > train.get_zorder() and test.get_markerfacecolor() == "none"
    assert test.get_markersize() > train.get_markersize()
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert "test set (NCC mismatch: the training class means)" in legend
    plt.close(fig)


def test_the_panels_legend_names_the_test_curve_it_has(tmp_path):
    """Figures 2-6 have test curves only when measured with --test-collapse."""
    run = write_run(tmp_path / "run")
    fig = plotting.panel_figure([run])
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    plt.close(fig)
    assert [text for text in legend if text.startswith("test set")] == [
        "test set (NCC mismatch: the training class means)"]
    set_columns(run, nc1_test=[3.0, 1.0, 0.5, 0.3, 0.2])
    fig = plotting.panel_figure([run])
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    plt.close(fig)
    assert [text for text in legend if text.startswith("test set")] == [
        "test set (its own class means)", "test set (NCC mismatch: the training class means)"]


def test_figure_9s_labels_hold_formulas_and_the_etf_value_is_in_the_legend(tmp_path):
    from test_plotting import with_other_measures
    fig = plotting.other_measures_figure(plotting._load_lines([with_other_measures(write_run(tmp_path / "run"))],
                                                              plotting.NC_TABLE, [], {}))
    assert all("\n" not in ax.get_ylabel() and "grey" not in ax.get_ylabel() for ax in fig.axes)
    assert r"simplex ETF's energy $\sqrt{(C-1)/(2C)}$" in [text.get_text() for text in fig.legends[0].get_texts()]
    plt.close(fig)


def test_the_row_norm_panel_labels_each_class_size_and_keeps_its_points_off_the_frame(tmp_path):
    counts = [100, 100, 10, 10]
    run = write_run(tmp_path / "run", imbalance=10.0, class_counts=counts)
    set_columns(run, minority_cosine=[0.3, 0.2, 0.1, 0.0, -0.1], majority_cosine=[0.2, 0.1, 0.0, -0.2, -0.3],
                **{f"weight_norm_{c}": [1.0 + c] * len(NC_ROWS) for c in range(4)})
    fig = plotting.minority_figure([run])
    fig.canvas.draw()
    ax = fig.axes[2]
    low, high = ax.get_xlim()
    assert low < min(counts) and high > max(counts)
    ticks = [tick for tick in ax.xaxis.get_major_ticks() if low <= tick.get_loc() <= high]
    assert sorted(tick.get_loc() for tick in ticks) == [10, 100]
    assert all(tick.label1.get_text() for tick in ticks) and not ax.xaxis.get_minorticklocs().size
    plt.close(fig)
