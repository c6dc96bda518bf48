"""kdprune-report's bad input: a missing PATH, no record at all, an --out that is a file or cannot be written, a bad
option; each is one line on stderr and exit status 2, with nothing written."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from records import _record

from kdprune_cli.report.cli import main


def _write(path: Path, rec: dict, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(rec))
    os.utime(path / "results.json", (mtime, mtime))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_exit_2_empty_or_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.json found" in err[0]
    assert not (empty / "report.md").exists()
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.fixture
def one_ok(tmp_path) -> Path:
    return _write(tmp_path / "runs" / "a", _record("magnitude", None, 0.5, 0, 1), 1_000_000)


def test_out_is_a_file(tmp_path, one_ok, capsys):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    assert main([str(one_ok), "--out", str(target)]) == 2
    assert _one_line(capsys) == f"kdprune-report: error: --out {target} is a file, not a folder"
    assert target.read_text() == "keep me"
    assert main([str(one_ok), "--out", str(target / "sub")]) == 2  # a file on the way
    line = _one_line(capsys)
    assert line.startswith("kdprune-report: error: cannot create the --out folder") and "Not a directory" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_out_is_one_line(tmp_path, one_ok, capsys, monkeypatch, code):
    def fail(self, *a, **k):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", fail)
    out = tmp_path / "out"
    assert main([str(one_ok), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"kdprune-report: error: cannot write the report into {out}: {os.strerror(code)}")
    assert "Traceback" not in line


def test_bad_latency_batch_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--latency-batch", "0"])
    assert e.value.code == 2 and "not a positive integer" in capsys.readouterr().err
