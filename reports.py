"""The science read from a run's tables, without drawing: the paper's Table 1 (the TPT onset, the test accuracy
there and at the last epoch) as Markdown, CSV and LaTeX, and the labels that tell runs apart, the same in every
figure (plotting.py) and table. Printing a table imports no plotting library.
"""
import sys
from pathlib import Path

import numpy as np

import config
import datasets
import runs
from errors import UserError
from nc_metrics import OTHER_KEYS, tpt_row
from study_files import read_json

NC_TABLE = "nc_metrics.csv"
# The files validate_nc.py writes into a run's plots folder, as far as its nc_metrics.csv calls for them.
NC_FIGURE_FILES = ("fig2_equinorm.png", "fig3_equiangularity.png", "fig4_max_equiangularity.png",
                   "fig5_self_duality.png", "fig6_nc1.png", "fig7_ncc_mismatch.png")
ROBUSTNESS_FILE, OTHER_FILE = "fig8_adversarial_robustness.png", "fig9_other_measures.png"
PANEL_FILE, CURVES_FILE, LAYERS_FILE, MINORITY_FILE = ("panel.png", "training_curves.png", "layerwise_nc1.png",
                                                       "minority_collapse.png")
TPT_TABLE = "tpt_table.md"
# The paper's Table 1, per run. A grouped table has instead of `run_dir` the grouping keys and the
# counts of its runs, and each of TABLE1_STATS as its mean, minimum and maximum over them (<stat>_mean ...).
TABLE1_COLUMNS = ["dataset", "model", "tpt_epoch", "tpt_test_acc", "last_epoch", "last_test_acc", "change"]
TABLE1_STATS = TABLE1_COLUMNS[2:]
SPREAD = ("mean", "min", "max")
TABLE1_HEADERS = {"run_dir": "run", "label": "run",
                  "runs": "runs", "runs_tpt": "runs reaching the TPT", "dataset": "dataset",
                  "model": "network", "tpt_epoch": "TPT onset epoch", "tpt_test_acc": "test accuracy at the TPT onset",
                  "last_epoch": "last epoch", "last_test_acc": "test accuracy at the last epoch",
                  "change": "change (points)"}
TABLE1_NOTE = ("TPT onset: the first measured checkpoint whose clean training set is classified without error "
               "(eval mode). Change: the test accuracy at the last epoch minus that at the onset, in percentage "
               "points.")
GROUPED_NOTE = " A group's cell: the mean over its runs [minimum, maximum]; the onset's over the runs that reach it."
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a CSV cell as a formula
# How run_labels holds milestones that are the default of the run's length: a value, but never named.
_DEFAULT_MILESTONES = "default milestones"
_LATEX_ESCAPES = {"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def done(folder: runs.RunFolder, layers: bool = False, test_collapse: bool = False,
         adversarial: bool = False) -> bool:
    """Whether validate_nc.py has nothing left to do for a trained run: every analysis checkpoint on disk has
    its row in nc_metrics.csv with the measurements asked for (`lacks_measurements`), and summary.json, the
    figures its table calls for (`figure_files`) and the TPT table are where validate_nc.py writes them. A
    summary.json that is not a run's summary is a UserError."""
    rows = {row["epoch"]: row for row in folder.measured}
    checkpoints = [epoch for epoch, _ in folder.checkpoints()]
    measured = bool(checkpoints) and all(
        epoch in rows and not lacks_measurements(rows[epoch], folder.config, layers, test_collapse, adversarial)
        for epoch in checkpoints)
    return measured and _drawn(folder)


def lacks_measurements(row: dict, run_config: dict, layers: bool, test_collapse: bool, adversarial: bool) -> bool:
    """Whether a row of nc_metrics.csv lacks a measurement of validate_nc.py's --layers, --test-collapse or
    --adversarial that is asked for, or, of an imbalanced run (`run_config`'s imbalance above 1), its
    Minority Collapse columns, or the field's other measures (a row measured before they existed)."""
    present = {key for key, value in row.items() if value is not None}
    imbalanced = run_config.get("imbalance", 1.0) > 1
    return (not present.issuperset(OTHER_KEYS) or (test_collapse and "nc1_test" not in present)
            or (adversarial and "deepfool_robustness" not in present) or (layers and not runs.stage_columns([row]))
            or (imbalanced and "minority_cosine" not in present))


def figure_files(measured: list[dict], suffix: str = ".png") -> list[str]:
    """The files of the figures validate_nc.py draws (plotting.plot_run) for a run whose nc_metrics.csv holds
    the rows `measured`, in the format of `suffix`: Figures 2-7, the panel and the training curves always;
    Figure 8, Figure 9, the layer-wise figure and the Minority Collapse figure where their columns hold values."""
    names = list(NC_FIGURE_FILES)
    if any(row.get("deepfool_robustness") is not None for row in measured):
        names.append(ROBUSTNESS_FILE)
    if any(row.get("cdnv") is not None for row in measured):
        names.append(OTHER_FILE)
    names += [PANEL_FILE, CURVES_FILE] + ([LAYERS_FILE] if runs.stage_columns(measured) else [])
    if has_minority_columns(measured):
        names.append(MINORITY_FILE)
    return [Path(name).stem + suffix for name in names]


def has_minority_columns(measured: list[dict]) -> bool:
    """Whether a table holds Minority Collapse's measurements (an imbalanced run's)."""
    return any(row.get("minority_cosine") is not None for row in measured)


def table1(run_dirs: list[Path], group_by: list[str] = ()) -> list[dict]:
    """The paper's Table 1 from the runs' nc_metrics.csv, as rows of `table1_columns(group_by)` and a label
    each: per run its folder, its label (as figures name it), dataset and network, the TPT onset epoch and the
    test accuracy there (None if the run never reached it), the last measured epoch and the test accuracy
    there, the change (a fraction) and its best clean training accuracy. With `group_by`, one row per group of
    runs with equal values of those config.json keys: the values, the group's label, the counts `runs` and
    `runs_tpt`, and the mean, minimum and maximum of each of TABLE1_STATS over the group's runs (over those
    that reach the onset for the onset's columns; None where none does)."""
    folders = [runs.RunFolder(run_dir) for run_dir in run_dirs]
    rows = [_table1_row(folder) for folder in folders]
    configs = [folder.config for folder in folders]
    if not group_by:
        return [{**row, "label": label} for row, label in
                zip(rows, run_labels(configs, folder_names([folder.path for folder in folders])))]
    grouped = []
    for members in groups(configs, group_by):
        chosen = [rows[i] for i in members]
        row = {**{key: configs[members[0]].get(key) for key in group_by},
               "label": group_label(configs[members[0]], group_by, len(members)), "runs": len(chosen),
               "runs_tpt": sum(row["tpt_epoch"] is not None for row in chosen),
               "dataset": _distinct(row["dataset"] for row in chosen),
               "model": _distinct(row["model"] for row in chosen)}
        for stat in TABLE1_STATS:
            present = [row[stat] for row in chosen if row[stat] is not None]
            spread = (float(np.mean(present)), min(present), max(present)) if present else (None,) * len(SPREAD)
            row |= {f"{stat}_{part}": value for part, value in zip(SPREAD, spread)}
        grouped.append(row)
    return grouped


def table1_columns(group_by: list[str] = ()) -> list[str]:
    """The columns of `table1`'s rows, as its CSV has them."""
    if not group_by:
        return ["run_dir", *TABLE1_COLUMNS, "best_train_acc"]
    return [*group_by, "runs", "runs_tpt", "dataset", "model", *(f"{stat}_{part}" for stat in TABLE1_STATS
                                                                 for part in SPREAD)]


def table1_markdown(rows: list[dict], group_by: list[str] = (), run_column: bool = True) -> str:
    """`table1`'s rows as a Markdown table (accuracies in percent, a group's statistics as mean [minimum,
    maximum]) with a note on its terms, each run named by its label as the figures name it; `run_column` False
    leaves out the runs' names."""
    columns = ([*group_by, "runs", "runs_tpt"] if group_by else ["label"] * run_column) + TABLE1_COLUMNS
    header = [TABLE1_HEADERS.get(column) or config.LABELS.get(column) or column for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_table1_cell(column, row) for column in columns) + " |" for row in rows]
    return "\n".join([*lines, "", TABLE1_NOTE + (GROUPED_NOTE if group_by else "")]) + "\n"


def write_table1(rows: list[dict], out: Path, group_by: list[str] = ()) -> list[Path]:
    """`table1`'s rows as Markdown, CSV and LaTeX, at `out` with the suffixes .md, .csv and .tex; the paths
    written."""
    paths = [Path(out).with_suffix(suffix) for suffix in (".md", ".csv", ".tex")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(paths[0], table1_markdown(rows, group_by))
    columns = table1_columns(group_by)
    runs.write_csv(paths[1], [{key: _csv_value(row[key]) for key in columns} for row in rows], columns)
    runs.write_text(paths[2], table1_latex(rows, group_by))
    return paths


def table1_latex(rows: list[dict], group_by: list[str] = ()) -> str:
    r"""`table1`'s rows as a LaTeX tabular with booktabs' rules (\toprule, \midrule, \bottomrule), each row named
    by its label (the figures' name for the run or group), the other cells as `table1_markdown` has them, and
    the note on its terms as a comment above it; every text escaped for LaTeX."""
    columns = ["label", *(["runs", "runs_tpt"] if group_by else []), *TABLE1_COLUMNS]
    header = ["group" if group_by else "run", *(TABLE1_HEADERS[column] for column in columns[1:])]
    align = "l" + "".join("r" if column in TABLE1_STATS or column.startswith("runs") else "l"
                          for column in columns[1:])
    cells = [header] + [[row["label"] if column == "label" else _table1_cell(column, row) for column in columns]
                        for row in rows]
    body = [" & ".join(map(latex_text, line)) + r" \\" for line in cells]
    return "\n".join([f"% {TABLE1_NOTE}{GROUPED_NOTE if group_by else ''}", f"\\begin{{tabular}}{{{align}}}",
                      r"\toprule", body[0], r"\midrule", *body[1:], r"\bottomrule", r"\end{tabular}"]) + "\n"


def latex_text(text: str) -> str:
    r"""`text` as LaTeX prints it: its special characters (_ % & # $ { } ~ ^ \) escaped."""
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def tpt_table(run_dir: Path) -> str:
    """The paper's Table 1 for one run, as Markdown (what validate_nc.py writes to tpt_table.md)."""
    return table1_markdown(table1([run_dir]), run_column=False)


def run_labels(configs: list[dict], names: list[str]) -> list[str]:
    """A legend label per run: the user-facing settings that apply to it and whose values differ across
    `configs` (among the runs they apply to), in short form ("seed=1, spc=50"); cross-entropy against MSE
    reads "loss=ce" / "loss=mse", not "kappa=None" / "kappa=1". Learning-rate milestones that are the
    default of a run's length are not named. A run with nothing to name gets its folder name from `names`."""
    settings = [_applied_settings(run) for run in configs]
    differing = [key for key in config.LABELS if len({str(run[key]) for run in settings if key in run}) > 1]
    labels = [", ".join(config.setting_text(key, run[key]) for key in differing
                        if key in run and run[key] != _DEFAULT_MILESTONES) for run in settings]
    return [label or name for label, name in zip(labels, names)]


def groups(configs: list[dict], group_by: list[str]) -> list[list[int]]:
    """The indices of `configs` per group of equal values of the `group_by` keys, in order of appearance."""
    unknown = sorted(set(group_by) - {key for run in configs for key in run})
    if unknown:
        raise UserError(f"--group-by {' '.join(unknown)}: no such key in the runs' config.json; "
                        f"choose among {', '.join(config.LABELS)}")
    keys = [tuple(str(run.get(key)) for key in group_by) for run in configs]
    return [[i for i, key in enumerate(keys) if key == group] for group in dict.fromkeys(keys)]


def group_label(run: dict, group_by: list[str], count: int) -> str:
    """The label of a group of `count` runs (`run` one of them): its `group_name`, and how many runs it holds:
    "loss=ce (3 runs)"."""
    return f"{group_name(run, group_by)} ({count} run{'s' * (count > 1)})"


def group_name(run: dict, group_by: list[str]) -> str:
    """The `group_by` settings of a group's runs (`run` one of them) that apply to them ("loss=ce", not
    "loss=ce, kappa=None"): how --label names the group."""
    applied = _applied_settings(run)
    named = [_DEFAULT_MILESTONES if applied[key] == _DEFAULT_MILESTONES else config.setting_text(key, applied[key])
             for key in group_by if key in applied]
    return ", ".join(named) or ", ".join(f"no {config.LABELS.get(key) or key}" for key in group_by)


def folder_names(run_dirs: list[Path]) -> list[str]:
    """The runs' folder names or, where two folders share a name, the fewest last parts of their paths that
    tell them apart ("a/seed0", "b/seed0"): never a whole absolute path."""
    parts = [Path(run_dir).resolve().parts[1:] for run_dir in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(path[-depth:]) for path in parts]
        if len(set(names)) == len(names):
            return names
    return [Path(run_dir).resolve().name for run_dir in run_dirs]  # one folder given twice: nothing tells them apart


def dataset_label(name: str) -> str:
    """A dataset as figures and labels name it: a folder of one's own images by the folder's name, not its path."""
    return Path(name[len(datasets.FOLDER_PREFIX):]).name if datasets.is_folder(name) else name


def _applied_settings(run: dict) -> dict:
    """The user-facing settings (config.LABELS) of a run's config.json that apply to it: a setting
    its loss or optimizer does not use (None there: kappa under cross-entropy, the momentum of Adam) is
    left out, the whole training set (samples_per_class None) is "all", a folder dataset is its folder's
    name, and milestones that are the default of the run's length are _DEFAULT_MILESTONES."""
    applied = {}
    for key in config.LABELS:
        value = run.get(key)
        if key == "samples_per_class" and value is None:
            value = "all"
        elif key == "dataset" and value is not None:
            value = dataset_label(value)
        elif key == "lr_milestones" and value == config.default_milestones(run.get("epochs") or 0):
            value = _DEFAULT_MILESTONES
        if value is not None:
            applied[key] = value
    return applied


def _table1_row(folder: runs.RunFolder) -> dict:
    """One run's row of Table 1 (see `table1`), from the rows of its nc_metrics.csv whose accuracies are
    numbers: one holding NaN or Inf (written by hand, or by another program) is left out with a warning."""
    run_dir = folder.path
    measured = [row for row in folder.required(NC_TABLE) if _accuracies_finite(row, run_dir)]
    if not measured:
        raise UserError(f"{run_dir / NC_TABLE} has no row whose accuracies are numbers; measure the run again: "
                        f"python validate_nc.py --run-dir {run_dir} --recompute")
    settings = folder.config
    onset, last = tpt_row(measured), measured[-1]
    return {"run_dir": str(run_dir), "dataset": settings.get("dataset"), "model": settings.get("model"),
            "tpt_epoch": onset["epoch"] if onset else None, "tpt_test_acc": onset["test_acc"] if onset else None,
            "last_epoch": last["epoch"], "last_test_acc": last["test_acc"],
            "change": last["test_acc"] - onset["test_acc"]
            if onset and None not in (onset["test_acc"], last["test_acc"]) else None,
            "best_train_acc": max((row["train_acc"] for row in measured if row["train_acc"] is not None), default=None)}


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(str(value) for value in values))


def _table1_cell(column: str, row: dict) -> str:
    """A Markdown cell of Table 1: accuracies in percent, the change in percentage points, a group's
    statistic as its mean [minimum, maximum] (the range left out when they are equal)."""
    show = {"tpt_epoch": "{:g}".format, "last_epoch": "{:g}".format, "change": lambda value: f"{100 * value:+.2f}"}.get(
        column, _percent)
    if column in TABLE1_STATS and f"{column}_mean" in row:
        mean, low, high = (row[f"{column}_{part}"] for part in SPREAD)
        if mean is None:
            return "n/a"
        return show(round(mean, 1) if column.endswith("epoch") else mean) + (
            f" [{show(low)}, {show(high)}]" if low != high else "")
    value = row[column]
    if column == "tpt_epoch" and value is None:
        return f"not reached by epoch {row['last_epoch']} (best train accuracy {_percent(row['best_train_acc'])})"
    if value is None:
        return "n/a"
    if column in TABLE1_STATS:
        return show(value)
    if column == "label":
        return value.replace("|", r"\|")
    return f"{value:g}" if isinstance(value, float) else _setting_cell(value)


def _accuracies_finite(row: dict, run_dir: Path) -> bool:
    """Whether a row of nc_metrics.csv has numbers for its accuracies (or none, as a run without a test split
    has no test accuracy); if not, a warning says it is left out."""
    broken = [column for column in ("train_acc", "test_acc")
              if row[column] is not None and not np.isfinite(row[column])]
    if broken:
        print(f"warning: {run_dir / NC_TABLE}, epoch {row['epoch']}: {', '.join(broken)} is not a number; the row is "
              "left out of Table 1", file=sys.stderr)
    return not broken


def _setting_cell(value) -> str:
    """A setting as a Markdown cell: a list as "10,20", anything else as it prints."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _csv_value(value):
    """A value as a CSV cell: numbers (negative ones included) and None as they are; text, a list as "10,20",
    behind a quote that keeps it text if a spreadsheet would run it as a formula (one beginning with =, +,
    -, @, a tab or a carriage return: a run folder named "=HYPERLINK(...)")."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = _setting_cell(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None or np.isnan(fraction) else f"{100 * fraction:.2f}%"


def _drawn(folder: runs.RunFolder) -> bool:
    """Whether the run's summary.json, its figures and its TPT table are where validate_nc.py writes them."""
    path = folder.path / "summary.json"
    summary = read_json(path)
    if summary is None:
        return False
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a run's summary (a JSON object); delete it, and the study's validate_nc.py "
                        "writes it again")
    if "dataset" not in folder.config:
        return False
    plots_dir = folder.plots_dir
    return all((plots_dir / name).is_file() for name in [*figure_files(folder.measured), TPT_TABLE])
