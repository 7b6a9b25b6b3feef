"""Benchmark of nc_metrics.py against the NC1 / NCC computation of the authors' notebook lineage.

    python bench/metrics.py                  # N = 50,000 at d = 512, C = 10 and at d = 2048, C = 100
    python bench/metrics.py --quick          # tiny sizes, a few seconds (the test suite runs this)
    python bench/metrics.py --device cuda    # ours on the GPU; the baseline stays on the CPU

On synthetic float32 features (balanced labels, a common offset plus random class directions and
noise, a classifier close to the class means) it times, with one torch thread and one OpenBLAS thread:

    ours      what validate_nc.py does: `FeatureStats.update` per batch (the float32 batches kept),
              `metrics_from_stats`, then `ncc_disagreements` per kept batch once the class means are known.
    baseline  the notebook's method, written here from its description, in float64 on the CPU: a pass for
              the class means; a pass adding, per batch and per class, the B_c x d x d outer products
              around the class means into Sigma_W; Sigma_B^+ from `scipy.sparse.linalg.svds(Sigma_B,
              k=C-1)`; then a loop over the samples taking argmin_c torch.norm(h - M), compared with the
              classifier's argmax.

Repetitions are interleaved and the median is reported. When one baseline run over all N samples is
estimated (from a small pilot) to take over a minute, the baseline runs on the first --subset samples
and its three passes are scaled by N / subset (the svds and trace, which do not depend on N, are not).
The relative difference of NC1 and of the NCC mismatch is taken on the samples the baseline saw.
Memory: in a fresh process per N, FeatureStats is fed batches from a generator (the features are never
all held); reported are the bytes of its tensors and how far the peak resident set (Linux's VmHWM, reset
before feeding) rose above the resident set before feeding, which includes the batch in flight and
the update's temporaries (glibc's mmap threshold fixed, see memory_in_subprocess); on --device cuda,
the peak CUDA allocation instead.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import scipy.sparse.linalg  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from nc_metrics import FeatureStats, metrics_from_stats, ncc_disagreements  # noqa: E402

# (N, d, C, the speed-up this 2-core CPU should reach)
CONFIGS = ((50_000, 512, 10, 10.0), (50_000, 2048, 100, 50.0))
QUICK_CONFIGS = ((600, 32, 4, None),)
MEMORY_SIZES, MEMORY_SHAPE = (10_000, 200_000), (2048, 100)
QUICK_MEMORY_SIZES, QUICK_MEMORY_SHAPE = (600, 2400), (32, 4)
PILOT_SAMPLES = 200
MAX_REL_DIFF = 1e-9
MAX_MEMORY_DRIFT = 0.10
COMPARED = ("nc1", "ncc_mismatch")
BASELINE_PHASES = ("means", "within", "svds", "ncc")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Comparison:
    n: int
    dim: int
    classes: int
    target: float | None
    ours_s: float
    baseline_s: float
    baseline_samples: int
    rel_diff: float

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.ours_s

    def line(self, device: str) -> str:
        scaled = (f" (run on {self.baseline_samples} of {self.n} samples, scaled linearly; svds not scaled)"
                  if self.baseline_samples < self.n else "")
        return (f"metrics d={self.dim} C={self.classes} N={self.n}: ours {self.ours_s:.3g} s on {device}, "
                f"baseline {self.baseline_s:.3g} s{scaled} -> {self.speedup:.0f}x faster; "
                f"max rel diff {self.rel_diff:.0e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes and one repetition, to check the bench still runs")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="where ours runs (default cpu)")
    add("--reps", type=int, help="interleaved repetitions (default 3; 1 with --quick)")
    add("--batch", type=int, help="samples per batch (default 1000; 200 with --quick)")
    add("--subset", type=int, default=2000, help="samples the baseline runs on when all N would take too long")
    add("--baseline-seconds", type=float, default=60.0,
        help="longest estimated baseline run over all N before it runs on --subset instead (default 60)")
    add("--memory-probe", type=int, metavar="N", help=argparse.SUPPRESS)  # the fresh process of one memory run
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.batch is None:
        args.batch = 200 if args.quick else 1000
    if min(args.reps, args.batch, args.subset) < 1:
        parser.error("--reps, --batch and --subset must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    if args.memory_probe is not None:
        dim, classes = QUICK_MEMORY_SHAPE if args.quick else MEMORY_SHAPE
        print(json.dumps(memory_probe(args.memory_probe, dim, classes, args.batch, args.device)))
        return 0
    with openblas_threads(1) as limited:
        print(f"float64 on both sides; torch threads 1, OpenBLAS threads 1 in {limited} libraries; ours timed: "
              f"FeatureStats.update per batch of {args.batch} + metrics_from_stats + ncc_disagreements per "
              f"kept float32 batch, on {args.device}; median of {args.reps} interleaved repetitions")
        comparisons = []
        for n, dim, classes, target in QUICK_CONFIGS if args.quick else CONFIGS:
            comparisons.append(compare(n, dim, classes, target, args))
            print(comparisons[-1].line(args.device), flush=True)
    memory_line, memory_ratio = memory_report(args)
    print(memory_line)
    print(summary(comparisons, memory_ratio, args.quick))
    return 0


def compare(n: int, dim: int, classes: int, target: float | None, args: argparse.Namespace) -> Comparison:
    """Times ours on all N samples against the baseline (on a subset if all N would take too long)."""
    features, labels, weight, bias = synthetic_problem(n, dim, classes)
    device = torch.device(args.device)
    kept = [(f.to(device), y.to(device)) for f, y in zip(features.split(args.batch), labels.split(args.batch))]
    classifier = (weight.to(device), bias.to(device))

    pilot = min(n, PILOT_SAMPLES)
    _, phases = baseline(_batches_of(features, labels, pilot, args.batch), weight, bias, classes)
    samples = n if _scaled_seconds(phases, n, pilot) <= args.baseline_seconds else min(n, args.subset)
    shown = _batches_of(features, labels, samples, args.batch)
    # Ours on the baseline's own samples, for the difference (and as ours' warm-up).
    ours_same = ours([(f.to(device), y.to(device)) for f, y in shown], *classifier, classes)

    ours_times, baseline_times = [], []
    for _ in range(args.reps):
        ours_times.append(common.seconds_of(lambda: ours(kept, *classifier, classes), device))
        reference, phases = baseline(shown, weight, bias, classes)
        baseline_times.append(_scaled_seconds(phases, n, samples))
    return Comparison(n, dim, classes, target, statistics.median(ours_times), statistics.median(baseline_times),
                      samples, max(_relative_difference(ours_same[k], reference[k]) for k in COMPARED))


def ours(batches: Batches, weight: torch.Tensor, bias: torch.Tensor, classes: int) -> dict[str, float]:
    """Every metric, streamed the way validate_nc.py does it."""
    stats = FeatureStats(classes, weight.shape[1], device=weight.device)
    for features, labels in batches:
        stats.update(features, labels)
    metrics = metrics_from_stats(stats, weight)
    means = stats.class_means()
    disagreements = sum(ncc_disagreements(features, weight, bias, means) for features, _ in batches)
    metrics["ncc_mismatch"] = disagreements.item() / stats.num_samples
    return metrics


def baseline(batches: Batches, weight: torch.Tensor, bias: torch.Tensor,
             classes: int) -> tuple[dict[str, float], dict[str, float]]:
    """NC1 and the NCC mismatch the notebook's way, with the seconds each phase took."""
    marks = [time.perf_counter()]
    sums = torch.zeros(classes, weight.shape[1], dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    for features, labels in batches:
        h = features.double()
        for c in range(classes):
            members = h[labels == c]
            sums[c] += members.sum(dim=0)
            counts[c] += len(members)
    means = sums / counts[:, None]
    global_mean = sums.sum(dim=0) / counts.sum()
    marks.append(time.perf_counter())

    within = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
    for features, labels in batches:
        h = features.double()
        for c in range(classes):
            z = h[labels == c] - means[c]
            within += torch.matmul(z.unsqueeze(-1), z.unsqueeze(1)).sum(dim=0)
    within /= counts.sum()
    marks.append(time.perf_counter())

    centred = means - global_mean
    between = (centred.T @ centred / classes).numpy()
    u, s, vt = scipy.sparse.linalg.svds(between, k=classes - 1, rng=np.random.default_rng(0))
    nc1 = np.trace(within.numpy() @ (u @ np.diag(1 / s) @ vt)) / classes
    marks.append(time.perf_counter())

    w, b = weight.double(), bias.double()
    disagreements = 0
    for features, _ in batches:
        h = features.double()
        predicted = (h @ w.T + b).argmax(dim=1)
        for i in range(len(h)):
            nearest = torch.argmin(torch.norm(h[i] - means, dim=1))
            disagreements += int(nearest != predicted[i])
    marks.append(time.perf_counter())
    phases = {phase: end - start for phase, start, end in zip(BASELINE_PHASES, marks, marks[1:])}
    return {"nc1": float(nc1), "ncc_mismatch": disagreements / counts.sum().item()}, phases


def memory_report(args: argparse.Namespace) -> tuple[str, float]:
    """The FeatureStats memory line, each N measured in a fresh process, and the ratio of the peaks."""
    dim, classes = QUICK_MEMORY_SHAPE if args.quick else MEMORY_SHAPE
    probes = {n: _memory_in_subprocess(n, args) for n in (QUICK_MEMORY_SIZES if args.quick else MEMORY_SIZES)}
    small, large = (probes[n]["peak_growth"] for n in sorted(probes))
    ratio = large / small if small else math.nan
    peak = "peak CUDA allocation growth" if args.device == "cuda" else "peak RSS growth"
    sizes = "; ".join(f"N={n} tensors {p['tensor_bytes'] / 1e6:.3g} MB, {peak} {p['peak_growth'] / 1e6:.3g} MB"
                      for n, p in sorted(probes.items()))
    return (f"FeatureStats memory d={dim} C={classes} (batches of {args.batch} from a generator, "
            f"fresh process per N): {sizes}; ratio {ratio:.2f}"), ratio


def memory_probe(n: int, dim: int, classes: int, batch: int, device: str) -> dict[str, float]:
    """Bytes of FeatureStats' tensors and the growth of the process's peak memory while feeding it n samples."""
    # A first update of a tiny accumulator, so the one-off initialisation of torch's kernels is not counted.
    FeatureStats(2, 1, device=device).update(torch.zeros(2, 1, device=device), torch.arange(2, device=device))
    start = _memory_now(device)
    stats = FeatureStats(classes, dim, device=device)
    for features, labels in feature_stream(n, dim, classes, batch):
        stats.update(features.to(device), labels.to(device))
    tensors = [value for value in vars(stats).values() if isinstance(value, torch.Tensor)]
    return {"tensor_bytes": sum(t.nbytes for t in tensors), "peak_growth": _memory_peak(device) - start}


def summary(comparisons: list[Comparison], memory_ratio: float, quick: bool) -> str:
    speedups = ", ".join(f"{c.speedup:.0f}x at d={c.dim} C={c.classes}"
                         + (f" (target {c.target:.0f}x)" if c.target else "") for c in comparisons)
    rel_diff = max(c.rel_diff for c in comparisons)
    text = (f"summary: {speedups}; max rel diff {rel_diff:.0e} (target {MAX_REL_DIFF:.0e}); "
            f"memory ratio {memory_ratio:.2f} (target within {MAX_MEMORY_DRIFT:.0%})")
    if quick:
        return text + ": quick sizes, targets not checked"
    met = (all(c.speedup >= c.target for c in comparisons) and rel_diff <= MAX_REL_DIFF
           and abs(memory_ratio - 1) <= MAX_MEMORY_DRIFT)
    return text + (": all targets met" if met else ": TARGET MISSED")


def synthetic_problem(n: int, dim: int, classes: int,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (n, d) float32 with balanced labels (n,), and a classifier weight (C, d) and bias (C,)."""
    features, labels = next(feature_stream(n, dim, classes, n, seed))
    return features, labels, *_classifier(dim, classes, seed)


def feature_stream(n: int, dim: int, classes: int, batch: int,
                   seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic float32 features in batches, generated as they are asked for, with labels balanced in every
    prefix of a multiple of C samples (so a subset or a pilot sees every class)."""
    generator = torch.Generator().manual_seed(seed)
    means = _class_means(dim, classes, seed)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        blocks = torch.rand(math.ceil(size / classes), classes, generator=generator).argsort(dim=1)
        labels = blocks.flatten()[:size]
        noise = torch.randn(size, dim, generator=generator)
        yield means[labels] + noise, labels


@contextlib.contextmanager
def openblas_threads(count: int) -> Iterator[int]:
    """Limits every loaded OpenBLAS (numpy's and scipy's, used by svds) to `count` threads, then restores them;
    yields how many libraries were limited. torch.set_num_threads does not reach them."""
    controls = _openblas_controls()
    saved = [get() for get, _ in controls]
    for _, set_threads in controls:
        set_threads(count)
    try:
        yield len(controls)
    finally:
        for (_, set_threads), value in zip(controls, saved):
            set_threads(value)


def _scaled_seconds(phases: dict[str, float], n: int, samples: int) -> float:
    """The baseline's seconds for n samples from a run on `samples`: the passes over samples scale, svds does not."""
    return (phases["means"] + phases["within"] + phases["ncc"]) * n / samples + phases["svds"]


def _relative_difference(ours_value: float, baseline_value: float) -> float:
    scale = max(abs(ours_value), abs(baseline_value))
    return abs(ours_value - baseline_value) / scale if scale else 0.0


def _memory_in_subprocess(n: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", str(n),
               "--device", args.device, "--batch", str(args.batch)] + (["--quick"] if args.quick else [])
    # glibc's adaptive mmap threshold would keep freed batch buffers in the heap, so the peak RSS would drift
    # by 10-20% with the allocation history rather than with N; a fixed threshold returns them at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    finished = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(finished.stdout.splitlines()[-1])


def _class_means(dim: int, classes: int, seed: int) -> torch.Tensor:
    """Post-ReLU-like class means: a common nonnegative offset far from 0 (which tests cancellation) plus random
    class directions of norm about 5 against unit noise per coordinate, so that classes overlap a little."""
    generator = torch.Generator().manual_seed(seed + 1)
    offset = 4.0 * torch.rand(dim, generator=generator)
    return offset + 5.0 * torch.randn(classes, dim, generator=generator) / math.sqrt(dim)


def _classifier(dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest-class-mean rule as a linear classifier, its weight perturbed so that some samples disagree."""
    generator = torch.Generator().manual_seed(seed + 2)
    means = _class_means(dim, classes, seed)
    centre = means.mean(dim=0)
    centred = means - centre
    noise = torch.randn(classes, dim, generator=generator)
    weight = centred + 0.3 * centred.norm(dim=1, keepdim=True) * noise / math.sqrt(dim)
    return weight, -weight @ centre - 0.5 * centred.pow(2).sum(dim=1)


def _batches_of(features: torch.Tensor, labels: torch.Tensor, samples: int, batch: int) -> Batches:
    return list(zip(features[:samples].split(batch), labels[:samples].split(batch)))


def _memory_now(device: str) -> int:
    """Bytes in use now, CUDA allocations or the resident set, after resetting the peak that _memory_peak reads."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # getrusage's peak cannot be reset and may still hold the imports' transient peak; Linux's VmHWM can.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_bytes("VmRSS")


def _memory_peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        kilobytes = next(line.split()[1] for line in status if line.startswith(field + ":"))
    return int(kilobytes) * 1024


def _openblas_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of each OpenBLAS mapped into this process (Linux only; else none)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[-1] for fields in map(str.split, maps) if len(fields) == 6}
    except OSError:
        return []
    controls = []
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p)):
        library = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            get = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
            if get is not None:
                controls.append((get, getattr(library, f"{prefix}_set_num_threads{suffix}")))
                break
    return controls


if __name__ == "__main__":
    sys.exit(main(parse_args()))
