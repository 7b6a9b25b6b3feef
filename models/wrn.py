"""WideResNet-<depth>-<k> (Zagoruyko & Komodakis 2016), used by Fisher, Meng & Papyan (2024):
depth = 6n + 4, three groups of n pre-activation basic blocks with 16k, 32k, 64k channels (strides
1, 2, 2) after a 16-channel stem, then BN, ReLU, global average pooling and one linear classifier."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


class WideResNet(nn.Module):
    def __init__(self, depth: int, k: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a WideResNet's depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), not {depth}")
        if k < 1:
            raise ValueError(f"a WideResNet's widening factor must be at least 1, not {k}")
        n = (depth - 4) // 6
        scaled = [max(1, round(c * width / 64)) for c in (16, 16 * k, 32 * k, 64 * k)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, scaled[0], 3, padding=1, bias=False)]
        inputs = scaled[0]
        for group, channels in enumerate(scaled[1:]):
            for index in range(n):
                layers.append(PreActBlock(inputs, channels, 2 if group and not index else 1))
                inputs = channels
        layers += [nn.BatchNorm2d(inputs), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(inputs, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
