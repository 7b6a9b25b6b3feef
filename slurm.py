"""A study on Slurm, through submitit: the array job's submission, and its jobs requeued when pre-empted.

Only `sweep.py --executor slurm` imports this module (and so submitit): a study run on this machine, and
every other script, needs neither. Each job is a `studies.Job` that also knows what Slurm's stop means:
submitit requeues it when Slurm pre-empts it or its time runs out, and train.py then resumes the run from
its last.pt.
"""
import contextlib
import io
import shlex
from pathlib import Path

import submitit

import studies
import study_files
from errors import UserError


class SlurmJob(studies.Job):
    """A study's job (see studies.Job) as a submitit checkpointable: when Slurm stops it, its outcome says
    whether it was requeued (and resumes from last.pt) or its requeues ran out (and how to continue it)."""

    def steps(self, run: study_files.Run, state: str, log, began: float) -> dict | None:
        try:
            return super().steps(run, state, log, began)
        except submitit.core.utils.UncompletedJobError as err:  # raised by submitit's signal handler
            argv = study_files.read_study(Path(self.study_dir))["argv"]
            self.end(run, {"status": "pending", "reason": f"its Slurm requeues ran out (submitit: {err}); continue "
                           f"it with: python sweep.py {shlex.join(argv)} (a longer --time needs fewer requeues)"},
                     began)
            raise
        except SystemExit:  # submitit's exit once it has requeued the job
            self.end(run, {"status": "pending", "reason": "stopped by Slurm (pre-empted or at its time limit) and "
                           "requeued: it resumes from last.pt when Slurm starts it again"}, began)
            raise

    def checkpoint(self, run: study_files.Run) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues after a pre-emption or time-out: this same job, which resumes the run."""
        return submitit.helpers.DelayedSubmission(self, run)


def submit(study: studies.Study, todo: list[study_files.Run], folder: Path, parameters: dict,
           threads: int | None) -> list[submitit.Job]:
    """Submit `todo` as one Slurm array job (a single run as a plain job) with sbatch's `parameters`,
    submitit's files in `folder`; a UserError if there is no Slurm here or sbatch refuses."""
    try:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**parameters)
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes a refusing sbatch's output there
            return executor.map_array(SlurmJob(str(study.folder), threads), todo)
    except (RuntimeError, OSError) as err:  # submitit's: no srun or sbatch here, or sbatch refused the job
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not submit to Slurm ({reason}); --dry-run shows the submission without a "
                        "cluster") from None
