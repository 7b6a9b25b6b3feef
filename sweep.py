"""Run a study: train.py and validate_nc.py for every combination of the values given, here or on Slurm.

    python sweep.py --name losses --loss ce mse --mixup-alpha 0 1 --seed 0 1 2     # 12 runs, one at a time
    python sweep.py --name losses --loss ce mse --mixup-alpha 0 1 --seed 0 1 2 --parallel 2
    python sweep.py --name cifar10 --dataset CIFAR10 --model vgg11 resnet18 densenet121 --lr-grid \\
        --executor slurm --partition gpu --time 600                                 # one Slurm array job
    python sweep.py ... --dry-run         # the runs, their status and the submission; runs and writes nothing
    python sweep.py --script ufm.py --name minority --no-bias --imbalance 1 10 100 1000   # the UFM's runs

Every flag of train.py that selects a run takes one or more values, and the study is their product; the
others (--num-checkpoints, --device, --deterministic, ...) go to every run unchanged, except --download, which
sweep.py does itself, once per dataset, before any job starts. Each run is the ordinary run of its flags,
in the folder train.py chooses; its job runs `python train.py ...`, then `python validate_nc.py --run-dir
<folder>` with the study's --layers, --test-collapse and --adversarial. studies/NAME/ receives study.json,
runs.csv, table.md and a log per run (see studies.py). The same command run again skips the runs that are
done and resumes the others, so it completes a study after a crash, a pre-emption or Slurm requeues that
ran out. A run that another process is training is reported busy and left to it. Exit status 1 if a run
failed, 0 otherwise. With --script ufm.py the grid is made of ufm.py's flags (`sweep.py --script ufm.py
--help` lists them) and each job is `python ufm.py ...` alone (docs/ufm.md).
"""
from errors import ArgumentParser, interrupt_quietly, run_cli

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import argparse
import collections
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

import config
import datasets
import studies
import study_files

SLURM_FOLDER = "slurm"  # in the study's folder: submitit's pickles and its own logs of each job
# Slurm sends a job its --signal "up to 60 seconds earlier than specified" (sbatch(1)). submitit asks for
# 90 s; a tenth of --time (at most those 90 s) leaves a job of --time 2 at least 48 s, and no shorter
# limit leaves a job any time for sure.
SIGNAL_JITTER_S, MAX_SIGNAL_LEAD_S, MIN_TIME = 60, 90, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    script = _script(argv)  # whose flags make the grid, known before the parser that takes them is built
    parser = ArgumentParser(__doc__)
    grid = parser.add_argument_group("which runs: the grid", f"{script}'s flags that select a run, each taking "
                                     "one or more values: the study is every combination of them.")
    training = parser.add_argument_group("training", f"{script}'s other flags, which every run receives unchanged" +
                                         (" (--download excepted: sweep.py fetches each dataset once, before any job)."
                                          if script == "train.py" else "."))
    measurement = None if script != "train.py" else parser.add_argument_group(
        "measurement", "validate_nc.py's measurements beyond Figures 2-7, which every run's validate_nc.py receives.")
    study = parser.add_argument_group("the study", "Its folder, where and how its runs run.")
    slurm = parser.add_argument_group("Slurm", "With --executor slurm: the array job's resources.")
    studies.add_study_arguments(grid, training, measurement, script)
    add = study.add_argument
    add("--script", choices=tuple(studies.TRAINERS), default="train.py", help="the script of the study's runs: "
        "train.py (default), or ufm.py, the unconstrained-features model, whose flags then make the grid (see "
        "sweep.py --script ufm.py --help)")
    add("--name", required=True, type=_study_name, help="the study's folder is studies/NAME/; the same command "
        "run again finds it there and completes the study")
    add("--executor", choices=("local", "slurm"), default="local", help="local: on this machine (default); "
        "slurm: one Slurm array job through submitit, each job requeued when pre-empted or out of time")
    add("--parallel", type=config.positive_int, default=1, metavar="K", help="local: K runs at a time (default "
        "1); on the CPU each gets 1/K of the threads torch would take (the physical cores, or OMP_NUM_THREADS), "
        "on a GPU the K processes share it")
    add("--dry-run", action="store_true", help="print the runs with their status (new, partial, done) and, for "
        "slurm, the submission; start and write nothing")
    add = slurm.add_argument
    add("--partition", help="the partition (default: the cluster's default)")
    add("--gpus-per-job", type=config.non_negative_int, default=1, metavar="N",
        help="GPUs per job (default 1; 0 for CPU nodes)")
    add("--cpus-per-job", type=config.positive_int, default=4, metavar="N",
        help="CPU cores per job, and its OpenMP/MKL threads (default 4)")
    add("--time", type=_minutes, default=240, metavar="MINUTES", help="time limit of each job (default "
        f"240, at least {MIN_TIME}); a run that needs longer is requeued and continues from its last.pt: Slurm "
        f"signals the job a tenth of --time (at most {MAX_SIGNAL_LEAD_S} s) before its limit, and submitit requeues "
        "it, 3 times at most")
    add("--max-parallel", type=config.positive_int, default=256, metavar="N",
        help="at most N jobs of the array at once (default 256)")
    add("--sbatch", type=_sbatch_option, nargs="+", default=[], metavar="KEY=VALUE",
        help="further sbatch options, e.g. account=ABC qos=high mem=32G")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(args: argparse.Namespace) -> int:
    study = studies.plan(args, args.name, args.argv)
    states = {run.run_dir: studies.run_state(run) for run in study.runs}
    todo = [run for run in study.runs if states[run.run_dir] != "done"]
    threads = _threads_per_job(args)
    if args.dry_run:
        studies.check(study)
        _print_plan(study, states, todo, args, threads)
        return 0
    began = time.perf_counter()
    studies.start(study)
    if getattr(args, "download", False):
        for dataset in study.grid["dataset"]:
            datasets.fetch(dataset, args.data_root)  # here, once: jobs fetching into one folder at once would race
    for run in study.runs:
        if states[run.run_dir] == "done":
            print(f"skipped  {run.run_dir} (done)", flush=True)
    if args.executor == "slurm":
        return _submit(study, todo, args, threads)
    outcomes = _run_locally(studies.Job(str(study.folder), threads), todo, args.parallel)
    studies.refresh_tables(study.folder)
    counts = collections.Counter(outcome["status"] for outcome in outcomes)
    print(f"study {study.folder}: {counts['done']} done, {counts['failed']} failed, {counts['busy']} busy, "
          f"{counts['pending']} interrupted, {len(study.runs) - len(todo)} skipped (done before) of {len(study.runs)} "
          f"runs in {time.perf_counter() - began:.0f} s; tables in {study.folder / study_files.RUNS_TABLE} and "
          f"{study_files.MARKDOWN_TABLE}", flush=True)
    return 1 if counts["failed"] else 0


def _run_locally(job: studies.Job, todo: list[study_files.Run], parallel: int) -> list[dict]:
    """Run the jobs `parallel` at a time, in threads that wait for their subprocesses; the outcomes.
    On Ctrl-C no further job starts (the running ones get the terminal's Ctrl-C too, and stop resumable)."""
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(job, run) for run in todo]
        try:
            return [future.result() for future in as_completed(futures)]
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise


def _submit(study: studies.Study, todo: list[study_files.Run], args: argparse.Namespace, threads: int) -> int:
    """Submit the runs that are not done as one Slurm array job (a single run as a plain job) and return;
    each job rewrites the study's tables when it ends."""
    if not todo:
        print(f"nothing to submit: every run of {study.folder} is done")
        return 0
    import slurm  # here alone: submitit is needed to submit, not to run a study on this machine
    jobs = slurm.submit(study, todo, study.folder / SLURM_FOLDER / "%j", _slurm_parameters(study, args), threads)
    job_id = jobs[0].job_id.split("_")[0]
    print(f"submitted Slurm job {job_id}: {len(todo)} runs, at most {min(len(todo), args.max_parallel)} at a time. "
          f"Follow it with `squeue -j {job_id}` and {study.folder}/logs/; the tables are rewritten as each run ends; "
          "run this command again afterwards to resubmit what did not finish", flush=True)
    return 0


def _slurm_parameters(study: studies.Study, args: argparse.Namespace) -> dict:
    """submitit.SlurmExecutor's parameters (sbatch's names) for the study's jobs. The jobs start in this
    folder, where the runs' folders are, and import the repo's modules to unpickle their job."""
    repo = shlex.quote(str(studies.REPO))
    parameters = {"job_name": f"study-{study.name}", "time": args.time, "signal_delay_s": signal_lead(args.time),
                  "cpus_per_task": args.cpus_per_job, "array_parallelism": args.max_parallel,
                  "setup": [f"cd {shlex.quote(os.getcwd())}", f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    if args.partition:
        parameters["partition"] = args.partition
    if args.gpus_per_job:
        parameters["gpus_per_node"] = args.gpus_per_job
    if args.sbatch:
        parameters["additional_parameters"] = dict(args.sbatch)
    return parameters


def signal_lead(minutes: int) -> int:
    """Seconds before a job's time limit at which Slurm is to send it the signal that submitit requeues it on:
    a tenth of the limit, at most submitit's default. Slurm may send it up to SIGNAL_JITTER_S earlier."""
    return min(MAX_SIGNAL_LEAD_S, 6 * minutes)


def _threads_per_job(args: argparse.Namespace) -> int | None:
    """Local runs on the CPU share the threads torch would give one process here (the physical cores, or
    OMP_NUM_THREADS when set): K runs at a time get 1/K of them each, where each train.py would otherwise
    take them all and K of them would oversubscribe the cores. On a GPU, None: the runs share the GPU and
    keep torch's default. On Slurm each job has its own cores: --cpus-per-job."""
    if args.executor == "slurm":
        return args.cpus_per_job
    if config.resolve_device(args.device).type != "cpu":
        return None
    return max(1, torch.get_num_threads() // args.parallel)


def _print_plan(study: studies.Study, states: dict[str, str], todo: list[study_files.Run], args: argparse.Namespace,
                threads: int | None) -> None:
    """What the command would do: every run with its state and, for Slurm, the submission."""
    shape = " x ".join(f"{len(study.grid[key])} {key}" for key in study.varied)
    print(f"study {study.folder}: {len(study.runs)} runs{f' ({shape})' if shape else ''}, {len(todo)} to run")
    for run in study.runs:
        settings = ", ".join(config.setting_text(key, value) for key, value in run.settings.items()
                             if value is not None)
        print(f"  {states[run.run_dir]:<8} {run.run_dir}{'  ' + settings if settings else ''}")
    if args.executor == "local":
        print(f"local: {args.parallel} at a time" + (f", {threads} OpenMP/MKL threads each" if threads else ""))
        return
    parameters = _slurm_parameters(study, args)
    array = f"0-{len(todo) - 1}%{min(len(todo), args.max_parallel)}" if len(todo) > 1 else "none (a single job)"
    print(f"slurm (dry run, nothing submitted): submitit.SlurmExecutor(folder={study.folder / SLURM_FOLDER / '%j'}), "
          f"{len(todo)} jobs, array {array}; a job pre-empted or out of time is requeued and resumes its run")
    print("  sbatch parameters: " + ", ".join(f"{key}={value}" for key, value in parameters.items()))
    for index, run in enumerate(todo):
        job = studies.commands(run, states[run.run_dir])
        print(f"  job {index}: " + " && ".join(shlex.join(command) for command in job))


def _script(argv: list[str]) -> str:
    """The --script of a command line (train.py if none), read before its other flags, which depend on it; an
    unknown one is left for the full parser to refuse."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--script")
    given = chooser.parse_known_args(argv)[0].script
    return given if given in studies.TRAINERS else "train.py"


def _study_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"'{text}' cannot name a folder: use letters, digits, '.', '_' and '-'")
    return text


def _minutes(text: str) -> int:
    minutes = config.positive_int(text)
    if minutes < MIN_TIME:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_TIME} minutes: Slurm may send the requeue signal "
                                         f"up to {SIGNAL_JITTER_S} s earlier than asked, which could leave a "
                                         f"{minutes}-minute job no time to train")
    return minutes


def _sbatch_option(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not (key and equals and value):
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE (an sbatch option without its dashes)")
    return key, value


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
