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
def test_resnets_are_initialised_as_torchvision_does(name):
    """Kaiming-normal, fan-out, ReLU gain: each convolution's weights are N(0, 2 / (out * k * k)); batch
    norm starts at weight 1, bias 0; the classifier keeps PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=10)
    standardised = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            out_channels, _, height, width = module.weight.shape
            z = module.weight.detach().double().flatten() / (2 / (out_channels * height * width)) ** 0.5
            # The sample std of n normal draws is within 5 standard errors (1 / sqrt(2n)) of the truth.
            assert abs(z.std().item() - 1) < 5 / (2 * len(z)) ** 0.5
            standardised.append(z)
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    z = torch.cat(standardised)
    assert abs(z.mean().item()) < 5 / len(z) ** 0.5
    kurtosis = (z.pow(4).mean() / z.pow(2).mean() ** 2).item()
    assert kurtosis == pytest.approx(3.0, abs=0.05)  # normal; a uniform init would give 1.8
    weight, bound = model.fc.weight.detach(), 1 / model.fc.in_features ** 0.5
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
