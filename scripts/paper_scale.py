"""The paper's CIFAR-10 / ResNet-18 protocol on one GPU: train.py and validate_nc.py --follow side by
side, stopped and packed by a deadline, continued by a second command if one is not enough. Run it
through scripts/paper_scale.sh:

    scripts/paper_scale.sh --prepare      # here: the CIFAR-10 zip and its unpacker into .gpu/, what travels checked
    scripts/paper_scale.sh                # on the GPU: the check, then 350 epochs and 50 checkpoints, packed by 540 s
    scripts/paper_scale.sh --resume       # on the same machine: the run continued from its last.pt, packed again
    scripts/paper_scale.sh --tiny         # the same command on the CPU: synthetic data, a tiny network

What it does, in order:
1. preflight: python, torch, CUDA and cuDNN versions, the packages imported, the free GPU memory, both
   CIFAR-10 splits' sizes (unpacked first from .gpu/cifar10-jpeg.zip by .gpu/make_cifar10.py when missing
   from --data-root, default .gpu/data) and a two-step compiled smoke test of the run's network.
2. the GPU check (scripts/gpu_check.py, about a minute): resume, compile, bf16, --follow, DeepFool and a
   torchrun start on a small network. If a check fails, nothing is trained: the output is packed.
3. precision (--precision auto): float32, the paper's, unless at the known speeds (KNOWN_EPOCH_SECONDS:
   bf16 measured, fp32 an estimate) it cannot finish by the deadline, then bf16.
4. training: train.py per seed (--seeds N: N processes on the one GPU) with --compile (CUDA graphs) on a
   GPU, last.pt written at the analysis checkpoints and on a stop (--save-last checkpoint), and no test
   pass of its own (--eval-every 0: validate_nc.py measures the test split at every checkpoint anyway).
   A compiled trainer that fails, or has not logged its first epoch COMPILE_GRACE seconds after it
   started, is restarted eagerly with the same flags. Beside each, once it holds its run's training
   lock, validate_nc.py --follow measures every checkpoint as it lands. With --seeds N > 1, the first
   epochs after the compiling one (at most PROBE_SECONDS) time the runs, and seeds 1.. stop if they
   cannot all finish by the deadline.
5. the deadline (--deadline, seconds from the command's start, default 540): the trainers are asked to
   stop (SIGTERM: each finishes its epoch and writes its last.pt) STOP_MARGIN seconds before it, then
   the followers; SIGTERM or Ctrl-C to this command does the same at once. Then, whatever was reached,
   the tables are packed: results/<name>/ (config.json, log.csv, summary.json, nc_metrics.csv, tpt_table.md
   per seed, timings.txt with the commands run and the time of each phase) and, with $OUT (or --out) set,
   $OUT/paper_scale.tar.gz (results, figures, logs) beside timings.txt; then the panel is drawn into
   results/<name>/panel.png, docs/<name>_panel.png and $OUT/panel.png, and the archive rewritten with it.

--resume continues the runs of the last command in the same --runs-dir (its plan is in
<runs-dir>/paper_scale-logs/plan.json): the trainers resume from their last.pt, the followers measure what
is left, and everything is packed again, timings.txt keeping the earlier command's lines.

<name> is CIFAR10-resnet18, then -bf16 when trained in bf16 and -<N>seeds for N seeds (each in seed<k>/).
scripts/paper_scale.sh runs from the repository's root: relative paths given to it start there.
"""
import os
import time

# The deadline counts from the command's start: scripts/paper_scale.sh passes the moment it began, and a
# direct start takes the moment before torch's import (which alone can take seconds).
STARTED = float(os.environ.get("PAPER_SCALE_STARTED") or time.time())

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from errors import STOPPED, ArgumentParser, UserError, interrupt_quietly, run_cli  # noqa: E402

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import torch  # noqa: E402

import config  # noqa: E402
import datasets  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import plotting  # noqa: E402
import reports  # noqa: E402
import runs  # noqa: E402

# Seconds per training epoch of full CIFAR-10 on ResNet-18 (width 64, batch 128) with CUDA graphs.
# bf16: engine.train_epoch alone, measured on an H100 (docs/performance.md); fp32: an estimate, never
# measured: TF32 tensor cores at half bf16's rate.
KNOWN_EPOCH_SECONDS = {"bf16": 1.30, "fp32": 2.6}
# Seconds to measure one checkpoint: 2.24 on an H100 (60,000 images, strict fp32; docs/performance.md);
# about 0.5 for --tiny's on the CPU. Two processes on one GPU take turns on it, so the measurement
# overlapped with training still adds its time to the run's.
MEASURE_SECONDS = {"gpu": 2.24, "tiny": 0.5}
STARTUP_SECONDS = 75  # an estimate: the trainer's start, the data on the GPU and compiling the step
PROBE_SECONDS = 60  # the most the seeds' probe runs after the runs' first (compiling) epoch
COMPILE_GRACE = {"gpu": 180.0, "tiny": 120.0}  # seconds a compiled trainer may take to log its first epoch
STOP_MARGIN = {"gpu": 30, "tiny": 12}  # seconds before the deadline at which the trainers stop
PACK_MARGIN = {"gpu": 20, "tiny": 8}  # seconds before the deadline at which everything stops, to pack
STOP_WAIT = 15  # seconds the processes asked to stop get before they are killed
SHORT_FOLLOW_GRACE = 5  # validate_nc.py --follow's grace: it starts once its trainer holds the lock
TINY = {"flags": ["--dataset", "synthetic", "--width", "4", "--samples-per-class", "20", "--device", "cpu"],
        "epochs": 4, "num_checkpoints": 3}
SHARED_DATA = REPO.parent / "shared" / "data"
CARRIED = REPO / ".gpu"
DATA_FILES = ("cifar10-jpeg.zip", "make_cifar10.py")
TRAVEL_LIMIT = 64 * 2 ** 20  # bytes of the working tree that travel to the GPU machine
ARCHIVE = "paper_scale.tar.gz"
PLAN_FILE = "plan.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    preparation = parser.add_argument_group("preparation", "Here, once, before the command runs on the GPU.")
    run = parser.add_argument_group("the run", "What is trained and measured: the paper's CIFAR-10 run, or the "
                                    "dry run of --tiny.")
    speed = parser.add_argument_group("precision and speed")
    output = parser.add_argument_group("deadline and output")
    add = preparation.add_argument
    add("--prepare", action="store_true", help="copy the CIFAR-10 zip and its unpacker from --source into .gpu/, "
        "check that the working tree and .gpu/ fit what travels to the GPU machine, print the GPU command")
    add("--source", type=Path, default=SHARED_DATA, help="with --prepare: the folder holding cifar10-jpeg.zip and "
        "make_cifar10.py")
    add = run.add_argument
    add("--tiny", action="store_true", help="the dry run on the CPU: synthetic data, width 4, 20 images per class, "
        f"{TINY['epochs']} epochs (results under runs/paper_scale-tiny/)")
    add("--resume", action="store_true", help="continue the runs of the last command in --runs-dir from their "
        "last.pt (same settings; the check is not run again), measure what is left and pack everything again")
    add("--skip-check", action="store_true", help="train without running scripts/gpu_check.py first")
    add("--data-root", type=Path, default=Path(".gpu/data"), help="CIFAR-10's folder (default .gpu/data, "
        "unpacked from .gpu/cifar10-jpeg.zip when missing)")
    add("--seeds", type=config.positive_int, default=1, help="seeds 0..N-1 trained at once as N processes on the "
        "GPU, if the probe shows that they finish by the deadline (seed 0 alone otherwise); default 1")
    add("--epochs", type=config.positive_int, help=f"default {config.EPOCHS.default} "
        f"({TINY['epochs']} with --tiny)")
    add("--num-checkpoints", type=config.positive_int, help=f"default {config.NUM_CHECKPOINTS.default} "
        f"({TINY['num_checkpoints']} with --tiny)")
    add("extra", nargs=argparse.REMAINDER, metavar="-- FLAGS", help="flags after -- go to train.py and "
        "validate_nc.py alike: the flags that select the run (e.g. -- --width 32)")
    add = speed.add_argument
    add("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto (default): fp32 unless at the "
        "known speeds it cannot finish by the deadline, then bf16")
    add("--compile", action=argparse.BooleanOptionalAction, help="train.py --compile (default: on a GPU, not on "
        "the CPU, where compiling takes about 45 s per graph)")
    add("--compile-grace", type=config.positive_float, metavar="SECONDS", help="a compiled trainer that has not "
        f"logged its first epoch this long after it started is restarted eagerly (default {COMPILE_GRACE['gpu']:g}; "
        f"{COMPILE_GRACE['tiny']:g} with --tiny)")
    add = output.add_argument
    add("--deadline", type=config.positive_float, default=540.0, help="seconds from the start by which everything "
        "has stopped and is packed (default 540, for a 10-minute command)")
    add("--results", type=Path, help="folder for the tables (default results/<name>; runs/paper_scale-tiny/"
        "results/<name> with --tiny)")
    add("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
        help="folder for the archive, timings.txt and panel.png (default $OUT; none if unset)")
    add("--runs-dir", type=Path, help="folder of the run folders and the logs (default runs; runs/paper_scale-tiny "
        "with --tiny)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    return args


def main(args: argparse.Namespace) -> int:
    clock = _Clock(args.deadline)
    if args.prepare:
        return prepare(args.source)
    plan = resumed_plan(args) if args.resume else make_plan(args, clock)
    _say(clock, f"torch {torch.__version__}, {plan.device_name}; {plan.precision} ({plan.why}); "
         f"{'compiled' if plan.compiled else 'eager'}; deadline {args.deadline:g} s")
    outcome = Outcome()
    with _stopped_by_signals():
        try:
            outcome.preflight = preflight(plan, clock, smoke=not args.resume)
            if args.resume:
                outcome.check = ["not run again: --resume continues on the machine the first command checked"]
            elif not args.skip_check and not gpu_check(plan, outcome, clock):
                return 1  # packed below, nothing trained
            run_everything(plan, outcome, clock)
        except KeyboardInterrupt:
            outcome.decisions.append(f"interrupted at {clock.now():.0f} s (SIGTERM or Ctrl-C): every process was "
                                     "stopped and what they had written is packed")
            raise
        finally:
            _stop_all(outcome.jobs, clock, "stopped")
            pack(plan, outcome, clock)
    return 0 if outcome.complete(plan) else 1


def prepare(source: Path, carried: Path = CARRIED) -> int:
    """Copy the CIFAR-10 zip and its unpacker into `carried` (.gpu/) and check the size of what travels:
    the working tree (tracked files, and untracked ones git does not ignore) and that folder."""
    carried.mkdir(exist_ok=True)
    for name in DATA_FILES:
        if not (source / name).is_file():
            raise UserError(f"{source / name} is missing; pass --source, the folder holding {' and '.join(DATA_FILES)}")
        if not (carried / name).is_file() or (carried / name).read_bytes() != (source / name).read_bytes():
            with runs.atomic_path(carried / name) as tmp:
                shutil.copyfile(source / name, tmp)
    tree = _tree_bytes()
    data = sum(path.stat().st_size for path in carried.rglob("*") if path.is_file())
    print(f"{carried}: {data / 2 ** 20:.1f} MiB; with the working tree ({tree / 2 ** 20:.1f} MiB), "
          f"{(tree + data) / 2 ** 20:.1f} MiB of the {TRAVEL_LIMIT / 2 ** 20:.0f} MiB that travel")
    if tree + data > TRAVEL_LIMIT:
        raise UserError(f"the working tree and {carried} are over the {TRAVEL_LIMIT / 2 ** 20:.0f} MiB that travel; "
                        "remove untracked files or what else is in that folder")
    print(f"on the GPU machine, from the repository's root, with {carried.name} carried: "
          "scripts/paper_scale.sh --deadline 540, then if it did not finish: scripts/paper_scale.sh --resume")
    return 0


@dataclass
class Plan:
    """What the command runs: the settings of each run, where everything goes, and why."""
    tiny: bool
    device_name: str
    compiled: bool
    precision: str
    why: str
    seeds: list[int]
    epochs: int
    num_checkpoints: int
    selection: list[str]  # the flags that select the runs, but --precision and --seed
    data_root: Path | None
    runs_dir: Path
    results: Path | None  # None: results/<name>
    out: Path | None
    command: str
    compile_grace: float
    resumed: bool = False  # by --resume: timings.txt keeps the earlier command's lines

    def run_flags(self, seed: int) -> list[str]:
        """The flags that select seed's run, as train.py and validate_nc.py take them."""
        return [*self.selection, "--precision", self.precision, "--seed", str(seed), "--epochs", str(self.epochs)]

    def run_dir(self, seed: int) -> Path:
        """The folder train.py itself would choose for the run."""
        parsed = _selection_args(self.run_flags(seed))
        return self.runs_dir / config.run_name(config.resolve_config(parsed))

    def log(self, name: str) -> Path:
        return self.runs_dir / "paper_scale-logs" / f"{name}.log"

    def name(self) -> str:
        """results/<name>: dataset-model[-loss if not ce][-settings], -bf16, -<N>seeds."""
        parts = self.run_dir(0).name.split("-")
        kept = parts[:2] + ([parts[2]] if parts[2] != config.LOSS.default else []) + parts[4:]
        return "-".join(kept) + (f"-{len(self.seeds)}seeds" if len(self.seeds) > 1 else "")

    def results_dir(self) -> Path:
        default = (self.runs_dir / "results" if self.tiny else REPO / "results") / self.name()
        return self.results or default

    def seed_dirs(self) -> dict[int, Path]:
        """Where each seed's tables go inside the results folder."""
        top = self.results_dir()
        return {seed: top / f"seed{seed}" if len(self.seeds) > 1 else top for seed in self.seeds}

    def kind(self) -> str:
        return "tiny" if self.tiny else "gpu"


@dataclass
class Job:
    """One seed's run: its trainer and follower processes, and when things happened (clock seconds)."""
    seed: int
    run_dir: Path
    trainer: subprocess.Popen
    compiled: bool
    commands: list[list[str]]
    started_at: float
    follower: subprocess.Popen | None = None
    first_epoch_at: float | None = None  # when its first (compiling) epoch was logged
    trained_at: float | None = None
    measured_at: float | None = None
    stopped: str = ""  # why the command stopped it early, if it did


@dataclass
class Outcome:
    preflight: list[str] = field(default_factory=list)
    check: list[str] = field(default_factory=list)  # scripts/gpu_check.py's lines
    jobs: list[Job] = field(default_factory=list)
    dropped: list[Job] = field(default_factory=list)  # runs the probe stopped
    decisions: list[str] = field(default_factory=list)

    def complete(self, plan: Plan) -> bool:
        return bool(self.jobs) and all(_epochs_done(job.run_dir) == plan.epochs and
                                       _measured(job.run_dir) == _checkpoints(job.run_dir) for job in self.jobs)


def make_plan(args: argparse.Namespace, clock: "_Clock") -> Plan:
    """The runs' settings, device and precision, from the flags and the known speeds; kept in plan.json for
    a --resume."""
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise UserError("no CUDA GPU here: the paper-scale run needs one; scripts/paper_scale.sh --tiny runs every "
                        "step of it on the CPU")
    epochs = args.epochs or (TINY["epochs"] if args.tiny else config.EPOCHS.default)
    checkpoints = args.num_checkpoints or (TINY["num_checkpoints"] if args.tiny else config.NUM_CHECKPOINTS.default)
    data_root = None if args.tiny else args.data_root.resolve()
    dataset = TINY["flags"] if args.tiny else ["--dataset", "CIFAR10", "--data-root", str(data_root)]
    if args.precision != "auto":
        precision, why = args.precision, "as asked"
    elif args.tiny:
        precision, why = "fp32", "the CPU dry run"
    else:
        left = clock.deadline - STOP_MARGIN["gpu"] - STARTUP_SECONDS - clock.now()
        precision, why = known_precision(epochs, len(config.checkpoint_epochs(epochs, checkpoints)), left)
    runs_dir = (args.runs_dir or Path("runs/paper_scale-tiny" if args.tiny else "runs")).resolve()
    plan = Plan(tiny=args.tiny, device_name=torch.cuda.get_device_name() if cuda else "CPU",
                compiled=cuda if args.compile is None else args.compile, precision=precision, why=why,
                seeds=list(range(args.seeds)), epochs=epochs, num_checkpoints=checkpoints,
                selection=[*dataset, *args.extra], data_root=data_root, runs_dir=runs_dir,
                results=args.results.resolve() if args.results else None,
                out=args.out.resolve() if args.out else None, command=_command(args),
                compile_grace=args.compile_grace or COMPILE_GRACE["tiny" if args.tiny else "gpu"])
    plan_file = plan.log(PLAN_FILE).with_name(PLAN_FILE)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(plan_file, json.dumps(asdict(plan), indent=2, default=str) + "\n")
    return plan


def resumed_plan(args: argparse.Namespace) -> Plan:
    """The plan of the last command in --runs-dir, to continue (--resume); this command's --out and
    --deadline, the rest as it was."""
    runs_dir = (args.runs_dir or Path("runs/paper_scale-tiny" if args.tiny else "runs")).resolve()
    path = runs_dir / "paper_scale-logs" / PLAN_FILE
    try:
        saved = json.loads(path.read_text())
        paths = {key: Path(saved[key]) if saved[key] is not None else None
                 for key in ("data_root", "runs_dir", "results", "out")}
        plan = Plan(**{**saved, **paths, "command": _command(args)})
    except FileNotFoundError:
        raise UserError(f"no earlier run to resume: {path} is missing; run scripts/paper_scale.sh without "
                        "--resume first (with the same --runs-dir)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} is not a plan written by scripts/paper_scale.sh ({err}); run the command again "
                        "without --resume") from None
    plan.out = args.out.resolve() if args.out else plan.out
    plan.resumed = True
    return plan


def preflight(plan: Plan, clock: "_Clock", smoke: bool) -> list[str]:
    """The machine, the packages, the data's two splits and (with `smoke`, on a GPU) two compiled training
    steps of the run's network, as lines for timings.txt; the data is unpacked first if missing."""
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}"]
    lines.append("packages imported: " + ", ".join(_imported_packages()))
    if not plan.tiny:
        free, total = torch.cuda.mem_get_info()
        lines.append(f"GPU {plan.device_name}: {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free")
    lines.append(_data_line(plan, clock))
    if smoke and plan.compiled and not plan.tiny:
        lines.append(_smoke_test(plan))
    elif smoke:
        lines.append("compiled smoke test: left out (" + ("on the CPU, about 45 s a graph)" if plan.tiny else
                                                          "an eager run)"))
    for line in lines:
        _say(clock, f"preflight: {line}")
    return lines


def gpu_check(plan: Plan, outcome: Outcome, clock: "_Clock") -> bool:
    """scripts/gpu_check.py (--tiny on the CPU), its lines kept for timings.txt; whether every check passed."""
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py")] + (["--tiny"] if plan.tiny else [])
    log = plan.log("gpu_check")
    began = clock.now()
    status = _spawn(command, log).wait()
    outcome.check = [line for line in log.read_text().splitlines() if line.strip()]
    outcome.check.append(f"(gpu_check.py exited {status} after {clock.now() - began:.0f} s)")
    for line in outcome.check:
        _say(clock, line)
    if status != 0:
        outcome.decisions.append("the GPU check failed: nothing was trained")
    return status == 0


def run_everything(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """Start the trainers, their followers once they hold their locks, fall back to eager where compiling
    fails, decide after the seeds' probe, and wait until every run is measured or the deadline stops them."""
    stop_trainers_at = clock.deadline - STOP_MARGIN[plan.kind()]
    stop_all_at = clock.deadline - PACK_MARGIN[plan.kind()]
    outcome.jobs = [_start(plan, seed, plan.compiled, clock) for seed in plan.seeds]
    probing, said = len(plan.seeds) > 1, clock.now()
    while True:
        for index, job in enumerate(outcome.jobs):
            outcome.jobs[index] = _next_job(job, plan, outcome, probing, clock)
        if probing and _probe_over(outcome.jobs, clock):
            probing = False
            _keep_or_stop_seeds(plan, outcome, clock)
        if all(job.trainer.poll() is not None and (job.follower is None or job.follower.poll() is not None)
               for job in outcome.jobs):
            break
        if clock.now() >= stop_trainers_at:
            _stop(outcome.jobs, "trainer", clock)
        if clock.now() >= stop_all_at:
            _stop(outcome.jobs, "follower", clock)
            break
        if clock.now() - said >= (5 if plan.tiny else 30):
            said = clock.now()
            _say(clock, "; ".join(_progress(job, plan) for job in outcome.jobs))
        time.sleep(0.25 if plan.tiny else 1.0)


def pack(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """Copy each run's tables into the results folder, write timings.txt and the archive (with the
    followers' figures and the logs) into the --out folder; then draw the panel, in a try of its own, and
    add it to the results, docs/ and the archive: a drawing error never leaves the tables unpacked."""
    results = plan.results_dir()
    results.mkdir(parents=True, exist_ok=True)
    earlier = (results / "timings.txt").read_text() if plan.resumed and (results / "timings.txt").is_file() else ""
    measured = []
    for job in outcome.jobs:
        target = plan.seed_dirs()[job.seed]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "log.csv", "summary.json", "nc_metrics.csv"):
            if (job.run_dir / name).is_file():
                with runs.atomic_path(target / name) as tmp:
                    shutil.copyfile(job.run_dir / name, tmp)
        if runs.read_nc_metrics(target):
            runs.write_text(target / "tpt_table.md", reports.tpt_table(target))
            measured.append(target)
    runs.write_text(results / "timings.txt", earlier + timings(plan, outcome, clock))
    print((results / "timings.txt").read_text(), end="", flush=True)
    if plan.out is not None:
        _archive(plan, outcome, results)
    panel = _draw_panel(plan, measured, results, clock)
    if panel is not None and plan.out is not None:
        _archive(plan, outcome, results)
    _say(clock, f"results in {results}" + (f"; packed into {plan.out / ARCHIVE}" if plan.out else ""))


def timings(plan: Plan, outcome: Outcome, clock: "_Clock") -> str:
    """timings.txt: the command, the machine, the check, the commands it ran, and the time and outcome of
    each phase."""
    lines = [f"command: {plan.command}", *(f"preflight: {line}" for line in outcome.preflight),
             *(f"check: {line}" for line in outcome.check), f"precision: {plan.precision} ({plan.why})",
             *(f"decision: {text}" for text in outcome.decisions), f"data: {plan.data_root or 'synthetic'}"]
    for job in outcome.dropped + outcome.jobs:
        lines += [f"seed {job.seed} ran: {shlex.join(command)}" for command in job.commands]
    for job in outcome.jobs:
        ended = f"{job.trained_at:.0f} s" if job.trained_at is not None else "?"
        lines.append(f"{_progress(job, plan)}; trained from {job.started_at:.0f} s to {ended} "
                     f"({_epoch_seconds(job.run_dir)})"
                     + (f", measured by {job.measured_at:.0f} s" if job.measured_at is not None else "")
                     + (f"; {job.stopped}" if job.stopped else ""))
    state = "finished: every epoch trained and every checkpoint measured" if outcome.complete(plan) else \
        "NOT finished: the tables hold what was reached" + \
        ("; scripts/paper_scale.sh --resume continues it" if outcome.jobs else "")
    lines.append(f"total: {clock.now():.0f} s of the {clock.deadline:g} s deadline; {state}")
    return "\n".join(lines) + "\n"


def finishes(epoch_seconds: float, epochs_left: int, measure_seconds: float, checkpoints_left: int,
             seconds_left: float) -> bool:
    """Whether the training and measurement left fit in the seconds left: the epochs at their pace, with a
    tenth to spare for the checkpoint epochs' files, and the measurement of each checkpoint left, whose
    GPU time adds to training's (the processes take turns on the GPU)."""
    return needed_seconds(epoch_seconds, epochs_left, measure_seconds, checkpoints_left) <= seconds_left


def needed_seconds(epoch_seconds: float, epochs_left: int, measure_seconds: float, checkpoints_left: int) -> float:
    return epoch_seconds * epochs_left * 1.1 + measure_seconds * checkpoints_left


def known_precision(epochs: int, checkpoints: int, seconds_left: float) -> tuple[str, str]:
    """fp32 if at its (estimated) known speed the run finishes in the seconds left, else bf16; and why."""
    need = {key: needed_seconds(seconds, epochs, MEASURE_SECONDS["gpu"], checkpoints)
            for key, seconds in KNOWN_EPOCH_SECONDS.items()}
    precision = "fp32" if need["fp32"] <= seconds_left else "bf16"
    known = ", ".join(f"{key} {seconds:.2f} s" for key, seconds in KNOWN_EPOCH_SECONDS.items())
    fits = "" if need[precision] <= seconds_left else \
        "; it may not finish: the deadline then packs the epochs and checkpoints it reached"
    return precision, (f"known seconds per epoch with CUDA graphs: {known} (fp32 an estimate), "
                       f"{MEASURE_SECONDS['gpu']:.2f} s per checkpoint measured; {epochs} epochs and {checkpoints} "
                       f"checkpoints need about {need['fp32']:.0f} s in fp32 and {need['bf16']:.0f} s in bf16, with "
                       f"{seconds_left:.0f} s left after starting up{fits}")


def _start(plan: Plan, seed: int, compiled: bool, clock: "_Clock") -> Job:
    """Start seed's trainer on a run folder of its own (which it resumes if the folder holds a last.pt)."""
    run_dir = plan.run_dir(seed)
    command = [sys.executable, "train.py", *plan.run_flags(seed), "--num-checkpoints", str(plan.num_checkpoints),
               "--eval-every", "0", "--save-last", "checkpoint",
               "--run-dir", str(run_dir)] + (["--compile"] if compiled else [])
    name = f"train-seed{seed}-{plan.precision}" + ("" if compiled or not plan.compiled else "-eager")
    return Job(seed, run_dir, _spawn(command, plan.log(name)), compiled, [command], clock.now())


def _next_job(job: Job, plan: Plan, outcome: Outcome, probing: bool, clock: "_Clock") -> Job:
    """Note when things happened, start the follower once the trainer holds the run's lock (after the
    probe: it times training alone), and replace a compiled trainer that failed or is still compiling
    after its grace by an eager one; the job, or the one replacing it."""
    if job.first_epoch_at is None and _epochs_done(job.run_dir) >= 1:
        job.first_epoch_at = clock.now()
    if job.compiled and not job.stopped and _compile_failed(job, plan, clock):
        return _restart_eagerly(job, plan, outcome, clock)
    if job.follower is None and job.trainer.poll() is None and not probing and _holds_lock(job):
        command = [sys.executable, "validate_nc.py", "--run-dir", str(job.run_dir), "--follow", str(SHORT_FOLLOW_GRACE),
                   "--plots-dir", str(job.run_dir / "plots")] + (["--device", "cpu"] if plan.tiny else [])
        job.commands.append(command)
        job.follower = _spawn(command, plan.log(f"validate-seed{job.seed}-{plan.precision}"))
    if job.trained_at is None and job.trainer.poll() is not None:
        job.trained_at = clock.now()
        if job.trainer.returncode not in (0, STOPPED) and not job.stopped:
            _say(clock, f"seed {job.seed}: train.py failed (exit {job.trainer.returncode}); the end of its log:\n"
                 + _tail(_log_of(job, plan)))
    if job.measured_at is None and job.follower is not None and job.follower.poll() is not None:
        job.measured_at = clock.now()
    return job


def _compile_failed(job: Job, plan: Plan, clock: "_Clock") -> bool:
    """Whether a compiled trainer exited with an error, or has not logged its first epoch within the grace."""
    failed = job.trainer.poll() not in (None, 0, STOPPED)
    stuck = job.first_epoch_at is None and job.trainer.poll() is None and \
        clock.now() - job.started_at >= plan.compile_grace
    return failed or stuck


def _restart_eagerly(job: Job, plan: Plan, outcome: Outcome, clock: "_Clock") -> Job:
    """The same run trained eagerly (it resumes whatever the compiled trainer saved), with a note saying why."""
    why = (f"failed (exit {job.trainer.returncode}: {_last_line(_log_of(job, plan))})" if job.trainer.poll() is not None
           else f"had not logged its first epoch {plan.compile_grace:g} s after it started")
    for process in (job.trainer, job.follower):
        if process is not None and process.poll() is None:
            process.kill()  # still compiling: no epoch to finish, nothing to save
            process.wait()
    decision = f"seed {job.seed}: the compiled trainer {why}; restarted eagerly at {clock.now():.0f} s"
    outcome.decisions.append(decision)
    _say(clock, decision)
    eager = _start(plan, job.seed, False, clock)
    eager.commands = job.commands + eager.commands
    return eager


def _probe_over(jobs: list[Job], clock: "_Clock") -> bool:
    """Whether the seeds' probe has seen enough: every run has logged 2 epochs after its first (which
    compiles), or a trainer has ended, or PROBE_SECONDS have passed since the first run logged its first."""
    if all(_epochs_done(job.run_dir) >= 3 for job in jobs) or any(job.trained_at is not None for job in jobs):
        return True
    firsts = [job.first_epoch_at for job in jobs if job.first_epoch_at is not None]
    return bool(firsts) and clock.now() - min(firsts) >= PROBE_SECONDS


def _keep_or_stop_seeds(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """After the seeds' probe: keep every run if they finish by the deadline at the slowest one's pace,
    else stop seeds 1.. and let seed 0 go on."""
    left = clock.deadline - STOP_MARGIN[plan.kind()] - clock.now()
    paces = [_pace(job.run_dir) for job in outcome.jobs]
    slowest = None if None in paces else max(paces)
    epochs_left = plan.epochs - min(_epochs_done(job.run_dir) for job in outcome.jobs)
    checkpoints = len(config.checkpoint_epochs(plan.epochs, plan.num_checkpoints)) * len(outcome.jobs)
    seen = f"the probe saw {slowest:.2f} s per epoch" if slowest is not None else \
        "the probe saw no epoch after the first"
    runs_at_once = f"{len(outcome.jobs)} runs at once"
    if slowest is not None and finishes(slowest, epochs_left, MEASURE_SECONDS[plan.kind()], checkpoints, left):
        decision = f"{seen} with {runs_at_once}: {epochs_left} epochs fit in the {left:.0f} s left; kept"
    else:
        dropped, outcome.jobs = outcome.jobs[1:], outcome.jobs[:1]
        _stop_all(dropped, clock, "stopped by the probe")
        outcome.dropped += dropped
        plan.seeds = [0]
        decision = (f"{seen} with {runs_at_once}: {epochs_left} epochs do not fit in the {left:.0f} s left; "
                    "seed 0 alone goes on")
    outcome.decisions.append(decision)
    _say(clock, decision)


def _stop(jobs: list[Job], which: str, clock: "_Clock", why: str = "stopped by the deadline") -> None:
    """Ask the trainers (each finishes its epoch and writes its last.pt) or the followers of `jobs` that
    still run to stop, all at once; kill those still running STOP_WAIT seconds later."""
    processes = {id(job): job.trainer if which == "trainer" else job.follower for job in jobs}
    running = [job for job in jobs if processes[id(job)] is not None and processes[id(job)].poll() is None]
    _terminate([processes[id(job)] for job in running])
    for job in running:
        job.stopped = job.stopped or f"{which} {why} at {clock.now():.0f} s"
        _say(clock, f"seed {job.seed}: {which} {why} (epoch {_epochs_done(job.run_dir)} logged, "
             f"{_measured(job.run_dir)} checkpoints measured)")


def _stop_all(jobs: list[Job], clock: "_Clock", why: str) -> None:
    """Stop every trainer and follower of `jobs` at once (see `_stop`)."""
    running = [job for job in jobs if any(process is not None and process.poll() is None
                                          for process in (job.trainer, job.follower))]
    _terminate([process for job in jobs for process in (job.trainer, job.follower) if process is not None])
    for job in running:
        job.stopped = job.stopped or f"{why} at {clock.now():.0f} s"


def _terminate(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each process still running, at once, then SIGKILL to those still running STOP_WAIT s later."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    ends = time.monotonic() + STOP_WAIT
    for process in running:
        try:
            process.wait(max(0.0, ends - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _data_line(plan: Plan, clock: "_Clock") -> str:
    """Both splits' sizes, after unpacking CIFAR-10 from .gpu/ where it is missing."""
    name = plan.selection[plan.selection.index("--dataset") + 1]
    unpacked = ""
    if plan.data_root is not None and not (plan.data_root / "cifar-10-batches-py").is_dir():
        maker = CARRIED / "make_cifar10.py"
        if not (maker.is_file() and (CARRIED / "cifar10-jpeg.zip").is_file()):
            raise UserError(f"no CIFAR-10 at {plan.data_root} and no {CARRIED}/cifar10-jpeg.zip to unpack: run "
                            "scripts/paper_scale.sh --prepare here first and carry .gpu, or pass --data-root")
        began = clock.now()
        subprocess.run([sys.executable, str(maker), str(plan.data_root)], check=True, cwd=REPO)
        unpacked = f", unpacked into {plan.data_root} in {clock.now() - began:.0f} s"
    sizes = [len(datasets.load_split(name, plan.data_root or "data", train)[1]) for train in (True, False)]
    return f"data: {name} {sizes[0]} training and {sizes[1]} test images{unpacked}"


def _smoke_test(plan: Plan) -> str:
    """Two training steps of the run's network, compiled as train.py compiles it, on random batches."""
    settings = config.resolve_config(_selection_args(plan.run_flags(0)))
    settings["normalization"] = {"mean": [0.5] * 3, "std": [0.25] * 3}
    device = torch.device("cuda")
    began = time.perf_counter()
    model = engine.build_model(settings, device)
    step_model = engine.FullBatchesCompiled(model, device, settings["batch_size"])
    optimizer = engine.make_optimizer(model, settings, device)
    loss_fn = losses.loss_from_config(settings)
    images = torch.randint(0, 256, (2 * settings["batch_size"], 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, settings["num_classes"], (len(images),), device=device)
    row = engine.train_epoch(step_model, optimizer, loss_fn, (images, labels), settings, epoch=1)
    seconds = time.perf_counter() - began
    del model, step_model, optimizer
    torch.cuda.empty_cache()
    return (f"compiled smoke test: 2 steps of {settings['model']} width {settings['width']} at batch "
            f"{settings['batch_size']} in {seconds:.0f} s (compiling included), loss {row['train_loss']:.3f}")


def _draw_panel(plan: Plan, measured: list[Path], results: Path, clock: "_Clock") -> Path | None:
    """The panel of the measured runs in the results folder (and docs/ for a GPU run), or None if there is
    nothing to draw or drawing failed (said, with the tables already packed)."""
    if not measured:
        return None
    try:
        panel = plotting.plot_panel(measured, results / "panel.png", ["precision"] if len(measured) > 1 else [])
        if not plan.tiny:
            with runs.atomic_path(REPO / "docs" / f"{plan.name()}_panel.png") as tmp:
                shutil.copyfile(panel, tmp)
        return panel
    except Exception as err:  # noqa: BLE001 - the tables are packed already; the figure is redrawn from them anywhere
        _say(clock, f"the panel could not be drawn ({type(err).__name__}: {err}); the tables are packed: "
             f"python plotting.py panel {results} --out panel.png draws it from them")
        return None


def _archive(plan: Plan, outcome: Outcome, results: Path) -> None:
    """$OUT/paper_scale.tar.gz (results, the followers' figures, the logs), timings.txt and panel.png beside it."""
    plan.out.mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(plan.out / ARCHIVE) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(results, arcname=results.name)
            for job in outcome.jobs:
                if (job.run_dir / "plots").is_dir():
                    tar.add(job.run_dir / "plots", arcname=f"plots-seed{job.seed}")
            if plan.log("x").parent.is_dir():
                tar.add(plan.log("x").parent, arcname="logs")
    for path in (results / "timings.txt", results / "panel.png"):
        if path.is_file():
            with runs.atomic_path(plan.out / path.name) as tmp:
                shutil.copyfile(path, tmp)


def _holds_lock(job: Job) -> bool:
    """Whether the trainer has taken its run's training lock: the lock file names its process. Read, never
    locked: a lock test in the instant train.py takes the lock would make it find the folder busy."""
    lock = job.run_dir / runs.TRAIN_LOCK
    return lock.is_file() and lock.read_text().startswith(f"process {job.trainer.pid} ")


def _progress(job: Job, plan: Plan) -> str:
    return (f"seed {job.seed} ({plan.precision}{'' if job.compiled or not plan.compiled else ', eager'}): epoch "
            f"{_epochs_done(job.run_dir)}/{plan.epochs}, {_measured(job.run_dir)}/{plan.num_checkpoints} checkpoints "
            "measured")


def _epoch_seconds(run_dir: Path) -> str:
    """train.py's seconds per epoch from log.csv: the first (which compiles) and the median of the others."""
    log = runs.read_log(run_dir)
    if not log:
        return "no epoch logged"
    pace = _pace(run_dir)
    return (f"train.py's epochs: the first {log[0]['seconds']:.1f} s"
            + (f", then a median of {pace:.2f} s" if pace is not None else ""))


def _pace(run_dir: Path) -> float | None:
    """The median seconds of the logged epochs after the first, or None."""
    log = runs.read_log(run_dir)
    return statistics.median(row["seconds"] for row in log[1:]) if len(log) > 1 else None


def _epochs_done(run_dir: Path) -> int:
    log = runs.read_log(run_dir)
    return log[-1]["epoch"] if log else 0


def _measured(run_dir: Path) -> int:
    return len(runs.read_nc_metrics(run_dir))


def _checkpoints(run_dir: Path) -> int:
    return len(runs.checkpoint_files(run_dir))


def _imported_packages() -> list[str]:
    """The installed distributions whose modules are imported now, with their versions."""
    owners = importlib.metadata.packages_distributions()
    found = {owner for name in list(sys.modules) for owner in owners.get(name.split(".")[0], [])}
    return [f"{name} {importlib.metadata.version(name)}" for name in sorted(found, key=str.lower)]


def _selection_args(flags: list[str]) -> argparse.Namespace:
    """The selection flags parsed as train.py parses them (to name the run folder as it would)."""
    parser = ArgumentParser(None)
    config.add_selection_arguments(parser)
    parsed, _ = parser.parse_known_args(flags)
    return parsed


def _spawn(command: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _log_of(job: Job, plan: Plan) -> Path:
    return plan.log(f"train-seed{job.seed}-{plan.precision}" + ("" if job.compiled or not plan.compiled else "-eager"))


def _tail(log: Path, lines: int = 5) -> str:
    """The last lines of a log that hold text (progress bars' carriage returns read as line ends)."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _last_line(log: Path) -> str:
    return _tail(log, 1) or "no output"


def _command(args: argparse.Namespace) -> str:
    return shlex.join([os.environ.get("PAPER_SCALE_ENTRY", "scripts/paper_scale.py"), *args.argv])


class _Clock:
    """Seconds since the command started (STARTED), and its deadline on that clock."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def now(self) -> float:
        return time.time() - STARTED


class _stopped_by_signals:
    """While held, SIGTERM is handled as Ctrl-C is (a KeyboardInterrupt, so that the command stops its
    processes and packs); once one has arrived, further SIGTERMs and Ctrl-Cs are ignored until the packing
    is done."""

    def __enter__(self) -> None:
        self._previous = {number: signal.signal(number, self._interrupt) for number in (signal.SIGTERM, signal.SIGINT)}

    def __exit__(self, *exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _interrupt(self, signum: int, frame) -> None:
        for number in self._previous:
            signal.signal(number, signal.SIG_IGN)
        raise KeyboardInterrupt


def _say(clock: _Clock, text: str) -> None:
    print(f"[paper_scale {clock.now():5.0f} s] {text}", flush=True)


def _tree_bytes() -> int:
    """Bytes of the working tree that travel: tracked files, and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = [REPO / os.fsdecode(name) for name in listed if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
