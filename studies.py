"""Studies: one ordinary run of train.py and validate_nc.py for every combination of the values given.

A study is the product of the values given to the flags that select a run: `--loss ce mse --seed 0 1` is
four runs. Each run lives in the folder train.py itself chooses for its flags, so it is an ordinary run
(drawn, resumed and extended as any other), and its job is two subprocesses: `python train.py <flags>`,
then `python validate_nc.py --run-dir <its folder>` (with the study's measurement flags: --layers,
--test-collapse, --adversarial). A run that is done is never started again; a partial one resumes from its
last.pt, which train.py does by itself; one trained but not completely measured or drawn gets validate_nc.py
alone. A study of the unconstrained-features model (sweep.py --script ufm.py) takes ufm.py's selection flags
instead, and its job is `python ufm.py <flags>` alone, which measures as it runs: its run is done once its
final.pt is written, and started anew otherwise. A study's folder, studies/<name>/, holds:

    study.json      the grid as given (the command line) and expanded (every run's folder and commands)
    runs.csv        one row per run: its varied settings, status, folder, TPT onset, final numbers (an
                    imbalanced run's Minority Collapse columns too), reason
    table.md        the same, readable; for a learning-rate grid, the paper's choice of learning rate
    outcomes.json   how each run's last job ended (a run's folder shows whether it is done, not why it stopped)
    logs/<run>.log  the output of each job of that run, every attempt appended after a dated header line

A run's status is `done` when its folder holds all its job makes: log.csv reaches the requested epochs,
every analysis checkpoint on disk has its row in nc_metrics.csv with the measurements the study asks for,
and summary.json and every figure validate_nc.py draws are there. Otherwise it is `failed` when its last job
exited with an error (the reason is that job's last `error:` line), `busy` when another process held the
run's training lock (tried without waiting, so no log is read to decide it), and `pending`: not run yet,
partial, interrupted, requeued by Slurm, or stopped when its Slurm requeues ran out (the reason says so,
with the command that continues it). The tables are rebuilt from the run folders and outcomes.json under
the study's lock each time a job ends, and written atomically.
"""
import argparse
import datetime
import fcntl
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
from typing import Callable

import numpy as np

import config
import reports
import runs
import unconstrained
from errors import ArgumentParser, UserError
from nc_metrics import OTHER_KEYS, PAPER_KEYS, tpt_row
from study_files import LOCK, MARKDOWN_TABLE, OUTCOMES_FILE, RUNS_TABLE, STUDY_FILE, Run, read_json, read_study_file

REPO = Path(__file__).resolve().parent
TRAIN, VALIDATE, UFM = REPO / "train.py", REPO / "validate_nc.py", REPO / unconstrained.SCRIPT
STUDIES = Path("studies")
STATUSES = ("done", "failed", "busy", "pending")
MEASUREMENT_FLAGS = ("--layers", "--test-collapse", "--adversarial")  # validate_nc.py's, passed on by a study
FINAL_COLUMNS = ["tpt_epoch", "tpt_test_acc", "last_epoch", "last_test_acc", *PAPER_KEYS,
                 "ncc_mismatch_train", "ncc_mismatch_test", *OTHER_KEYS]
# A job's output goes to its log file, where the scripts print lines, not progress bars (progress.py).
JOB_ENVIRONMENT = {"PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Trainer:
    """A script whose runs a study makes: its file, the functions that add its flags (those that select a run,
    its other ones) and resolve them into a run's settings and folder, and the setting of a run's length."""
    path: Path
    add_selection: Callable[[config.FlagGroup], None]
    add_other: Callable[[config.FlagGroup], None]
    resolve: Callable[[argparse.Namespace], dict]
    run_dir: Callable[[dict, argparse.Namespace], Path]
    length: str


TRAINERS = {"train.py": Trainer(TRAIN, config.add_selection_arguments, config.add_training_arguments,
                                config.resolve_config, config.default_run_dir, "epochs"),
            unconstrained.SCRIPT: Trainer(UFM, unconstrained.add_selection_arguments, unconstrained.add_run_arguments,
                                          unconstrained.resolve_config, unconstrained.default_run_dir, "steps")}


@dataclass(frozen=True)
class Study:
    """A study as planned: its name and folder, the command line that describes it, and its runs."""
    name: str
    folder: Path
    argv: list
    grid: dict  # every selection setting given, with its values
    varied: list  # the settings given more than one value, in the order of train.py's flags
    runs: list


def add_study_arguments(grid: config.FlagGroup, training: config.FlagGroup, measurement: config.FlagGroup | None,
                        script: str = "train.py") -> None:
    """Into `grid`, the selection flags of `script` (train.py's, or ufm.py's), each taking one or more values
    (--run-dir excepted: every run gets the folder the script chooses; boolean flags and --lr-milestones take
    their one value) and, for train.py, --lr-grid; into `training`, the script's other flags, which every run
    receives unchanged; for train.py, into `measurement`, validate_nc.py's measurement flags, which every
    run's validate_nc.py receives."""
    trainer = TRAINERS[script]
    trainer.add_selection(_Flags(grid, several=True))
    trainer.add_other(training)
    if script == "train.py":
        grid.add_argument("--lr-grid", action="store_true", help="instead of --lr, the paper's 25 learning rates, "
                          "log-spaced on [1e-4, 0.25]; table.md then picks the best per group, as the paper did")
        config.add_measurement_arguments(measurement)


def plan(args: argparse.Namespace, name: str, argv: list[str]) -> Study:
    """Every run of the study that the parsed flags describe, each checked as train.py checks its own flags,
    so that a bad value or combination is refused before anything runs. `args.script` (default train.py) names
    the trainer whose flags they are."""
    trainer = TRAINERS[getattr(args, "script", "train.py")]
    parser, selection, training = _trainer_parser(trainer)
    grid = {dest: _values(getattr(args, dest), action) for dest, action in selection.items()}
    if getattr(args, "lr_grid", False):
        if args.lr is not None:
            raise UserError("give --lr or --lr-grid, not both")
        grid["lr"] = lr_grid()
    varied = [dest for dest, values in grid.items() if len(values) > 1]
    # --download is sweep.py's, done once before any job starts; the jobs only read the data.
    fixed = {dest: getattr(args, dest) for dest in training} | ({"download": False} if "download" in training else {})
    measure = [flag for flag in MEASUREMENT_FLAGS if getattr(args, flag[2:].replace("-", "_"), False)]
    if getattr(args, "adversarial", False):
        measure += ["--adversarial-samples", str(args.adversarial_samples)]
    planned: dict[str, Run] = {}
    for values in itertools.product(*grid.values()):
        run = _run(parser, {**selection, **training}, {**dict(zip(grid, values)), **fixed}, varied, measure, trainer)
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
    """What the run's folder holds: `new` (no last.pt yet), `partial` (log.csv short of the run's epochs),
    `trained` (trained, but a checkpoint or a measurement the study asks for is not in nc_metrics.csv, or
    summary.json or a figure is missing: validate_nc.py alone completes it) or `done`. A summary.json that
    is not a run's summary is a UserError. A run of ufm.py is `done` or `new`: it measures as it runs, and
    starts anew where it did not finish."""
    run_dir = Path(run.run_dir)
    if run.script == unconstrained.SCRIPT:
        return "done" if unconstrained.finished(run_dir, run.epochs) else "new"
    if not (run_dir / "last.pt").exists():
        return "new"
    log = runs.read_log(run_dir)
    if not log or log[-1]["epoch"] != run.epochs:
        return "partial"
    asked = [flag in run.validate for flag in MEASUREMENT_FLAGS]
    return "done" if reports.done(runs.RunFolder(run_dir), *asked) else "trained"


def check(study: Study) -> None:
    """Refuse, in one line, a study folder that holds a study this one does not grow (see `_growth_conflict`),
    or a study.json or outcomes.json that sweep.py did not write; reads only."""
    old = read_study_file(study.folder / STUDY_FILE)
    conflict = _growth_conflict(old, study) if old is not None else ""
    if conflict:
        raise UserError(f"{study.folder} holds another study: {conflict}. Repeat the command that made it, adding "
                        f"values to grow it (python sweep.py {shlex.join(old['argv'])}), or choose another --name "
                        "(the runs done already are found in their folders and skipped)")
    _read_outcomes(study.folder)


def start(study: Study) -> None:
    """Create the study's folder with its study.json and tables, after `check`ing what the folder holds: a
    study folder belongs to one study, which may grow (study.json then lists the grown grid's runs; the runs
    it held, their folders, logs and outcomes stay as they are)."""
    check(study)
    study.folder.mkdir(parents=True, exist_ok=True)
    study_json = {"name": study.name, "argv": study.argv, "grid": study.grid, "varied": study.varied,
                  "runs": [asdict(run) for run in study.runs]}
    runs.write_text(study.folder / STUDY_FILE, json.dumps(study_json, indent=2) + "\n")
    refresh_tables(study.folder)


def commands(run: Run, state: str = "new") -> list[list[str]]:
    """The commands of a run's job in `state`, as the job starts them: train.py, then validate_nc.py; for a
    run trained already, validate_nc.py alone; ufm.py alone for a run of the unconstrained-features model."""
    trainer = [sys.executable, str(TRAINERS[run.script].path), *run.train]
    if run.script == unconstrained.SCRIPT:
        return [trainer]
    validate = [sys.executable, str(VALIDATE), *run.validate]
    return [validate] if state == "trained" else [trainer, validate]


@dataclass(frozen=True)
class Job:
    """A study's job for one run: train.py, then (if it succeeded) validate_nc.py, as subprocesses of this
    Python, their output appended to the run's log; then the outcome is recorded and the tables rewritten.
    A run found done already is left as it is; one found trained gets validate_nc.py alone. With
    `threads`, each subprocess gets that many OpenMP/MKL threads (OMP_NUM_THREADS and MKL_NUM_THREADS,
    which torch reads when it starts). Picklable: slurm.SlurmJob sends it to a cluster."""
    study_dir: str
    threads: int | None = None

    def __call__(self, run: Run) -> dict:
        began = time.perf_counter()
        state = run_state(run)
        if state == "done":  # e.g. submitted twice: the other job finished it
            print(f"skipped  {run.run_dir} (done)", flush=True)
            return {"run_dir": run.run_dir, "status": "done", "reason": "", "seconds": 0.0}
        print(f"start    {run.run_dir}", flush=True)
        log_path = Path(self.study_dir) / "logs" / f"{Path(run.run_dir).name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a+") as log:
            _new_line(log)
            log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')}: job of process {os.getpid()} "
                      f"on {socket.gethostname()}\n")
            outcome = self.steps(run, state, log, began)
        return self.end(run, outcome or {"status": "done", "reason": ""}, began)

    def steps(self, run: Run, state: str, log, began: float) -> dict | None:
        """The job's commands (see `_steps`); slurm.SlurmJob adds what happens when Slurm stops them."""
        return _steps(run, state, log, self._environment())

    def end(self, run: Run, outcome: dict, began: float) -> dict:
        """Record the job's outcome, rewrite the tables and say how it ended."""
        outcome = {**outcome, "seconds": round(time.perf_counter() - began, 1)}
        record(Path(self.study_dir), run.run_dir, outcome)
        reason = f": {outcome['reason']}" if outcome["reason"] else ""
        print(f"{outcome['status']:<8} {run.run_dir} in {outcome['seconds']:.1f} s{reason}", flush=True)
        return {"run_dir": run.run_dir, **outcome}

    def _environment(self) -> dict[str, str]:
        environment = {**JOB_ENVIRONMENT, **os.environ}
        if self.threads is not None:
            environment |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return environment


def record(study_dir: Path, run_dir: str, outcome: dict) -> None:
    """Keep how a run's job ended and rewrite the study's tables, under the study's lock: jobs of one study
    end at once in threads, in several sweeps, or on several machines of a cluster."""
    with runs.locked(Path(study_dir) / LOCK):
        outcomes = _read_outcomes(Path(study_dir))
        outcomes[run_dir] = outcome
        runs.write_text(Path(study_dir) / OUTCOMES_FILE, json.dumps(outcomes, indent=2) + "\n")
        _write_tables(Path(study_dir), outcomes)


def refresh_tables(study_dir: Path) -> list[dict]:
    """Rewrite runs.csv and table.md from the run folders as they are now; return the rows."""
    with runs.locked(Path(study_dir) / LOCK):
        return _write_tables(Path(study_dir), _read_outcomes(Path(study_dir)))


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


def _growth_conflict(old: dict, study: Study) -> str:
    """Why `study` is not the study in `old` (a study.json), grown or repeated: it runs another script, leaves
    out one of its runs, or gives one of its runs other commands (other fixed flags: training or measurement
    flags, the device); "" if it is. Its values may come in another order, and settings fixed in `old` may
    vary."""
    script = old["runs"][0].get("script", "train.py") if old["runs"] else study.runs[0].script
    if script != study.runs[0].script:
        return f"its runs are {script}'s and this command's {study.runs[0].script}'s (--script)"
    planned = {run.run_dir: run for run in study.runs}
    left_out = [run["run_dir"] for run in old["runs"] if run["run_dir"] not in planned]
    if left_out:
        return (f"this command leaves out {len(left_out)} of its {len(old['runs'])} runs ({left_out[0]}"
                f"{', ...' if len(left_out) > 1 else ''}), and a study grows but does not shrink")
    for run in old["runs"]:
        for command, before, now in ((script, run["train"], planned[run["run_dir"]].train),
                                     ("validate_nc.py", run["validate"], planned[run["run_dir"]].validate)):
            there, here = _flag_words(before), _flag_words(now)
            if sorted(there) != sorted(here):
                return (f"for its run {run['run_dir']}, {command} gets {_words(there, here)} in it and "
                        f"{_words(here, there)} in this command")
    return ""


def _flag_words(argv: list[str]) -> list[str]:
    """A command's arguments as one string per flag with its values: ["--seed 1", "--deterministic"]."""
    words: list[str] = []
    for word in argv:
        if word.startswith("--") or not words:
            words.append(word)
        else:
            words[-1] += f" {word}"
    return words


def _words(mine: list[str], theirs: list[str]) -> str:
    """The flags of `mine` (with their values) that `theirs` lacks, or "no other flag"."""
    return " ".join(word for word in mine if word not in theirs) or "no other flag"


class _Flags:
    """Stands in for a parser (or one of its groups) while config's add_*_arguments add their flags: keeps
    each flag's action by its dest and, with `several`, lets each flag of one value take one or more (a
    study's values)."""

    def __init__(self, parser: config.FlagGroup, several: bool = False):
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


def _trainer_parser(trainer: Trainer) -> tuple[argparse.ArgumentParser, dict[str, argparse.Action],
                                                dict[str, argparse.Action]]:
    """A parser of the trainer's command line, built by the two functions the script builds its own with, and
    the actions of its selection flags (without --run-dir) and of its other flags, by dest."""
    parser = ArgumentParser(None)
    selection, training = _Flags(parser), _Flags(parser)
    trainer.add_selection(selection)
    trainer.add_other(training)
    selection.actions.pop("run_dir")
    return parser, selection.actions, training.actions


def _values(value, action: argparse.Action) -> list:
    """A selection flag's values in the study: the list given to a flag of one value, else its one value."""
    several = action.nargs is None and value is not None
    return list(value) if several else [value]


def _run(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action], values: dict,
         varied: list[str], measure: list[str], trainer: Trainer = TRAINERS["train.py"]) -> Run:
    """The run of one combination: the trainer's arguments for it, and the folder it will choose for them,
    found by parsing and resolving those arguments exactly as the trainer does. A setting the run does
    not use (--focal-gamma with ce, --momentum with adam) is left out of its command: `--loss ce focal
    --focal-gamma 1 3` is one ce run and two focal runs. Its validate_nc.py gets the folder, the device and
    the study's measurement flags, `measure`."""
    argv = []
    for dest, value in values.items():
        if value != parser.get_default(dest):
            argv += _flag(actions[dest], value)
    args = parser.parse_args(argv)
    settings = trainer.resolve(args)
    unused = [dest for dest, value in values.items()
              if value is not None and dest in settings and settings[dest] is None]
    if unused:
        return _run(parser, actions, {**values, **dict.fromkeys(unused)}, varied, measure, trainer)
    run_dir = str(trainer.run_dir(settings, args))
    length = getattr(args, "extend_to", None) or settings[trainer.length]
    if trainer.path.name == unconstrained.SCRIPT:  # which measures its runs itself: no validate_nc.py
        return Run(run_dir, {key: values[key] for key in varied}, argv, [], length, unconstrained.SCRIPT)
    device = ["--device", args.device] if args.device != parser.get_default("device") else []
    return Run(run_dir, {key: values[key] for key in varied}, argv, ["--run-dir", run_dir, *device, *measure], length)


def _flag(action: argparse.Action, value) -> list[str]:
    """The command-line words that give `value` to `action`'s flag (floats written to be read back exactly)."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag.removeprefix("--")]
    if action.nargs == 0:
        return [flag]
    return [flag, *(repr(item) if isinstance(item, float) else str(item)
                    for item in (value if isinstance(value, list) else [value]))]


def _steps(run: Run, state: str, log, environment: dict[str, str]) -> dict | None:
    """Run the job's commands one after the other, their output appended to `log`; None if they all
    succeeded, else the outcome of the one that did not. A run whose training lock another process holds,
    before train.py starts or when train.py is refused, is busy: decided by the lock, not by the log, which
    another process may be writing into too."""
    run_dir = Path(run.run_dir)
    for command in commands(run, state):
        training, script = command[1] != str(VALIDATE), Path(command[1]).name
        held, before = _training_lock(run_dir) if training else (False, "")
        if held:
            return _busy(run_dir, before)
        _new_line(log)
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        start = os.fstat(log.fileno()).st_size
        code, pid = _step(command, log, environment)
        if code == 0:
            continue
        if code < 0 or code == 130:
            stopped = signal.Signals(-code).name if code < 0 else "SIGINT"
            return {"status": "pending", "reason": f"{script} was stopped ({stopped}); run the study again to continue"}
        if training and code == 2:
            held, after = _training_lock(run_dir)
            if held or (after != before and f"process {pid} " not in after):  # or taken and let go meanwhile
                return _busy(run_dir, after)
        return {"status": "failed", "reason": _reason(Path(log.name), start, f"{script} exited with status {code}")}
    return None


def _step(command: list[str], log, environment: dict[str, str]) -> tuple[int, int]:
    """Run one command with its output appended to `log`: its exit status and process id. Whatever stops
    this process meanwhile (Ctrl-C, submitit's requeue) stops the command too."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        return process.wait(), process.pid
    except BaseException:
        process.kill()
        process.wait()
        raise


def _new_line(log) -> None:
    """End the log's last line if it is open (a progress bar stopped mid-line), so the next line begins a line."""
    log.flush()
    size = os.fstat(log.fileno()).st_size
    if size and os.pread(log.fileno(), 1, size - 1) != b"\n":
        log.write("\n")


def _training_lock(run_dir: Path) -> tuple[bool, str]:
    """Whether another process holds the run folder's training lock (tried without waiting and let go at
    once), and what the lock file says: train.py's "process N on HOST" of its holder, or of its last one."""
    try:
        handle = os.open(run_dir / runs.TRAIN_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False, ""  # none: never trained here (a symlink train.py refuses by itself)
    with os.fdopen(handle) as lock:
        text = lock.read().strip()
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, text
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False, text


def _busy(run_dir: Path, holder: str) -> dict:
    return {"status": "busy", "reason": f"{run_dir} is being trained by {holder or 'another process'}; run the "
                                        "study again once it is done"}


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
    """runs.csv and table.md of the study, from its study.json, the run folders and the recorded outcomes;
    the columns of further measurements (validate_nc.py --layers, --test-collapse, --adversarial) after the
    usual ones."""
    study = read_study_file(study_dir / STUDY_FILE)
    varied = study["varied"]
    # ufm.py's runs have no test split: no test columns, and no learning rate chosen by test error
    tested = all(run.get("script", "train.py") == "train.py" for run in study["runs"])
    untested = set() if tested else {column for column in FINAL_COLUMNS if "test" in column}
    rows = [{key: value for key, value in _row(Run(**run), varied, outcomes.get(run["run_dir"])).items()
             if key not in untested} for run in study["runs"]]
    columns = [*varied, "status", "run_dir", *(column for column in FINAL_COLUMNS if column not in untested)]
    columns += list(dict.fromkeys(key for row in rows for key in row if key not in {*columns, "reason"}))
    choices = []
    if "lr" in varied and tested:
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
    """A run's row: its varied settings, status and folder; the TPT onset and the last checkpoint's numbers
    (those of further measurements too) when it is done, else the reason its last job gave."""
    row = {**{key: run.settings[key] for key in varied}, "run_dir": run.run_dir}
    if run_state(run) != "done":
        status = outcome["status"] if outcome and outcome["status"] in ("failed", "busy") else "pending"
        return {**row, "status": status, "reason": outcome["reason"] if outcome else ""}
    measured = runs.read_nc_metrics(Path(run.run_dir))
    onset, last = tpt_row(measured), measured[-1]
    return {**row, "status": "done", "tpt_epoch": onset and onset["epoch"], "tpt_test_acc": onset and onset["test_acc"],
            "last_epoch": last["epoch"], "last_test_acc": last["test_acc"],
            **{key: last.get(key) for key in FINAL_COLUMNS[4:]},
            **{key: value for key, value in last.items()
               if key not in runs.NC_COLUMNS and not key.startswith("weight_norm_")}, "reason": ""}


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
    header = [config.LABELS.get(column) or column for column in columns]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(column, row.get(column)) for column in columns) + " |" for row in rows)]


def _cell(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column == "selected":
        return "**best lr**" if value else ""
    if column == "run_dir":
        return f"`{value}`"
    if column in ("tpt_test_acc", "last_test_acc", "test_error", "test_acc_minority", "test_acc_majority"):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _read_outcomes(study_dir: Path) -> dict:
    """A study's outcomes.json (how each run's last job ended), {} if there is none; any other content than
    sweep.py writes is a UserError."""
    path = Path(study_dir) / OUTCOMES_FILE
    outcomes = read_json(path)
    if outcomes is None:
        return {}
    if isinstance(outcomes, dict) and all(isinstance(outcome, dict) and isinstance(outcome.get("status"), str)
                                          and isinstance(outcome.get("reason"), str) for outcome in outcomes.values()):
        return outcomes
    raise UserError(f"{path} is not an outcomes.json written by sweep.py; delete it (it only records how each run's "
                    "last job ended) and run the study's sweep.py command again")
