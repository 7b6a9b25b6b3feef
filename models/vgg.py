"""VGG-11/13/16/19 with batch norm (Simonyan & Zisserman 2015; Ioffe & Szegedy 2015), one of the
paper's three families, for small images: max-pools round up (28x28 inputs reach 1x1), then global
average pooling and one linear classifier.

Stages: "block1" to "block5", each ending with its max-pool; the pooled output of block5 is the
features."""
import torch
import torch.nn as nn

from models.stages import StagedNetwork, global_average, pooled_stages

# Channels at width 64, "M" a 2x2 max-pool.
_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(StagedNetwork):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        layers, inputs, ends = [], in_channels, []  # positions in body where each block ends
        for item in _CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                ends.append(len(layers))
                continue
            channels = max(1, round(item * width / 64))
            layers += [nn.Conv2d(inputs, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
            inputs = channels
        self.body = nn.Sequential(*layers)
        self.stage_names = tuple(f"block{block}" for block in range(1, len(ends) + 1))
        self._stage_ends = tuple(ends)
        self.fc = nn.Linear(inputs, num_classes)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        return pooled_stages(self.body, self._stage_ends, global_average, x, every)
