"""VGG-11/13/16/19 with batch norm (Simonyan & Zisserman 2015; Ioffe & Szegedy 2015), one of the
paper's three families, for small images: max-pools round up (28x28 inputs reach 1x1), then global
average pooling and one linear classifier."""
import torch
import torch.nn as nn

# Channels at width 64, "M" a 2x2 max-pool.
_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        layers, inputs = [], in_channels
        for item in _CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            channels = max(1, round(item * width / 64))
            layers += [nn.Conv2d(inputs, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
            inputs = channels
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(inputs, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
