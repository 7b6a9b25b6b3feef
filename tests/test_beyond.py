"""Beyond Figures 2-7: collapse after every stage, collapse of the test features, and the paper's Figure 8,
measured in validate_nc.py's pass over each checkpoint."""
import math

import pytest
import torch
import torch.nn as nn

import engine
import losses
import runs
import train
import validate_nc
from models.stages import StagedNetwork

CONFIG = {"num_classes": 3, "seed": 0, "normalization": {"mean": [0.5], "std": [0.25]}, "loss": "ce",
          "target_scale": None, "label_smoothing": None, "focal_gamma": None}


class IdentityStages(StagedNetwork):
    """Three stages that pass their input on unchanged (read out as the flattened image, its first half and
    its pixel mean), then a linear classifier of the last readout."""

    def __init__(self, pixels: int):
        super().__init__()
        self.stage_names = ("all", "half", "mean")
        self.fc = nn.Linear(1, 3)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        flat = x.flatten(1)
        stages = [flat, flat[:, :flat.shape[1] // 2], flat.mean(dim=1, keepdim=True)]
        return stages if every else stages[-1:]


def collapsed_split(per_class: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images identical within their class: each class one random 4x4 template."""
    templates = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3).repeat_interleave(per_class)
    return templates[labels], labels


def test_identity_stages_of_collapsed_inputs_have_zero_nc1_at_every_stage():
    model = IdentityStages(16).eval()
    data = collapsed_split()
    measured = engine.measure_collapse(model, losses.loss_from_config(CONFIG), data, data, CONFIG, batch_size=5,
                                       layers=True)
    assert [measured[f"nc1_{name}"] for name in model.stage_names] == [0.0, 0.0, 0.0]
    assert measured["nc1"] == 0.0


def test_the_last_stage_is_the_penultimate_layer_and_a_test_split_equal_to_train_gives_the_train_metrics():
    torch.manual_seed(0)
    model = engine.build_model({"model": "resnet18", "num_classes": 3, "in_channels": 1, "width": 4},
                               torch.device("cpu")).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, 1, 16, 16), dtype=torch.uint8, generator=generator)
    data = (images, torch.arange(3).repeat(10))
    measured = engine.measure_collapse(model, losses.loss_from_config(CONFIG), data, data, CONFIG, batch_size=7,
                                       layers=True, test_collapse=True)
    plain = engine.measure_collapse(model, losses.loss_from_config(CONFIG), data, data, CONFIG, batch_size=7)
    # The stages' pass (model.stage_features) and the plain one (model.features) see the same last layer.
    assert measured["nc1_layer4"] == pytest.approx(plain["nc1"], rel=1e-12)
    assert {key: measured[key] for key in plain} == pytest.approx(plain, rel=1e-12)
    assert runs.stage_columns([measured]) == \
        ["nc1_stem", "nc1_layer1", "nc1_layer2", "nc1_layer3", "nc1_layer4"]
    for key in ("nc1", "equinorm_means", "equiangular_means", "maxangle_means", "self_duality"):
        assert measured[f"{key}_test"] == pytest.approx(measured[key], rel=1e-12), key


@pytest.mark.slow
def test_validate_adds_the_columns_and_figures_and_remeasures_rows_that_lack_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train.main(train.parse_args(["--dataset", "synthetic", "--width", "4", "--epochs", "2", "--num-checkpoints", "2",
                                 "--samples-per-class", "10", "--device", "cpu", "--run-dir", str(run_dir)]))
    plots = tmp_path / "plots"
    flags = ["--run-dir", str(run_dir), "--device", "cpu", "--plots-dir", str(plots)]
    assert validate_nc.main(validate_nc.parse_args(flags)) == 0
    plain = runs.read_nc_metrics(run_dir)
    capsys.readouterr()
    assert validate_nc.main(validate_nc.parse_args([*flags, "--layers", "--test-collapse", "--adversarial",
                                                    "--adversarial-samples", "20"])) == 0
    assert "2 checkpoint(s) measured" in capsys.readouterr().out
    rows = runs.read_nc_metrics(run_dir)
    for before, after in zip(plain, rows):
        assert after["nc1"] == before["nc1"]
        assert after["nc1_layer4"] == pytest.approx(before["nc1"], rel=1e-12)  # measured without --layers
        assert 0 < after["deepfool_robustness"] < 1 and after["deepfool_unflipped"] == 0.0
        assert math.isfinite(after["nc1_test"])
    for name in ("fig8_adversarial_robustness.png", "layerwise_nc1.png", "panel.png"):
        assert (plots / name).is_file()
