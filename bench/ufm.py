"""Benchmark of ufm.py's gradient-descent step: how its time grows with the classes K and the samples N.

    python bench/ufm.py               # d = 512: (K, N) = (10, 5,000), the baseline; (100, 5,000); (10, 500);
                                      # (10, 50,000); (100, 50,000)
    python bench/ufm.py --quick       # tiny sizes, a few seconds (the test suite runs this)

Each case is the unconstrained-features model of ufm.py's defaults (cross-entropy with a bias, float64, gd)
at K classes of N/K samples, built by unconstrained.initial_model and stepped by unconstrained.train (no
measurement). The cases are timed in turn, ABCABC..., --repeats times, and each one's median seconds per
step is printed with its ratio to the baseline's and, for comparison, the ratio of their K N: a step is
three products of an N x d and a d x K matrix (the logits and the two gradients) and a few passes over
the N x d features (weight decay, update), so it grows with N at least linearly and with K less than
linearly while those passes weigh.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import config  # noqa: E402
import ufm  # noqa: E402
import unconstrained  # noqa: E402

FULL = {"dim": 512, "cases": [(10, 5000), (100, 5000), (10, 500), (10, 50000), (100, 50000)], "steps": 20,
        "repeats": 3}
QUICK = {"dim": 16, "cases": [(4, 40), (8, 40), (4, 400)], "steps": 5, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=config.positive_int, help=f"gd steps per timing (default {FULL['steps']})")
    parser.add_argument("--repeats", type=config.positive_int, help="timings of each case, interleaved; the median "
                        f"is reported (default {FULL['repeats']})")
    parser.add_argument("--threads", type=config.positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.steps = args.steps or preset["steps"]
    args.repeats = args.repeats or preset["repeats"]
    args.dim, args.cases = preset["dim"], preset["cases"]
    return args


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timings: dict[tuple[int, int], list[float]] = {case: [] for case in args.cases}
    for _ in range(args.repeats):
        for classes, count in args.cases:
            timings[(classes, count)].append(seconds_per_step(classes, count, args.dim, args.steps, device))
    base_case = args.cases[0]
    base = statistics.median(timings[base_case])
    for (classes, count), times in timings.items():
        median = statistics.median(times)
        size = classes * count / (base_case[0] * base_case[1])
        print(f"ufm step d={args.dim} K={classes} N={count}: {median * 1e3:.3g} ms on {device.type}, "
              f"{args.threads} thread(s); x{median / base:.3g} the baseline (K={base_case[0]} N={base_case[1]}), "
              f"whose K N it has x{size:.3g}")
    return 0


def seconds_per_step(classes: int, count: int, dim: int, steps: int, device: torch.device) -> float:
    """Seconds per gd step of ufm.py's default model at these sizes (after one untimed step)."""
    args = ufm.parse_args(["--classes", str(classes), "--dim", str(dim), "--per-class", str(count // classes),
                           "--steps", str(steps + 1)])
    run = unconstrained.resolve_config(args)
    model = unconstrained.initial_model(run, device)
    timed = []
    unconstrained.train(model, run, {1, steps + 1}, lambda step, seconds: timed.append(seconds))
    return timed[1] / steps

if __name__ == "__main__":
    sys.exit(main(parse_args()))
