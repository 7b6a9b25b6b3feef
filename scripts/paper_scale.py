"""The paper's CIFAR-10 / ResNet-18 protocol on one GPU in one command: train.py and validate_nc.py
--follow side by side, stopped and packed by a deadline. Run it through scripts/paper_scale.sh:

    scripts/paper_scale.sh --prepare      # here: the CIFAR-10 zip and its unpacker into .gpu/, what travels checked
    scripts/paper_scale.sh                # on the GPU: 350 epochs, 50 checkpoints measured, packed by 540 s
    scripts/paper_scale.sh --tiny         # the same command on the CPU: synthetic data, a tiny network

What it does, in order:
1. data: CIFAR-10 from --data-root (default .gpu/data), unpacked there first from .gpu/cifar10-jpeg.zip by
   .gpu/make_cifar10.py when missing (--prepare puts both into .gpu/, which git ignores).
2. precision (--precision auto): float32, the paper's, unless it cannot finish by the deadline, then
   bf16. Without --probe the known speeds decide (KNOWN_EPOCH_SECONDS below: bf16 measured, fp32 an
   estimate); with --probe, the run itself starts in fp32 and its first epochs are the probe (below).
3. training: train.py per seed (--seeds N: N processes on the one GPU), --compile (CUDA graphs) on a
   GPU, the test split evaluated only at the analysis checkpoints (--eval-every EPOCHS); beside each,
   once it holds its run's training lock (and the probe, if any, is over), validate_nc.py --follow
   measures every checkpoint as it lands.
   With --compile, an eager train.py of the first 2 epochs runs alongside (while the compiled run
   compiles), and both runs' losses of those epochs are printed: they must agree.
4. the probe (--probe, or --seeds N > 1): at most 60 s of the runs' epochs after their first (which
   compiles) give the seconds per epoch; if the runs and their measurement cannot finish by the
   deadline at that pace, seeds 1.. stop (seed 0 goes on), or the fp32 run is stopped and trained again
   in bf16 (what it trained is lost: its compiling epoch and the probe's).
5. the deadline (--deadline, seconds from the start, default 540): the trainers are stopped
   STOP_MARGIN seconds before it, then the followers; then, whatever was reached, the tables are packed:
   results/<name>/ (config.json, log.csv, summary.json, nc_metrics.csv, tpt_table.md per seed, panel.png,
   timings.txt with the commands run and the time of each phase), the panel in docs/<name>_panel.png, and
   with $OUT (or --out) set, $OUT/paper_scale.tar.gz (results, figures, logs) beside timings.txt and panel.png.

<name> is CIFAR10-resnet18, then -bf16 when trained in bf16 and -<N>seeds for N seeds (each in seed<k>/).
scripts/paper_scale.sh runs from the repository's root: relative paths given to it start there.
A kill of any process leaves every file whole (train.py and validate_nc.py write atomically and share
the run folder through its locks), so a cut run packs what it had measured.
"""
import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import config  # noqa: E402
import plotting  # noqa: E402
import runs  # noqa: E402
from errors import ArgumentParser, UserError, run_cli  # noqa: E402

# Seconds per training epoch of full CIFAR-10 on ResNet-18 (width 64, batch 128) with CUDA graphs.
# bf16: engine.train_epoch alone, measured on an H100 by an earlier session (docs/performance.md);
# fp32: an estimate, never measured: TF32 tensor cores at half bf16's rate.
KNOWN_EPOCH_SECONDS = {"bf16": 1.30, "fp32": 2.6}
# Seconds to measure one checkpoint: 2.24 on an H100 (60,000 images, strict fp32; docs/performance.md);
# about 0.5 for --tiny's on the CPU. Two processes on one GPU take turns on it, so the measurement
# overlapped with training still adds its time to the run's.
MEASURE_SECONDS = {"gpu": 2.24, "tiny": 0.5}
STARTUP_SECONDS = 75  # an estimate: the processes' start, the data on the GPU and compiling the step
PROBE_SECONDS = 60  # the most a probe runs after the runs' first (compiling) epoch
STOP_MARGIN = {"gpu": 30, "tiny": 12}  # seconds before the deadline at which the trainers stop
PACK_MARGIN = {"gpu": 20, "tiny": 8}  # seconds before the deadline at which everything stops, to pack
FOLLOW_GRACE = 5  # validate_nc.py --follow's grace: it starts once its trainer holds the lock
CHECK_EPOCHS = 2  # epochs of the eager run the compiled one is compared with
TINY = {"flags": ["--dataset", "synthetic", "--width", "4", "--samples-per-class", "20", "--device", "cpu"],
        "epochs": 4, "num_checkpoints": 3}
SHARED_DATA = REPO.parent / "shared" / "data"
CARRIED = REPO / ".gpu"
DATA_FILES = ("cifar10-jpeg.zip", "make_cifar10.py")
TRAVEL_LIMIT = 64 * 2 ** 20  # bytes of the working tree that travel to the GPU machine
ARCHIVE = "paper_scale.tar.gz"


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
    add("--source", type=Path, default=SHARED_DATA, help=f"with --prepare: the folder holding cifar10-jpeg.zip and "
        f"make_cifar10.py (default {SHARED_DATA})")
    add = run.add_argument
    add("--tiny", action="store_true", help="the dry run on the CPU: synthetic data, width 4, 20 images per class, "
        f"{TINY['epochs']} epochs (results under runs/paper_scale-tiny/)")
    add("--data-root", type=Path, default=Path(".gpu/data"), help="CIFAR-10's folder (default .gpu/data, "
        "unpacked from .gpu/cifar10-jpeg.zip when missing)")
    add("--seeds", type=config.positive_int, default=1, help="seeds 0..N-1 trained at once as N processes on the "
        "GPU, if the probe shows that they finish by the deadline (seed 0 alone otherwise); default 1")
    add("--epochs", type=config.positive_int, help=f"default {config.PROTOCOL['epochs']} "
        f"({TINY['epochs']} with --tiny)")
    add("--num-checkpoints", type=config.positive_int, help=f"default {config.PROTOCOL['num_checkpoints']} "
        f"({TINY['num_checkpoints']} with --tiny)")
    add("extra", nargs=argparse.REMAINDER, metavar="-- FLAGS", help="flags after -- go to train.py and "
        "validate_nc.py alike: the flags that select the run (e.g. -- --width 32)")
    add = speed.add_argument
    add("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto (default): fp32 unless it "
        "cannot finish by the deadline (the known speeds, or --probe, decide), then bf16")
    add("--probe", action="store_true", help=f"let the runs' first epochs (at most {PROBE_SECONDS} s after the "
        "compiling one) decide the precision instead of the known speeds")
    add("--compile", action=argparse.BooleanOptionalAction, help="train.py --compile (default: on a GPU, not on "
        "the CPU, where compiling takes about 45 s per graph)")
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
    if args.seeds > 1 and args.probe and args.precision == "auto":
        parser.error("one probe decides one thing: with --seeds, choose --precision fp32 or bf16 (or drop --probe)")
    return args


def main(args: argparse.Namespace) -> int:
    clock = _Clock(args.deadline)
    if args.prepare:
        return prepare(args.source)
    plan = make_plan(args, clock)
    _say(clock, f"torch {torch.__version__}, {plan.device_name}; {plan.precision} ({plan.why}); "
         f"{'compiled' if plan.compiled else 'eager'}; deadline {args.deadline:g} s")
    outcome = Outcome(data_seconds=_ensure_data(plan, clock))
    try:
        run_everything(plan, outcome, clock)
    finally:
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
          "scripts/paper_scale.sh --deadline 540")
    return 0


@dataclass
class Plan:
    """What the command runs: the settings of each run, where everything goes, and why."""
    tiny: bool
    device_name: str
    compiled: bool
    precision: str
    why: str
    probe: str | None  # what the probe decides: "precision", "seeds" or nothing
    seeds: list[int]
    epochs: int
    num_checkpoints: int
    selection: list[str]  # the flags that select the runs, but --precision and --seed
    data_root: Path | None
    runs_dir: Path
    results: Path | None  # None: from the precision and seeds once decided
    out: Path | None
    command: str

    def run_flags(self, seed: int, precision: str | None = None) -> list[str]:
        return [*self.selection, "--precision", precision or self.precision, "--seed", str(seed)]

    def run_dir(self, seed: int, precision: str | None = None) -> Path:
        parsed = _selection_args(self.run_flags(seed, precision))
        return self.runs_dir / config.run_name(config.resolve_config(parsed), parsed)

    def log(self, name: str) -> Path:
        return self.runs_dir / "paper_scale-logs" / f"{name}.log"

    def name(self) -> str:
        """results/<name>: dataset-model[-loss if not ce][-settings], -bf16, -<N>seeds."""
        parts = self.run_dir(0).name.split("-")
        kept = parts[:2] + ([parts[2]] if parts[2] != config.PROTOCOL["loss"] else []) + parts[4:]
        return "-".join(kept) + (f"-{len(self.seeds)}seeds" if len(self.seeds) > 1 else "")

    def results_dir(self) -> Path:
        default = (self.runs_dir / "results" if self.tiny else REPO / "results") / self.name()
        return self.results or default

    def seed_dirs(self) -> dict[int, Path]:
        """Where each seed's tables go inside the results folder."""
        top = self.results_dir()
        return {seed: top / f"seed{seed}" if len(self.seeds) > 1 else top for seed in self.seeds}


@dataclass
class Job:
    """One seed's run: its trainer and follower processes, and when things happened (clock seconds)."""
    seed: int
    precision: str
    run_dir: Path
    trainer: subprocess.Popen
    commands: list[list[str]]
    started_at: float
    follower: subprocess.Popen | None = None
    first_epoch_at: float | None = None  # when its first (compiling) epoch was logged
    trained_at: float | None = None
    measured_at: float | None = None
    stopped: str = ""  # why the command stopped it early, if it did


@dataclass
class Outcome:
    data_seconds: float = 0.0
    jobs: list[Job] = field(default_factory=list)
    dropped: list[Job] = field(default_factory=list)  # runs the probe stopped
    decisions: list[str] = field(default_factory=list)
    check: list[str] = field(default_factory=list)  # the eager-vs-compiled lines

    def complete(self, plan: Plan) -> bool:
        return bool(self.jobs) and all(_epochs_done(job.run_dir) == plan.epochs and
                                       _measured(job.run_dir) == _checkpoints(job.run_dir) for job in self.jobs)


def make_plan(args: argparse.Namespace, clock: "_Clock") -> Plan:
    """The runs' settings, device and precision, from the flags and the known speeds."""
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise UserError("no CUDA GPU here: the paper-scale run needs one; scripts/paper_scale.sh --tiny runs every "
                        "step of it on the CPU")
    epochs = args.epochs or (TINY["epochs"] if args.tiny else config.PROTOCOL["epochs"])
    checkpoints = args.num_checkpoints or (TINY["num_checkpoints"] if args.tiny else config.PROTOCOL["num_checkpoints"])
    data_root = None if args.tiny else args.data_root.resolve()
    dataset = TINY["flags"] if args.tiny else ["--dataset", "CIFAR10", "--data-root", str(data_root)]
    if args.tiny:
        precision = "fp32" if args.precision == "auto" else args.precision
        why, probe = "the CPU dry run", "precision" if args.probe else None
    else:
        precision, why, probe = _precision(args, epochs, len(config.checkpoint_epochs(epochs, checkpoints)),
                                           clock)
    if args.seeds > 1:
        probe = "seeds"
    runs_dir = (args.runs_dir or Path("runs/paper_scale-tiny" if args.tiny else "runs")).resolve()
    return Plan(tiny=args.tiny, device_name=torch.cuda.get_device_name() if cuda else "CPU",
                compiled=cuda if args.compile is None else args.compile, precision=precision, why=why, probe=probe,
                seeds=list(range(args.seeds)), epochs=epochs, num_checkpoints=checkpoints,
                selection=[*dataset, *args.extra], data_root=data_root, runs_dir=runs_dir,
                results=args.results.resolve() if args.results else None,
                out=args.out.resolve() if args.out else None,
                command=shlex.join([os.environ.get("PAPER_SCALE_ENTRY", "scripts/paper_scale.py"), *args.argv]))


def run_everything(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """Start the trainers (and the eager check), their followers once they hold their locks, decide
    after the probe, and wait until every run is measured or the deadline stops them."""
    kind = "tiny" if plan.tiny else "gpu"
    stop_trainers_at, stop_all_at = clock.deadline - STOP_MARGIN[kind], clock.deadline - PACK_MARGIN[kind]
    outcome.jobs = [_start(plan, seed, plan.precision, clock) for seed in plan.seeds]
    check = _start_check(plan) if plan.compiled else None
    checked = plan.precision
    if not plan.compiled:
        outcome.check.append("eager only: " + ("torch.compile is left out on the CPU (about 45 s per graph; "
                                               "--compile to compare)" if plan.tiny else "--no-compile"))
    probing, said = plan.probe is not None, clock.now()
    try:
        while True:
            for job in outcome.jobs:
                _advance(job, plan, probing, clock)
            if probing and _probe_over(outcome.jobs, clock):
                probing = False
                _decide(plan, outcome, clock)
            if check is not None and check.poll() is not None:
                outcome.check = _compare_losses(plan, outcome.jobs + outcome.dropped, checked, check.returncode)
                check = None if outcome.check else check
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
    finally:  # an error or an interrupt here stops every process before the tables are packed
        _stop(outcome.jobs, "trainer", clock, "stopped")
        _stop(outcome.jobs, "follower", clock, "stopped")
        if check is not None and check.poll() is None:
            check.kill()
            check.wait()


def pack(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """Copy each run's tables into the results folder, draw the panel, write timings.txt, and pack it all
    (with the figures of the followers and the logs) into the --out folder."""
    results = plan.results_dir()
    results.mkdir(parents=True, exist_ok=True)
    measured = []
    for job in outcome.jobs:
        target = plan.seed_dirs()[job.seed]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "log.csv", "summary.json", "nc_metrics.csv"):
            if (job.run_dir / name).is_file():
                with runs.atomic_path(target / name) as tmp:
                    shutil.copyfile(job.run_dir / name, tmp)
        if runs.read_nc_metrics(target):
            runs.write_text(target / "tpt_table.md", plotting.tpt_table(target))
            measured.append(target)
    panel = plotting.plot_panel(measured, results / "panel.png", ["precision"] if len(measured) > 1 else []) \
        if measured else None
    if panel is not None and not plan.tiny:
        docs_panel = REPO / "docs" / f"{plan.name()}_panel.png"
        with runs.atomic_path(docs_panel) as tmp:
            shutil.copyfile(panel, tmp)
    runs.write_text(results / "timings.txt", timings(plan, outcome, clock))
    print((results / "timings.txt").read_text(), end="")
    if plan.out is not None:
        _archive(plan, outcome, results, panel)
    _say(clock, f"results in {results}" + (f"; packed into {plan.out / ARCHIVE}" if plan.out else ""))


def timings(plan: Plan, outcome: Outcome, clock: "_Clock") -> str:
    """timings.txt: the command, the commands it ran, the machine, and the time and outcome of each phase."""
    lines = [f"command: {plan.command}",
             f"torch {torch.__version__}; {plan.device_name}; python {sys.version.split()[0]}",
             f"precision: {plan.precision} ({plan.why})", *(f"decision: {text}" for text in outcome.decisions),
             f"data: {plan.data_root or 'synthetic'}"
             + (f", unpacked in {outcome.data_seconds:.0f} s" if outcome.data_seconds else "")]
    for job in outcome.dropped + outcome.jobs:
        lines += [f"seed {job.seed} ran: {shlex.join(command)}" for command in job.commands]
    for job in outcome.jobs:
        ended = f"{job.trained_at:.0f} s" if job.trained_at is not None else "?"
        lines.append(f"{_progress(job, plan)}; trained from {job.started_at:.0f} s to {ended} "
                     f"({_epoch_seconds(job.run_dir)})"
                     + (f", measured by {job.measured_at:.0f} s" if job.measured_at is not None else "")
                     + (f"; {job.stopped}" if job.stopped else ""))
    lines += [f"first epochs' train loss, {text}" for text in outcome.check]
    state = "finished: every epoch trained and every checkpoint measured" if outcome.complete(plan) else \
        "NOT finished: the tables hold what was reached"
    lines.append(f"total: {clock.now():.0f} s of the {clock.deadline:g} s deadline; {state}")
    return "\n".join(lines) + "\n"


def finishes(epoch_seconds: float, epochs_left: int, measure_seconds: float, checkpoints_left: int,
             seconds_left: float) -> bool:
    """Whether the training and measurement left fit in the seconds left: the epochs at their pace, with a
    tenth to spare for the checkpoint epochs' evaluation and files, and the measurement of each checkpoint
    left, whose GPU time adds to training's (the processes take turns on the GPU)."""
    return needed_seconds(epoch_seconds, epochs_left, measure_seconds, checkpoints_left) <= seconds_left


def needed_seconds(epoch_seconds: float, epochs_left: int, measure_seconds: float, checkpoints_left: int) -> float:
    return epoch_seconds * epochs_left * 1.1 + measure_seconds * checkpoints_left


def _precision(args: argparse.Namespace, epochs: int, checkpoints: int, clock: "_Clock") -> tuple[str, str, str | None]:
    """(precision, why, what the probe decides) on a GPU."""
    if args.precision != "auto":
        return args.precision, "as asked", None
    if args.probe:
        return "fp32", "the paper's, as the probe found it finishes by the deadline", "precision"
    left = clock.deadline - STOP_MARGIN["gpu"] - STARTUP_SECONDS - clock.now()
    return (*known_precision(epochs, checkpoints, left), None)


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


def _start(plan: Plan, seed: int, precision: str, clock: "_Clock") -> Job:
    """Start seed's trainer on a run folder of its own."""
    run_dir = plan.run_dir(seed, precision)
    command = [sys.executable, "train.py", *plan.run_flags(seed, precision), "--epochs", str(plan.epochs),
               "--num-checkpoints", str(plan.num_checkpoints), "--eval-every", str(plan.epochs),
               "--run-dir", str(run_dir)] + (["--compile"] if plan.compiled else [])
    return Job(seed, precision, run_dir, _spawn(command, plan.log(f"train-seed{seed}-{precision}")), [command],
               clock.now())


def _start_check(plan: Plan) -> subprocess.Popen:
    """The eager run of seed 0's first epochs, in a fresh folder, to compare the compiled run's losses with."""
    run_dir = plan.runs_dir / "paper_scale-eager-check"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "train.py", *plan.run_flags(0), "--epochs", str(CHECK_EPOCHS),
               "--num-checkpoints", "1", "--eval-every", str(CHECK_EPOCHS), "--run-dir", str(run_dir)]
    return _spawn(command, plan.log("eager-check"))


def _advance(job: Job, plan: Plan, probing: bool, clock: "_Clock") -> None:
    """Start the follower once the trainer holds the run's lock (after the probe: it times training alone);
    note when things happened."""
    if job.follower is None and job.trainer.poll() is None and not probing and _holds_lock(job):
        command = [sys.executable, "validate_nc.py", "--run-dir", str(job.run_dir), "--follow", str(FOLLOW_GRACE),
                   "--plots-dir", str(job.run_dir / "plots")] + (["--device", "cpu"] if plan.tiny else [])
        job.commands.append(command)
        job.follower = _spawn(command, plan.log(f"validate-seed{job.seed}-{job.precision}"))
    if job.first_epoch_at is None and _epochs_done(job.run_dir) >= 1:
        job.first_epoch_at = clock.now()
    if job.trained_at is None and job.trainer.poll() is not None:
        job.trained_at = clock.now()
        if job.trainer.returncode != 0 and not job.stopped:
            _say(clock, f"seed {job.seed}: train.py failed (exit {job.trainer.returncode}); the end of its log:\n"
                 + _tail(plan.log(f"train-seed{job.seed}-{job.precision}")))
    if job.measured_at is None and job.follower is not None and job.follower.poll() is not None:
        job.measured_at = clock.now()


def _probe_over(jobs: list[Job], clock: "_Clock") -> bool:
    """Whether the probe has seen enough: every run has logged 2 epochs after its first (which compiles),
    or a trainer has ended, or PROBE_SECONDS have passed since the first run logged its first epoch."""
    if all(_epochs_done(job.run_dir) >= 3 for job in jobs) or any(job.trained_at is not None for job in jobs):
        return True
    firsts = [job.first_epoch_at for job in jobs if job.first_epoch_at is not None]
    return bool(firsts) and clock.now() - min(firsts) >= PROBE_SECONDS


def _decide(plan: Plan, outcome: Outcome, clock: "_Clock") -> None:
    """After the probe: keep every run if they finish by the deadline at the slowest one's pace; else stop
    seeds 1.. (--seeds), or train again in bf16 (an fp32 run of --probe); else go on as far as the
    deadline allows."""
    kind = "tiny" if plan.tiny else "gpu"
    left = clock.deadline - STOP_MARGIN[kind] - clock.now()
    paces = [_pace(job.run_dir) for job in outcome.jobs]
    slowest = None if None in paces else max(paces)
    epochs_left = plan.epochs - min(_epochs_done(job.run_dir) for job in outcome.jobs)
    checkpoints = len(config.checkpoint_epochs(plan.epochs, plan.num_checkpoints)) * len(outcome.jobs)
    seen = f"the probe saw {slowest:.2f} s per epoch" if slowest is not None else \
        "the probe saw no epoch after the first"
    runs_at_once = f"{len(outcome.jobs)} run{'s' if len(outcome.jobs) > 1 else ''} at once"
    if slowest is not None and finishes(slowest, epochs_left, MEASURE_SECONDS[kind], checkpoints, left):
        decision = f"{seen} with {runs_at_once}: {epochs_left} epochs fit in the {left:.0f} s left; kept"
    elif plan.probe == "seeds":
        dropped, outcome.jobs = outcome.jobs[1:], outcome.jobs[:1]
        _stop(dropped, "trainer", clock, "stopped by the probe")
        _stop(dropped, "follower", clock, "stopped by the probe")
        outcome.dropped += dropped
        plan.seeds = [0]
        decision = (f"{seen} with {runs_at_once}: {epochs_left} epochs do not fit in the {left:.0f} s left; "
                    "seed 0 alone goes on")
    elif plan.probe == "precision" and plan.precision == "fp32":
        _stop(outcome.jobs, "trainer", clock, "stopped by the probe")
        _stop(outcome.jobs, "follower", clock, "stopped by the probe")
        outcome.dropped += outcome.jobs
        plan.precision, plan.why = "bf16", f"fp32 would not finish by the deadline ({seen})"
        outcome.jobs = [_start(plan, 0, "bf16", clock)]
        decision = f"{seen} in fp32: {epochs_left} epochs do not fit in the {left:.0f} s left; trained again in bf16"
    else:
        decision = f"{seen}: the run may not finish by the deadline; the deadline packs what it reaches"
    outcome.decisions.append(decision)
    _say(clock, decision)


def _compare_losses(plan: Plan, jobs: list[Job], precision: str, status: int) -> list[str]:
    """The eager check's and seed 0's compiled run's train losses of the first epochs in `precision`, once
    both have them ([] until then)."""
    if status != 0:
        return [f"the eager check failed (exit {status}); see {plan.log('eager-check')}"]
    compiled = next(job for job in jobs if job.seed == 0 and job.precision == precision)
    eager = runs.read_log(plan.runs_dir / "paper_scale-eager-check")
    ours = runs.read_log(compiled.run_dir)[:CHECK_EPOCHS]
    if len(ours) < CHECK_EPOCHS:
        return [] if compiled.trainer.poll() is None else ["the compiled run ended before its second epoch"]
    pairs = [(a["train_loss"], b["train_loss"]) for a, b in zip(eager, ours)]
    worst = max(abs(a - b) / abs(a) for a, b in pairs)
    return [f"eager vs compiled ({precision}), epochs 1-{CHECK_EPOCHS}: "
            + ", ".join(f"{a:.5f} vs {b:.5f}" for a, b in pairs) + f" (largest relative difference {worst:.1e})"]


def _stop(jobs: list[Job], which: str, clock: "_Clock", why: str = "stopped by the deadline") -> None:
    """Stop the trainers or the followers of `jobs` that still run (SIGTERM, SIGKILL 10 s later)."""
    for job in jobs:
        process = job.trainer if which == "trainer" else job.follower
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        job.stopped = job.stopped or f"{which} {why} at {clock.now():.0f} s"
        _say(clock, f"seed {job.seed}: {which} {why} (epoch {_epochs_done(job.run_dir)} logged, "
             f"{_measured(job.run_dir)} checkpoints measured)")


def _ensure_data(plan: Plan, clock: "_Clock") -> float:
    """CIFAR-10 at the data root, unpacked from .gpu/ first if missing; the seconds it took."""
    if plan.data_root is None or (plan.data_root / "cifar-10-batches-py").is_dir():
        return 0.0
    maker = CARRIED / "make_cifar10.py"
    if not (maker.is_file() and (CARRIED / "cifar10-jpeg.zip").is_file()):
        raise UserError(f"no CIFAR-10 at {plan.data_root} and no {CARRIED}/cifar10-jpeg.zip to unpack: run "
                        "scripts/paper_scale.sh --prepare here first and carry .gpu, or pass --data-root")
    began = clock.now()
    subprocess.run([sys.executable, str(maker), str(plan.data_root)], check=True, cwd=REPO)
    _say(clock, f"CIFAR-10 unpacked into {plan.data_root} in {clock.now() - began:.0f} s")
    return clock.now() - began


def _archive(plan: Plan, outcome: Outcome, results: Path, panel: Path | None) -> None:
    """$OUT/paper_scale.tar.gz (results, the followers' figures, the logs), timings.txt and panel.png beside it."""
    plan.out.mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(plan.out / ARCHIVE) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(results, arcname=results.name)
            for job in outcome.jobs:
                if (job.run_dir / "plots").is_dir():
                    tar.add(job.run_dir / "plots", arcname=f"plots-seed{job.seed}")
            tar.add(plan.log("x").parent, arcname="logs")
    for path in (results / "timings.txt", panel):
        if path is not None:
            with runs.atomic_path(plan.out / path.name) as tmp:
                shutil.copyfile(path, tmp)


def _holds_lock(job: Job) -> bool:
    """Whether the trainer has taken its run's training lock: the lock file names its process. Read, never
    locked: a lock test in the instant train.py takes the lock would make it find the folder busy."""
    lock = job.run_dir / runs.TRAIN_LOCK
    return lock.is_file() and lock.read_text().startswith(f"process {job.trainer.pid} ")


def _progress(job: Job, plan: Plan) -> str:
    return (f"seed {job.seed} ({job.precision}): epoch {_epochs_done(job.run_dir)}/{plan.epochs}, "
            f"{_measured(job.run_dir)}/{plan.num_checkpoints} checkpoints measured")


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


def _tail(log: Path, lines: int = 5) -> str:
    """The last lines of a log that hold text (progress bars' carriage returns read as line ends)."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


class _Clock:
    """Seconds since the command started, and its deadline on that clock."""

    def __init__(self, deadline: float):
        self._start, self.deadline = time.monotonic(), deadline

    def now(self) -> float:
        return time.monotonic() - self._start


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
