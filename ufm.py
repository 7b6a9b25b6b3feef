"""Train the unconstrained-features model (unconstrained.py): Neural Collapse at the theory's scale, in seconds.

    python ufm.py                                   # K = 10 classes, d = 512, 500 samples each, cross-entropy
    python ufm.py --classes 4 --dim 8 --per-class 20 --loss mse --no-bias --steps 5000
    python ufm.py --imbalance 100 --optimizer sgd --batch-size 128 --lr 1

The features H (one free d-vector per training sample), the classifier W and its bias b minimise
(1/N) sum_i loss(W h_i + b, y_i) + (lamW/2)||W||^2 + (lamH/2)||H||^2 with train.py's loss for the same
flags. The run folder (default runs/UFM-K<K>-d<D>-n<n>-<loss>-seed<seed>[-<non-default settings>]) is an
ordinary one that every plotting.py command draws: config.json, log.csv and nc_metrics.csv with a row at
each of --num-checkpoints log-spaced steps (their `epoch` column counts steps; no test split, so the test
columns are empty), summary.json and, last, final.pt with the tensors {"weight", "bias", "features",
"labels"} and the config. The same command run again finds a finished run and stops; an unfinished one
starts over. docs/ufm.md derives the optima the tests check it against.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import config
import progress
import runs
import unconstrained
from errors import ArgumentParser, UserError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    unconstrained.add_selection_arguments(parser.add_argument_group(
        "which run", "The model, the loss and the optimizer, which name the run's folder."))
    unconstrained.add_run_arguments(parser.add_argument_group(
        "measurement and device", "None of these names another run."))
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    run = unconstrained.resolve_config(args)
    run_dir = runs.usable_run_dir(unconstrained.default_run_dir(run, args))
    device = config.resolve_device(args.device)
    with runs.training_lock(run_dir):
        if _finished_before(run_dir, run):
            print(f"{run_dir} holds this run, finished: nothing to do (draw it with: python plotting.py panel "
                  f"{run_dir} --out panel.png)")
            return 0
        runs.remove_leftovers(run_dir)
        runs.write_config(run_dir, run)
        train_run(run, run_dir, device)
    return 0


def train_run(run: dict, run_dir: Path, device: torch.device) -> None:
    """Train the model and write the run folder: the tables at every measured step, then summary.json and
    final.pt."""
    model = unconstrained.initial_model(run, device)
    steps = run["steps"]
    measure_at = set(config.checkpoint_epochs(steps, run["num_checkpoints"]))
    log, measured = [], []
    began = time.perf_counter()
    print(f"run {run_dir}: K={run['classes']}, d={run['dim']}, N={sum(run['class_counts'])}, {run['loss']}, "
          f"{run['optimizer']} lr {run['lr']:g}, lamW {run['weight_decay_classifier']:g}, lamH "
          f"{run['weight_decay_features']:g}, {run['precision']} on {device}")
    with progress.bar(total=steps, unit="step", desc=run_dir.name) as bar:

        def record(step: int, seconds: float) -> None:
            logged, metrics = unconstrained.measure(model, run)
            log.append({"epoch": step, **logged, "seconds": seconds})
            measured.append({"epoch": step, **metrics})
            runs.write_csv(run_dir / "log.csv", log, runs.LOG_COLUMNS + unconstrained.LOG_EXTRA)
            extra = [key for key in measured[-1] if key not in runs.NC_COLUMNS]
            runs.write_csv(run_dir / "nc_metrics.csv", measured, runs.NC_COLUMNS + extra)
            bar.update(step - bar.n)
            progress.say(f"step {step}/{steps}  loss {logged['train_loss']:.4g}  NC1 {metrics['nc1']:.3g}  "
                         f"gradient norm {logged['grad_norm']:.2g}  {seconds:.1f}s")

        unconstrained.train(model, run, measure_at, record)
    runs.write_summary(run_dir)
    unconstrained.save_final(run_dir, model, run)
    last = measured[-1]
    print(f"done: {steps} steps in {time.perf_counter() - began:.1f} s ({sum(row['seconds'] for row in log):.1f} s "
          f"of steps); at the last: loss {last['train_loss']:.6g}, NC1 {last['nc1']:.3g}, gradient norm "
          f"{log[-1]['grad_norm']:.3g}. Draw it with: python plotting.py panel {run_dir} --out panel.png")


def _finished_before(run_dir: Path, run: dict) -> bool:
    """Whether the folder holds this run, finished; a UserError if it holds another run (finished or not)."""
    written = runs.read_config(run_dir, required=())
    if written is None:
        return False
    differences = unconstrained.result_differences(written, run)
    if written.get("script") != unconstrained.SCRIPT or differences:
        what = "; ".join(differences) or "it is not a run of ufm.py"
        raise UserError(f"{run_dir} holds another run ({what}); pass --run-dir another folder, or repeat that "
                        "run's flags")
    return unconstrained.finished(run_dir, run["steps"])


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
