"""Where tensors live: the random draws of a run are made on the host, by CPU generators, so that a run
is the same on every device, and then moved to the device without waiting for it.

Every tensor created inside a training step, an evaluation or a measurement names its device: the
device of the data it joins, or `HOST` for a draw from a CPU generator, moved by `to_device`. The tests
run those passes with the default device set to `meta`, where a tensor created without a device would
land and then fail to mix with the data.
"""
import torch

HOST = torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied without blocking: a blocking host-to-GPU copy would wait for every
    kernel queued before it, at each batch."""
    return tensor.to(device, non_blocking=True)
