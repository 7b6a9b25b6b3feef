"""A study's folder on disk: the names of its files, the runs its study.json lists, and reading them.

studies.py plans a study and writes these files; plotting.py reads them to draw a study (its tables in,
figures out), so it needs nothing of how a study runs.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import runs
from errors import UserError

STUDY_FILE, OUTCOMES_FILE, RUNS_TABLE, MARKDOWN_TABLE, LOCK = (
    "study.json", "outcomes.json", "runs.csv", "table.md", ".tables.lock")


# The scripts whose runs a study makes (studies.TRAINERS): train.py, and ufm.py (the unconstrained-features model).
SCRIPTS = ("train.py", "ufm.py")


@dataclass(frozen=True)
class Run:
    """One run of a study: its folder, its values of the study's varied settings, the arguments of its two
    commands (after the script's name: the trainer's and validate_nc.py's, none for ufm.py), the epochs (or
    ufm.py's steps) it is to reach, and its trainer, `script` (one of SCRIPTS)."""
    run_dir: str
    settings: dict
    train: list
    validate: list
    epochs: int
    script: str = "train.py"


def read_study(study_dir: Path) -> dict:
    """A study's study.json: its command line, grid, varied settings and runs."""
    study = read_study_file(Path(study_dir) / STUDY_FILE)
    if study is None:
        raise UserError(f"{study_dir} is not a study folder (no {STUDY_FILE}); make one with: python sweep.py "
                        "--name NAME ...")
    return study


def finished_runs(study_dir: Path) -> list[Path]:
    """The folders of a study's finished runs (for a learning-rate grid, those at the chosen rate only), as
    its runs.csv lists them: the table its jobs rewrite as each ends."""
    rows = runs.read_csv(Path(study_dir) / RUNS_TABLE)
    return [Path(row["run_dir"]) for row in rows if row.get("status") == "done" and row.get("selected") != "False"]


def read_study_file(path: Path) -> dict | None:
    """A study.json as sweep.py writes it, None if there is none; any other content is a UserError."""
    study = read_json(path)
    if study is None or _is_study(study):
        return study
    raise UserError(f"{path} is not a study.json written by sweep.py; restore it, or delete it and run the study's "
                    "sweep.py command again, which writes it anew")


def read_json(path: Path):
    """A JSON file's contents, None if it does not exist; an unreadable file is a UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is corrupt ({err}); restore or delete it") from None


def _is_study(study) -> bool:
    """Whether a study.json's contents have the shape sweep.py gives them."""
    fields = {field.name for field in dataclasses.fields(Run)}
    return (isinstance(study, dict) and isinstance(study.get("name"), str) and isinstance(study.get("grid"), dict)
            and all(isinstance(study.get(key), list) for key in ("argv", "varied", "runs"))
            and all(isinstance(word, str) for word in study["argv"] + study["varied"])
            # a study.json written before ufm.py's studies has no `script`: its runs are train.py's
            and all(isinstance(run, dict) and fields - {"script"} <= set(run) <= fields
                    and run.get("script", "train.py") in SCRIPTS and isinstance(run["run_dir"], str)
                    and isinstance(run["settings"], dict) and set(study["varied"]) <= set(run["settings"])
                    and isinstance(run["train"], list) and isinstance(run["validate"], list)
                    and isinstance(run["epochs"], int) for run in study["runs"]))
