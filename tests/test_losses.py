"""The losses against values worked out by hand, and Mixup as the model and the loss actually see it."""
import json
import math

import pytest
import torch

import engine
import losses
import models
import runs
import train
import validate_nc

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
LABELS = torch.tensor([0, 1])


def log_softmax_by_hand(row: list[float]) -> list[float]:
    normaliser = math.log(sum(math.exp(value) for value in row))
    return [value - normaliser for value in row]


def batch_mean(per_sample) -> float:
    rows = LOGITS.tolist()
    return sum(per_sample(log_softmax_by_hand(row), int(label)) for row, label in zip(rows, LABELS)) / len(rows)


@pytest.mark.parametrize("name, expected", [
    # With kappa = 2 the residuals z - 2 e_y are [0, 0, -1] and [0.5, -0.5, 0].
    ("mse", ((0 + 0 + 1) / 3 + (0.25 + 0.25 + 0) / 3) / 2),
    ("mae", ((0 + 0 + 1) / 3 + (0.5 + 0.5 + 0) / 3) / 2),
    ("smooth_l1", ((0 + 0 + 0.5) / 3 + (0.125 + 0.125 + 0) / 3) / 2),
])
def test_regression_losses_average_the_distance_to_the_scaled_one_hot_target(name, expected):
    loss = losses.make_loss(name, num_classes=3, target_scale=2.0)
    assert loss(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_float64_logits_keep_float64_in_every_loss_and_half_precision_ones_are_upcast(name):
    # log(1 + 2 + 3) is cross-entropy's value at logits [0, log 2, log 3] for label 0; float32 rounding would
    # put it 1e-8 off at least, float64 within 1e-15.
    logits = torch.tensor([[0.0, math.log(2), math.log(3)]], dtype=torch.float64)
    loss = losses.make_loss(name, num_classes=3)
    assert loss(logits, torch.tensor([0])).dtype == torch.float64
    assert loss(logits.bfloat16(), torch.tensor([0])).dtype == torch.float32
    if name == "ce":
        assert abs(loss(logits, torch.tensor([0])).item() - math.log(6)) < 1e-15


def test_cross_entropy_and_its_alias():
    expected = batch_mean(lambda log_p, y: -log_p[y])
    for name in ("ce", "cross_entropy", "CE"):
        assert losses.make_loss(name, 3)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_puts_eps_over_c_on_every_class():
    eps = 0.3
    expected = batch_mean(lambda log_p, y: -sum(((1 - eps) * (c == y) + eps / 3) * log_p[c] for c in range(3)))
    assert losses.make_loss("label_smoothing", 3, label_smoothing=eps)(LOGITS, LABELS).item() == pytest.approx(
        expected, rel=1e-6)


def test_focal_loss_down_weights_confident_samples_and_is_cross_entropy_at_gamma_zero():
    expected = batch_mean(lambda log_p, y: -(1 - math.exp(log_p[y])) ** 2 * log_p[y])
    assert losses.make_loss("focal", 3, focal_gamma=2.0)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    ce = batch_mean(lambda log_p, y: -log_p[y])
    assert losses.make_loss("focal", 3, focal_gamma=0.0)(LOGITS, LABELS).item() == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_a_mixed_pair_weighs_the_two_labels_by_lambda(name):
    loss = losses.make_loss(name, 3, target_scale=2.0)
    other = torch.tensor([2, 0])
    mixed = loss(LOGITS, losses.Mixed(LABELS, other, 0.3)).item()
    assert mixed == pytest.approx(0.3 * loss(LOGITS, LABELS).item() + 0.7 * loss(LOGITS, other).item(), rel=1e-6)
    assert loss(LOGITS, losses.Mixed(LABELS, other, 1.0)).item() == pytest.approx(loss(LOGITS, LABELS).item())


def test_an_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="focal"):
        losses.make_loss("hinge", 3)


def test_same_class_partners_are_a_permutation_within_each_class_and_never_the_example_itself():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        labels = torch.randint(0, 4, (33,), generator=generator)
        partners = losses.same_class_partners(labels, generator)
        assert sorted(partners.tolist()) == list(range(33))
        assert torch.equal(labels[partners], labels)
        alone = torch.bincount(labels, minlength=4)[labels] == 1
        positions = torch.arange(33)
        assert torch.equal(partners == positions, alone)


@pytest.mark.parametrize("same_class", [False, True])
def test_the_model_sees_the_mixed_images_and_the_loss_their_two_labels(same_class):
    """Image i is black with one white pixel at position i, so every input the model receives says which
    two images were mixed and with which weights: it must be lam * image_a + (1 - lam) * image_b."""
    count, side = 48, 8
    images = torch.zeros(count, 1, side * side, dtype=torch.uint8)
    images[torch.arange(count), 0, torch.arange(count)] = 255
    images = images.view(count, 1, side, side)
    labels = torch.arange(count) % 3
    settings = {"seed": 5, "batch_size": 16, "augment": False, "mixup_alpha": 1.0, "mixup_same_class": same_class,
                "precision": "fp32", "normalization": {"mean": [0.25], "std": [0.5]}}
    model = models.get_model("resnet18", num_classes=3, in_channels=1, width=4)
    inputs, calls = [], []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    plain = losses.make_loss("ce", 3)

    def recording_loss(logits, targets):
        value = plain(logits, targets)
        calls.append((logits.detach().clone(), targets, value.item()))
        return value

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.train_epoch(model, optimizer, recording_loss, (images, labels), settings, epoch=1)

    seen = []
    for x, (logits, targets, value) in zip(inputs, calls):
        lam = targets.lam
        pixels = (x * 0.5 + 0.25).flatten(1).double()  # undo the normalisation: lam e_a + (1 - lam) e_b
        values, where = pixels.topk(2, dim=1)
        alone = values[:, 1] < 1e-6  # mixed with itself: one white pixel
        a_is_top = (values[:, 0] - lam).abs() <= (values[:, 1] - lam).abs()
        first = torch.where(alone | a_is_top, where[:, 0], where[:, 1])
        second = torch.where(alone, where[:, 0], torch.where(a_is_top, where[:, 1], where[:, 0]))
        rebuilt = torch.zeros_like(pixels)
        rebuilt[torch.arange(len(x)), first] += lam
        rebuilt[torch.arange(len(x)), second] += 1 - lam
        assert torch.allclose(pixels, rebuilt, atol=1e-5)
        assert torch.equal(targets.y_a, labels[first]) and torch.equal(targets.y_b, labels[second])
        assert sorted(second.tolist()) == sorted(first.tolist())  # partners come from the same batch
        if same_class:
            assert torch.equal(labels[first], labels[second]) and not (first == second).any()
        log_p = [log_softmax_by_hand(row) for row in logits.tolist()]
        by_hand = sum(lam * -row[a] + (1 - lam) * -row[b]
                      for row, a, b in zip(log_p, labels[first].tolist(), labels[second].tolist())) / len(x)
        assert value == pytest.approx(by_hand, rel=1e-5)
        seen += first.tolist()
    assert sorted(seen) == list(range(count))  # every image once per epoch


@pytest.mark.parametrize("mixup", ["0", "1"])
@pytest.mark.parametrize("name", losses.LOSSES)
@pytest.mark.slow
def test_every_loss_trains_and_validates_from_the_command_line_with_and_without_mixup(name, mixup, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--dataset", "synthetic", "--width", "4", "--epochs", "2", "--num-checkpoints", "2",
             "--samples-per-class", "10", "--device", "cpu", "--run-dir", str(run_dir), "--loss", name,
             "--mixup-alpha", mixup]
    assert train.main(train.parse_args(flags)) == 0
    settings = json.loads((run_dir / "config.json").read_text())
    assert (settings["loss"], settings["mixup_alpha"]) == (name, float(mixup))
    assert validate_nc.main(validate_nc.parse_args(
        ["--run-dir", str(run_dir), "--plots-dir", str(tmp_path / "plots"), "--device", "cpu"])) == 0
    rows = runs.read_nc_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["nc1"]) and 0 <= row["test_ece"] <= 1 for row in rows)
