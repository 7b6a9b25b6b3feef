"""measure_features.py: the four file formats read back to the same rows (safetensors files written by the
format's own library), the rows against collapse_metrics and a loop over samples, --min-class-samples, and
each bad input refused with one line naming its file and row."""
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

import measure_features
import runs
from errors import UserError
from feature_files import open_checkpoint
from nc_metrics import STATS_KEYS, collapse_metrics

CLASSES, DIM = 6, 5


def problem(seed: int = 0, per_class: int = 4, test_per_class: int = 3) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    means = 3 * generator.standard_normal((CLASSES, DIM))
    labels = generator.permutation(np.repeat(np.arange(CLASSES), per_class))
    test_labels = np.repeat(np.arange(CLASSES), test_per_class)
    return {"features": (means[labels] + generator.standard_normal((len(labels), DIM))).astype(np.float32),
            "labels": labels, "weight": (means + 0.5 * generator.standard_normal(means.shape)).astype(np.float32),
            "bias": generator.standard_normal(CLASSES).astype(np.float32),
            "test_features": (means[test_labels] + 2 * generator.standard_normal((len(test_labels), DIM))).astype(
                np.float32), "test_labels": test_labels}


def write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The arrays in the format of `path`'s suffix; a folder of .npy files (features split in two shards) for no
    suffix."""
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".pt":
        torch.save({name: torch.from_numpy(array) for name, array in arrays.items()}, path)
    elif path.suffix == ".safetensors":
        save_file(arrays, str(path))
    else:
        path.mkdir(parents=True)
        for name, array in arrays.items():
            if name in ("features", "labels"):
                half = len(array) // 2
                np.save(path / f"{name}.0.npy", array[:half])
                np.save(path / f"{name}.1.npy", array[half:])
            else:
                np.save(path / f"{name}.npy", array)
    return path


def measure(tmp_path: Path, *paths: Path, extra: list[str] = ()) -> list[dict]:
    out = tmp_path / "out"
    assert measure_features.main(measure_features.parse_args([*map(str, paths), "--out", str(out), *extra])) == 0
    return runs.read_nc_metrics(out)


def test_the_four_formats_give_one_row_each_equal_to_collapse_metrics(tmp_path):
    arrays = problem()
    paths = [write(tmp_path / name, arrays) for name in ("step_10.npz", "step_20.pt", "step_30.safetensors", "step_40")]
    rows = measure(tmp_path, *paths)
    assert [row["epoch"] for row in rows] == [10, 20, 30, 40]
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    expected = collapse_metrics(tensors["features"], tensors["labels"], tensors["weight"], tensors["bias"])
    for row in rows:
        for key in STATS_KEYS:
            assert row[key] == pytest.approx(expected[key], rel=1e-9), key
        assert row["ncc_mismatch_train"] == pytest.approx(expected["ncc_mismatch"], abs=1e-15)


def test_accuracy_loss_and_the_ncc_mismatch_on_held_out_features_against_a_loop_over_samples(tmp_path):
    arrays = problem(seed=1)
    (row,) = measure(tmp_path, write(tmp_path / "held_out.npz", arrays))
    h, y = arrays["features"].astype(np.float64), arrays["labels"]
    means = np.stack([h[y == c].mean(axis=0) for c in range(CLASSES)])
    w, b = arrays["weight"].astype(np.float64), arrays["bias"].astype(np.float64)
    agree, correct, loss = 0, 0, 0.0
    for feature, label in zip(arrays["test_features"].astype(np.float64), arrays["test_labels"]):
        logits = w @ feature + b
        nearest = int(np.argmin([np.linalg.norm(feature - mean) for mean in means]))
        agree += int(np.argmax(logits)) == nearest  # Wu & Papyan's NC4: the classifier agrees with the NCC rule
        correct += int(np.argmax(logits)) == label
        loss += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label]
    count = len(arrays["test_labels"])
    assert row["ncc_mismatch_test"] == pytest.approx(1 - agree / count, abs=1e-15)
    assert row["test_acc"] == pytest.approx(correct / count, abs=1e-15)
    assert row["test_loss"] == pytest.approx(loss / count, rel=1e-9)
    assert 0 <= row["test_ece"] <= 1


def test_without_a_classifier_or_held_out_features_their_columns_stay_empty(tmp_path):
    arrays = problem()
    (row,) = measure(tmp_path, write(tmp_path / "features_only.safetensors",
                                     {"features": arrays["features"], "labels": arrays["labels"]}))
    assert row["epoch"] == 1  # no number in its name: its place among FILES
    for key in ("train_acc", "test_acc", "test_ece", "equinorm_weights", "self_duality", "ncc_mismatch_train",
                "wh_alignment", "unc3_dot_var"):
        assert row[key] is None, key
    expected = collapse_metrics(torch.from_numpy(arrays["features"]), torch.from_numpy(arrays["labels"]),
                                torch.randn(CLASSES, DIM))
    for key in ("nc1", "cdnv", "equiangular_means", "gnc2_log_distance_var"):
        assert row[key] == pytest.approx(expected[key], rel=1e-9), key


def test_min_class_samples_leaves_out_the_small_classes_their_samples_and_rows(tmp_path, capsys):
    arrays = problem(seed=2)
    keep = (arrays["labels"] != 2) | (np.cumsum(arrays["labels"] == 2) == 1)  # class 2 keeps one sample
    arrays["features"], arrays["labels"] = arrays["features"][keep], arrays["labels"][keep]
    (row,) = measure(tmp_path, write(tmp_path / "step_5.npz", arrays), extra=["--min-class-samples", "2"])
    assert "1 of 6 classes have fewer than 2 samples (1 of 21 samples) and are left out" in capsys.readouterr().err
    others = arrays["labels"] != 2
    renumbered = torch.from_numpy(arrays["labels"][others] - (arrays["labels"][others] > 2))
    rows = [0, 1, 3, 4, 5]
    expected = collapse_metrics(torch.from_numpy(arrays["features"][others]), renumbered,
                                torch.from_numpy(arrays["weight"][rows]), torch.from_numpy(arrays["bias"][rows]))
    for key in STATS_KEYS:
        assert row[key] == pytest.approx(expected[key], rel=1e-9), key


def test_shards_are_read_in_the_order_of_the_numbers_in_their_names(tmp_path):
    arrays = problem()
    folder = tmp_path / "shards"
    folder.mkdir()
    for index, rows in enumerate(np.array_split(np.arange(len(arrays["labels"])), 12)):  # shard 10 after shard 9
        np.save(folder / f"features.{index}.npy", arrays["features"][rows])
        np.save(folder / f"labels.{index}.npy", arrays["labels"][rows])
    checkpoint = open_checkpoint(folder)
    features = torch.cat([part.whole() for part, _ in checkpoint.parts()])
    assert torch.equal(features, torch.from_numpy(arrays["features"]))


def test_bfloat16_and_float16_features_read_as_their_values(tmp_path):
    arrays = problem()
    features = torch.from_numpy(arrays["features"]).to(torch.bfloat16)
    save_torch_file({"features": features, "labels": torch.from_numpy(arrays["labels"])},
                    str(tmp_path / "b.safetensors"))
    np.savez(tmp_path / "h.npz", features=arrays["features"].astype(np.float16), labels=arrays["labels"])
    read = open_checkpoint(tmp_path / "b.safetensors").arrays["features"][0].whole()
    assert torch.equal(read, features.to(torch.float32))
    half = open_checkpoint(tmp_path / "h.npz").arrays["features"][0].whole()
    assert torch.equal(half, torch.from_numpy(arrays["features"].astype(np.float16).astype(np.float32)))


def test_rows_are_numbered_by_their_names_and_a_number_twice_is_refused(tmp_path):
    arrays = problem()
    first, second = write(tmp_path / "run1_step_3.npz", arrays), write(tmp_path / "run2_step_3.pt", arrays)
    with pytest.raises(UserError, match=r"run1_step_3.npz and .*run2_step_3.pt would both be row 3"):
        measure(tmp_path, first, second)


# ---------------------------------------------------------------- bad input: one line naming the file and row

def bad(tmp_path: Path, name: str, change) -> str:
    """The message measure_features.py gives for the problem's arrays changed by `change`, written as `name`."""
    arrays = problem()
    change(arrays)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write(tmp_path / name, arrays)
    with pytest.raises(UserError) as raised:
        measure(tmp_path, path)
    message = str(raised.value)
    assert "\n" not in message
    return message


def nan_row(arrays):
    arrays["features"][13, 2] = np.nan


def test_bad_inputs_are_named_with_their_file_and_row(tmp_path):
    assert re.search(r"features\.1\.npy, row 1: the features hold NaN or Inf", bad(tmp_path, "npy", nan_row))
    assert re.search(r"x\.npz, row 7: label 6 is outside \[0, 6\) \(the weight has 6 rows\)",
                     bad(tmp_path, "x.npz", lambda a: a["labels"].__setitem__(7, 6)))
    assert re.search(r"x\.pt, row 3: label -1 is outside",
                     bad(tmp_path / "neg", "x.pt", lambda a: a["labels"].__setitem__(3, -1)))
    assert re.search(r"x\.safetensors: 24 rows of features but 23 labels",
                     bad(tmp_path / "short", "x.safetensors", lambda a: a.update(labels=a["labels"][:-1])))
    single = bad(tmp_path / "single", "x.npz", lambda a: a.update(labels=np.where(a["labels"] == 4, 5, a["labels"]),
                                                                 **{"test_labels": a["test_labels"]}))
    assert "class 4 of 0..5 has no samples" in single and "--min-class-samples 2" in single
    lone = problem()
    row = int(np.flatnonzero(lone["labels"] == 1)[0])
    message = bad(tmp_path / "lone", "x.npz",
                  lambda a: a["labels"].__setitem__(np.flatnonzero(a["labels"] == 1)[1:], 0))
    assert re.search(rf"x\.npz, row {row}: the only sample of class 1", message)
    assert re.search(r"x\.npz: the weight must be floating point of shape \(K, 5\)",
                     bad(tmp_path / "wide", "x.npz", lambda a: a.update(weight=np.zeros((6, 4), np.float32))))
    assert re.search(r"x\.npz: labels must be integers",
                     bad(tmp_path / "float", "x.npz", lambda a: a.update(labels=a["labels"].astype(np.float32))))
    assert re.search(r"x\.npz has no labels array \(it has: bias, features, test_features, test_labels, weight\)",
                     bad(tmp_path / "missing", "x.npz", lambda a: a.pop("labels")))


def test_corrupt_cut_and_foreign_files_are_refused(tmp_path):
    arrays = problem()
    npz = write(tmp_path / "a.npz", arrays)
    data = bytearray(npz.read_bytes())
    offset = data.index(b"features.npy") + 400  # inside the features' bytes, which np.savez stores uncompressed
    data[offset] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"a\.npz is corrupt"):
        measure(tmp_path, npz)
    folder = write(tmp_path / "cut", arrays)
    (folder / "features.0.npy").write_bytes((folder / "features.0.npy").read_bytes()[:-10])
    with pytest.raises(UserError, match=r"features\.0\.npy is cut"):
        measure(tmp_path, folder)
    buffer = io.BytesIO()
    torch.save({"features": torch.zeros(2, 2), "labels": torch.zeros(2, dtype=torch.long), "code": Path(".")}, buffer)
    (tmp_path / "code.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match=r"code\.pt could not be loaded as tensors only"):
        measure(tmp_path, tmp_path / "code.pt")
    st = write(tmp_path / "b.safetensors", arrays)
    raw = bytearray(st.read_bytes())
    header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
    lying = header.replace('"shape":[24,5]', '"shape":[25,5]')
    assert lying != header
    st.write_bytes(bytes(raw[:8]) + lying.encode() + bytes(raw[8 + len(header):]))
    with pytest.raises(UserError, match=r"b\.safetensors is not a readable \.safetensors file \(tensor 'features'"):
        measure(tmp_path, st)
    with pytest.raises(UserError, match="an .npy file holds one array"):
        measure(tmp_path, tmp_path / "cut" / "labels.0.npy")
    assert zipfile.is_zipfile(npz)


@pytest.mark.slow
def test_plotting_draws_the_rows(tmp_path):
    import plotting
    arrays = problem()
    paths = [write(tmp_path / f"step_{step}.npz", arrays) for step in (1, 10)]
    measure(tmp_path, *paths)
    assert plotting.main(plotting.parse_args(["nc", str(tmp_path / "out"), "--out", str(tmp_path / "plots")])) == 0
    names = {path.name for path in (tmp_path / "plots").iterdir()}
    assert {"fig6_nc1.png", "fig7_ncc_mismatch.png", "fig9_other_measures.png"} <= names
    assert plotting.main(plotting.parse_args(["table", str(tmp_path / "out"), "--out", str(tmp_path / "t.md")])) == 0
