"""A run records a fingerprint of the data it trained on, and is never continued or measured on other data:
a changed, added or removed image of a folder dataset, a changed CIFAR batch, another synthetic generator are
refused in one line naming the split and the class and how many images, and leave the folder as it was. The
same images read from other files are the same data; a run written before fingerprints is measured with a
warning."""
import gzip
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import runs
import train
from errors import UserError
from test_integrity import snapshot
from test_own_data import write_folder
from test_safety import write_cifar10
from conftest import validate

TINY = ["--width", "4", "--epochs", "1", "--num-checkpoints", "1", "--device", "cpu"]
FOLDER = {"a": (6, 3), "b": (6, 3), "c": (6, 3)}  # class -> (train images, test images)



@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A run trained on a folder of 3 classes (6 train, 3 test images each) and measured once: (the images'
    folder, the run folder, the pixels written)."""
    root = tmp_path_factory.mktemp("folder")
    written = write_folder(root / "pets", FOLDER, size=(8, 8))
    run_dir = root / "run"
    assert train.main(train.parse_args(["--dataset", f"folder:{root / 'pets'}", *TINY, "--run-dir", str(run_dir)])) == 0
    assert validate(run_dir) == 0
    return root / "pets", run_dir, written


@pytest.fixture
def copied(folder_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the images and the run, its own to change; the run's config.json points at the copy."""
    images, run_dir, _ = folder_run
    images, run_dir = Path(shutil.copytree(images, tmp_path / "pets")), Path(shutil.copytree(run_dir, tmp_path / "run"))
    for path in [run_dir / "config.json", *run_dir.glob("checkpoints/*.pt"), run_dir / "last.pt"]:
        rename_dataset(path, f"folder:{images}")
    return images, run_dir


def rename_dataset(path: Path, dataset: str) -> None:
    """Point a run file (config.json or a checkpoint) at another folder holding the same images."""
    if path.suffix == ".json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "dataset": dataset}))
    else:
        state = runs.load_checkpoint(path)
        state["config"]["dataset"] = dataset
        torch.save(state, path)


def test_config_json_records_each_class_s_count_and_the_digest_of_its_pixels(folder_run):
    """Known independently: the SHA-256 of the pixels written, class by class in file order, as (3, H, W) bytes."""
    _, run_dir, written = folder_run
    recorded = runs.read_config(run_dir)["data_fingerprint"]
    for split in ("train", "test"):
        for name, (train_count, test_count) in FOLDER.items():
            count = train_count if split == "train" else test_count
            digest = hashlib.sha256()
            for index in range(count):
                digest.update(written[split, name, index].transpose(2, 0, 1).tobytes())
            assert recorded[split]["classes"][name] == [count, digest.hexdigest()[:datasets.DIGEST_CHARS]]
    labels = np.repeat(np.arange(3, dtype=np.int64), 6)
    assert recorded["train"]["order"] == hashlib.sha256(labels.tobytes()).hexdigest()[:datasets.DIGEST_CHARS]


def test_changed_added_and_removed_images_are_refused_naming_split_class_and_count(copied):
    images, run_dir = copied
    pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(pixels).save(images / "train" / "a" / "002.png")  # changed
    for index in (10, 11):
        Image.fromarray(pixels).save(images / "test" / "b" / f"{index}.png")  # added
    (images / "train" / "c" / "000.png").unlink()  # removed
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=r"is not the data .*run was trained on \(train: the 6 images of class a "
                                        r"changed; train: class c has 5 images, 6 when recorded; test: class b has 5 "
                                        r"images, 3 when recorded\); use that data \(restore it, or pass --data-root"):
        validate(run_dir, "--recompute")
    with pytest.raises(UserError, match=r"train: the 6 images of class a changed.*; use that data"):
        train.main(train.parse_args(["--dataset", f"folder:{images}", *TINY, "--extend-to", "2", "--run-dir",
                                     str(run_dir)]))
    assert snapshot(run_dir) == before


def test_a_renamed_image_that_reorders_its_class_is_other_data(copied):
    images, run_dir = copied
    (images / "train" / "b" / "000.png").rename(images / "train" / "b" / "999.png")
    with pytest.raises(UserError, match=r"\(train: the 6 images of class b changed\)"):
        validate(run_dir, "--recompute")


@pytest.mark.slow
def test_the_same_images_in_another_folder_are_the_same_data(copied, capsys):
    images, run_dir = copied
    assert validate(run_dir, "--recompute") == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_changed_cifar_batch_is_refused_and_a_gzipped_copy_of_the_same_is_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(datasets.SPLIT_SIZES, "CIFAR10", (30, 20))  # the copies stand for the full splits
    root = write_cifar10(tmp_path / "data", list(range(10)) * 3)
    run_dir = tmp_path / "run"
    flags = ["--dataset", "CIFAR10", *TINY, "--run-dir", str(run_dir)]
    assert train.main(train.parse_args([*flags, "--data-root", str(root)])) == 0
    gzipped = tmp_path / "gzipped" / "cifar-10-batches-py"
    gzipped.mkdir(parents=True)
    for path in (root / "cifar-10-batches-py").iterdir():
        (gzipped / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    assert validate(run_dir, "--data-root", str(gzipped.parent)) == 0
    assert "warning" not in capsys.readouterr().err
    test_batch = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(test_batch.read_bytes())
    batch["data"][13, :5] ^= 1  # the second test image of class 3 (the labels cycle through the classes)
    test_batch.write_bytes(pickle.dumps(batch, protocol=4))
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=r"\(test: the 2 images of class 3 changed\)"):
        validate(run_dir, "--recompute")
    assert snapshot(run_dir) == before


def test_a_synthetic_run_is_refused_when_its_generator_changed(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    flags = ["--dataset", "synthetic", "--samples-per-class", "10", *TINY, "--run-dir", str(run_dir)]
    assert train.main(train.parse_args(flags)) == 0
    monkeypatch.setattr(datasets, "SYNTHETIC_NOISE_STD", 50.0)
    with pytest.raises(UserError, match=r"\(the generator's noise_std: 60\.0 -> 50\.0; train: the 100 images of "
                                        r"class 0 changed;"):
        validate(run_dir)
    assert not (run_dir / "nc_metrics.csv").exists()


@pytest.mark.slow
def test_a_run_from_before_fingerprints_is_measured_with_a_one_line_warning(folder_run, tmp_path, capsys):
    _, original, _ = folder_run
    run_dir = Path(shutil.copytree(original, tmp_path / "run"))
    settings = json.loads((run_dir / "config.json").read_text())
    del settings["data_fingerprint"]
    (run_dir / "config.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert validate(run_dir, "--recompute") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: {run_dir} was trained before runs recorded their data's fingerprint: that it is "
                        "measured on the data it was trained on cannot be checked"]
    assert runs.read_nc_metrics(run_dir) == runs.read_nc_metrics(original)
