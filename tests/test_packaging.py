"""The wheel: built without setuptools warnings, it ships every kdprune_cli module and conf/ as kdprune_cli/conf, so
a non-editable `pip install .` finds its configs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import SAFETY_S

ROOT = Path(__file__).resolve().parents[1]
BUILD = "from setuptools import build_meta; import sys; print(build_meta.build_wheel(sys.argv[1]))"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel as setuptools' build backend makes it (what `pip install .` runs) and the backend's output."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-W", "default", "-c", BUILD, str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / r.stdout.strip().splitlines()[-1], r.stdout + r.stderr


def test_build_prints_no_warning(wheel):
    _, output = wheel
    lines = [line for line in output.splitlines() if "Warning" in line or "deprecated" in line]
    assert not lines, "\n".join(lines)


def test_wheel_contains_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel[0]).namelist())
    confs = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")
             if p.parent.name != "local"}
    missing = [c for c in confs if f"kdprune_cli/conf/{c}" not in names]
    assert not missing, missing
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "kdprune_cli").rglob("*.py")}
    assert not modules - names, sorted(modules - names)
    assert not [n for n in names if n.startswith("kdprune_cli/conf/local/")]  # one machine's paths
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel[0]).read(entry[0]).decode()
    assert "kdprune = kdprune_cli.cli.main:main" in text and "kdprune-report = kdprune_cli.report.cli:main" in text


def test_installed_wheel_finds_its_own_configs(wheel, tmp_path):
    zipfile.ZipFile(wheel[0]).extractall(tmp_path / "site")  # a wheel is a zip laid out as site-packages
    code = ("from kdprune_cli.cli.main import config_dir; import sys; d = config_dir(); "
            "assert d.startswith(sys.argv[1]), d; print(d)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_tracked_file_is_git_ignored():
    """`.gitignore` names only what a run or a machine makes (outputs, caches, conf/local/*.yaml), never a file the
    repository ships (conf/config.yaml, conf/local/example.yaml.txt)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", "conf/local/default.yaml"], cwd=ROOT)
    assert r.returncode == 0  # the machine's own paths stay out of the repository
