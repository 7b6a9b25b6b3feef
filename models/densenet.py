"""DenseNet-BC (Huang et al. 2017) in its CIFAR form, one of the paper's three families: a 3x3 stem of
2k channels, dense blocks of bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k, k the
growth rate, 32 at width 64), transitions halving the channels and the resolution, then BN, ReLU,
global average pooling and one linear classifier.

Stages: "stem" (the first convolution), "block1", "block2", ... (each dense block with the transition
after it, the last block without one), and "features", the closing BN-ReLU whose pooled output is the
features."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.stages import StagedNetwork, pooled_stages


class DenseLayer(nn.Module):
    def __init__(self, inputs: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(inputs), nn.ReLU(inplace=True),
                                  nn.Conv2d(inputs, 4 * growth, 1, bias=False), nn.BatchNorm2d(4 * growth),
                                  nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(StagedNetwork):
    def __init__(self, blocks: list[int], in_channels: int, num_classes: int, width: int):
        super().__init__()
        growth = max(1, round(32 * width / 64))
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        ends = [1]  # positions in body where each stage ends
        for index, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if index < len(blocks) - 1:
                halved = channels // 2
                layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                           nn.Conv2d(channels, halved, 1, bias=False), nn.AvgPool2d(2, ceil_mode=True)]
                channels = halved
            ends.append(len(layers))
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.stage_names = ("stem", *(f"block{block}" for block in range(1, len(blocks) + 1)), "features")
        self._stage_ends = (*ends, len(layers))
        self.fc = nn.Linear(channels, num_classes)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        return pooled_stages(self.body, self._stage_ends, _pool, x, every)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling, (B, C, H, W) to (B, C), by the op DenseNet's features have always used
    (the other CNNs' `mean` may differ from it in the last bit)."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)
