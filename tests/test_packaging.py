"""The wheel ships conf/ as kdprune_cli/conf, so a non-editable `pip install .` finds its configs."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import SAFETY_S

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("kdprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    missing = [c for c in confs if f"kdprune_cli/conf/{c}" not in names]
    assert not missing, missing
    assert "kdprune_cli/pruning/methods/cakld.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "kdprune = kdprune_cli.cli.main:main" in text and "kdprune-report = kdprune_cli.report.main:main" in text


def test_installed_wheel_finds_its_own_configs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "w"), str(ROOT)], capture_output=True, text=True, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("kdprune-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # a wheel is a zip laid out as site-packages
    code = ("from kdprune_cli.cli.main import config_dir; import sys; d = config_dir(); "
            "assert d.startswith(sys.argv[1]), d; print(d)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_tracked_file_is_git_ignored():
    """`.gitignore` names only what a run or a machine makes (outputs, caches, conf/local/*.yaml), never a file the
    repository ships (conf/config.yaml, conf/local/example.yaml.txt)."""
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        import pytest
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", "conf/local/default.yaml"], cwd=ROOT)
    assert r.returncode == 0  # the machine's own paths stay out of the repository
