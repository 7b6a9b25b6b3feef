"""The GPU acceptance check: train.py's and validate_nc.py's GPU paths on a small network, in about a
minute, one line per check and a summary; exit status 1 if a check fails. Run it through
scripts/gpu_check.sh:

    scripts/gpu_check.sh            # on a GPU machine (scripts/paper_scale.sh runs it first)
    scripts/gpu_check.sh --tiny     # the checks that apply on a CPU, on a tinier network (CI runs it)

Every check starts the scripts as a user does, in processes of their own, the checks side by side, on
synthetic data (a ResNet-18 of width 8 on 200 images, batches of 32; width 4 on 100 with --tiny):

    resume     a run stopped by SIGTERM after an epoch and started again ends bit-identical (weights and
               log) to the same run uninterrupted, both --deterministic
    compile    --compile (CUDA graphs on a GPU) against eager: each of 3 epochs' training loss within
               COMPILE_TOLERANCE; left out with --tiny unless --compile (about 45 s a graph on a CPU)
    bf16       --precision bf16 trains 3 epochs with finite losses, the last within BF16_TOLERANCE of fp32's
    follow     validate_nc.py --follow started beside train.py measures every checkpoint as it lands, to the
               same numbers as validate_nc.py run afterwards
    deepfool   validate_nc.py --adversarial measures DeepFool's robustness on the device; on a GPU, within
               DEEPFOOL_TOLERANCE of the CPU's on the same checkpoint
    torchrun   a one-process torchrun start (NCCL on a GPU, gloo on a CPU) trains an epoch

Each line ends with the peak GPU memory the check's processes took (train.py and validate_nc.py print
theirs on CUDA). The folders go to --work (default: a temporary folder, removed afterwards).
"""
import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from errors import ArgumentParser, UserError, interrupt_quietly, run_cli  # noqa: E402

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import torch  # noqa: E402

import runs  # noqa: E402

COMPILE_TOLERANCE = 0.02  # relative: compiled kernels sum in another order, and three epochs amplify it
BF16_TOLERANCE = 0.10  # relative: bf16 rounds every activation, another trajectory from the first step
DEEPFOOL_TOLERANCE = 0.02  # relative: both strict fp32, but a sample may flip one step earlier or later
CHECKS = ("resume", "compile", "bf16", "follow", "deepfool", "torchrun")
NETWORK = {"gpu": ["--width", "8", "--samples-per-class", "20"], "tiny": ["--width", "4", "--samples-per-class", "10"]}
PEAK = "peak GPU memory "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    add = parser.add_argument
    add("--tiny", action="store_true", help="on the CPU: the checks that apply there, on a tinier network")
    add("--compile", action="store_true", help="with --tiny: the compile check too (about 45 s a graph on a CPU)")
    add("--only", nargs="+", choices=CHECKS, metavar="CHECK", help=f"run these checks alone ({', '.join(CHECKS)})")
    add("--work", type=Path, help="folder for the checks' run folders (default: a temporary one, removed after)")
    return parser.parse_args(argv)


@dataclass
class Result:
    name: str
    passed: bool | None  # None: left out
    text: str
    peak: float = 0.0  # GiB, the most any of the check's processes took

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        memory = f" [peak GPU memory {self.peak:.2f} GiB]" if self.peak else ""
        return f"{verdict} {self.name:<9} {self.text}{memory}"


def main(args: argparse.Namespace) -> int:
    began = time.monotonic()
    if not args.tiny and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; scripts/gpu_check.sh --tiny runs the checks that apply on a CPU")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        check = Checks(Path(work), tiny=args.tiny)
        left_out = {name: "not asked for (--only)" for name in CHECKS if args.only and name not in args.only}
        if args.tiny and not args.compile:
            left_out.setdefault("compile", "left out on the CPU (about 45 s a graph; --compile)")
        chosen = [getattr(check, name) for name in CHECKS if name not in left_out]
        where = "cpu" if args.tiny else torch.cuda.get_device_name()
        print(f"gpu_check on {where}: torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
        with ThreadPoolExecutor(len(chosen)) as pool:
            ran = {result.name: result for result in pool.map(Checks.guarded, chosen)}
        results = [ran.get(name) or Result(name, None, left_out[name]) for name in CHECKS]
    for result in results:
        print(result.line())
    failed = [result.name for result in results if result.passed is False]
    passed = sum(result.passed is True for result in results)
    print(f"gpu_check: {passed} passed, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f", {sum(result.passed is None for result in results)} left out, in {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


class Checks:
    """The checks, each a method returning its Result, in folders of their own under `work`."""

    def __init__(self, work: Path, tiny: bool):
        self.work, self.tiny = work, tiny
        self.device = "cpu" if tiny else "cuda"
        self.base = ["--dataset", "synthetic", *NETWORK["tiny" if tiny else "gpu"], "--batch-size", "32",
                     "--num-checkpoints", "3", "--device", self.device]

    @staticmethod
    def guarded(check) -> Result:
        """A check's result; an error of the check itself (not of what it checks) is a failure."""
        try:
            return check()
        except Exception as err:  # noqa: BLE001 - reported as the check's failure, the others go on
            return Result(check.__name__, False, f"{type(err).__name__}: {err}")

    def resume(self) -> Result:
        flags = [*self.base, "--epochs", "8", "--deterministic"]
        whole, cut = self.work / "resume-whole", self.work / "resume-cut"
        outputs = [self.train(whole, flags)]
        process = self.start(["train.py", *flags, "--run-dir", str(cut)])
        while not runs.read_log(cut) and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        stopped_output = _finish(process)
        if process.returncode == 0:
            return Result("resume", False, "the run ended before SIGTERM could stop it: nothing was resumed")
        if process.returncode != 128 + signal.SIGTERM:
            return Result("resume", False, f"train.py stopped by SIGTERM exited {process.returncode}: "
                          f"{_last_line(stopped_output)}")
        stopped = runs.read_log(cut)[-1]["epoch"]
        outputs += [stopped_output, self.train(cut, flags)]
        same_log = _without_seconds(runs.read_log(cut)) == _without_seconds(runs.read_log(whole))
        mine, theirs = (runs.load_checkpoint(folder / "last.pt")["model"] for folder in (cut, whole))
        same_weights = all(torch.equal(mine[key], theirs[key]) for key in theirs)
        verdict = "bit-identical" if same_log and same_weights else \
            f"DIFFERENT ({'log' if not same_log else ''}{' and ' if not (same_log or same_weights) else ''}" \
            f"{'weights' if not same_weights else ''})"
        return Result("resume", same_log and same_weights, f"stopped after epoch {stopped} of 8 and resumed: weights "
                      f"and log {verdict} to the uninterrupted run", _peak(outputs))

    def compile(self) -> Result:
        flags = [*self.base, "--epochs", "3"]
        eager, compiled = self.work / "compile-eager", self.work / "compile-graphs"
        with ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda job: self.train(*job), [(eager, flags), (compiled, [*flags, "--compile"])]))
        pairs = [(a["train_loss"], b["train_loss"]) for a, b in zip(runs.read_log(eager), runs.read_log(compiled))]
        worst = max(abs(a - b) / abs(a) for a, b in pairs)
        return Result("compile", len(pairs) == 3 and worst <= COMPILE_TOLERANCE, "train loss eager vs compiled: "
                      + ", ".join(f"{a:.4f} vs {b:.4f}" for a, b in pairs)
                      + f" (largest relative difference {worst:.1e}, tolerance {COMPILE_TOLERANCE:g})", _peak(outputs))

    def bf16(self) -> Result:
        flags = [*self.base, "--epochs", "3"]
        fp32, bf16 = self.work / "bf16-fp32", self.work / "bf16-bf16"
        outputs = [self.train(fp32, flags), self.train(bf16, [*flags, "--precision", "bf16"])]
        ours, reference = runs.read_log(bf16), runs.read_log(fp32)
        finite = all(math.isfinite(row["train_loss"]) for row in ours)
        gap = abs(ours[-1]["train_loss"] - reference[-1]["train_loss"]) / reference[-1]["train_loss"]
        return Result("bf16", finite and gap <= BF16_TOLERANCE,
                      f"train loss after 3 epochs {ours[-1]['train_loss']:.4f}"
                      f" in bf16 vs {reference[-1]['train_loss']:.4f} in fp32 (relative difference {gap:.1e}, "
                      f"tolerance {BF16_TOLERANCE:g}){'' if finite else '; NOT finite'}", _peak(outputs))

    def follow(self) -> Result:
        run_dir, afterwards = self.work / "follow", self.work / "follow-afterwards"
        flags = [*self.base, "--epochs", "6"]
        trainer = self.start(["train.py", *flags, "--run-dir", str(run_dir)])
        follower = self.start(["validate_nc.py", "--run-dir", str(run_dir), "--follow", "30", "--device",
                               self.device, "--plots-dir", str(self.work / "follow-plots")])
        outputs = [_finish(trainer), _finish(follower)]
        if trainer.returncode or follower.returncode:
            return Result("follow", False, f"train.py exited {trainer.returncode}, validate_nc.py --follow "
                          f"{follower.returncode}: {_last_line(outputs[1] if follower.returncode else outputs[0])}")
        shutil.copytree(run_dir, afterwards, ignore=shutil.ignore_patterns("nc_metrics.csv", "summary.json"))
        outputs.append(self.validate(afterwards))
        followed, measured = runs.read_nc_metrics(run_dir), runs.read_nc_metrics(afterwards)
        checkpoints = [epoch for epoch, _ in runs.checkpoint_files(run_dir)]
        same = followed == measured and [row["epoch"] for row in followed] == checkpoints
        return Result("follow", same, f"measured checkpoints {checkpoints} as they landed; "
                      + ("the same numbers as validate_nc.py afterwards" if same else "DIFFERENT from validate_nc.py "
                         "afterwards"), _peak(outputs))

    def deepfool(self) -> Result:
        run_dir = self.work / "deepfool"
        outputs = [self.train(run_dir, [*self.base, "--epochs", "1", "--num-checkpoints", "1"])]
        outputs.append(self.validate(run_dir, "--adversarial", "--adversarial-samples", "20"))
        ours = runs.read_nc_metrics(run_dir)[-1]
        values = {key: ours[key] for key in ("deepfool_robustness", "deepfool_unflipped", "deepfool_steps")}
        finite = all(math.isfinite(value) for value in values.values())
        text = f"robustness {values['deepfool_robustness']:.4g} after {values['deepfool_steps']:.2f} steps on average"
        if self.tiny:
            return Result("deepfool", finite, f"on the CPU: {text}", _peak(outputs))
        on_cpu = self.work / "deepfool-cpu"
        shutil.copytree(run_dir, on_cpu, ignore=shutil.ignore_patterns("nc_metrics.csv", "summary.json"))
        self.validate(on_cpu, "--adversarial", "--adversarial-samples", "20", device="cpu")
        reference = runs.read_nc_metrics(on_cpu)[-1]["deepfool_robustness"]
        gap = abs(values["deepfool_robustness"] - reference) / reference
        return Result("deepfool", finite and gap <= DEEPFOOL_TOLERANCE, f"on the GPU: {text}; on the CPU "
                      f"{reference:.4g} (relative difference {gap:.1e}, tolerance {DEEPFOOL_TOLERANCE:g})",
                      _peak(outputs))

    def torchrun(self) -> Result:
        run_dir = self.work / "torchrun"
        output = self.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(REPO / "train.py"), *self.base, "--epochs", "1", "--run-dir", str(run_dir)])
        backend = "gloo" if self.tiny else "NCCL"
        return Result("torchrun", runs.read_log(run_dir)[-1]["epoch"] == 1,
                      f"one process ({backend}) trained an epoch", _peak([output]))

    def train(self, run_dir: Path, flags: list[str]) -> str:
        return self.run([sys.executable, str(REPO / "train.py"), *flags, "--run-dir", str(run_dir)])

    def validate(self, run_dir: Path, *flags: str, device: str | None = None) -> str:
        return self.run([sys.executable, str(REPO / "validate_nc.py"), "--run-dir", str(run_dir), "--device",
                         device or self.device, "--plots-dir", str(run_dir / "plots"), *flags])

    def run(self, command: list[str]) -> str:
        """The command's output; an error naming the command and its last line if it fails."""
        done = subprocess.run(command, cwd=self.work, env=_environment(), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{Path(command[1]).name} exited {done.returncode}: "
                               f"{_last_line(done.stdout + done.stderr)}")
        return done.stdout + done.stderr

    def start(self, words: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / words[0]), *words[1:]], cwd=self.work,
                                env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _environment() -> dict[str, str]:
    """One CPU thread per process: the checks run side by side."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _finish(process: subprocess.Popen) -> str:
    return process.communicate(timeout=600)[0]


def _peak(outputs: list[str]) -> float:
    """The largest "peak GPU memory X GiB" the outputs print, 0 if none does (on the CPU)."""
    found = [float(line.split(PEAK, 1)[1].split()[0]) for output in outputs for line in output.splitlines()
             if PEAK in line]
    return max(found, default=0.0)


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
