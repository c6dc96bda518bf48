"""Issue #7: CIFAR batches are read without running code from them; checksum mismatches say so; the data cache
carries a content fingerprint and is rebuilt when its source files change."""
from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdprune_cli.data import loading as data_mod
from kdprune_cli.data.loading import DataError, dataset_fingerprint, load_cached, load_data, read_cifar_batch, read_raw

from fakedata import write_cifar, write_tiny_imagenet


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


def test_md5_mismatch_says_corrupt_and_missing_says_not_found(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    write_cifar(tmp_path)
    with pytest.raises(DataError, match="data_batch_1 is corrupt or modified \\(md5 mismatch") as info:
        read_raw("cifar10", tmp_path, download=False, verify=True)
    assert "not found" not in str(info.value) and "data.verify_checksums=false" in str(info.value)
    # the official sums come from torchvision's class: with the fake files' sums, verification passes
    base = tmp_path / "cifar-10-batches-py"
    sums = {f: data_mod._md5(base / f) for f, _ in [*CIFAR10.train_list, *CIFAR10.test_list]}
    monkeypatch.setattr(CIFAR10, "train_list", [[f, sums[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, sums[f]] for f, _ in CIFAR10.test_list])
    (xtr, _), (xte, _) = read_raw("cifar10", tmp_path, download=False, verify=True)
    assert xtr.shape == (100, 3, 32, 32) and xte.shape == (30, 3, 32, 32)
    (base / "test_batch").unlink()
    with pytest.raises(DataError, match="not found under"):
        read_raw("cifar10", tmp_path, download=False, verify=True)


def test_a_cache_built_without_checksums_is_checked_when_they_are_asked_for(tmp_path):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    dataset_fingerprint(_cfg(tmp_path / "a", cache))  # verify_checksums=false: a re-packed copy
    with pytest.raises(DataError, match="corrupt or modified"):
        load_cached("cifar10", tmp_path / "a", False, cache, verify=True)


# --- content fingerprints and cache rebuilds -----------------------------------------------------------------
def _cfg(root, cache, name="cifar10"):
    return SimpleNamespace(name=name, root=str(root), download=False, cache_dir=str(cache), verify_checksums=False,
                           crop_padding=4, flip=True, val_split=0.0, split_seed=0)


@pytest.fixture
def reads(monkeypatch):
    """Count the times a dataset is read from its source files."""
    calls = []
    real = data_mod.read_raw
    monkeypatch.setattr(data_mod, "read_raw", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    return calls


def test_fingerprint_follows_content_not_root(tmp_path, reads):
    write_cifar(tmp_path / "a", seed=0)
    write_cifar(tmp_path / "b", seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "c")  # a re-packed copy elsewhere: same bytes
    cache = tmp_path / "cache"
    fa, fb, fc = (dataset_fingerprint(_cfg(tmp_path / r, cache)) for r in "abc")
    assert fa != fb
    assert fa == fc
    assert len(reads) == 3
    # the fingerprint is the content's: recomputed from the tensors it matches
    blob = load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    assert blob["fingerprint"] == fa == data_mod.fingerprint("cifar10", blob)
    d = load_data(_cfg(tmp_path / "b", cache), torch.device("cpu"))
    assert d.fingerprint == fb
    assert len(reads) == 3  # all answered by the caches


def test_current_cache_answers_from_its_sidecar(tmp_path, reads, monkeypatch):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    fp = dataset_fingerprint(_cfg(tmp_path / "a", cache))
    sidecars = list(cache.glob("*.json"))
    assert len(sidecars) == 1 and fp in sidecars[0].read_text()
    monkeypatch.setattr(data_mod.torch, "load", lambda *a, **k: pytest.fail("the tensors were read"))
    assert dataset_fingerprint(_cfg(tmp_path / "a", cache)) == fp
    assert len(reads) == 1


def test_changed_source_rebuilds_the_cache(tmp_path, reads, capsys):
    write_cifar(tmp_path / "a", seed=0)
    write_cifar(tmp_path / "other", seed=1)
    cache = tmp_path / "cache"
    cfg = _cfg(tmp_path / "a", cache)
    fp = dataset_fingerprint(cfg)
    capsys.readouterr()
    # touched (new mtime, same bytes): rebuilt, same fingerprint
    batch = tmp_path / "a" / "cifar-10-batches-py" / "data_batch_2"
    st = batch.stat()
    os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
    assert dataset_fingerprint(cfg) == fp
    assert len(reads) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kdprune: warning: ") and "rebuilding" in err[0]
    assert dataset_fingerprint(cfg) == fp and len(reads) == 2  # current again
    # replaced by other content: rebuilt, another fingerprint, the new images are served
    shutil.copy2(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_2", batch)
    fp2 = dataset_fingerprint(cfg)
    assert fp2 != fp and len(reads) == 3
    blob = load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    other = read_cifar_batch(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_2", 10)[0]
    np.testing.assert_array_equal(blob["x_train"][20:40].reshape(20, -1).numpy(), other)


def test_old_cache_without_sidecar_is_rebuilt_from_present_source(tmp_path, reads):
    write_cifar(tmp_path / "a", seed=0)
    cache = tmp_path / "cache"
    load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    pt = next(cache.glob("*.pt"))
    # a stale cache of an earlier version: other tensors, no sidecar
    torch.save({"x_train": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "y_train": torch.zeros(1, dtype=torch.long),
                "x_test": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "y_test": torch.zeros(1, dtype=torch.long)}, pt)
    pt.with_suffix(".json").unlink()
    blob = load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    assert blob["x_train"].shape == (100, 3, 32, 32) and len(reads) == 2


def test_damaged_cache_warns_and_is_rebuilt(tmp_path, reads, capsys):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    fp = dataset_fingerprint(_cfg(tmp_path / "a", cache))
    pt = next(cache.glob("*.pt"))
    st = pt.stat()
    pt.write_bytes(b"\0" * st.st_size)  # damaged in place: same size, same mtime
    os.utime(pt, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    blob = load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    assert blob["fingerprint"] == fp and len(reads) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot be read" in err[0] and "rebuilding" in err[0]
    pt.write_bytes(b"garbage")  # replaced by something else
    blob = load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    assert blob["fingerprint"] == fp and len(reads) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "changed" in err[0] and "rebuilding" in err[0]


def test_cache_answers_when_the_source_is_gone(tmp_path, reads):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    fp = dataset_fingerprint(_cfg(tmp_path / "a", cache))
    shutil.rmtree(tmp_path / "a")
    assert dataset_fingerprint(_cfg(tmp_path / "a", cache)) == fp
    assert load_cached("cifar10", tmp_path / "a", False, cache, verify=False)["fingerprint"] == fp
    assert len(reads) == 1


def test_tiny_imagenet_fingerprint_sees_a_changed_image(tmp_path, reads):
    from PIL import Image

    base = write_tiny_imagenet(tmp_path / "t")
    cache = tmp_path / "cache"
    cfg = _cfg(base, cache, name="tinyimagenet")
    fp = dataset_fingerprint(cfg)
    img = base / "val" / "images" / "val_0.JPEG"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img, quality=95)
    fp2 = dataset_fingerprint(cfg)
    assert fp2 != fp and len(reads) == 2
    assert dataset_fingerprint(cfg) == fp2 and len(reads) == 2


def test_cache_files_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        write_cifar(tmp_path / "a")
        dataset_fingerprint(_cfg(tmp_path / "a", tmp_path / "cache"))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert {p.suffix for p in files} == {".pt", ".json"}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files)
