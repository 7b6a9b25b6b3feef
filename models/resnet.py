"""ResNet-18/34/50 (He et al. 2016) in the CIFAR form used by Papyan, Han & Donoho (2020): a 3x3
stride-1 stem without max-pool, four stages of width w, 2w, 4w, 8w (strides 1, 2, 2, 2), global
average pooling and one linear classifier.

Stages: "stem", then "layer1" to "layer4"; the pooled output of layer4 is the features. The blocks
of all four stages stay in one `layers` sequence, so checkpoints keep their keys (`layers.0.conv1.weight`).

Initialised as the authors' notebook does it: it builds torchvision's ResNet, whose convolutions are
Kaiming-normal with fan-out and ReLU gain (std sqrt(2 / (out_channels * k * k))) and whose batch norm
starts at weight 1 and bias 0, then replaces the 7x7 stem convolution by a new 3x3 one, which keeps
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as does the linear classifier."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.stages import StagedNetwork, global_average, pooled_stages


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inputs: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _shortcut(inputs, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inputs: int, channels: int, stride: int):
        super().__init__()
        outputs = channels * self.expansion
        self.conv1 = nn.Conv2d(inputs, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.shortcut = _shortcut(inputs, outputs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(StagedNetwork):
    def __init__(self, block: str, depths: list[int], in_channels: int, num_classes: int, width: int):
        super().__init__()
        kind = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, inputs, ends = [], width, [1]  # positions in (stem, *layers) where each stage ends
        for stage, depth in enumerate(depths):
            channels = width * 2 ** stage
            for index in range(depth):
                layers.append(kind(inputs, channels, 2 if stage and not index else 1))
                inputs = channels * kind.expansion
            ends.append(1 + len(layers))
        self.layers = nn.Sequential(*layers)
        self.stage_names = ("stem", *(f"layer{stage}" for stage in range(1, len(depths) + 1)))
        self._stage_ends = tuple(ends)
        self.fc = nn.Linear(inputs, num_classes)
        for module in self.layers.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        return pooled_stages([self.stem, *self.layers], self._stage_ends, global_average, x, every)


def _shortcut(inputs: int, outputs: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 projection where the shape changes."""
    if stride == 1 and inputs == outputs:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
