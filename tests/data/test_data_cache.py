"""The uint8 data cache: written once and reused, a content fingerprint beside it, rebuilt when its source
files change or it is damaged, answering when the source is gone."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakedata import write_cifar, write_tiny_imagenet

from kdprune_cli.data import DataError, dataset_fingerprint, fingerprint, load_cached, load_data, sources
from kdprune_cli.data import cache as cache_mod
from kdprune_cli.data.sources.cifar import read_cifar_batch


def test_cache_is_written_once_and_reused(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    a = load_cached("tinyimagenet", base, False, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    import shutil
    shutil.rmtree(base)  # the source is gone: the cache answers
    b = load_cached("tinyimagenet", base, False, tmp_path / "cache")
    assert torch.equal(a["x_train"], b["x_train"])


def test_a_cache_built_without_checksums_is_checked_when_they_are_asked_for(tmp_path):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    dataset_fingerprint(_cfg(tmp_path / "a", cache))  # verify_checksums=false: a re-packed copy
    with pytest.raises(DataError, match="corrupt or modified"):
        load_cached("cifar10", tmp_path / "a", False, cache, verify=True)


def _cfg(root, cache, name="cifar10"):
    return SimpleNamespace(name=name, root=str(root), download=False, cache_dir=str(cache), verify_checksums=False,
                           crop_padding=4, flip=True, val_split=0.0, split_seed=0)


@pytest.fixture
def reads(monkeypatch):
    """Count the times a dataset is read from its source files."""
    calls = []
    real = sources.read_raw
    monkeypatch.setattr(sources, "read_raw", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
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
    assert blob["fingerprint"] == fa == fingerprint("cifar10", blob)
    d = load_data(_cfg(tmp_path / "b", cache), torch.device("cpu"))
    assert d.fingerprint == fb
    assert len(reads) == 3  # all answered by the caches


def test_current_cache_answers_from_its_sidecar(tmp_path, reads, monkeypatch):
    write_cifar(tmp_path / "a")
    cache = tmp_path / "cache"
    fp = dataset_fingerprint(_cfg(tmp_path / "a", cache))
    sidecars = list(cache.glob("*.json"))
    assert len(sidecars) == 1 and fp in sidecars[0].read_text()
    monkeypatch.setattr(cache_mod.torch, "load", lambda *a, **k: pytest.fail("the tensors were read"))
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


def test_cache_without_sidecar_is_rebuilt_from_present_source(tmp_path, reads):
    write_cifar(tmp_path / "a", seed=0)
    cache = tmp_path / "cache"
    load_cached("cifar10", tmp_path / "a", False, cache, verify=False)
    pt = next(cache.glob("*.pt"))
    # a cache whose sidecar is gone, holding other tensors
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
