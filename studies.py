"""Studies: one ordinary run of train.py and validate_nc.py for every combination of the values given.

A study is the product of the values given to the flags that select a run: `--loss ce mse --seed 0 1` is
four runs. Each run lives in the folder train.py itself chooses for its flags, so it is an ordinary run
(drawn, resumed and extended as any other), and its job is two subprocesses: `python train.py <flags>`,
then `python validate_nc.py --run-dir <its folder>`. A run that is done is never started again; a partial
one resumes from its last.pt, which train.py does by itself. A study's folder, studies/<name>/, holds:

    study.json      the grid as given (the command line) and expanded (every run's folder and commands)
    runs.csv        one row per run: its varied settings, status, folder, TPT onset, final numbers, reason
    table.md        the same, readable; for a learning-rate grid, the paper's choice of learning rate
    outcomes.json   how each run's last job ended (a run's folder shows whether it is done, not why it stopped)
    logs/<run>.log  the output of each job of that run, every attempt appended after a dated header line

A run's status is `done` when it has trained the requested epochs and every analysis checkpoint on disk
has its row in nc_metrics.csv; else `failed` when its last job exited with an error (the reason is that
job's last `error:` line), `busy` when another process was training it (train.py's lock refused the job),
and `pending` otherwise: not run yet, partial, or interrupted. The tables are rebuilt from the run folders
and outcomes.json under the study's lock each time a job ends, and written atomically.
"""
import argparse
import datetime
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import submitit

import config
import runs
from errors import ArgumentParser, UserError
from nc_metrics import OTHER_KEYS, PAPER_KEYS

REPO = Path(__file__).resolve().parent
TRAIN, VALIDATE = REPO / "train.py", REPO / "validate_nc.py"
STUDIES = Path("studies")
STUDY_FILE, OUTCOMES_FILE, RUNS_TABLE, MARKDOWN_TABLE, LOCK = (
    "study.json", "outcomes.json", "runs.csv", "table.md", ".tables.lock")
STATUSES = ("done", "failed", "busy", "pending")
BUSY_MESSAGE = "is being trained by"  # train.py's refusal when another process holds the run's lock
FINAL_COLUMNS = ["tpt_epoch", "tpt_test_acc", "last_epoch", "last_test_acc", *PAPER_KEYS,
                 "ncc_mismatch_train", "ncc_mismatch_test", *OTHER_KEYS]
# tqdm redraws its bars several times a second, which in a log file is megabytes per long run.
JOB_ENVIRONMENT = {"TQDM_MININTERVAL": "10", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Run:
    """One run of a study: its folder, its values of the study's varied settings, the arguments of its two
    commands (after the script's name) and the epochs it is to reach."""
    run_dir: str
    settings: dict
    train: list
    validate: list
    epochs: int


@dataclass(frozen=True)
class Study:
    """A study as planned: its name and folder, the command line that describes it, and its runs."""
    name: str
    folder: Path
    argv: list
    grid: dict  # every selection setting given, with its values
    varied: list  # the settings given more than one value, in the order of train.py's flags
    runs: list


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """train.py's selection flags, each taking one or more values (--run-dir excepted: every run gets the
    folder train.py chooses; boolean flags and --lr-milestones take their one value), --lr-grid, and
    train.py's other flags, which every run receives unchanged."""
    config.add_selection_arguments(_Flags(parser, several=True))
    parser.add_argument("--lr-grid", action="store_true", help="instead of --lr, the paper's 25 learning rates, "
                        "log-spaced on [1e-4, 0.25]; table.md then picks the best per group, as the paper did")
    config.add_training_arguments(parser)


def plan(args: argparse.Namespace, name: str, argv: list[str]) -> Study:
    """Every run of the study that the parsed flags describe, each checked as train.py checks its own flags,
    so that a bad value or combination is refused before anything runs."""
    parser, selection, training = _train_parser()
    grid = {dest: _values(getattr(args, dest), action) for dest, action in selection.items()}
    if args.lr_grid:
        if args.lr is not None:
            raise UserError("give --lr or --lr-grid, not both")
        grid["lr"] = lr_grid()
    varied = [dest for dest, values in grid.items() if len(values) > 1]
    # --download is sweep.py's, done once before any job starts; the jobs only read the data.
    fixed = {dest: getattr(args, dest) for dest in training} | {"download": False}
    planned: dict[str, Run] = {}
    for values in itertools.product(*grid.values()):
        run = _run(parser, {**selection, **training}, {**dict(zip(grid, values)), **fixed}, varied)
        earlier = planned.setdefault(run.run_dir, run)  # the same run twice (a value repeated) runs once
        if earlier.train != run.train:
            raise UserError(f"two runs of the grid would share the folder {run.run_dir}: {shlex.join(earlier.train)} "
                            f"and {shlex.join(run.train)}; give values that name different runs")
    given = {dest: values for dest, values in grid.items() if values != [None]}
    return Study(name, STUDIES / name, list(argv), given, varied, list(planned.values()))


def lr_grid() -> list[float]:
    """The paper's learning rates: numpy.logspace(log10(1e-4), log10(0.25), 25)."""
    return np.logspace(np.log10(1e-4), np.log10(0.25), 25).tolist()


def run_state(run: Run) -> str:
    """`new` (no last.pt yet), `done` (trained to its epochs, every analysis checkpoint measured) or `partial`."""
    run_dir = Path(run.run_dir)
    if not (run_dir / "last.pt").exists():
        return "new"
    return "done" if _finished(run_dir, run.epochs) else "partial"


def start(study: Study) -> None:
    """Create the study's folder with its study.json and tables, or check that the folder holds this grid's
    runs (a study folder belongs to one grid, as a run folder belongs to one run)."""
    path = study.folder / STUDY_FILE
    old = _read_json(path)
    if old is not None and [run["run_dir"] for run in old["runs"]] != [run.run_dir for run in study.runs]:
        raise UserError(f"{study.folder} holds another study ({len(old['runs'])} runs, made by: python sweep.py "
                        f"{shlex.join(old['argv'])}); choose another --name, or repeat that command")
    study.folder.mkdir(parents=True, exist_ok=True)
    study_json = {"name": study.name, "argv": study.argv, "grid": study.grid, "varied": study.varied,
                  "runs": [asdict(run) for run in study.runs]}
    runs.write_text(path, json.dumps(study_json, indent=2) + "\n")
    refresh_tables(study.folder)


def commands(run: Run) -> list[list[str]]:
    """The two commands of a run's job, as the job starts them."""
    return [[sys.executable, str(TRAIN), *run.train], [sys.executable, str(VALIDATE), *run.validate]]


@dataclass(frozen=True)
class Job:
    """A study's job for one run: train.py, then (if it succeeded) validate_nc.py, as subprocesses of this
    Python, their output appended to the run's log; then the outcome is recorded and the tables rewritten.
    A run found done already is left as it is.

    Picklable, for submitit to send to a cluster, and a submitit checkpointable: when Slurm pre-empts the
    job or its time runs out, submitit requeues `checkpoint`'s submission, this job again, and train.py
    resumes the run from its last.pt. With `threads`, each subprocess gets that many OpenMP/MKL threads
    (OMP_NUM_THREADS and MKL_NUM_THREADS, which torch reads when it starts)."""
    study_dir: str
    threads: int | None = None

    def __call__(self, run: Run) -> dict:
        began = time.perf_counter()
        if run_state(run) == "done":  # e.g. submitted twice: the other job finished it
            print(f"skipped  {run.run_dir} (done)", flush=True)
            return {"run_dir": run.run_dir, "status": "done", "reason": "", "seconds": 0.0}
        print(f"start    {run.run_dir}", flush=True)
        log_path = Path(self.study_dir) / "logs" / f"{Path(run.run_dir).name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')}: job of process {os.getpid()} "
                      f"on {socket.gethostname()}\n")
            outcome = None
            for command in commands(run):
                outcome = _step(command, log, self._environment())
                if outcome is not None:
                    break
        outcome = {**(outcome or {"status": "done", "reason": ""}), "seconds": round(time.perf_counter() - began, 1)}
        record(Path(self.study_dir), run.run_dir, outcome)
        reason = f": {outcome['reason']}" if outcome["reason"] else ""
        print(f"{outcome['status']:<8} {run.run_dir} in {outcome['seconds']:.1f} s{reason}", flush=True)
        return {"run_dir": run.run_dir, **outcome}

    def checkpoint(self, run: Run) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues after a pre-emption or time-out: this same job, which resumes the run."""
        return submitit.helpers.DelayedSubmission(self, run)

    def _environment(self) -> dict[str, str]:
        environment = {**JOB_ENVIRONMENT, **os.environ}
        if self.threads is not None:
            environment |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return environment


def record(study_dir: Path, run_dir: str, outcome: dict) -> None:
    """Keep how a run's job ended and rewrite the study's tables, under the study's lock: jobs of one study
    end at once in threads, in several sweeps, or on several machines of a cluster."""
    with runs.locked(Path(study_dir) / LOCK):
        outcomes = _read_json(Path(study_dir) / OUTCOMES_FILE) or {}
        outcomes[run_dir] = outcome
        runs.write_text(Path(study_dir) / OUTCOMES_FILE, json.dumps(outcomes, indent=2) + "\n")
        _write_tables(Path(study_dir), outcomes)


def refresh_tables(study_dir: Path) -> list[dict]:
    """Rewrite runs.csv and table.md from the run folders as they are now; return the rows."""
    with runs.locked(Path(study_dir) / LOCK):
        return _write_tables(Path(study_dir), _read_json(Path(study_dir) / OUTCOMES_FILE) or {})


def read_study(study_dir: Path) -> dict:
    """A study's study.json: its command line, grid, varied settings and runs."""
    study = _read_json(Path(study_dir) / STUDY_FILE)
    if study is None:
        raise UserError(f"{study_dir} is not a study folder (no {STUDY_FILE}); make one with: python sweep.py "
                        "--name NAME ...")
    return study


def select_lr(rows: list[dict], varied: list[str]) -> list[dict]:
    """The paper's choice of learning rate: per group of runs equal in every varied setting but the learning
    rate and the seed, the learning rate whose runs have the lowest final test error (1 - last_test_acc)
    averaged over seeds. A learning rate competes once all its runs in the group are done, so a seed that
    diverged rules it out. One dict per group: its settings, `lr`, `test_error` and `runs`."""
    keys = [key for key in varied if key not in ("lr", "seed")]
    outcomes: dict[tuple, list] = {}
    for row in rows:
        outcomes.setdefault((tuple(row[key] for key in keys), row["lr"]), []).append(row)
    best: dict[tuple, dict] = {}
    for (group, lr), members in outcomes.items():
        if any(row["status"] != "done" for row in members):
            continue
        error = float(np.mean([1 - row["last_test_acc"] for row in members]))
        if group not in best or error < best[group]["test_error"]:
            best[group] = {**dict(zip(keys, group)), "lr": lr, "test_error": error, "runs": len(members)}
    return list(best.values())


class _Flags:
    """Stands in for a parser while config's add_*_arguments add their flags: keeps each flag's action by
    its dest and, with `several`, lets each flag of one value take one or more (a study's values)."""

    def __init__(self, parser: argparse.ArgumentParser, several: bool = False):
        self.parser, self.several, self.actions = parser, several, {}

    def add_argument(self, *flags: str, **options) -> argparse.Action | None:
        if self.several and "--run-dir" in flags:
            return None  # a study's runs live in the folders train.py chooses
        if self.several and _takes_one_value(options):
            default = options.get("default")
            options = {**options, "nargs": "+", "default": None if default is None else [default]}
        action = self.parser.add_argument(*flags, **options)
        self.actions[action.dest] = action
        return action


def _takes_one_value(options: dict) -> bool:
    return options.get("action") is None and "nargs" not in options


def _train_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action], dict[str, argparse.Action]]:
    """A parser of train.py's command line, built by the two functions train.py builds its own with, and
    the actions of its selection flags (without --run-dir) and of its other flags, by dest."""
    parser = ArgumentParser(None)
    selection, training = _Flags(parser), _Flags(parser)
    config.add_selection_arguments(selection)
    config.add_training_arguments(training)
    selection.actions.pop("run_dir")
    return parser, selection.actions, training.actions


def _values(value, action: argparse.Action) -> list:
    """A selection flag's values in the study: the list given to a flag of one value, else its one value."""
    several = action.nargs is None and value is not None
    return list(value) if several else [value]


def _run(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action], values: dict,
         varied: list[str]) -> Run:
    """The run of one combination: train.py's arguments for it, and the folder train.py will choose for
    them, found by parsing and resolving those arguments exactly as train.py does. A setting the run does
    not use (--focal-gamma with ce, --momentum with adam) is left out of its command: `--loss ce focal
    --focal-gamma 1 3` is one ce run and two focal runs."""
    argv = []
    for dest, value in values.items():
        if value != parser.get_default(dest):
            argv += _flag(actions[dest], value)
    args = parser.parse_args(argv)
    settings = config.resolve_config(args)
    unused = [dest for dest, value in values.items()
              if value is not None and dest in settings and settings[dest] is None]
    if unused:
        return _run(parser, actions, {**values, **dict.fromkeys(unused)}, varied)
    run_dir = str(config.default_run_dir(settings, args))
    device = ["--device", args.device] if args.device != parser.get_default("device") else []
    return Run(run_dir, {key: values[key] for key in varied}, argv, ["--run-dir", run_dir, *device],
               settings["epochs"])


def _flag(action: argparse.Action, value) -> list[str]:
    """The command-line words that give `value` to `action`'s flag (floats written to be read back exactly)."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag.removeprefix("--")]
    if action.nargs == 0:
        return [flag]
    return [flag, *(repr(item) if isinstance(item, float) else str(item)
                    for item in (value if isinstance(value, list) else [value]))]


def _finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run has trained `epochs` epochs and every analysis checkpoint on disk has been measured."""
    summary = _read_json(run_dir / "summary.json", quiet=True)
    if not summary or summary.get("epochs_done") != epochs:
        return False
    checkpoints = {epoch for epoch, _ in runs.checkpoint_files(run_dir)}
    return bool(checkpoints) and checkpoints <= {row["epoch"] for row in runs.read_nc_metrics(run_dir)}


def _step(command: list[str], log, environment: dict[str, str]) -> dict | None:
    """Run one command of a job with its output appended to `log`; None if it succeeded, else the job's
    outcome: busy (another process trains the run), pending (stopped by a signal or Ctrl-C: resumable) or
    failed, with the command's last `error:` line as the reason."""
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    start = os.fstat(log.fileno()).st_size
    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode
    if code == 0:
        return None
    script = Path(command[1]).name
    if code < 0 or code == 130:
        stopped = signal.Signals(-code).name if code < 0 else "SIGINT"
        return {"status": "pending", "reason": f"{script} was stopped ({stopped}); run the study again to continue"}
    reason = _reason(Path(log.name), start, f"{script} exited with status {code}")
    return {"status": "busy" if code == 2 and BUSY_MESSAGE in reason else "failed", "reason": reason}


def _reason(path: Path, start: int, exit_status: str) -> str:
    """Why a command failed, from what it wrote to `path` after byte `start`: its last `error: ` line (the
    scripts' one-line message), else its exit status and last line (the end of a traceback)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]  # also splits \r
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    last = next((line for line in reversed(lines) if line), "")
    return f"{exit_status}: {last}" if last else exit_status


def _write_tables(study_dir: Path, outcomes: dict) -> list[dict]:
    """runs.csv and table.md of the study, from its study.json, the run folders and the recorded outcomes."""
    study = _read_json(study_dir / STUDY_FILE)
    varied = study["varied"]
    rows = [_row(Run(**run), varied, outcomes.get(run["run_dir"])) for run in study["runs"]]
    columns = [*varied, "status", "run_dir", *FINAL_COLUMNS]
    choices = []
    if "lr" in varied:
        choices = select_lr(rows, varied)
        chosen = {tuple(choice[key] for key in varied if key != "seed") for choice in choices}
        for row in rows:
            row["selected"] = tuple(row[key] for key in varied if key != "seed") in chosen
        columns.append("selected")
    columns.append("reason")
    runs.write_csv(study_dir / RUNS_TABLE, rows, columns)
    runs.write_text(study_dir / MARKDOWN_TABLE, _markdown(study, rows, columns, choices))
    return rows


def _row(run: Run, varied: list[str], outcome: dict | None) -> dict:
    """A run's row: its varied settings, status and folder; the TPT onset and last checkpoint's numbers
    when it is done, else the reason its last job gave."""
    row = {**{key: run.settings[key] for key in varied}, "run_dir": run.run_dir}
    if run_state(run) != "done":
        status = outcome["status"] if outcome and outcome["status"] in ("failed", "busy") else "pending"
        return {**row, "status": status, "reason": outcome["reason"] if outcome else ""}
    measured = runs.read_nc_metrics(Path(run.run_dir))
    onset, last = runs.tpt_row(measured), measured[-1]
    return {**row, "status": "done", "tpt_epoch": onset and onset["epoch"], "tpt_test_acc": onset and onset["test_acc"],
            "last_epoch": last["epoch"], "last_test_acc": last["test_acc"],
            **{key: last.get(key) for key in FINAL_COLUMNS[4:]}, "reason": ""}


def _markdown(study: dict, rows: list[dict], columns: list[str], choices: list[dict]) -> str:
    """table.md: the command, the count of each status, every run's row, and the learning-rate choice."""
    counts = ", ".join(f"{sum(row['status'] == status for row in rows)} {status}" for status in STATUSES)
    lines = [f"# Study {study['name']}", "", f"`python sweep.py {shlex.join(study['argv'])}`", "",
             f"{len(rows)} runs: {counts}.", "", *_markdown_table(columns, rows)]
    if choices:
        keys = [key for key in study["varied"] if key not in ("lr", "seed")]
        lines += ["", "## Learning rate, chosen as in the paper", "",
                  "Per group of the other varied settings, the learning rate with the lowest final test error "
                  "(mean over seeds; a learning rate competes once all its runs are done).", "",
                  *_markdown_table([*keys, "lr", "test_error", "runs"], choices)]
    return "\n".join(lines) + "\n"


def _markdown_table(columns: list[str], rows: list[dict]) -> list[str]:
    header = [config.SETTING_NAMES.get(column) or column for column in columns]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(column, row.get(column)) for column in columns) + " |" for row in rows)]


def _cell(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column == "selected":
        return "**best lr**" if value else ""
    if column == "run_dir":
        return f"`{value}`"
    if column in ("tpt_test_acc", "last_test_acc", "test_error"):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _read_json(path: Path, quiet: bool = False) -> dict | None:
    """A JSON file's contents, None if it does not exist (or, `quiet`, cannot be read: a run folder's
    summary.json being rewritten counts as not done); otherwise an unreadable file is a UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if quiet:
            return None
        raise UserError(f"{path} is corrupt ({err}); restore or delete it") from None
