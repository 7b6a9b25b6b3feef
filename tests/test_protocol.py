"""The paper's protocol as train.py resolves it: defaults, schedule, checkpoint epochs, run names, flags."""
import math
import re

import numpy as np
import pytest
import torch

import config
import engine
import train


def settings_for(*flags: str) -> dict:
    return config.resolve_config(train.parse_args(list(flags)))


def test_the_defaults_are_the_papers():
    cifar10 = settings_for("--dataset", "CIFAR10")
    assert (cifar10["model"], cifar10["width"], cifar10["epochs"], cifar10["batch_size"]) == ("resnet18", 64, 350, 128)
    assert (cifar10["optimizer"], cifar10["momentum"], cifar10["weight_decay"]) == ("sgd", 0.9, 5e-4)
    assert cifar10["lr_milestones"] == [116, 233] and cifar10["lr_gamma"] == 0.1
    assert cifar10["loss"] == "ce" and not cifar10["augment"] and cifar10["mixup_alpha"] == 0
    assert cifar10["num_checkpoints"] == 50
    assert cifar10["precision"] == "fp32"  # the paper trained in float32, on any device
    assert settings_for("--dataset", "CIFAR10", "--precision", "bf16")["precision"] == "bf16"
    cifar100 = settings_for("--dataset", "cifar100")
    assert cifar100["model"] == "resnet50" and cifar100["dataset"] == "CIFAR100"
    assert settings_for("--dataset", "MNIST")["model"] == "resnet18"


def test_default_learning_rates_are_points_of_the_papers_grid():
    grid = np.logspace(math.log10(1e-4), math.log10(0.25), 25)
    for flags, lr in [(("--dataset", "CIFAR10"), 0.1302501827396728),
                      (("--dataset", "CIFAR100"), 0.18045095091164853)]:
        chosen = settings_for(*flags)["lr"]
        assert chosen == lr
        assert np.min(np.abs(grid - chosen)) < 1e-12
    mnist = settings_for("--dataset", "MNIST")["lr"]
    assert mnist == 0.0679 and np.min(np.abs(grid - mnist)) < 1e-4  # the authors' rounded grid point
    assert settings_for("--dataset", "CIFAR10", "--optimizer", "adam")["lr"] == 1e-3


def test_learning_rate_drops_tenfold_after_epochs_116_and_233():
    settings = settings_for("--dataset", "CIFAR10")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=settings["lr"], momentum=0.9)
    scheduler = engine.make_scheduler(optimizer, settings)
    used = {}
    for epoch in range(1, 351):  # as train.py: read the rate, train the epoch, step after it
        used[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    lr = settings["lr"]
    assert used[1] == used[116] == lr
    assert used[117] == pytest.approx(lr / 10, rel=1e-12) and used[233] == pytest.approx(lr / 10, rel=1e-12)
    assert used[234] == pytest.approx(lr / 100, rel=1e-12) and used[350] == pytest.approx(lr / 100, rel=1e-12)


def test_fifty_checkpoints_of_350_epochs_are_the_authors_list_verbatim():
    authors = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45,
               50, 54, 59, 65, 71, 77, 85, 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293,
               320, 350]
    assert config.checkpoint_epochs(350, 50) == authors
    assert settings_for("--dataset", "CIFAR10")["num_checkpoints"] == 50


def test_other_lengths_use_the_log_spaced_formula():
    formula = config.checkpoint_epochs(350, 51)
    assert len(formula) == 51 and formula[:15] == list(range(1, 16)) and formula[-1] == 350
    ratios = [b / a for a, b in zip(formula[20:], formula[21:])]
    assert max(ratios) / min(ratios) < 1.1  # log-spaced: a constant ratio once past the integers


@pytest.mark.parametrize("epochs,count", [(350, 10), (30, 15), (120, 25), (7, 10), (1, 3), (350, 2), (350, 1)])
def test_checkpoint_count_changes_and_the_last_epoch_stays(epochs, count):
    chosen = config.checkpoint_epochs(epochs, count)
    assert len(chosen) == min(count, epochs) and chosen[-1] == epochs and (chosen[0] == 1 or count == 1)
    assert all(a < b for a, b in zip(chosen, chosen[1:]))


def test_run_names_record_what_differs_from_the_defaults():
    def name(*flags):
        args = train.parse_args(list(flags))
        return config.default_run_dir(config.resolve_config(args), args).as_posix()
    assert name("--dataset", "cifar10") == "runs/CIFAR10-resnet18-ce-seed0"
    assert name("--dataset", "CIFAR10", "--epochs", "350") == "runs/CIFAR10-resnet18-ce-seed0"
    assert name("--dataset", "CIFAR10", "--epochs", "500") == "runs/CIFAR10-resnet18-ce-seed0-ep500"
    assert name("--dataset", "synthetic", "--epochs", "30") == "runs/synthetic-resnet18-ce-seed0"
    assert name("--dataset", "CIFAR10", "--lr", "0.1302501827396728") == "runs/CIFAR10-resnet18-ce-seed0"
    assert (name("--dataset", "CIFAR10", "--loss", "cross_entropy", "--seed", "3", "--width", "32",
                 "--samples-per-class", "50") == "runs/CIFAR10-resnet18-ce-seed3-w32-spc50")
    assert (name("--dataset", "CIFAR10", "--loss", "mse", "--target-scale", "15", "--mixup-alpha", "1")
            == "runs/CIFAR10-resnet18-mse-seed0-kappa15-mixup1")
    assert name("--run-dir", "elsewhere/x") == "elsewhere/x"
    assert config.paper_run_name("CIFAR100") == "CIFAR100-resnet50-ce-seed0"


def test_loss_parameters_a_loss_does_not_use_are_not_recorded():
    ce = settings_for("--dataset", "CIFAR10", "--focal-gamma", "2")
    assert ce["focal_gamma"] is None and ce["target_scale"] is None and ce["label_smoothing"] is None
    mse = settings_for("--dataset", "CIFAR10", "--loss", "mse")
    assert mse["target_scale"] == 1.0 and mse["focal_gamma"] is None


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of: CIFAR10"),
    (["--model", "resnet19"], "unknown model 'resnet19'"),
    (["--loss", "hinge"], "unknown loss 'hinge'; choose one of: ce, mse"),
    (["--epochs", "0"], "must be a positive integer, got 0"),
    (["--label-smoothing", "1.5"], r"must lie in \[0, 1\)"),
])
def test_bad_flags_are_argparse_errors_naming_the_choices(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(flags)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
