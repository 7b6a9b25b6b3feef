"""Tests of datasets.py: each reader on small files written here in the dataset's published format,
with pixels checked against the format's own layout formula, plus the batching and augmentation."""
import argparse
import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import datasets
from errors import UserError


def test_canonical_name_ignores_case():
    assert datasets.canonical_name("cifar10") == "CIFAR10"
    assert datasets.canonical_name("fashionmnist") == "FashionMNIST"
    assert datasets.canonical_name("SYNTHETIC") == "synthetic"


def test_unknown_dataset_is_explained_by_argparse(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=datasets.canonical_name)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "foo"])
    assert ("argument --dataset: unknown dataset 'foo'; choose one of: "
            "CIFAR10, CIFAR100, MNIST, FashionMNIST, SVHN, STL10, synthetic") in capsys.readouterr().err
    with pytest.raises(ValueError):
        datasets.canonical_name("foo")


def test_cifar10_pixels_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {name: (rng.integers(0, 256, (count, 3072), dtype=np.uint8), rng.integers(0, 10, count).tolist())
               for name, count in [("data_batch_1", 2), ("data_batch_2", 3), ("data_batch_3", 1),
                                   ("data_batch_4", 2), ("data_batch_5", 2), ("test_batch", 3)]}
    _write_python2_pickle(folder / "data_batch_1", {"data": batches["data_batch_1"][0],
                                                    "labels": batches["data_batch_1"][1]})
    for name in ["data_batch_2", "data_batch_3", "data_batch_4", "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": batches[name][0], "labels": batches[name][1]}, protocol=4))
    (folder / "data_batch_5").write_bytes(pickle.dumps({b"data": batches["data_batch_5"][0],
                                                        b"labels": batches["data_batch_5"][1]}, protocol=4))

    images, labels = datasets.read_split("CIFAR10", tmp_path, train=True)
    rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    _assert_cifar_layout(images, rows)
    assert labels.dtype == torch.int64
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test_images, test_labels = datasets.read_split("CIFAR10", tmp_path, train=False)
    _assert_cifar_layout(test_images, batches["test_batch"][0])
    assert test_labels.tolist() == batches["test_batch"][1]


def test_cifar100_reads_the_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    fine = [99, 0, 57, 12]
    for name in ["train", "test"]:
        (folder / name).write_bytes(pickle.dumps({"data": rows, "fine_labels": fine, "coarse_labels": [19, 0, 1, 2]}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    for train in [True, False]:
        images, labels = datasets.read_split("CIFAR100", tmp_path, train)
        _assert_cifar_layout(images, rows)
        assert labels.tolist() == fine


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
@pytest.mark.parametrize("compressed", [False, True])
def test_idx_pixels_and_labels_round_trip(tmp_path, name, compressed):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, 3 * 28 * 28, dtype=np.uint8).tobytes()
    digits = bytes([7, 0, 9])
    for prefix in ["train", "t10k"]:
        _write_file(tmp_path / name / "raw" / f"{prefix}-images-idx3-ubyte",
                    struct.pack(">IIII", 0x803, 3, 28, 28) + raw, compressed)
        _write_file(tmp_path / name / "raw" / f"{prefix}-labels-idx1-ubyte",
                    struct.pack(">II", 0x801, 3) + digits, compressed)
    for train in [True, False]:
        images, labels = datasets.read_split(name, tmp_path, train)
        assert images.shape == (3, 1, 28, 28) and images.dtype == torch.uint8
        for i, h, w in [(0, 0, 1), (1, 5, 20), (2, 27, 3)]:
            assert images[i, 0, h, w] == raw[i * 784 + 28 * h + w]
        assert labels.tolist() == [7, 0, 9]


def test_svhn_pixels_round_trip_and_ten_is_zero(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    digits = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    for name in ["train_32x32.mat", "test_32x32.mat"]:
        scipy.io.savemat(tmp_path / name, {"X": pixels, "y": digits})
    images, labels = datasets.read_split("SVHN", tmp_path, train=True)
    assert images.shape == (4, 3, 32, 32)
    for i, c, h, w in [(0, 0, 0, 1), (1, 2, 30, 4), (3, 1, 7, 31)]:
        assert images[i, c, h, w] == pixels[h, w, c, i]
    assert labels.tolist() == [0, 1, 9, 0]


def test_stl10_is_column_major_and_labels_start_at_one(tmp_path):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, 2 * 3 * 96 * 96, dtype=np.uint8).tobytes()
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ["train", "test"]:
        (folder / f"{split}_X.bin").write_bytes(raw)
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10]))
    images, labels = datasets.read_split("STL10", tmp_path, train=False)
    assert images.shape == (2, 3, 96, 96)
    for i, c, h, w in [(0, 0, 0, 1), (1, 2, 90, 4), (1, 1, 3, 95)]:
        assert images[i, c, h, w] == raw[i * 27648 + c * 9216 + w * 96 + h]
    assert labels.tolist() == [0, 9]


def test_missing_data_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(UserError) as caught:
        datasets.load_split("cifar10", tmp_path / "nowhere", train=True)
    message = str(caught.value)
    assert str((tmp_path / "nowhere").absolute()) in message
    assert "cifar-10-batches-py/data_batch_1" in message and "--download" in message


@pytest.mark.parametrize("name, damaged", [("CIFAR10", "cifar-10-batches-py/test_batch"),
                                           ("MNIST", "MNIST/raw/t10k-images-idx3-ubyte"),
                                           ("MNIST", "MNIST/raw/t10k-labels-idx1-ubyte"),
                                           ("SVHN", "test_32x32.mat"),
                                           ("STL10", "stl10_binary/test_X.bin"),
                                           ("STL10", "stl10_binary/test_y.bin")])
def test_a_truncated_file_is_named(tmp_path, name, damaged):
    _write_small_test_split(tmp_path, name)
    datasets.read_split(name, tmp_path, train=False)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match="truncated or corrupt") as caught:
        datasets.read_split(name, tmp_path, train=False)
    assert str(path) in str(caught.value)


def test_a_truncated_gzip_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_file(raw / "t10k-images-idx3-ubyte", struct.pack(">IIII", 0x803, 1, 28, 28) + bytes(784), True)
    _write_file(raw / "t10k-labels-idx1-ubyte", struct.pack(">II", 0x801, 1) + bytes([3]), False)
    path = raw / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated or corrupt") as caught:
        datasets.read_split("MNIST", tmp_path, train=False)
    assert str(path) in str(caught.value)


def test_labels_out_of_range_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}))
    with pytest.raises(UserError, match="labels outside 0..9"):
        datasets.read_split("CIFAR10", tmp_path, train=False)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _CreatesFile(str(marker)), "labels": []}))
    with pytest.raises(UserError) as caught:
        datasets.read_split("CIFAR10", tmp_path, train=False)
    assert str(folder / "test_batch") in str(caught.value)
    assert not marker.exists()


def test_load_split_insists_on_the_official_size(tmp_path):
    _write_small_test_split(tmp_path, "STL10")
    with pytest.raises(UserError, match="has 2 samples instead of the official 8000"):
        datasets.load_split("STL10", tmp_path, train=False)
    datasets.check_count("CIFAR10", True, 50000, tmp_path)
    datasets.check_count("SVHN", False, 26032, tmp_path)


def test_synthetic_is_deterministic_balanced_and_shaped():
    images, labels = datasets.load_split("synthetic", "ignored", train=True, download=True)
    again, _ = datasets.load_split("synthetic", "elsewhere", train=True)
    assert torch.equal(images, again)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [100] * 10
    test_images, test_labels = datasets.load_split("synthetic", "ignored", train=False)
    assert test_images.shape == (500, 3, 32, 32)
    assert torch.bincount(test_labels).tolist() == [50] * 10
    assert not torch.equal(test_images, images[:500])


def test_subset_indices_take_k_of_each_class():
    labels = torch.tensor([0, 1, 2] * 6 + [1] * 4)
    chosen = datasets.subset_indices(labels, 4, seed=3)
    assert chosen.dtype == torch.int64
    assert torch.equal(chosen, torch.sort(chosen).values) and len(chosen.unique()) == 12
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert torch.equal(chosen, datasets.subset_indices(labels, 4, seed=3))
    seeds_differ = [not torch.equal(chosen, datasets.subset_indices(labels, 4, seed=s)) for s in range(4, 10)]
    assert any(seeds_differ)


def test_subset_indices_default_to_the_smallest_class():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)
    chosen = datasets.subset_indices(labels, None, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    balanced = torch.arange(12) % 4
    assert torch.equal(datasets.subset_indices(balanced, None, seed=0), torch.arange(12))


def test_subset_indices_refuse_impossible_sizes():
    labels = torch.tensor([0] * 5 + [1] * 6)
    with pytest.raises(UserError, match="--samples-per-class 6 is more than the data has: at most 5 per class"):
        datasets.subset_indices(labels, 6, seed=0)
    with pytest.raises(UserError, match="at least 1"):
        datasets.subset_indices(labels, 0, seed=0)


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = datasets.channel_stats(images)
    pixels = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 2, 3)), rtol=1e-12)


def test_normalize_a_constant_image():
    images = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)
    images[:, 1] = 255
    x = datasets.normalize(images, [0.1, 0.5, 0.0], [0.5, 0.25, 2.0])
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = torch.tensor([(0.2 - 0.1) / 0.5, (1.0 - 0.5) / 0.25, 0.2 / 2.0])
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(2, 3, 4, 4))


def test_augment_leaves_a_constant_image_alone():
    images = torch.full((16, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(datasets.augment(images, torch.Generator().manual_seed(0)), images)


def test_augment_crops_a_window_of_the_reflect_padded_image_or_its_mirror():
    images = torch.randint(0, 256, (64, 2, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = datasets.augment(images, torch.Generator().manual_seed(2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    found = [_crop_of(padded[i], out[i].numpy()) for i in range(len(images))]
    assert None not in found
    assert {flipped for _, _, flipped in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) > 20
    again = datasets.augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


def test_batches_cover_a_permutation_with_a_smaller_last_batch():
    images, labels = _numbered_data(23)
    got = list(datasets.batches(images, labels, 5, [0.0], [1.0], shuffle=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in got] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in got])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for x, y in got:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x[:, 0, 0, 0], y.float() / 255)
    again = list(datasets.batches(images, labels, 5, [0.0], [1.0], shuffle=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([y for _, y in again]), seen)
    in_order = torch.cat([y for _, y in datasets.batches(images, labels, 5, [0.0], [1.0])])
    assert in_order.tolist() == list(range(23))
    assert datasets.num_batches(23, 5) == 5 and datasets.num_batches(20, 5) == 4


def test_ranks_share_each_global_batch_exactly():
    images, labels = _numbered_data(23)
    whole = [y for _, y in datasets.batches(images, labels, 8, [0.0], [1.0], shuffle=torch.Generator().manual_seed(4))]
    shares = [[y for _, y in datasets.batches(images, labels, 8, [0.0], [1.0], rank=rank, world_size=2,
                                              shuffle=torch.Generator().manual_seed(4))] for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == 3
    for global_batch, first, second in zip(whole, *shares):
        assert torch.equal(torch.cat([first, second]), global_batch)
        assert abs(len(first) - len(second)) <= 1


def test_batches_augment_when_asked():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(10)
    plain = torch.cat([x for x, _ in datasets.batches(images, labels, 4, [0.0] * 3, [1.0] * 3)])
    augmented = torch.cat([x for x, _ in datasets.batches(images, labels, 4, [0.0] * 3, [1.0] * 3,
                                                          augment_with=torch.Generator().manual_seed(6))])
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    torch.testing.assert_close(augmented.sort(dim=3).values.sum(), plain.sort(dim=3).values.sum(), rtol=0.1, atol=0)


def test_load_run_data_keeps_the_balanced_subset():
    (train_images, train_labels), (test_images, test_labels), per_class, _ = datasets.load_run_data(
        {"dataset": "synthetic", "samples_per_class": 3, "seed": 0}, "ignored", download=False,
        device=torch.device("cpu"))
    assert per_class == 3 and train_images.shape == (30, 3, 32, 32)
    assert torch.bincount(train_labels).tolist() == [3] * 10
    assert len(test_labels) == 500 and test_images.shape == (500, 3, 32, 32)
    _, _, everything, _ = datasets.load_run_data({"dataset": "synthetic", "samples_per_class": None, "seed": 0},
                                                 "ignored", False, torch.device("cpu"))
    assert everything == 100


class _CreatesFile:
    """Unpickling this would create a file, as any malicious pickle could."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _Python2Pickler(pickle.Pickler):
    """Writes arrays as a Python 2 pickle reads with encoding="latin1": the pixel bytes as a latin-1
    text string (and, once `_write_python2_pickle` renames it, numpy 1's module numpy.core)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            reconstruct = obj.__reduce__()[0]
            pixels_as_text = obj.tobytes().decode("latin1")
            return reconstruct, (np.ndarray, (0,), "b"), (1, obj.shape, obj.dtype, False, pixels_as_text)
        return NotImplemented


def _write_python2_pickle(path: Path, content: dict) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    written = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in written and b"_codecs" not in written
    path.write_bytes(written)


def _assert_cifar_layout(images: torch.Tensor, rows: np.ndarray) -> None:
    """Each image's pixel (c, h, w) is its row's entry c*1024 + 32*h + w (red, green, blue planes)."""
    for i in range(len(rows)):
        for c, h, w in [(0, 0, 1), (1, 3, 30), (2, 31, 0), (2, 17, 5)]:
            assert images[i, c, h, w] == rows[i, c * 1024 + 32 * h + w]


def _write_file(path: Path, content: bytes, compressed: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compressed:
        Path(f"{path}.gz").write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)


def _write_small_test_split(root: Path, name: str) -> None:
    """A two-image test split of `name` in its on-disk format, content irrelevant."""
    if name == "CIFAR10":
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "test_batch").write_bytes(
            pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}))
    elif name == "MNIST":
        _write_file(root / "MNIST/raw/t10k-images-idx3-ubyte", struct.pack(">IIII", 0x803, 2, 28, 28) + bytes(1568),
                    False)
        _write_file(root / "MNIST/raw/t10k-labels-idx1-ubyte", struct.pack(">II", 0x801, 2) + bytes([1, 2]), False)
    elif name == "SVHN":
        scipy.io.savemat(root / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                   "y": np.ones((2, 1), np.uint8)})
    elif name == "STL10":
        _write_file(root / "stl10_binary/test_X.bin", bytes(2 * 3 * 96 * 96), False)
        _write_file(root / "stl10_binary/test_y.bin", bytes([1, 2]), False)


def _numbered_data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-pixel images whose value is their index, and labels equal to it."""
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1), torch.arange(count)


def _crop_of(padded: np.ndarray, out: np.ndarray) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) window of the padded image that `out` is, or None."""
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy:dy + 32, dx:dx + 32]
            for flipped, candidate in [(False, window), (True, window[:, :, ::-1])]:
                if np.array_equal(candidate, out):
                    return dy, dx, flipped
    return None


def test_the_test_subset_is_class_balanced_seeded_and_refused_beyond_the_split():
    labels = torch.arange(50) % 10  # five test images of each of ten classes
    picked = datasets.test_subset_indices(labels, 23, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [3, 3, 3] + [2] * 7 and len(set(picked.tolist())) == 23
    assert torch.equal(picked, datasets.test_subset_indices(labels, 23, seed=0))
    assert not torch.equal(picked, datasets.test_subset_indices(labels, 23, seed=1))
    assert not torch.equal(picked[:20], datasets.test_subset_indices(labels, 20, seed=0))
    assert torch.bincount(labels[datasets.test_subset_indices(labels, 50, seed=0)]).tolist() == [5] * 10
    with pytest.raises(UserError, match=r"--test-samples 51 needs 6 test images of class 0, which has 5; choose at "
                                        r"most 50"):
        datasets.test_subset_indices(labels, 51, seed=0)


def test_a_run_with_test_samples_is_tested_on_that_subset_of_the_test_split():
    run = {"dataset": "synthetic", "samples_per_class": 3, "seed": 4}
    whole = datasets.load_run_data(run, "ignored", False, torch.device("cpu"))
    some = datasets.load_run_data({**run, "test_samples": 30}, "ignored", False, torch.device("cpu"))
    chosen = datasets.test_subset_indices(whole.test[1], 30, seed=4)
    assert torch.equal(some.test[0], whole.test[0][chosen]) and torch.equal(some.test[1], whole.test[1][chosen])
    assert torch.bincount(some.test[1]).tolist() == [3] * 10 and torch.equal(some.train[0], whole.train[0])
