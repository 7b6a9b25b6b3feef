"""Reading features that any code wrote: the arrays of one checkpoint from .npy, .npz, .pt or .safetensors files,
checked before use and read a window of rows at a time, so that a pass over them holds one window in memory.

A checkpoint is one .npz, .pt or .safetensors file holding named arrays, or a folder of such files (shards,
in the natural order of their names: shard2 before shard10) and of .npy files, each named after the array it
holds (`features.npy`, or shards `features.0.npy`, `features.1.npy`, ...: the name up to its first dot).
Its arrays, by name (ARRAYS):

    features, labels            (N, d) floating point and (N,) integers: required
    weight, bias                (K, d) and (K,): the last layer, optional
    test_features, test_labels  held-out features and their labels, optional

An array split into shards is their concatenation; the features and their labels (and the test ones) must be
split alike, shard by shard. The weight and the bias are read whole, from one file each.

.npy and .safetensors files are memory-mapped one window at a time (the window unmapped after use, so the
process's resident memory stays bounded); the arrays of an .npz are read as streams from its zip archive,
whose CRC-32 is checked when a stream ends; a .pt file must be a dict of tensors, loaded with
`torch.load(weights_only=True, map_location="cpu", mmap=True)` once every record of its zip archive matches
its CRC-32 (mapped whole: the pages read stay resident, so features larger than memory belong in .npy or
.safetensors files). Floating-point arrays may be float16, bfloat16, float32 or float64, labels any integer type.
Anything else (a missing array, a shape or type that does not fit, a corrupt or foreign file) is a UserError
naming the file.
"""
import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from errors import UserError

ARRAYS = ("features", "labels", "weight", "bias", "test_features", "test_labels")
SUFFIXES = (".npy", ".npz", ".pt", ".safetensors")
# The safetensors dtypes, as numpy reads their bytes (bfloat16 as its 16 bits, widened to float32 on reading).
_SAFETENSORS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


class Array:
    """One stored array: its file, shape and kind ("float", "int" or another), and its rows a window at a time."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], kind: str):
        self.path, self.name, self.shape, self.kind = path, name, shape, kind

    def windows(self, rows: int) -> Iterator[torch.Tensor]:
        """The array's rows, `rows` at a time (the last window may be shorter), as tensors: floating point as
        float32 or float64, integers as int64."""
        for start in range(0, self.shape[0], rows):
            yield self._read(start, min(start + rows, self.shape[0]))
        self._finish()

    def whole(self) -> torch.Tensor:
        windows = list(self.windows(max(1, self.shape[0])))
        return torch.cat(windows) if windows else self._read(0, 0)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self) -> None:
        """Checks that need the whole array read (an .npz stream's CRC-32)."""


@dataclass
class Checkpoint:
    """The arrays of one checkpoint: each name of ARRAYS it has, with its shards in order."""
    path: Path
    arrays: dict[str, list[Array]]

    def parts(self, prefix: str = "") -> list[tuple[Array, Array]]:
        """The (features, labels) shards, or (test_features, test_labels) with prefix "test_", checked to pair up
        row for row: floating-point features of one width, integer labels of as many rows."""
        features, labels = self.arrays.get(f"{prefix}features", []), self.arrays.get(f"{prefix}labels", [])
        if len(features) != len(labels):
            raise UserError(f"{self.path}: {len(features)} file(s) of {prefix}features but {len(labels)} of "
                            f"{prefix}labels; the two must be split alike, shard by shard")
        for feature, label in zip(features, labels):
            _require(feature, dims=2, kind="float")
            _require(label, dims=1, kind="int")
            if feature.shape[0] != label.shape[0]:
                where = feature.path if feature.path == label.path else f"{feature.path} and {label.path}"
                raise UserError(f"{where}: {feature.shape[0]} rows of {feature.name} but {label.shape[0]} "
                                f"{label.name}; give every feature its label")
            if feature.shape[1] != features[0].shape[1]:
                raise UserError(f"{feature.path}: {feature.name} of width {feature.shape[1]}, but "
                                f"{features[0].path}'s have {features[0].shape[1]}; all features must have one width")
        return list(zip(features, labels))

    def single(self, name: str) -> Array | None:
        """The array `name` (weight or bias), from one file, or None."""
        found = self.arrays.get(name, [])
        if len(found) > 1:
            raise UserError(f"{self.path}: {name} is in {found[0].path} and in {found[1].path}; keep one")
        return found[0] if found else None


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path` (a file or a folder, see the module docstring), its headers read and checked."""
    path = Path(path)
    if path.is_dir():
        files = sorted((file for file in path.iterdir() if file.suffix in SUFFIXES), key=_natural)
        if not files:
            raise UserError(f"{path} holds no {', '.join(SUFFIXES)} file; put the features and labels there")
    elif path.is_file():
        if path.suffix == ".npy":
            raise UserError(f"{path}: an .npy file holds one array; put features.npy and labels.npy in a folder "
                            "and give the folder")
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: not a {', '.join(SUFFIXES)} file")
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    arrays: dict[str, list[Array]] = {}
    for file in files:
        for array in _arrays_of(file):
            if array.name in ARRAYS:
                arrays.setdefault(array.name, []).append(array)
    checkpoint = Checkpoint(path, arrays)
    if "features" not in arrays or "labels" not in arrays:
        found = sorted({array.name for file in files for array in _arrays_of(file)})
        raise UserError(f"{path} has no {'features' if 'features' not in arrays else 'labels'} array (it has: "
                        f"{', '.join(found) or 'none'}); name them features and labels")
    return checkpoint


def _arrays_of(file: Path) -> list[Array]:
    try:
        if file.suffix == ".npy":
            return [_NpyArray(file, file.name.split(".")[0])]
        if file.suffix == ".npz":
            return _npz_arrays(file)
        if file.suffix == ".pt":
            return _pt_arrays(file)
        return _safetensors_arrays(file)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "CRC-32" in reason:
            raise UserError(f"{file} is corrupt ({reason}); its bytes changed after it was written") from None
        raise UserError(f"{file} is not a readable {file.suffix} file ({reason})") from None


class _NpyArray(Array):
    """An .npy file, memory-mapped a window at a time."""

    def __init__(self, path: Path, name: str):
        with open(path, "rb") as handle:
            shape, dtype = _npy_header(handle, path)
            self.offset = handle.tell()
        super().__init__(path, name, shape, _kind(dtype))
        self.dtype = dtype
        _check_size(path, self.offset + _bytes(shape, dtype))

    def _read(self, start: int, stop: int) -> torch.Tensor:
        row = _bytes(self.shape[1:], self.dtype)
        window = np.memmap(self.path, self.dtype, "r", self.offset + start * row, (stop - start, *self.shape[1:]))
        return _tensor(np.array(window), self.dtype)


class _NpzArray(Array):
    """An array of an .npz archive, read as a stream."""

    def __init__(self, path: Path, member: str):
        with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
            shape, self.dtype = _npy_header(stream, path)
        super().__init__(path, member.removesuffix(".npy"), shape, _kind(self.dtype))
        self.member = member

    def windows(self, rows: int) -> Iterator[torch.Tensor]:
        row = _bytes(self.shape[1:], self.dtype)
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
            _npy_header(stream, self.path)
            for start in range(0, self.shape[0], rows):
                count = min(rows, self.shape[0] - start)
                data = stream.read(count * row)
                if len(data) != count * row:
                    raise UserError(f"{self.path}: {self.name} ends after {start + len(data) // row} of its "
                                    f"{self.shape[0]} rows; the file is cut")
                yield _tensor(np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:]).copy(), self.dtype)
            try:
                stream.read()  # to its end: zipfile checks the CRC-32 there
            except zipfile.BadZipFile as err:
                raise UserError(f"{self.path} is corrupt ({err}); its bytes changed after it was written") from None


class _TensorArray(Array):
    """A tensor of a .pt file."""

    def __init__(self, path: Path, name: str, tensor: torch.Tensor):
        kind = "float" if tensor.is_floating_point() else "other" if tensor.dtype == torch.bool or \
            tensor.is_complex() else "int"
        super().__init__(path, name, tuple(tensor.shape), kind)
        self.tensor = tensor

    def _read(self, start: int, stop: int) -> torch.Tensor:
        window = self.tensor[start:stop]
        if self.kind == "int":
            return window.to(torch.int64)
        return window if window.dtype in (torch.float32, torch.float64) else window.to(torch.float32)


class _SafetensorsArray(Array):
    """A tensor of a .safetensors file, memory-mapped a window at a time."""

    def __init__(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], offset: int):
        self.dtype, self.offset, self.bfloat16 = np.dtype(_SAFETENSORS[dtype]), offset, dtype == "BF16"
        super().__init__(path, name, shape, "float" if dtype.startswith(("F", "BF")) else
                         "int" if dtype[0] in "IU" else "other")

    def _read(self, start: int, stop: int) -> torch.Tensor:
        row = _bytes(self.shape[1:], self.dtype)
        window = np.array(np.memmap(self.path, self.dtype, "r", self.offset + start * row,
                                    (stop - start, *self.shape[1:])))
        if self.bfloat16:  # the upper half of a float32
            return torch.from_numpy((window.astype(np.uint32) << 16).view(np.float32))
        return _tensor(window, self.dtype)


def _npz_arrays(path: Path) -> list[Array]:
    with zipfile.ZipFile(path) as archive:
        members = [name for name in archive.namelist() if name.endswith(".npy")]
    return [_NpzArray(path, member) for member in members]


def _pt_arrays(path: Path) -> list[Array]:
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise UserError(f"{path} is corrupt (record {damaged} fails its CRC-32); its bytes changed after it was "
                        "written")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # weights_only refuses what would run code with UnpicklingError; torch raises others
        raise UserError(f"{path} could not be loaded as tensors only ({str(err).splitlines()[0]}); save a dict of "
                        "tensors with torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise UserError(f"{path} holds a {type(state).__name__}, not a dict of named tensors; save "
                        "{'features': ..., 'labels': ...} with torch.save")
    return [_TensorArray(path, name, value) for name, value in state.items() if isinstance(value, torch.Tensor)]


def _safetensors_arrays(path: Path) -> list[Array]:
    """The tensors a .safetensors file's header lists (8 bytes: the header's length, little-endian; the header,
    JSON: name -> dtype, shape, data_offsets [begin, end) from the end of the header), each checked to lie
    inside the file and to have as many bytes as its shape and dtype need."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            raise ValueError(f"its header claims {length} bytes, more than the file has")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    arrays = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            itemsize = np.dtype(_SAFETENSORS[dtype]).itemsize
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if not all(isinstance(value, int) and value >= 0 for value in (*shape, begin, end)) or \
                end - begin != itemsize * int(np.prod(shape)) or 8 + length + end > size:
            raise ValueError(f"tensor {name!r} (shape {list(shape)}, {dtype}) does not fit bytes {begin}..{end} "
                             f"of the {size - 8 - length} after the header")
        arrays.append(_SafetensorsArray(path, name, dtype, shape, 8 + length + begin))
    return arrays


def _npy_header(handle, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    if fortran and len(shape) > 1:
        raise UserError(f"{path}: an array in Fortran order; save it with np.save(path, np.ascontiguousarray(array))")
    if dtype.hasobject:
        raise UserError(f"{path}: an array of Python objects, which is never loaded (it could run code)")
    return shape, dtype


def _check_size(path: Path, needed: int) -> None:
    if path.stat().st_size < needed:
        raise UserError(f"{path} is cut: its array needs {needed} bytes, the file has {path.stat().st_size}")


def _require(array: Array, dims: int, kind: str) -> None:
    what = {"float": "floating point", "int": "integers"}[kind]
    if len(array.shape) != dims or array.kind != kind:
        shape = "(N, d)" if dims == 2 else "(N,)"
        raise UserError(f"{array.path}: {array.name} must be {what} of shape {shape}, got shape "
                        f"{list(array.shape)} of {array.kind} values")


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "int" if dtype.kind in "iu" else "other"


def _bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _tensor(window: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """A window of an array as a tensor: floating point as float32 or float64, integers as int64."""
    if dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(window, dtype=np.float64 if dtype.itemsize == 8 else np.float32))
    if dtype.kind in "iu":
        if dtype == np.uint64 and window.size and window.max() > np.iinfo(np.int64).max:
            raise UserError("labels above 2^63 are not class indices")
        return torch.from_numpy(window.astype(np.int64))
    return torch.from_numpy(np.array(window))


def _natural(path: Path) -> list:
    """A sort key that orders the numbers in names by value: shard2 before shard10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
