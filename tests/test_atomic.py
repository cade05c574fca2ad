"""The one atomic-write helper: permissions of a plain write, nothing left behind, the same bytes as before."""

import json
import os
import stat
import struct

import ml_dtypes
import numpy as np
import pytest

from edu_prm_jax.io.atomic import write_bytes_atomic, write_text_atomic
from edu_prm_jax.models.safetensors_io import SafetensorsFile, write_safetensors


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_has_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    write_bytes_atomic(tmp_path / "atomic.bin", b"x")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == _mode(tmp_path / "atomic.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.bin", "atomic.txt", "plain.txt"]  # no temp left


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    write_text_atomic(target, "old")

    def explode(_):
        raise RuntimeError("disk full")

    from edu_prm_jax.io.atomic import atomic_write

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_safetensors_data_is_each_tensor_bytes_in_order(tmp_path):
    tensors = [("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
               ("b", np.asarray([1.5, -2.0], dtype=ml_dtypes.bfloat16)),  # a dtype without a buffer format
               ("c", np.asarray([True, False, True])),
               ("d", np.arange(12, dtype=np.int64).reshape(3, 4).T)]  # not contiguous until written
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert raw[8 + header_len:] == b"".join(np.ascontiguousarray(arr).tobytes() for _, arr in tensors)
    assert [header[name]["shape"] for name, _ in tensors] == [[2, 3], [2], [3], [4, 3]]
    back = SafetensorsFile(path)
    for name, arr in tensors:
        np.testing.assert_array_equal(back.array(name), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
