"""A validating, memory-mapped safetensors reader and a streaming writer.

The `safetensors` numpy backend cannot read bfloat16 (what Qwen2.5 ships), and it reads whole tensors. This
reader maps the file and hands out zero-copy views, so a sharded import reads only the slice each device needs
and never holds a second host copy. Every structural problem (truncation, bad header, offsets out of range)
raises `CheckpointError` naming the file and tensor. A file on an object store (gs://) is first copied to a
local temp file (removed at exit), since a memory map needs a local file.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from typing import BinaryIO

import ml_dtypes
import numpy as np

from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import atomic_write

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be; names the file and tensor."""


class SafetensorsFile:
    """Read-only view of one .safetensors file; `array(name)` is a memory-mapped numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.as_path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self._local = self.path if storage.is_local(self.path) else _local_copy(self.path)
        size = os.path.getsize(self._local)
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated ({size} bytes, no header)")
        with open(self._local, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(f"{self.path}: corrupt or truncated header (claims {header_len} bytes, "
                                      f"file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is JSON {type(header).__name__}, not an object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry ({e})") from e
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape "
                                      f"{shape} and dtype {info['dtype']} need {expected}")
            if end > data_size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data "
                                      f"section, which has only {data_size}")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def array(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self._local, dtype=np.uint8, mode="r")
        dtype, shape, begin, end = self._entries[name]
        raw = self._mmap[self._data_start + begin: self._data_start + end]
        return raw.view(dtype).reshape(shape)


def _local_copy(path: storage.Path) -> str:
    """A local temp copy of remote file `path` (removed at exit), for the memory map."""
    fd, local = tempfile.mkstemp(prefix=".safetensors-", suffix=f"-{path.name}")
    os.close(fd)
    atexit.register(lambda: os.path.exists(local) and os.unlink(local))
    storage.copy_file(path, local)
    return local


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (consumed one at a time) to `path` atomically: a temp file renamed on success."""
    tensors = [(name, np.ascontiguousarray(arr)) for name, arr in tensors]
    header: dict[str, object] = {"__metadata__": metadata or {"format": "np"}}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(arr.reshape(-1).view(np.uint8))  # the tensor's own buffer: no bytes copy of it

    atomic_write(path, write, binary=True)
