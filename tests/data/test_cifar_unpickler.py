"""CIFAR batches are read without running code from them: a restricted unpickler builds nothing but dicts,
lists, strings, numbers, bytes and numpy arrays, and checks the batch's structure."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from fakedata import write_cifar

from kdprune_cli.data import DataError, load_cached, read_raw
from kdprune_cli.data.sources.cifar import read_cifar_batch


class Payload:
    """A pickle that, when loaded by a plain unpickler, runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["whole_file", "inside_data"])
def test_malicious_cifar_pickle_is_not_run(tmp_path, where):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = Payload(marker)
    obj = evil if where == "whole_file" else {"data": evil, "labels": [0]}
    payload = pickle.dumps(obj)
    # the payload is real: a plain unpickler runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR batch \(refused pickle global \w+\.system\)"):
        read_raw("cifar10", tmp_path, download=False, verify=False)
    assert not marker.exists()
    with pytest.raises(DataError, match="not a CIFAR batch"):
        load_cached("cifar10", tmp_path, False, tmp_path / "cache", verify=False)
    assert not marker.exists()


def _write(path: Path, obj, protocol=None):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("obj,match", [
    ([1, 2, 3], "a pickled list, not a dict"),
    ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, "not a uint8 array N×3072"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "not a uint8 array N×3072"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"labels outside 0..9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "not a list of integers"),
    ({"data": np.zeros((2, 3072), np.uint8)}, "not a list of integers"),
    ({"data": np.array([{"x": 1}], dtype=object), "labels": [0]}, "not a uint8 array"),
])
def test_batch_structure_is_checked(tmp_path, obj, match):
    _write(tmp_path / "b", obj)
    with pytest.raises(DataError, match=match):
        read_cifar_batch(tmp_path / "b", 10)


def test_truncated_batch_is_a_data_error(tmp_path):
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    (tmp_path / "b").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="unreadable pickle"):
        read_cifar_batch(tmp_path / "b", 10)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as the official CIFAR files were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _binstring(self, raw: bytes):
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    def save_bytes(self, obj):
        self._binstring(obj)
        self.memoize(obj)

    def save_str(self, obj):
        self._binstring(obj.encode("latin-1"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def test_python2_and_old_numpy_pickles_are_read(tmp_path):
    """The official files: Python 2 strings, numpy.core.multiarray._reconstruct; keys as bytes also work."""
    import io

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({"batch_label": "training batch 1 of 5", "labels": [3, 1, 4], "data": arr,
                                       "filenames": ["a.png", "b.png", "c.png"]})
    raw = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    (tmp_path / "py2").write_bytes(raw)
    x, y = read_cifar_batch(tmp_path / "py2", 10)
    np.testing.assert_array_equal(x, arr)
    assert y == [3, 1, 4]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        _write(tmp_path / f"p{protocol}", {b"data": arr, b"fine_labels": [5, 50, 99]}, protocol)
        x, y = read_cifar_batch(tmp_path / f"p{protocol}", 100)
        np.testing.assert_array_equal(x, arr)
        assert y == [5, 50, 99]
