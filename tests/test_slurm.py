"""sweep.py --executor slurm on a real Slurm cluster: a study's array ends with the tables and the bits of the
same study run locally; a run requeued mid-training by the signal Slurm sends before a job's time limit
resumes from last.pt, says in its study's tables when submitit's requeues ran out and how to continue it,
and continued so, ends bit-identical to an uninterrupted run; a refused submission is one line.

`../shared/slurm/local-slurm.sh start` (root) brings up a one-node cluster on this machine, and .ci/run
does so before the tests and stops it after. Where no cluster answers, these tests are skipped with the
reason (`pytest -rs`, the default here, prints it)."""
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import config
import runs
import studies
import sweep
import train
from errors import run_cli
from sweep_helpers import same_weights, sweep_in, table_rows, working_directory

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EPOCHS = 24  # long enough that four signals, each sent once an epoch more is logged, all land mid-training
FLAGS = ["--width", "4", "--samples-per-class", "20", "--epochs", str(EPOCHS), "--num-checkpoints", "3",
         "--device", "cpu", "--deterministic"]
SEEDS = ["--seed", "0", "1"]
SLURM = ["--executor", "slurm", "--gpus-per-job", "0", "--cpus-per-job", "1", "--time", "10"]
REQUEUES = 3  # submitit's max_num_timeout; with --time 10, every signal counts as reaching the time limit
DEADLINE_S = 300  # for any one wait on the cluster: a hung job fails the test instead of hanging it


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skips the test, saying why, unless a Slurm cluster answers here with a node up."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("no Slurm here (sbatch and sinfo are not on PATH); start a local cluster with "
                    "../shared/slurm/local-slurm.sh start (as root), as .ci/run does")
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("no Slurm cluster answers (sinfo timed out after 30 s)")
    states = sinfo.stdout.split()
    if sinfo.returncode != 0 or not any(state.rstrip("*") in ("idle", "mixed", "allocated") for state in states):
        reason = (sinfo.stderr.strip().splitlines() or [f"node states: {states}"])[-1]
        pytest.skip(f"no Slurm cluster answers with a node up ({reason}); start one with "
                    "../shared/slurm/local-slurm.sh start")


@pytest.fixture(scope="module")
def local(tmp_path_factory, cluster) -> Path:
    """The folder where the study of FLAGS and SEEDS ran with --executor local: the reference."""
    folder = tmp_path_factory.mktemp("local")
    code, output = sweep_in(folder, "--name", "s", *FLAGS, *SEEDS, "--parallel", "2")
    assert code == 0, output
    return folder


def test_an_array_ends_with_the_tables_and_bits_of_the_same_study_run_locally(local, tmp_path):
    code, output = sweep_in(tmp_path, "--name", "s", *FLAGS, *SEEDS, *SLURM)
    assert code == 0
    job = re.search(r"submitted Slurm job (\d+): 2 runs, at most 2 at a time", output).group(1)
    script = subprocess.run(["scontrol", "write", "batch_script", f"{job}_0", "-"], capture_output=True,
                            text=True, check=True).stdout
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --time=10", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --signal=USR2@60", f"cd {tmp_path}", f"export PYTHONPATH={studies.REPO}"):
        assert line in script  # the signal a tenth of the 10 minutes before the limit
    wait_until_gone(job, tmp_path)
    for table in ("runs.csv", "table.md"):
        assert without_command(tmp_path / "studies/s" / table) == without_command(local / "studies/s" / table)
    assert [row["status"] for row in table_rows(tmp_path / "studies/s/runs.csv")] == ["done", "done"]
    for seed in (0, 1):
        assert_same_run(tmp_path, local, run_folder(seed))


def test_a_run_requeued_until_its_requeues_run_out_says_so_and_continued_ends_as_an_uninterrupted_run(local, tmp_path):
    flags = ["--name", "r", *FLAGS, "--seed", "0", *SLURM]
    code, output = sweep_in(tmp_path, *flags)
    assert code == 0
    job = re.search(r"submitted Slurm job (\d+): 1 runs", output).group(1)
    run = tmp_path / run_folder(0)
    log = tmp_path / "studies/r/logs" / f"{run.name}.log"
    for attempt in range(REQUEUES + 1):
        logged = wait_for_an_epoch(run, log, attempt, job, tmp_path)
        assert logged < EPOCHS, f"the run finished before signal {attempt + 1}: make EPOCHS larger"
        # What Slurm sends the job's steps --signal's lead time before its limit.
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        if attempt < REQUEUES:
            wait_for_state(job, "PENDING", tmp_path)  # requeued by submitit, held back about two minutes
            _wait(lambda: table_rows(tmp_path / "studies/r/runs.csv")[0]["reason"].startswith("stopped by Slurm")
                  or None, job, "the table to say it was requeued", tmp_path)
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_until_gone(job, tmp_path)
    [row] = table_rows(tmp_path / "studies/r/runs.csv")
    assert row["status"] == "pending" and row["reason"].startswith("its Slurm requeues ran out")
    assert row["reason"] in (tmp_path / "studies/r/table.md").read_text()
    command = shlex.split(row["reason"].split("continue it with: ")[1].split(" (")[0])
    assert command[:2] == ["python", "sweep.py"]

    code, output = sweep_in(tmp_path, *command[2:])
    assert code == 0
    wait_until_gone(re.search(r"submitted Slurm job (\d+)", output).group(1), tmp_path)
    [row] = table_rows(tmp_path / "studies/r/runs.csv")
    assert row["status"] == "done"
    [expected] = [line for line in table_rows(local / "studies/s/runs.csv") if line["seed"] == "0"]
    assert {key: row[key] for key in row} == {key: expected[key] for key in row}  # seed is not varied here
    lines = log.read_text().splitlines()
    assert sum(line.startswith("=== ") for line in lines) == REQUEUES + 2  # four attempts, then the continuation
    assert sum("resuming after epoch" in line for line in lines) == REQUEUES + 1
    assert_same_run(tmp_path, local, run_folder(0))


def test_a_submission_slurm_refuses_is_one_line_and_nothing_is_queued(cluster, tmp_path, capsys):
    flags = ["--name", "bad", *FLAGS, *SLURM, "--partition", "no-such-partition"]
    with working_directory(tmp_path):
        code = run_cli(sweep.main, lambda: sweep.parse_args(flags))
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: could not submit to Slurm (") and "partition" in line.lower()
    assert subprocess.run(["squeue", "-h", "-n", "study-bad"], capture_output=True, text=True).stdout == ""


def run_folder(seed: int) -> Path:
    """The folder of the study's run of `seed`, as train.py computes it."""
    args = train.parse_args([*FLAGS, "--seed", str(seed)])
    return config.default_run_dir(config.resolve_config(args), args)


def assert_same_run(folder: Path, reference: Path, run: Path) -> None:
    """The run's nc_metrics.csv and every checkpoint's weights are those of the reference's run."""
    assert (folder / run / "nc_metrics.csv").read_bytes() == (reference / run / "nc_metrics.csv").read_bytes()
    names = sorted(path.relative_to(reference / run) for path in (reference / run).glob("checkpoints/*.pt"))
    assert names == sorted(path.relative_to(folder / run) for path in (folder / run).glob("checkpoints/*.pt"))
    for name in [*names, Path("last.pt")]:
        assert same_weights(folder / run / name, reference / run / name), f"{run}/{name}"


def without_command(table: Path) -> list[str]:
    """A study table's lines, less table.md's line with the sweep.py command (it names the executor)."""
    return [line for line in table.read_text().splitlines() if not line.startswith("`python sweep.py ")]


def wait_for_an_epoch(run: Path, log: Path, attempt: int, job: str, folder: Path) -> int:
    """Wait until the job's `attempt` (0: the first) trains: its train.py has said in the study's `log` from
    which epoch it resumes (so submitit's signal handler is set), and log.csv holds an epoch past it; the
    epochs logged then."""

    def trained() -> int | None:
        resumed = [int(epoch) for epoch in re.findall(r"resuming after epoch (\d+)", log.read_text())] \
            if log.exists() else []
        logged = len(runs.read_log(run))
        return logged if len(resumed) == attempt and logged > (resumed[-1] if attempt else 0) else None
    return _wait(trained, job, f"attempt {attempt + 1} to train an epoch", folder)


def wait_for_state(job: str, state: str, folder: Path) -> None:
    _wait(lambda: _squeue(job) == state or None, job, f"it to be {state}", folder)


def wait_until_gone(job: str, folder: Path) -> None:
    """Wait until the job (all tasks of an array) has left the queue: completed, failed or cancelled."""
    _wait(lambda: _squeue(job) == "" or None, job, "it to end", folder)


def _squeue(job: str) -> str:
    listed = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return " ".join(listed.stdout.split())  # "" once Slurm forgets it (a finished job id is an error then)


def _wait(found, job: str, what: str, folder: Path):
    """Poll `found` until it returns something; past DEADLINE_S, fail with the job's state and the study logs."""
    began = time.monotonic()
    while (value := found()) is None:
        if time.monotonic() - began > DEADLINE_S:
            logs = "\n".join(f"--- {path}\n{path.read_text()[-2000:]}"
                             for path in sorted(folder.glob("studies/*/logs/*")))
            pytest.fail(f"waited {DEADLINE_S} s for {what} (Slurm job {job}: {_squeue(job)!r})\n{logs}")
        time.sleep(0.1)
    return value
