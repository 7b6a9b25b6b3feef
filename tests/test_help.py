"""Each script's --help lists its flags in titled groups (which run, training, measurement, output, Slurm),
read back from the help text as a user reads it: every flag under the title it belongs to, none elsewhere."""
import importlib.util
import re
from pathlib import Path

import pytest

import measure_features
import sweep
import train
import ufm
import validate_nc

REPO = Path(__file__).resolve().parents[1]
# train.py's flags that select a run, in the order --help lists them.
SELECTION = ["--dataset", "--model", "--width", "--samples-per-class", "--imbalance", "--imbalance-profile", "--epochs",
             "--loss", "--optimizer", "--lr", "--momentum", "--weight-decay", "--batch-size", "--lr-milestones",
             "--lr-gamma", "--target-scale", "--label-smoothing", "--focal-gamma", "--augment", "--mixup-alpha",
             "--mixup-same-class", "--precision", "--seed", "--classifier", "--no-bias", "--classifier-weight-decay",
             "--image-size", "--test-samples", "--run-dir"]
TRAINING = ["--extend-to", "--num-checkpoints", "--eval-every", "--save-last", "--deterministic", "--compile",
            "--sync-bn"]
DATA = ["--data-root", "--download", "--device"]
MEASUREMENT = ["--layers", "--test-collapse", "--adversarial", "--adversarial-samples"]
# ufm.py's flags that select a run, and its others.
UFM_SELECTION = ["--classes", "--dim", "--per-class", "--loss", "--seed", "--imbalance", "--imbalance-profile",
                 "--optimizer", "--lr", "--batch-size", "--weight-decay-classifier", "--weight-decay-features",
                 "--weight-decay-bias", "--no-bias", "--target-scale", "--label-smoothing", "--focal-gamma",
                 "--mixup-alpha", "--mixup-same-class", "--steps", "--precision", "--run-dir"]
UFM_OTHER = ["--num-checkpoints", "--device"]
STUDY = ["--script", "--name", "--executor", "--parallel", "--dry-run"]
SLURM = ["--partition", "--gpus-per-job", "--cpus-per-job", "--time", "--max-parallel", "--sbatch"]
HELP = ["-h"]  # argparse's own group, "options", holds only --help


def test_train_py_groups_which_run_training_data_and_output(capsys, monkeypatch):
    assert sections(train.parse_args, capsys, monkeypatch) == {
        "options": HELP, "which run": SELECTION, "training": TRAINING, "data and device": DATA,
        "output and monitoring": ["--tensorboard"]}


def test_validate_nc_py_groups_the_run_it_selects_measurement_output_and_the_representation_figure(capsys,
                                                                                                    monkeypatch):
    groups = help_sections(help_text(validate_nc.parse_args, capsys, monkeypatch))
    assert flags(groups) == {
        "options": HELP, "which run": SELECTION,
        "measurement": ["--device", "--eval-batch-size", "--data-root", "--download", "--recompute", "--follow",
                        *MEASUREMENT],
        "output": ["--plots-dir", "--format", "--tensorboard"],
        "figure options": ["--title", "--label", "--size", "--font-size", "--dpi", "--style", "--number-figures"],
        "the Mixup representation figure": ["--representations", "--representation-epochs", "--classes",
                                            "--bn-mode"]}
    description, entries = groups["which run"]
    assert "selected by the flags train.py was given" in description
    assert all(text.startswith("selects the run: ") for text in entries.values())
    assert not any("selects the run" in text for title, (_, entries) in groups.items() if title != "which run"
                   for text in entries.values())


def test_sweep_py_groups_the_grid_training_measurement_the_study_and_slurm(capsys, monkeypatch):
    assert sections(sweep.parse_args, capsys, monkeypatch) == {
        "options": HELP, "which runs: the grid": [*SELECTION[:-1], "--lr-grid"],
        "training": [*TRAINING, *DATA, "--tensorboard"], "measurement": MEASUREMENT, "the study": STUDY,
        "Slurm": SLURM}


def test_ufm_py_groups_which_run_and_measurement(capsys, monkeypatch):
    assert sections(ufm.parse_args, capsys, monkeypatch) == {
        "options": HELP, "which run": UFM_SELECTION, "measurement and device": UFM_OTHER}


def test_sweep_py_with_script_ufm_py_makes_its_grid_of_ufm_py_s_flags_without_validate_nc_py_s(capsys, monkeypatch):
    groups = help_sections(help_text(lambda argv: sweep.parse_args(["--script", "ufm.py", *argv]), capsys, monkeypatch))
    assert flags(groups) == {"options": HELP, "which runs: the grid": UFM_SELECTION[:-1], "training": UFM_OTHER,
                             "the study": STUDY, "Slurm": SLURM}
    assert groups["which runs: the grid"][0].startswith("ufm.py's flags that select a run")


def test_measure_features_py_groups_its_input_and_output(capsys, monkeypatch):
    assert sections(measure_features.parse_args, capsys, monkeypatch) == {
        "options": HELP, "input": ["FILE", "--min-class-samples"], "output": ["--out"]}


def test_paper_scale_groups_preparation_the_run_precision_and_output(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_scale_script", REPO / "scripts" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sections(module.parse_args, capsys, monkeypatch) == {
        "options": HELP, "preparation": ["--prepare", "--source"],
        "the run": ["--tiny", "--resume", "--skip-check", "--data-root", "--seeds", "--epochs", "--num-checkpoints",
                    "-- FLAGS"],
        "precision and speed": ["--precision", "--compile", "--compile-grace"],
        "deadline and output": ["--deadline", "--results", "--out", "--runs-dir"]}


def sections(parse_args, capsys, monkeypatch) -> dict[str, list[str]]:
    return flags(help_sections(help_text(parse_args, capsys, monkeypatch)))


def help_text(parse_args, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: one width, whatever runs the tests
    with pytest.raises(SystemExit) as exit:
        parse_args(["--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def help_sections(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Each group of an argparse help text after the description: its title, with its description and the
    help of each entry by the entry's first flag ("--sync-bn, --no-sync-bn" is "--sync-bn"; a positional
    is its metavar). A group is its title line, then its description and a blank line if it has one, then
    its entries: each an indented invocation, with its help beside it or on the deeper-indented lines below."""
    text = text[re.search(r"^(options|optional arguments):$", text, re.MULTILINE).start():]
    groups = {}
    for title, body in re.findall(r"^(\S.*):\n((?:.*\S.*\n|\n(?= ))*)", text, re.MULTILINE):
        blocks = body.strip("\n").split("\n\n")
        description = " ".join(line.strip() for line in blocks[0].splitlines()) if len(blocks) == 2 else ""
        entries = {}
        for line in blocks[-1].splitlines():
            if re.match(r"  \S", line):
                invocation, _, text_beside = line[2:].partition("  ")
                name = invocation if invocation.startswith("-- ") else re.split(r"[ ,]", invocation)[0]
                entries[name] = text_beside.strip()
            else:
                entries[name] = f"{entries[name]} {line.strip()}".strip()
        groups[title] = (description, entries)
    return groups


def flags(groups: dict[str, tuple[str, dict[str, str]]]) -> dict[str, list[str]]:
    return {title: list(entries) for title, (_, entries) in groups.items()}
