"""The GPU path, checked on the CPU: what is read from disk lands on the host whatever device the run uses,
and the training step, evaluation, measurement and DeepFool create no tensor on the host by accident.

A CPU-only torch cannot hold CUDA tensors, so two stand-ins are used. A run resumed, or a checkpoint
measured, for `cuda` must read its files without asking torch for a CUDA tensor: the first use of the
device fails here, and it must be the data's or the network's, not the checkpoint's. And every pass
runs with torch's default device set to `meta` while its tensors are on the CPU: a tensor made without
naming its device (which on a GPU would be a host tensor inside the step) lands on `meta`, where it cannot
mix with the CPU data, and the pass fails. What these cannot catch is listed in docs/testing.md.
"""
import pytest
import torch

import config
import engine
import losses
import runs
import train
import validate_nc
from errors import UserError
from conftest import tiny_flags

TINY = tiny_flags(2, 2, 10)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, scripts/gpu_check.sh resumes on it")


@NO_GPU
def test_a_run_resumed_for_cuda_reads_its_last_pt_on_the_host(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(train.parse_args([*TINY, "--epochs", "1", "--run-dir", str(run_dir)])) == 0
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    args = train.parse_args([*TINY, "--epochs", "1", "--run-dir", str(run_dir), "--extend-to", "2"])
    with pytest.raises(RuntimeError) as failure:  # the data's move to the GPU, after last.pt was read
        train.train_run(args, torch.device("cuda"))
    assert not isinstance(failure.value, UserError) and "deserialize" not in str(failure.value)
    assert "NVIDIA driver" in str(failure.value) or "CUDA" in str(failure.value)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@NO_GPU
def test_a_checkpoint_measured_for_cuda_is_read_on_the_host(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(train.parse_args([*TINY, "--run-dir", str(run_dir)])) == 0
    args = validate_nc.parse_args(["--run-dir", str(run_dir), "--device", "cpu"])
    run_config = runs.read_config(run_dir)
    train_split, test_split, *_ = validate_nc._load_data(run_config, args, torch.device("cpu"), run_dir)
    with pytest.raises(RuntimeError) as failure:  # the network's move to the GPU, after the checkpoint was read
        validate_nc._measure(1, runs.checkpoint_path(run_dir, 1), run_config, train_split, test_split, args,
                             torch.device("cuda"))
    assert not isinstance(failure.value, UserError) and "deserialize" not in str(failure.value)


def test_the_rng_states_of_a_checkpoint_stay_on_the_host_and_restore(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(train.parse_args([*TINY, "--epochs", "1", "--run-dir", str(run_dir)])) == 0
    states = runs.load_checkpoint(run_dir / "last.pt")["rng"]
    assert states["torch"].device.type == "cpu" and states["torch"].dtype == torch.uint8
    torch.manual_seed(12345)
    train._set_rng_states(states)
    assert torch.equal(torch.get_rng_state(), states["torch"])


VARIANTS = {"paper": [], "augment and mixup": ["--augment", "--mixup-alpha", "1"],
            "same-class mixup, adam, bf16": ["--mixup-alpha", "0.4", "--mixup-same-class", "--optimizer", "adam",
                                             "--precision", "bf16"],
            "imbalanced, mse, no bias": ["--imbalance", "4", "--loss", "mse", "--no-bias"],
            "fixed etf, label smoothing": ["--classifier", "etf", "--loss", "label_smoothing"]}


@pytest.fixture(params=VARIANTS.values(), ids=VARIANTS.keys())
def setup(request):
    """A tiny run's settings, model, optimizer, loss and data, all on the CPU."""
    args = train.parse_args([*TINY, *request.param])
    settings = config.resolve_config(args)
    host = torch.device("cpu")
    train_split, test_split = train.load_data(settings, args, host)
    model = engine.build_model(settings, host)
    optimizer = engine.make_optimizer(model, settings, host)
    return settings, model, optimizer, losses.loss_from_config(settings), train_split, test_split


def test_a_training_epoch_creates_no_tensor_off_its_device(setup):
    settings, model, optimizer, loss_fn, train_split, _ = setup
    with torch.device("meta"):
        row = engine.train_epoch(model, optimizer, loss_fn, train_split, settings, epoch=1)
    assert all(torch.isfinite(torch.tensor(value)) for value in row.values())
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())


def test_evaluation_and_measurement_create_no_tensor_off_their_device(setup):
    settings, model, _, loss_fn, train_split, test_split = setup
    expected = (engine.evaluate(model, loss_fn, test_split, settings),
                engine.measure_collapse(model, loss_fn, train_split, test_split, settings, 64, layers=True,
                                        test_collapse=True))
    with torch.device("meta"):
        got = (engine.evaluate(model, loss_fn, test_split, settings),
               engine.measure_collapse(model, loss_fn, train_split, test_split, settings, 64, layers=True,
                                       test_collapse=True))
    assert got == expected  # the default device changes nothing but where a stray tensor would land


def test_deepfool_and_the_mixup_representations_create_no_tensor_off_their_device(setup):
    settings, model, _, _, train_split, test_split = setup
    with torch.device("meta"):
        robustness = engine.adversarial_robustness(model, test_split, settings, samples=6)
        rows = engine.mixup_representations(model, train_split, settings, [0, 1, 2], [0.0, 0.5, 1.0], per_class=4)
    assert set(robustness) == {"deepfool_robustness", "deepfool_unflipped", "deepfool_clean_error", "deepfool_steps"}
    assert rows and all(isinstance(row["x"], float) for row in rows)
