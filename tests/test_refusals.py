"""Inputs that ended in a traceback, a wrong number, a wrong label or a wedged folder: each is refused in one
line saying what to do, with nothing in the run folder changed, or now works. An imbalance its counts do not
have, one sample per class, a class without test images, rates beyond float32, runs too large for memory, a
full disk at the first last.pt, an extension of a run stopped early, lengths beyond any run, selection flags
that contradict --run-dir, flags that do not apply, networks of one's own that do not fit, a NaN row and a
formula in Table 1, a --follow of a run that stopped, and Ctrl-C while torch loads."""
import csv
import errno
import math
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

import config
import datasets
import engine
import models
import plotting
import reports
import runs
import train
import validate_nc
from errors import UserError
import test_integrity
import test_own_data
from conftest import one_line_error, tiny_flags, validate, ONE_THREAD
from test_integrity import snapshot
from test_own_data import write_folder
from test_plotting import write_accuracies, write_run

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags()
SELECTING = ["--dataset", "synthetic", "--width", "4", "--device", "cpu"]  # what validate_nc.py takes of TINY



def parse_error(parse, argv: list[str], capsys) -> str:
    """The one line a parser refused `argv` with (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def stopped_after(epoch: int, flags: list[str], monkeypatch) -> None:
    """Train with `flags` and stop it (Ctrl-C) at the start of epoch `epoch` + 1: last.pt is of `epoch`."""
    real = engine.train_epoch

    def interrupted(model, optimizer, loss_fn, data, settings, at, *args, **kwargs):
        if at == epoch + 1:
            raise KeyboardInterrupt
        return real(model, optimizer, loss_fn, data, settings, at, *args, **kwargs)

    monkeypatch.setattr(engine, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(flags))
    monkeypatch.setattr(engine, "train_epoch", real)


# Fixtures of other files: a copy of a finished 2-epoch run (checkpoints 1 and 2, not measured), its own to
# damage; tiny_nets.py of small networks of one's own, importable.
trained_once, trained, tiny_nets = test_integrity.trained_once, test_integrity.trained, test_own_data.tiny_nets


# ------------------------------------------------------------------ 2: --imbalance R is the ratio of the data

@pytest.mark.parametrize("ratio, message", [
    ("40", "--imbalance 40 keeps 20 and 1 samples of the largest and smallest classes, a ratio of 20: R must make "
           "20/R (the smallest class's count) a whole number; --imbalance 20 keeps these counts"),
    ("1e9", "--imbalance 1000000000 keeps 20 and 1 samples of the largest and smallest classes, a ratio of 20"),
    ("1.0000001", "--imbalance 1.0000001 keeps all 20 samples of every class: that is the balanced run; drop "
                  "--imbalance"),
])
def test_an_imbalance_whose_counts_have_another_ratio_is_refused_before_a_folder_is_made(tmp_path, ratio, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(train.parse_args([*TINY, "--imbalance", ratio, "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("classes, per_class, ratio", [(10, 20, 3.0), (10, 37, 2.5), (10, 20, 7.0), (100, 500, 30.0),
                                                     (10, 20, 1e9), (10, 17, 17 / 7)])  # 17 / (17 / 7) > 7
def test_the_ratio_a_refusal_offers_keeps_the_same_counts_as_their_ratio_and_is_accepted(classes, per_class, ratio):
    with pytest.raises(UserError) as refused:
        datasets.refuse_inexact_imbalance(classes, per_class, ratio, "step")
    offered = float(re.search(r"; --imbalance (\S+) keeps these counts", str(refused.value))[1])
    counts = datasets.imbalanced_counts(classes, per_class, offered, "step")
    assert counts == datasets.imbalanced_counts(classes, per_class, ratio, "step")
    assert max(counts) / min(counts) == pytest.approx(offered, rel=1e-9)
    datasets.refuse_inexact_imbalance(classes, per_class, offered, "step")


@pytest.mark.parametrize("classes, per_class, ratio, profile", [
    (10, 5000, 100.0, "step"), (10, 100, 10.0, "step"), (10, 20, 20.0, "step"), (10, 20, 1.0, None),
    (10, 5000, 100.0, "exp"), (10, 5000, 10.0, "exp"), (100, 500, 100.0, "exp"), (100, 500, 200.0, "exp"),
    (10, 20, 7.0, "exp")])
def test_ratios_of_whole_counts_and_every_exp_curve_are_accepted(classes, per_class, ratio, profile):
    """Fang et al.'s step sets, CIFAR-10-LT and CIFAR-100-LT (Cao et al.; at R = 200 the latter keeps 500 ... 2,
    the exp profile's R being its curve's parameter) and the documented study."""
    datasets.refuse_inexact_imbalance(classes, per_class, ratio, profile)


# ------------------------------------------------------------------ 3: zeros and one point on log axes

@pytest.mark.slow
def test_one_sample_per_class_is_measured_and_every_figure_drawn(tmp_path):
    """With one image per class the within-class variation is exactly 0 at every checkpoint."""
    run_dir = tmp_path / "run"
    assert train.main(train.parse_args([*TINY, "--samples-per-class", "1", "--run-dir", str(run_dir)])) == 0
    assert validate(run_dir) == 0
    assert [row["nc1"] for row in runs.read_nc_metrics(run_dir)] == [0.0, 0.0]
    assert {"panel.png", "fig6_nc1.png"} <= {path.name for path in (tmp_path / "plots").iterdir()}


def test_a_quantity_that_is_zero_throughout_keeps_a_linear_axis_and_one_checkpoint_draws(tmp_path):
    run = write_run(tmp_path / "run")
    text = (run / "nc_metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    first = text[1].split(",")
    first[header.index("nc1")] = "0.0"
    (run / "nc_metrics.csv").write_text("\n".join([text[0], ",".join(first)]) + "\n")  # one checkpoint
    scales = {name: figure.axes[0].get_yscale() for name, figure in plotting.nc_figures([run])}
    assert scales["fig6_nc1.png"] == "linear" and scales["fig2_equinorm.png"] == "log"
    plt.close("all")
    written = plotting.plot_run(run, tmp_path / "plots")
    assert {path.name for path in written} >= {"fig6_nc1.png", "panel.png"}


# ------------------------------------------------------------------ 4: every class needs test images

def test_a_folder_class_without_test_images_is_refused_when_training(tmp_path):
    write_folder(tmp_path / "data", {"a": (3, 2), "b": (3, 0)}, size=(8, 8))
    with pytest.raises(UserError, match=r"test/b holds no images .*every class needs training and test images"):
        train.main(train.parse_args(["--dataset", f"folder:{tmp_path / 'data'}", "--width", "4", "--epochs", "1",
                                     "--device", "cpu", "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 5: rates float32 cannot hold

@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--classifier-weight-decay", "--lr-gamma"])
def test_a_rate_beyond_float32_is_refused_by_its_flag(flag, capsys):
    line = parse_error(train.parse_args, [*TINY, flag, "1e300"], capsys)
    assert f"argument {flag}: must be at most 3.4e+38, float32's largest number, in which the optimizer computes, " \
           "got 1e300" in line


def test_a_schedule_whose_rate_grows_beyond_float32_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--lr 1e\+38 multiplied by --lr-gamma 100 at 1 milestone\(s\) exceeds "):
        train.main(train.parse_args([*TINY, "--lr", "1e38", "--lr-gamma", "100", "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 6: too large for memory, refused before allocating

def limited(*args: str, headroom: int) -> subprocess.CompletedProcess:
    """A script run under an address-space limit (ulimit -v) of `headroom` bytes beyond what a process that has
    imported the scripts' modules maps: an allocation past it fails at once, instead of swapping the machine."""
    probe = subprocess.run([sys.executable, "-c", "import train, validate_nc; print(open('/proc/self/status').read()"
                            ".split('VmSize:')[1].split()[0])"], cwd=REPO, env=ONE_THREAD, capture_output=True,
                           text=True, check=True)
    limit = int(probe.stdout) * 1024 + headroom
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ONE_THREAD, capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


@pytest.mark.parametrize("width", ["256", "3000"])
@pytest.mark.slow
def test_a_network_too_large_to_train_is_refused_with_its_estimate_before_it_is_built(tmp_path, width):
    """Width 256 builds in 0.7 GB, but training it takes more than 4 GB; width 3000 takes 300 GB."""
    result = limited("train.py", *TINY, "--width", width, "--run-dir", str(tmp_path / "run"), headroom=1536 << 20)
    line = one_line_error(result)
    assert re.search(rf"a resnet18 of width {width} does not fit in memory: training it needs at least [\d,.]+ GiB "
                     r"on cpu \(weights, gradients and optimizer state [\d,.]+, a batch's activations [\d,.]+ GiB\), "
                     r"and [\d.]+ GiB are available; choose a smaller --width or --batch-size", line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_images_too_large_for_memory_are_refused_before_they_are_decoded(tmp_path):
    write_folder(tmp_path / "data", {"a": (2, 1), "b": (2, 1)}, size=(8, 8))
    result = limited("train.py", "--dataset", f"folder:{tmp_path / 'data'}", "--image-size", "100000", "--device",
                     "cpu", "--run-dir", str(tmp_path / "run"), headroom=1536 << 20)
    assert f"the 6 images of {tmp_path / 'data'} at --image-size 100000 take 167.6 GiB, more than the " \
           in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_counts_weights_gradients_optimizer_state_and_each_layer_s_output(tiny_nets):
    """tiny_nets:doubled, known by hand: one nn.Linear of 3072 x 10 weights and 10 biases, in float32, held as
    weights, gradients and SGD's momentum (Adam: two moments); its one layer's output for 8 images is 8 x 10
    floats (its flatten is a function, not a layer)."""
    settings = {"model": "tiny_nets:doubled", "num_classes": 10, "in_channels": 3, "width": 4, "optimizer": "sgd",
                "momentum": 0.9, "precision": "fp32"}
    weights = 4 * (3072 * 10 + 10)
    assert engine.training_memory(settings, 8, 32) == {"weights, gradients and optimizer state": 3 * weights,
                                                       "a batch's activations": 4 * 8 * 10}
    adam = engine.training_memory({**settings, "optimizer": "adam", "momentum": None}, 8, 32)
    assert adam["weights, gradients and optimizer state"] == 4 * weights
    plain = engine.training_memory({**settings, "momentum": 0.0, "precision": "bf16"}, 8, 32)
    assert plain == {"weights, gradients and optimizer state": 2 * weights, "a batch's activations": 2 * 8 * 10}


# ------------------------------------------------------------------ 7: a full disk at the first last.pt

def test_after_a_full_disk_at_the_first_last_pt_the_advised_command_completes_the_run(tmp_path, monkeypatch):
    run_dir, clean = tmp_path / "run", tmp_path / "clean"
    save = torch.save

    def disk_full_at_last_pt(state, file, *args, **kwargs):
        if "optimizer" in state:  # last.pt's state; an analysis checkpoint holds the weights alone
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_last_pt)
    with pytest.raises(UserError, match=r"could not write .*last\.pt: No space left on device; free some space, then "
                                        "run the same command again"):
        train.main(train.parse_args([*TINY, "--run-dir", str(run_dir)]))
    assert [row["epoch"] for row in runs.read_log(run_dir)] == [1] and not (run_dir / "last.pt").exists()
    monkeypatch.setattr(torch, "save", save)  # space freed
    assert train.main(train.parse_args([*TINY, "--run-dir", str(run_dir)])) == 0
    assert train.main(train.parse_args([*TINY, "--run-dir", str(clean)])) == 0
    assert [row["train_loss"] for row in runs.read_log(run_dir)] == [row["train_loss"] for row in runs.read_log(clean)]
    ours, theirs = (runs.load_checkpoint(folder / "last.pt")["model"] for folder in (run_dir, clean))
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_log_beyond_the_first_checkpoint_without_last_pt_is_still_refused(trained):
    """A run that got past its first analysis checkpoint had a last.pt: without it, nothing starts over it."""
    (trained / "last.pt").unlink()
    before = snapshot(trained)
    with pytest.raises(UserError, match="has a log.csv up to epoch 2 but no last.pt to resume from; put its last.pt "
                                        "back, or start the run in a new --run-dir"):
        train.main(train.parse_args([*TINY, "--run-dir", str(trained)]))
    assert snapshot(trained) == before


# ------------------------------------------------------------------ 8-9: extensions

@pytest.mark.slow
def test_extending_a_run_stopped_early_gives_the_run_finished_then_extended(tmp_path, monkeypatch):
    flags = [*TINY, "--epochs", "6", "--num-checkpoints", "4"]
    early, finished = tmp_path / "early", tmp_path / "finished"
    stopped_after(2, [*flags, "--run-dir", str(early)], monkeypatch)
    assert runs.load_checkpoint(early / "last.pt")["epoch"] == 2
    assert train.main(train.parse_args([*flags, "--extend-to", "8", "--run-dir", str(early)])) == 0
    assert train.main(train.parse_args([*flags, "--run-dir", str(finished)])) == 0
    assert train.main(train.parse_args([*flags, "--extend-to", "8", "--run-dir", str(finished)])) == 0
    # The 4 log-spaced checkpoints of 6 epochs (1, 2, 3, 6), then those of 8 after epoch 6 (8).
    assert [epoch for epoch, _ in runs.checkpoint_files(early)] == [1, 2, 3, 6, 8]
    assert [epoch for epoch, _ in runs.checkpoint_files(finished)] == [1, 2, 3, 6, 8]
    assert runs.read_config(early)["extended_from"] == runs.read_config(finished)["extended_from"] == [6]
    assert [row["lr"] for row in runs.read_log(early)] == [row["lr"] for row in runs.read_log(finished)]
    ours, theirs = (runs.load_checkpoint(folder / "last.pt")["model"] for folder in (early, finished))
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_an_extended_run_has_the_checkpoints_of_each_length_over_the_epochs_it_added():
    """6 epochs with 4 checkpoints are 1, 2, 3, 6; 8 epochs with 4 are 1, 2, 4, 8, of which 8 comes after 6."""
    assert config.analysis_epochs({"epochs": 8, "num_checkpoints": 4, "extended_from": [6]}) == [1, 2, 3, 6, 8]
    assert config.analysis_epochs({"epochs": 6, "num_checkpoints": 4}) == [1, 2, 3, 6]


@pytest.mark.parametrize("flag", ["--extend-to", "--epochs"])
def test_a_length_beyond_any_run_is_refused(flag, capsys):
    line = parse_error(train.parse_args, [*TINY, flag, "1000000000000"], capsys)
    assert f"argument {flag}: must be at most 100,000 epochs, got 1000000000000" in line


# ------------------------------------------------------------------ 10-11: flags that select another run, or none

@pytest.mark.parametrize("flags, named", [
    (["--epochs", "5"], "--epochs 5 (the run's epochs: 2)"),
    (["--width", "8", "--seed", "0"], "--width 8 (the run's width: 4)"),
    (["--dataset", "CIFAR10"], "--dataset CIFAR10 (the run's dataset: 'synthetic')"),
])
def test_a_selection_flag_that_contradicts_run_dir_is_refused_naming_it(trained, flags, named):
    before = snapshot(trained)
    with pytest.raises(UserError, match=re.escape(f"{trained} holds another run than {named} select(s); drop")):
        validate(trained, *flags)
    assert snapshot(trained) == before


@pytest.mark.slow
def test_selection_flags_that_agree_with_run_dir_are_accepted(trained):
    assert validate(trained, "--epochs", "2", "--width", "4", "--dataset", "synthetic", "--seed", "0") == 0


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "16"], "--image-size applies to folder:PATH datasets only"),
    (["--target-scale", "2"], "--target-scale applies to the regression losses (mse, mae, smooth_l1) only"),
    (["--focal-gamma", "2"], "--focal-gamma applies to --loss focal only"),
    (["--label-smoothing", "0.2"], "--label-smoothing applies to --loss label_smoothing only"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
    (["--imbalance-profile", "exp"], "--imbalance-profile applies to --imbalance above 1 only"),
    (["--classifier", "etf", "--no-bias"], "--no-bias applies to --classifier learned only"),
    (["--classifier", "etf", "--classifier-weight-decay", "0"], "--classifier-weight-decay applies to --classifier "
                                                                "learned only"),
])
def test_a_flag_that_does_not_apply_to_the_run_is_refused(tmp_path, flags, message):
    for script, selecting in ((train, TINY), (validate_nc, SELECTING)):
        with pytest.raises(UserError, match=re.escape(message + ", which this run is not: drop it")):
            script.main(script.parse_args([*selecting, *flags, "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 12: networks of one's own

@pytest.mark.parametrize("spec", ["tiny_nets:positional", "os:getcwd"])
def test_a_network_function_of_another_signature_is_one_line_naming_the_signature(tiny_nets, spec):
    function = spec.split(":")[1]
    with pytest.raises(UserError, match=rf"--model {spec}: {function} must take num_classes=, in_channels= and width= "
                                        rf"\(e\.g\. def {function}\(num_classes, in_channels, width\)\)"):
        models.get_model(spec, 10, 3, 4)


def test_a_network_whose_output_is_not_its_last_linear_layer_s_is_refused_before_training(tiny_nets, tmp_path):
    with pytest.raises(UserError, match=r"the network of --model tiny_nets:doubled does not end with its last "
                                        r"nn.Linear "
                                        r"\(fc\): its output must be that layer's output"):
        train.main(train.parse_args([*TINY, "--model", "tiny_nets:doubled", "--run-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 13-14: Table 1

def test_a_nan_row_is_left_out_of_table_1_with_a_warning(tmp_path, capsys):
    run = write_accuracies(tmp_path / "run", [(1, math.nan, math.nan), (5, 0.95, 0.70), (10, 0.99, 0.75)])
    row, = reports.table1([run])
    assert (row["best_train_acc"], row["last_epoch"], row["last_test_acc"], row["tpt_epoch"]) == (0.99, 10, 0.75, None)
    assert capsys.readouterr().err.splitlines() == [f"warning: {run / 'nc_metrics.csv'}, epoch 1: train_acc, test_acc "
                                                    "is not a number; the row is left out of Table 1"]
    assert "best train accuracy 99.00%" in reports.tpt_table(run)


@pytest.mark.parametrize("name", ['=HYPERLINK("evil","click")', "+1", "-1", "@SUM(1)"])
def test_a_run_folder_named_like_a_formula_is_text_in_table_1_s_csv_and_numbers_stay_numbers(tmp_path, monkeypatch,
                                                                                            name):
    monkeypatch.chdir(tmp_path)
    write_accuracies(tmp_path / name, [(5, 1.0, 0.80), (10, 1.0, 0.75)])  # the test accuracy falls by 5 points
    assert plotting.main(plotting.parse_args(["table", name, "--out", "table.md"])) == 0
    with open(tmp_path / "table.csv", newline="") as handle:
        row, = csv.DictReader(handle)
    assert row["run_dir"] == "'" + name and float(row["change"]) == pytest.approx(-0.05)
    assert row["change"].startswith("-0.05") and row["tpt_epoch"] == "5"
    assert f"| {name} |" in (tmp_path / "table.md").read_text()  # a lone run is named by its folder


# ------------------------------------------------------------------ 15: --follow of a run that stopped

def test_following_a_run_that_diverged_before_any_checkpoint_exits_1_with_the_reason(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="training diverged in epoch 1"):
        train.main(train.parse_args([*TINY, "--lr", "1e4", "--run-dir", str(run_dir)]))
    assert validate(run_dir, "--follow", "1") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: no process has trained {run_dir} for 1 s; it stopped before its last epoch (2), and it has no "
        "checkpoint to measure (it stopped or diverged before its first; train.py said which): run train.py again to "
        "continue it, with validate_nc.py --follow beside it")


@pytest.mark.slow
def test_following_a_run_stopped_early_measures_what_it_reached_and_exits_1(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    stopped_after(2, [*TINY, "--epochs", "4", "--num-checkpoints", "4", "--run-dir", str(run_dir)], monkeypatch)
    assert validate(run_dir, "--follow", "1") == 1
    assert [row["epoch"] for row in runs.read_nc_metrics(run_dir)] == [1, 2]
    assert "it stopped before its last epoch (4), and its checkpoints through epoch 2 are measured" in \
        capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------ 16: Ctrl-C while torch loads

INTERRUPT_AT_TORCH = '''
import importlib.abc, os, signal, sys


class InterruptAtTorch(importlib.abc.MetaPathFinder):
    """Ctrl-C as torch's import begins, as a user's lands while it loads."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, InterruptAtTorch())
'''


@pytest.mark.parametrize("script", ["train.py", "validate_nc.py", "plotting.py", "sweep.py", "scripts/gpu_check.py",
                                    "scripts/paper_scale.py"])
@pytest.mark.slow
def test_ctrl_c_while_torch_loads_is_one_line(tmp_path, script):
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_TORCH)
    # SIGINT at its default, as in a user's shell: a suite started in the background (`&` without job control)
    # ignores it, and children inherit that
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**ONE_THREAD, "PYTHONPATH": str(tmp_path)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130 and result.stderr.splitlines() == [
        "interrupted: run the same command again to continue where it stopped"], result.stderr

