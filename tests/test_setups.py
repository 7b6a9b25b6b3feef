"""The last layer's setups: --classifier etf (a fixed simplex ETF), --no-bias, --classifier-weight-decay."""
import pytest
import torch

import config
import engine
import models
import runs
import train
import validate_nc
from errors import UserError
from models.classifier import simplex_etf
from conftest import tiny_flags

TINY = tiny_flags(3, 3, 20, "--deterministic")
CPU = torch.device("cpu")


def run_train(run_dir, *flags: str) -> dict:
    assert train.main(train.parse_args([*TINY, "--run-dir", str(run_dir), *flags])) == 0
    return runs.load_checkpoint(run_dir / "last.pt")


def settings(*flags: str) -> dict:
    return config.resolve_config(train.parse_args([*TINY, *flags])) | {"num_classes": 10, "in_channels": 3}


def cosines(rows: torch.Tensor) -> torch.Tensor:
    unit = rows.double() / rows.double().norm(dim=1, keepdim=True)
    return (unit @ unit.T)[~torch.eye(len(rows), dtype=torch.bool)]


@pytest.mark.parametrize("classes, dim", [(2, 1), (3, 2), (10, 9), (10, 64), (100, 128)])
def test_simplex_etf_rows_have_unit_norm_and_cosines_minus_one_over_c_minus_one(classes, dim):
    rows = simplex_etf(classes, dim, seed=3)
    assert rows.shape == (classes, dim) and rows.dtype == torch.float64
    assert torch.allclose(rows.norm(dim=1), torch.ones(classes, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(cosines(rows), torch.full((classes * (classes - 1),), -1 / (classes - 1),
                                                     dtype=torch.float64), rtol=0, atol=1e-14)


def test_the_orientation_is_drawn_from_the_seed():
    assert torch.equal(simplex_etf(10, 32, seed=5), simplex_etf(10, 32, seed=5))
    first, other = simplex_etf(10, 32, seed=5), simplex_etf(10, 32, seed=6)
    assert (first - other).abs().max() > 0.1
    # Both are the same simplex: their Gram matrices agree.
    assert torch.allclose(first @ first.T, other @ other.T, atol=1e-14)


@pytest.mark.parametrize("name", [*models.MODEL_NAMES, "wrn16_4"])
def test_every_registry_network_takes_the_fixed_etf_and_keeps_its_own_initialisation(name):
    torch.manual_seed(0)
    learned = engine.build_model(settings("--model", name), CPU)
    torch.manual_seed(0)
    fixed = engine.build_model(settings("--model", name, "--classifier", "etf"), CPU)
    weight = fixed.fc.weight
    assert weight.dtype == torch.float32 and not weight.requires_grad and fixed.fc.bias is None
    assert torch.allclose(weight.double().norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(cosines(weight), torch.full((90,), -1 / 9, dtype=torch.float64), atol=1e-6)
    body = {key: value for key, value in learned.state_dict().items() if not key.startswith("fc.")}
    assert all(torch.equal(value, fixed.state_dict()[key]) for key, value in body.items())
    assert set(fixed.state_dict()) == set(body) | {"fc.weight"}
    logits = fixed(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_a_network_with_fewer_features_than_the_simplex_needs_is_refused():
    with pytest.raises(UserError, match="spans 9 dimensions, more than the 4 features"):
        engine.build_model(settings("--model", "wrn16_1", "--classifier", "etf"), CPU)


@pytest.mark.slow
def test_the_etf_stays_fixed_through_training_and_measures_as_an_exact_simplex(tmp_path):
    last = run_train(tmp_path / "etf", "--classifier", "etf")
    assert last["config"]["classifier"] == "etf" and last["config"]["bias"] is None
    assert "fc.bias" not in last["model"]
    assert torch.equal(last["model"]["fc.weight"], simplex_etf(10, 32, seed=0).float())
    first = runs.load_checkpoint(runs.checkpoint_path(tmp_path / "etf", 1))["model"]
    assert not torch.equal(first["layers.0.conv1.weight"], last["model"]["layers.0.conv1.weight"])  # the rest trains
    assert validate_nc.main(validate_nc.parse_args(["--run-dir", str(tmp_path / "etf"), "--device", "cpu",
                                                    "--plots-dir", str(tmp_path / "plots")])) == 0
    for row in runs.read_nc_metrics(tmp_path / "etf"):
        for key in ("equinorm_weights", "equiangular_weights", "maxangle_weights", "etf_error_weights"):
            assert abs(row[key]) < 1e-6, key


def test_an_etf_run_resumes_to_the_bits_of_an_uninterrupted_one(tmp_path):
    flags = ("--classifier", "etf", "--lr-milestones", "1", "2", "--loss", "mse", "--mixup-alpha", "1")
    whole = run_train(tmp_path / "whole", *flags)
    run_train(tmp_path / "parts", *flags, "--epochs", "2")  # stopped after epoch 2, then trained on
    resumed = run_train(tmp_path / "parts", *flags, "--epochs", "2", "--extend-to", "3")
    assert all(torch.equal(value, resumed["model"][key]) for key, value in whole["model"].items())


def test_no_bias_trains_a_classifier_without_bias(tmp_path):
    last = run_train(tmp_path / "plain", "--no-bias")
    assert last["config"]["bias"] is False and "fc.bias" not in last["model"]
    assert last["model"]["fc.weight"].shape == (10, 32)


def test_settings_show_in_the_run_name_and_flags_only_when_they_are_not_the_default():
    def name_and_flags(*flags: str) -> tuple[str, list[str]]:
        args = train.parse_args(["--dataset", "synthetic", *flags])
        resolved = config.resolve_config(args)
        return config.run_name(resolved), config.selection_flags(resolved)

    assert name_and_flags() == ("synthetic-resnet18-ce-seed0", ["--dataset", "synthetic"])
    assert name_and_flags("--classifier", "learned") == ("synthetic-resnet18-ce-seed0", ["--dataset", "synthetic"])
    assert name_and_flags("--no-bias", "--classifier-weight-decay", "0.001") == (
        "synthetic-resnet18-ce-seed0-nobias-cwd0.001",
        ["--dataset", "synthetic", "--no-bias", "--classifier-weight-decay", "0.001"])
    # Milestones of their own, and an optimizer other than SGD (whose default rate is then 1e-3), name their run.
    assert name_and_flags("--epochs", "10", "--lr-milestones", "3") == (
        "synthetic-resnet18-ce-seed0-ep10-ms3", ["--dataset", "synthetic", "--epochs", "10", "--lr-milestones", "3"])
    assert name_and_flags("--optimizer", "adam") == ("synthetic-resnet18-ce-seed0-adam",
                                                     ["--dataset", "synthetic", "--optimizer", "adam"])
    assert name_and_flags("--optimizer", "adam", "--lr", "0.001")[0] == "synthetic-resnet18-ce-seed0-adam"
    # The fixed ETF has no bias and no weight decay: flags for them do not apply and leave no trace.
    assert name_and_flags("--classifier", "etf", "--no-bias", "--classifier-weight-decay", "0.1") == (
        "synthetic-resnet18-ce-seed0-etf", ["--dataset", "synthetic", "--classifier", "etf"])


def test_a_config_written_before_these_settings_existed_means_the_defaults():
    current = settings()
    added = ("imbalance", "classifier", "bias", "classifier_weight_decay", "image_size")
    older = {key: value for key, value in current.items() if key not in added}
    assert config.result_differences(older, current) == []
    assert config.result_differences(older, settings("--no-bias")) == ["bias: True -> False"]


def parameter_names(model: torch.nn.Module, group: dict) -> set[str]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {names[id(parameter)] for parameter in group["params"]}


def test_the_weight_decay_groups_hold_the_intended_parameters():
    every = {name for name, _ in engine.build_model(settings(), CPU).named_parameters()}
    body = {name for name in every if not name.startswith("fc.")}

    model = engine.build_model(settings(), CPU)
    (group,) = engine.make_optimizer(model, settings(), CPU).param_groups
    assert parameter_names(model, group) == every and group["weight_decay"] == 5e-4

    chosen = settings("--classifier-weight-decay", "0.01")
    model = engine.build_model(chosen, CPU)
    rest, last = engine.make_optimizer(model, chosen, CPU).param_groups
    assert parameter_names(model, rest) == body and rest["weight_decay"] == 5e-4
    assert parameter_names(model, last) == {"fc.weight", "fc.bias"} and last["weight_decay"] == 0.01

    fixed = settings("--classifier", "etf")
    model = engine.build_model(fixed, CPU)
    (group,) = engine.make_optimizer(model, fixed, CPU).param_groups
    assert parameter_names(model, group) == body  # the ETF is neither trained nor decayed


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_group_decays_at_its_own_rate(optimizer):
    """With zero gradients, one step of SGD (momentum buffer = wd * p) or AdamW (decoupled decay) multiplies
    each parameter by 1 - lr * wd of its group."""
    chosen = settings("--classifier-weight-decay", "0.3", "--weight-decay", "0.01", "--lr", "0.5",
                      "--optimizer", optimizer)
    model = engine.build_model(chosen, CPU)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    step = engine.make_optimizer(model, chosen, CPU)
    (0 * model(torch.randn(2, 3, 32, 32)).sum()).backward()
    step.step()
    for name, parameter in model.named_parameters():
        factor = 1 - 0.5 * (0.3 if name.startswith("fc.") else 0.01)
        assert torch.allclose(parameter.detach(), factor * before[name], rtol=1e-6, atol=0), name


def test_a_module_function_model_keeps_its_case_and_its_config_json_reads_back(tmp_path):
    settings = config.resolve_config(train.parse_args(["--model", "My_Nets.Deep:Small_Net"]))
    assert settings["model"] == "My_Nets.Deep:Small_Net"
    runs.write_config(tmp_path, {**settings, "samples_per_class": 10, "data_root": "data"})
    assert runs.read_config(tmp_path)["model"] == "My_Nets.Deep:Small_Net"
    assert config.resolve_config(train.parse_args(["--model", "ResNet18"]))["model"] == "resnet18"
    runs.write_config(tmp_path, {**settings, "model": "ResNet18", "samples_per_class": 10, "data_root": "data"})
    with pytest.raises(UserError, match="invalid settings: model = 'ResNet18'"):
        runs.read_config(tmp_path)



def test_test_samples_names_the_run_and_a_config_json_without_it_meant_the_whole_split():
    settings = config.resolve_config(train.parse_args(["--test-samples", "200"]))
    assert settings["test_samples"] == 200 and config.run_name(settings) == "synthetic-resnet18-ce-seed0-test200"
    assert config.selection_flags(settings) == ["--dataset", "synthetic", "--test-samples", "200"]
    older = {key: value for key, value in config.resolve_config(train.parse_args([])).items() if key != "test_samples"}
    assert config.result_differences(older, settings) == ["test_samples: None -> 200"]
