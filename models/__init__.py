"""The network registry: `get_model(name, num_classes)` builds any network by name.

Every network has the same explicit interface, so the collapse measurement never needs hooks:
`model.features(x)` is the penultimate activation (B, D), exactly the input of the last linear layer
`model.fc`, and `model(x)` is `model.fc(model.features(x))`. For collapse layer by layer,
`model.stage_features(x)` is [(name, (B, C) readout), ...] of every stage in depth order from one
forward pass, a CNN's stage read out by global average pooling and the ViT's by its class token; the
last readout is `model.features(x)` bit for bit, and `model.stage_names` lists the names without
running the model (see models/stages.py and each network's docstring). `width` scales every layer's
channels proportionally; 64 is the width of the paper's ResNets. A network of one's own,
`module.path:function`, is built by that function and given the same interface (see models/user.py).
"""
import re

import torch.nn as nn

from models.densenet import DenseNet
from models import user
from models.resnet import ResNet
from models.vgg import VGG
from models.vit import ViT
from models.wrn import WideResNet

_BUILDERS = {
    "resnet18": lambda c, k, w: ResNet("basic", [2, 2, 2, 2], c, k, w),
    "resnet34": lambda c, k, w: ResNet("basic", [3, 4, 6, 3], c, k, w),
    "resnet50": lambda c, k, w: ResNet("bottleneck", [3, 4, 6, 3], c, k, w),
    "vgg11": lambda c, k, w: VGG(11, c, k, w),
    "vgg13": lambda c, k, w: VGG(13, c, k, w),
    "vgg16": lambda c, k, w: VGG(16, c, k, w),
    "vgg19": lambda c, k, w: VGG(19, c, k, w),
    "densenet121": lambda c, k, w: DenseNet([6, 12, 24, 16], c, k, w),
    "vit": lambda c, k, w: ViT(c, k, w),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
_WRN = re.compile(r"wrn(\d+)_(\d+)")


def get_model(name: str, num_classes: int, in_channels: int = 3, width: int = 64) -> nn.Module:
    """The network `name` (any case; `wrn<depth>_<k>` for any WideResNet; `module.path:function` for one's
    own) for `num_classes` classes."""
    if user.PATTERN.fullmatch(name):
        return user.build(name, num_classes, in_channels, width)
    key = name.lower()
    if key in _BUILDERS:
        return _BUILDERS[key](in_channels, num_classes, width)
    wide = _WRN.fullmatch(key)
    if wide:
        return WideResNet(int(wide[1]), int(wide[2]), in_channels, num_classes, width)
    raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}, "
                     "wrn<depth>_<k> (e.g. wrn40_10)")


def is_model_name(name: str) -> bool:
    """Whether `get_model` builds `name`: a fixed name, wrn<depth>_<k> with depth 6n+4 and k >= 1, or
    module.path:function (not imported here)."""
    if user.PATTERN.fullmatch(name):
        return True
    wide = _WRN.fullmatch(name.lower())
    if wide:
        depth, k = int(wide[1]), int(wide[2])
        return depth >= 10 and (depth - 4) % 6 == 0 and k >= 1
    return name.lower() in _BUILDERS
