"""Where tensors live: the random draws of a run are made on the host, by CPU generators, so that a run
is the same on every device, and then moved to the device without waiting for it.

Every tensor created inside a training step, an evaluation or a measurement names its device: the
device of the data it joins, or `HOST` for a draw from a CPU generator, moved by `to_device`. The tests
run those passes with the default device set to `meta`, where a tensor created without a device would
land and then fail to mix with the data.

`available_memory` tells how much more a device can hold, for the scripts to refuse, before allocating, a
run that would not fit.
"""
import resource
from pathlib import Path

import torch

HOST = torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied without blocking: a blocking host-to-GPU copy would wait for every
    kernel queued before it, at each batch."""
    return tensor.to(device, non_blocking=True)


def available_memory(device: torch.device) -> int | None:
    """The bytes this process may still allocate on `device`: a GPU's free memory; on the host the least of
    the memory the system has available, what the address-space limit (ulimit -v) leaves beyond what the
    process maps, and what its control group's limit leaves; None where none of these can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    bounds = [_kibibytes("/proc/meminfo", "MemAvailable:"), _address_space_left(), _cgroup_left()]
    known = [bound for bound in bounds if bound is not None]
    return min(known) if known else None


def _address_space_left() -> int | None:
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    mapped = _kibibytes("/proc/self/status", "VmSize:")
    if limit == resource.RLIM_INFINITY or mapped is None:
        return None
    return max(0, limit - mapped)


def _cgroup_left() -> int | None:
    """What the (version 2) control group's memory.max leaves beyond its memory.current, if it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _kibibytes(path: str, key: str) -> int | None:
    """The bytes of a "<key> <n> kB" line of a /proc file, or None."""
    try:
        with open(path) as lines:
            found = next((line.split()[1] for line in lines if line.startswith(key)), None)
    except OSError:
        return None
    return None if found is None else int(found) * 1024
