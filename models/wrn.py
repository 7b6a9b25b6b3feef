"""WideResNet-<depth>-<k> (Zagoruyko & Komodakis 2016), used by Fisher, Meng & Papyan (2024):
depth = 6n + 4, three groups of n pre-activation basic blocks with 16k, 32k, 64k channels (strides
1, 2, 2) after a 16-channel stem, then BN, ReLU, global average pooling and one linear classifier.

Stages: "stem" (the first convolution), "group1" to "group3", and "features", the closing BN-ReLU
whose pooled output is the features."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.stages import StagedNetwork, global_average, pooled_stages


class PreActBlock(nn.Module):
    def __init__(self, inputs: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Identity() if stride == 1 and inputs == channels
                         else nn.Conv2d(inputs, channels, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        # A projection shortcut reads the activated input, as in the original WideResNet.
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(activated)
        out = self.conv1(activated)
        return self.conv2(F.relu(self.bn2(out))) + skip


class WideResNet(StagedNetwork):
    def __init__(self, depth: int, k: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a WideResNet's depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), not {depth}")
        if k < 1:
            raise ValueError(f"a WideResNet's widening factor must be at least 1, not {k}")
        n = (depth - 4) // 6
        scaled = [max(1, round(c * width / 64)) for c in (16, 16 * k, 32 * k, 64 * k)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, scaled[0], 3, padding=1, bias=False)]
        inputs, ends = scaled[0], [1]  # positions in body where each stage ends
        for group, channels in enumerate(scaled[1:]):
            for index in range(n):
                layers.append(PreActBlock(inputs, channels, 2 if group and not index else 1))
                inputs = channels
            ends.append(len(layers))
        layers += [nn.BatchNorm2d(inputs), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.stage_names = ("stem", "group1", "group2", "group3", "features")
        self._stage_ends = (*ends, len(layers))
        self.fc = nn.Linear(inputs, num_classes)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        return pooled_stages(self.body, self._stage_ends, global_average, x, every)
