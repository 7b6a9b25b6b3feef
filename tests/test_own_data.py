"""Neural Collapse of one's own images (--dataset folder:PATH), network (--model module.path:function) and
code (the README's "Measure collapse in your own code", run as printed)."""
import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import datasets
import engine
import models
import runs
import train
import validate_nc
from errors import UserError

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def own_run(folder: Path) -> dict:
    """The settings by which datasets.load_run_data reads a run of the images in `folder` (whole, seed 0)."""
    return {"dataset": datasets.canonical_name(f"folder:{folder}"), "samples_per_class": None, "seed": 0}


TINY_NETS = '''
import torch.nn as nn


def small(num_classes, in_channels, width):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2 * width), nn.ReLU(),
                         nn.Linear(2 * width, num_classes))


def softmax_after(num_classes, in_channels, width):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes), nn.Softmax(dim=1))


def too_few_outputs(num_classes, in_channels, width):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes - 1))


def not_a_network(num_classes, in_channels, width):
    return "a network"


class Doubled(nn.Module):
    """A classifier whose output is twice its last nn.Linear's."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Linear(in_channels * 32 * 32, num_classes)

    def forward(self, x):
        return 2 * self.fc(x.flatten(1))


def doubled(num_classes, in_channels, width):
    return Doubled(num_classes, in_channels)


def positional(classes):
    return nn.Linear(3 * 32 * 32, classes)
'''


def write_folder(root: Path, per_class: dict[str, tuple[int, int]], size: tuple[int, int] = (12, 12),
                 seed: int = 0) -> dict[tuple[str, str, int], np.ndarray]:
    """An ImageFolder dataset of random PNGs: class -> (train count, test count); returns the pixels written,
    (H, W, 3) by (split, class, index)."""
    generator = np.random.default_rng(seed)
    written = {}
    for name, counts in per_class.items():
        for split, count in zip(("train", "test"), counts):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index:03d}.png")
                written[split, name, index] = pixels
    return written


@pytest.fixture()
def tiny_nets(tmp_path, monkeypatch):
    """tiny_nets.py in a folder on sys.path (for in-process runs) and PYTHONPATH (for subprocesses)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "tiny_nets.py").write_text(TINY_NETS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    yield folder
    sys.modules.pop("tiny_nets", None)


# ---------------------------------------------------------------- image folders

def test_a_folder_reads_its_pixels_and_labels_its_classes_in_sorted_order(tmp_path):
    written = write_folder(tmp_path / "pets", {"dog": (3, 2), "cat": (3, 1), "eel": (3, 2)})
    name = datasets.canonical_name(f"folder:{tmp_path / 'pets'}")
    assert datasets.info(name).num_classes == 3 and datasets.label(name) == "folder-pets"
    images, labels = datasets.read_folder(name, True, None)
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 12, 12)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # cat, dog, eel
    assert np.array_equal(images[4].permute(1, 2, 0).numpy(), written["train", "dog", 1])
    test_images, test_labels = datasets.read_folder(name, False, None)
    assert test_labels.tolist() == [0, 1, 1, 2, 2]
    assert np.array_equal(test_images[0].permute(1, 2, 0).numpy(), written["test", "cat", 0])


def test_an_unbalanced_folder_trains_on_its_largest_balanced_subset(tmp_path):
    write_folder(tmp_path / "data", {"a": (5, 1), "b": (2, 1), "c": (4, 1)})
    train_split, test_split, per_class, _ = datasets.load_run_data(
        own_run(tmp_path / "data"), "unused", False, CPU)
    assert per_class == 2 and torch.bincount(train_split[1]).tolist() == [2, 2, 2]
    assert len(test_split[1]) == 3


def test_image_size_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    root = tmp_path / "wide"
    for split in ("train", "test"):
        for name, colour in (("left", 0), ("right", 1)):
            (root / split / name).mkdir(parents=True)
            pixels = np.zeros((8, 24, 3), dtype=np.uint8)  # 24 wide, 8 high: 200 in one channel of its middle half
            pixels[:, 6:18, colour] = 200
            Image.fromarray(pixels).save(root / split / name / "0.png")
    images, _ = datasets.read_folder(datasets.canonical_name(f"folder:{root}"), True, 4)
    assert images.shape == (2, 3, 4, 4)
    # 8 x 24 becomes 4 x 12 and its middle 4 x 4, inside the bright half (columns 3-9), remains.
    assert (images[0, 0] == 200).all() and (images[0, 1:] == 0).all() and (images[1, 1] == 200).all()


@pytest.mark.parametrize("layout, message", [
    ({"train/a/0.png": (8, 8), "train/b/0.png": (8, 8), "test/a/0.png": (8, 8)},
     "train/ and test/ must hold the same class folders, but b is in only one of them"),
    ({"train/a/0.png": (8, 8), "train/b/0.png": (8, 6), "test/a/0.png": (8, 8), "test/b/0.png": (8, 8)},
     "is 8x6, not square: pass --image-size S"),
    ({"train/a/0.png": (8, 8), "train/b/0.png": (6, 6), "test/a/0.png": (8, 8), "test/b/0.png": (8, 8)},
     "is 6x6 but .* has images of 8x8: pass --image-size S"),
    ({"train/a/0.png": (8, 8), "train/b/notes.txt": None, "test/a/0.png": (8, 8), "test/b/0.png": (8, 8)},
     "train/b holds no images"),
    ({"train/a/0.png": (8, 8), "train/b/0.png": b"not a png", "test/a/0.png": (8, 8), "test/b/0.png": (8, 8)},
     "0.png is not an image Pillow can read"),
    ({"train/a/0.png": (8, 8), "test/a/0.png": (8, 8)}, "one class folder; Neural Collapse needs at least 2"),
    ({"a/0.png": (8, 8)}, "is not an image folder dataset: it needs train/<class>/ and test/<class>/"),
])
def test_a_folder_that_does_not_fit_is_refused_with_one_line(tmp_path, layout, message):
    for relative, content in layout.items():
        path = tmp_path / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            Image.fromarray(np.zeros((content[1], content[0], 3), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(content or b"")
    with pytest.raises(UserError, match=message):
        datasets.load_run_data(own_run(tmp_path / "data"), "unused", False, CPU)


def test_download_is_refused_for_a_folder(tmp_path):
    with pytest.raises(UserError, match="a folder:PATH dataset is read where it is"):
        datasets.fetch(f"folder:{tmp_path}", tmp_path)


# ---------------------------------------------------------------- one's own network

def test_the_hooked_features_are_the_input_of_the_last_linear_layer(tiny_nets):
    torch.manual_seed(0)
    model = models.get_model("tiny_nets:small", num_classes=5, in_channels=3, width=6).eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        by_hand = model.net[:-1](x)  # everything before the last nn.Linear
        assert torch.equal(model.features(x), by_hand)
        assert torch.equal(model.fc(by_hand), model(x))
        assert model.fc is model.net[-1] and [name for name, _ in model.stage_features(x)] == ["penultimate"]
    assert set(model.state_dict()) == {f"net.{key}" for key in model.net.state_dict()}


@pytest.mark.parametrize("spec, message", [
    ("absent_module:small", "no module named absent_module on Python's path; put the folder that holds it on "
                            "PYTHONPATH"),
    ("tiny_nets:missing", "tiny_nets has no function missing"),
    ("tiny_nets:not_a_network", "returned a str, not an nn.Module"),
    ("tiny_nets:too_few_outputs", r"its last nn.Linear \(1\) has 4 outputs, not one per class \(5\)"),
])
def test_a_network_that_does_not_fit_is_refused_with_one_line(tiny_nets, spec, message):
    with pytest.raises(UserError, match=message):
        models.get_model(spec, num_classes=5, in_channels=3, width=6)


def test_a_network_whose_output_is_not_its_last_linear_layer_s_is_refused_when_measured(tiny_nets):
    model = models.get_model("tiny_nets:softmax_after", num_classes=5, in_channels=3, width=6)
    with pytest.raises(UserError, match=r"does not end with its last nn.Linear \(1\)"):
        model.features(torch.randn(2, 3, 4, 4))


def test_the_model_flag_keeps_the_name_and_names_the_folder_after_it():
    args = train.parse_args(["--dataset", "synthetic", "--model", "My_Nets.cifar:Build"])
    settings = config.resolve_config(args)
    assert settings["model"] == "My_Nets.cifar:Build"
    assert config.run_name(settings) == "synthetic-My_Nets.cifar.Build-ce-seed0"
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "not a:name"])


@pytest.mark.slow
def test_own_images_and_own_network_train_measure_and_draw_every_figure(tmp_path, tiny_nets, monkeypatch):
    write_folder(tmp_path / "shapes", {"a": (8, 4), "b": (8, 4), "c": (8, 4)}, size=(10, 10))
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", f"folder:{tmp_path / 'shapes'}", "--image-size", "8", "--model", "tiny_nets:small",
             "--width", "8", "--epochs", "3", "--num-checkpoints", "3", "--device", "cpu", "--classifier", "etf"]
    assert train.main(train.parse_args(flags)) == 0
    run_dir = tmp_path / "runs" / "folder-shapes-tiny_nets.small-ce-seed0-w8-ep3-etf-size8"
    settings = runs.read_config(run_dir)
    assert settings["image_size"] == 8 and settings["num_classes"] == 3 and settings["samples_per_class"] == 8
    assert validate_nc.main(validate_nc.parse_args([*flags[:10], "--classifier", "etf", "--device", "cpu",
                                                    "--layers", "--test-collapse", "--adversarial",
                                                    "--adversarial-samples", "3"])) == 0
    rows = runs.read_nc_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3] and all(row["cdnv"] is not None for row in rows)
    plots = tmp_path / "folder-shapes_plots" / run_dir.name
    assert {"panel.png", "fig8_adversarial_robustness.png", "fig9_other_measures.png", "layerwise_nc1.png",
            "training_curves.png"} <= {path.name for path in plots.iterdir()}
    state = runs.load_checkpoint(run_dir / "checkpoints" / "epoch_0003.pt")
    model = engine.build_model(state["config"], CPU)
    model.load_state_dict(state["model"])  # strict: the same keys
    # The penultimate stage's NC1 is that of the output of the layer before the last nn.Linear (the Sequential
    # cut there, no hook), by numpy's trace(Sigma_W pinv(Sigma_B)) / C on the run's 24 training images.
    images, labels = datasets.load_run_data(settings, "ignored", False, CPU)[0]
    normalization = settings["normalization"]
    with torch.no_grad():
        features = model.net.eval()[:-1](datasets.normalize(images, normalization["mean"], normalization["std"]))
    assert rows[-1]["nc1_penultimate"] == pytest.approx(numpy_nc1(features, labels), rel=1e-5)


def numpy_nc1(features: torch.Tensor, labels: torch.Tensor) -> float:
    """NC1 = trace(Sigma_W pinv(Sigma_B)) / C by numpy, in float64, over classes of equal size."""
    h, y = features.double().numpy(), labels.numpy()
    classes = sorted(set(y.tolist()))
    means = np.stack([h[y == c].mean(axis=0) for c in classes])
    within = np.mean([np.cov(h[y == c].T, bias=True) for c in classes], axis=0)
    centred = means - means.mean(axis=0)
    between = centred.T @ centred / len(classes)
    return np.trace(within @ np.linalg.pinv(between, rcond=1e-10, hermitian=True)) / len(classes)


# ---------------------------------------------------------------- the README's snippet

def readme_section(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


# Run after the snippet: its stand-ins' data and penultimate features (the Sequential cut before its last layer,
# not the snippet's hook), for the test to measure by itself.
SNIPPET_DATA = """
import torch as _torch
_images, _labels = loader.dataset.tensors
with _torch.no_grad():
    _torch.save({"features": model.eval()[:-1](_images), "labels": _labels}, "snippet_data.pt")
"""


@pytest.mark.slow
def test_the_readme_s_measure_collapse_in_your_own_code_runs_as_printed_and_prints_the_nc1_of_its_data(tmp_path):
    [code] = re.findall(r"```python\n(.*?)```", readme_section("Measure collapse in your own code"), re.DOTALL)
    done = subprocess.run([sys.executable, "-c", code + SNIPPET_DATA], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    printed = ast.literal_eval(line)  # the dict of measures, as print shows it
    assert {"nc1", "cdnv", "self_duality", "hyperspherical_energy_means"} <= set(printed)
    assert all(isinstance(value, float) and math.isfinite(value) for value in printed.values())
    saved = torch.load(tmp_path / "snippet_data.pt", weights_only=True, map_location="cpu")
    assert printed["nc1"] == pytest.approx(numpy_nc1(saved["features"], saved["labels"]), rel=1e-6)
