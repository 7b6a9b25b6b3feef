"""Stages: every network's depth-wise interface, for Neural Collapse measured after each stage.

A network is cut into named stages in depth order; `stage_features(x)` gives the readout of each
(a CNN's global average pool, the ViT's class token) from one forward pass, and `features(x)` is the
last of them computed by the same code with no intermediate pooling, so the two agree bit for bit.
The CNNs keep running one flat sequence of modules with the stage boundaries held as positions in it,
which leaves their state_dict keys as they were before stages existed.
"""
from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn as nn


class StagedNetwork(nn.Module):
    """A classifier `fc` reading the penultimate features, which are the readout of the last stage.

    A subclass sets `stage_names` (depth order; the last one names the features) in its constructor and
    implements `_readouts(x, every)`: the readout of every stage, or of the last one alone when not
    `every`.
    """

    stage_names: tuple[str, ...]
    fc: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (B, D), the input of `fc`."""
        return self._readouts(x, every=False)[-1]

    def stage_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, readout (B, C)) of every stage in depth order, from one forward pass; the last readout
        is `features(x)`."""
        return list(zip(self.stage_names, self._readouts(x, every=True), strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        raise NotImplementedError


def global_average(x: torch.Tensor) -> torch.Tensor:
    """The mean over the spatial positions of a (B, C, H, W) map: (B, C)."""
    return x.mean(dim=(2, 3))


def pooled_stages(modules: Iterable[nn.Module], ends: Collection[int], pool: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor, every: bool) -> list[torch.Tensor]:
    """`pool` of the output of every stage of `modules` run in order, a stage ending with the module
    whose 1-based position is in `ends` (the last module ends the last stage); of the final output
    alone when not `every`."""
    pooled = []
    for position, module in enumerate(modules, 1):
        x = module(x)
        # Pooled at once, so no stage's map is held while the deeper stages run.
        if every and position in ends:
            pooled.append(pool(x))
    return pooled if every else [pool(x)]
