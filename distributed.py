"""The process group of a `torchrun` launch: joining and leaving it, this process's rank, and sums across it.

Under `torchrun --nproc_per_node=K script.py ...` every process runs the whole script; torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address. `process_group` joins the group (NCCL with
GPU LOCAL_RANK on CUDA, gloo on the CPU); in a plain `python` process it does nothing. With one
process (plain or under torchrun) every function here is the identity, so single-process runs are
untouched.

A user error must stop every process together: a process that stopped alone would leave the others
waiting in their next collective. `on_every_rank` and `on_rank_zero` run a step and share its
outcome; a `UserError` on any process is raised on process 0, which prints it, while the others exit
quietly with the same status. Neither may run inside the other: a process leaving the inner one
would leave the outer one waiting.
"""
import contextlib
import gc
import os
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import UserError
from nc_metrics import FeatureStats

T = TypeVar("T")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration and yield this process's device (CUDA device
    LOCAL_RANK on a GPU machine); outside torchrun, yield `device` unchanged. A one-process torchrun
    joins a group of one, so that it starts the backend (NCCL on a GPU) as a larger one would; every
    function below still treats it as the single process it is."""
    if "RANK" not in os.environ:
        yield device
        return
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this machine than the {torch.cuda.device_count()} "
                            f"visible GPU(s); pass --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        # A DDP reducer left for the interpreter's exit to destroy, or a process leaving while another
        # still tears down, can abort a gloo process ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the group, 0 outside torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group, 1 outside torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is the one that writes files and prints (rank 0)."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the processes, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_stats(stats: FeatureStats) -> None:
    """Turn each process's `FeatureStats` of its shard into those of all shards together, in place.

    The sums are first re-centred on a common shift, for each class the one of the lowest rank that
    saw it: with shards in rank order that is the first sample of the class, the shift a single
    process would have used."""
    if world_size() == 1:
        return
    owner = torch.where(stats.counts > 0, rank(), world_size()).to(torch.int64)
    dist.all_reduce(owner, op=dist.ReduceOp.MIN)
    shift = torch.where((owner == rank())[:, None], stats.shift, torch.zeros_like(stats.shift))
    dist.all_reduce(shift)  # one non-zero term per class: exact
    stats.rebase(shift)
    for tensor in (stats.counts, stats.sums, stats.scatter, stats.squares):
        dist.all_reduce(tensor)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process the buffers (batch-norm running statistics) of process 0."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def on_every_rank(step: Callable[..., T], *args) -> T:
    """`step(*args)` on every process; a `UserError` on any of them stops them all (see the module)."""
    return _run_with_one_outcome(step, args, everywhere=True)


def on_rank_zero(step: Callable[..., T], *args) -> T | None:
    """`step(*args)` on process 0 only (None elsewhere), the others waiting for it; a `UserError`
    there stops every process."""
    return _run_with_one_outcome(step, args, everywhere=False)


def first_message(message: str | None) -> str | None:
    """The message of the lowest-ranked process that has one, the same on every process (None if none has)."""
    if world_size() == 1:
        return message
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)
    return next((found for found in messages if found is not None), None)


def _run_with_one_outcome(step: Callable[..., T], args: tuple, everywhere: bool) -> T | None:
    """`step(*args)` on every process (`everywhere`) or on process 0, ending the same way on all: its result,
    or, where one failed with a UserError, that error raised by process 0 and the others exiting quietly."""
    if world_size() == 1:
        return step(*args)
    result, failure = None, None
    if everywhere or is_main():
        try:
            result = step(*args)
        except UserError as err:
            failure = err
    mine = None if failure is None else str(failure) if is_main() else f"process {rank()}: {failure}"
    message = first_message(mine)
    if message is None:
        return result
    if not is_main():
        raise SystemExit(2)  # process 0 prints the message: once, not once per process
    raise failure or UserError(message)
