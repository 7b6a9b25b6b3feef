"""Test-wide settings: one torch thread, since two threads on two loaded cores can be 100x slower; and the
`quick` marker on every test not marked slow, compile or slurm (`python -m pytest -m quick`)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
NOT_QUICK = ("slow", "compile", "slurm")


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in NOT_QUICK):
            item.add_marker(pytest.mark.quick)
