"""The model registry: every network's interface, feature widths, width scaling and input shapes."""
import pytest
import torch
import torch.nn as nn

import models

SMALL = [*models.MODEL_NAMES, "wrn16_2", "wrn40_10"]
CNNS = [name for name in SMALL if name != "vit"]


@pytest.mark.parametrize("name", SMALL)
def test_forward_is_the_last_linear_layer_of_the_features(name):
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=7, width=8).eval()
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last)
    features = model.features(x)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == features.shape[1]
    assert model(x).shape == (3, 7)
    assert torch.equal(model(x), model.fc(features))


@pytest.mark.parametrize("name, width, dim", [("resnet18", 64, 512), ("resnet34", 64, 512), ("resnet50", 64, 2048),
                                              ("resnet18", 32, 256), ("vgg16", 64, 512), ("vgg11", 16, 128),
                                              ("wrn40_10", 64, 640), ("wrn16_2", 32, 64), ("vit", 64, 384),
                                              ("densenet121", 64, 1024)])
def test_feature_widths(name, width, dim):
    assert models.get_model(name, num_classes=10, width=width).fc.in_features == dim


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_papers_resnets_give_their_feature_width_on_an_image(name):
    model = models.get_model(name, num_classes=10).eval()
    with torch.inference_mode():
        assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, model.fc.in_features)


@pytest.mark.parametrize("name", CNNS)
def test_cnns_take_grey_28x28_and_96x96_images(name):
    model = models.get_model(name, num_classes=10, in_channels=1, width=4).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.randn(1, 1, 96, 96)).shape == (1, 10)


def test_the_vit_refuses_other_image_sizes():
    with pytest.raises(ValueError, match="32x32"):
        models.get_model("vit", num_classes=10, in_channels=1, width=4)(torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "densenet121", "wrn16_2", "vit"])
def test_models_run_under_bf16_autocast(name):
    model = models.get_model(name, num_classes=10, width=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16


def test_names_are_case_insensitive_and_unknown_ones_list_the_choices():
    assert isinstance(models.get_model("ResNet18", 10, width=4), nn.Module)
    assert models.is_model_name("WRN28_10") and not models.is_model_name("resnet19")
    assert not models.is_model_name("wrn20_2") and not models.is_model_name("wrn28_0")
    with pytest.raises(ValueError, match="unknown model 'resnet19'; choose one of: resnet18.*wrn<depth>_<k>"):
        models.get_model("resnet19", 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        models.get_model("wrn20_2", 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_are_initialised_as_the_authors_notebook_does(name):
    """torchvision's scheme, Kaiming-normal with fan-out and ReLU gain: each block convolution's weights are
    N(0, 2 / (out * k * k)); batch norm starts at weight 1, bias 0. The notebook's replacement 3x3 stem and
    the classifier keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose std is 1/sqrt(3 fan_in)."""
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=10)
    standardised = []
    for module in model.layers.modules():
        if isinstance(module, nn.Conv2d):
            out_channels, _, height, width = module.weight.shape
            z = module.weight.detach().double().flatten() / (2 / (out_channels * height * width)) ** 0.5
            # The sample std of n normal draws is within 5 standard errors (1 / sqrt(2n)) of the truth.
            assert abs(z.std().item() - 1) < 5 / (2 * len(z)) ** 0.5
            standardised.append(z)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    z = torch.cat(standardised)
    assert abs(z.mean().item()) < 5 / len(z) ** 0.5
    kurtosis = (z.pow(4).mean() / z.pow(2).mean() ** 2).item()
    assert kurtosis == pytest.approx(3.0, abs=0.05)  # normal; a uniform init would give 1.8
    for layer in (model.stem[0], model.fc):
        weight = layer.weight.detach()
        bound = 1 / weight[0].numel() ** 0.5
        assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)


STAGES = {  # names and widths at width 8, from each architecture's definition
    "resnet18": (("stem", "layer1", "layer2", "layer3", "layer4"), (8, 8, 16, 32, 64)),
    "resnet34": (("stem", "layer1", "layer2", "layer3", "layer4"), (8, 8, 16, 32, 64)),
    "resnet50": (("stem", "layer1", "layer2", "layer3", "layer4"), (8, 32, 64, 128, 256)),
    **{f"vgg{depth}": (("block1", "block2", "block3", "block4", "block5"), (8, 16, 32, 64, 64))
       for depth in (11, 13, 16, 19)},
    # growth 4: 8 + 6 * 4 = 32 halved to 16, + 12 * 4 halved to 32, + 24 * 4 halved to 64, + 16 * 4 = 128
    "densenet121": (("stem", "block1", "block2", "block3", "block4", "features"), (8, 16, 32, 64, 128, 128)),
    "vit": (("block1", "block2", "block3", "block4", "block5", "block6", "features"), (48,) * 7),
    "wrn16_2": (("stem", "group1", "group2", "group3", "features"), (2, 4, 8, 16, 16)),
    "wrn40_10": (("stem", "group1", "group2", "group3", "features"), (2, 20, 40, 80, 80)),
}


def test_every_registry_model_has_its_stages_listed_here():
    assert set(STAGES) == set(SMALL)


@pytest.mark.parametrize("name", SMALL)
def test_the_last_stage_is_the_features_and_every_stage_has_its_name_and_width(name):
    names, widths = STAGES[name]
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=7, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    stages = model.stage_features(x)
    assert model.stage_names == names and tuple(stage for stage, _ in stages) == names
    assert tuple(readout.shape for _, readout in stages) == tuple((2, width) for width in widths)
    assert torch.equal(stages[-1][1], model.features(x))


def _global_average(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _run(modules, x: torch.Tensor, pool) -> list[torch.Tensor]:
    """`pool` of the output of each group of modules, run one after the other by hand."""
    readouts = []
    for group in modules:
        for module in group:
            x = module(x)
        readouts.append(pool(x))
    return readouts


def _resnet18_by_hand(model, x):
    layers = model.layers
    return _run([[model.stem], layers[0:2], layers[2:4], layers[4:6], layers[6:8]], x, _global_average)


def _vgg11_by_hand(model, x):
    # vgg11 is 64 M 128 M 256 256 M 512 512 M 512 512 M, each number a conv, BN and ReLU.
    body = model.body
    return _run([body[0:4], body[4:8], body[8:15], body[15:22], body[22:29]], x, _global_average)


def _wrn16_2_by_hand(model, x):
    # a convolution, three groups of two blocks, BN and ReLU
    body = model.body
    return _run([body[0:1], body[1:3], body[3:5], body[5:7], body[7:9]], x, _global_average)


def _densenet121_by_hand(model, x):
    # a convolution, then dense blocks of 6, 12, 24 and 16 layers, each of the first three followed by a
    # transition of four modules (BN, ReLU, 1x1 convolution, average pool), then BN and ReLU
    body = model.body
    return _run([body[0:1], body[1:11], body[11:27], body[27:55], body[55:71], body[71:73]], x,
                lambda out: torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def _vit_by_hand(model, x):
    tokens = model.patches(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1) + model.position
    readouts = []
    for block in model.blocks:
        tokens = block(tokens)
        readouts.append(tokens[:, 0])
    return [*readouts, model.norm(tokens[:, 0])]


@pytest.mark.parametrize("name, by_hand", [("resnet18", _resnet18_by_hand), ("vgg11", _vgg11_by_hand),
                                           ("wrn16_2", _wrn16_2_by_hand), ("densenet121", _densenet121_by_hand),
                                           ("vit", _vit_by_hand)])
def test_each_stage_is_the_pooled_output_of_its_modules_run_by_hand(name, by_hand):
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=7, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = by_hand(model, x)
        got = [readout for _, readout in model.stage_features(x)]
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        assert torch.equal(mine, theirs)


def test_stages_keep_the_resnet_state_dict_keys_of_saved_checkpoints():
    """ResNet-18's keys as the flat `layers` of blocks has always saved them: the stem's conv and BN, eight
    basic blocks (a projection shortcut on the first block of stages 2-4), the classifier."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["stem.0.weight", *(f"stem.1.{k}" for k in bn)]
    for index in range(8):
        block = f"layers.{index}"
        keys += [f"{block}.conv1.weight", *(f"{block}.bn1.{k}" for k in bn),
                 f"{block}.conv2.weight", *(f"{block}.bn2.{k}" for k in bn)]
        if index in (2, 4, 6):
            keys += [f"{block}.shortcut.0.weight", *(f"{block}.shortcut.1.{k}" for k in bn)]
    keys += ["fc.weight", "fc.bias"]
    assert list(models.get_model("resnet18", num_classes=10, width=4).state_dict()) == keys


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "wrn16_2", "densenet121", "vit"])
def test_stage_features_backpropagate_in_training_mode(name):
    """No stage's readout is overwritten by a later in-place ReLU, which autograd would refuse."""
    model = models.get_model(name, num_classes=7, width=4).train()
    sum(readout.sum() for _, readout in model.stage_features(torch.randn(2, 3, 32, 32))).backward()
    assert all(parameter.grad is not None for key, parameter in model.named_parameters()
               if not key.startswith("fc."))  # the classifier is not on the readouts' path
