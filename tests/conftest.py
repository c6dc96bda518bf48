"""Shared test helpers: compose the real Hydra config, build a tiny digits Context, a tiny network."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from kdprune_cli.cli import config_dir
from kdprune_cli.config import register

register()
import kdprune_cli.pruning  # noqa: E402,F401  the methods' typed configs (method/<name>_schema)

# Everything small: digits, ResNet-20 teacher and student, 1-epoch dense training.
TINY = [
    "experiment=quickstart",
    "teacher=resnet20",
    "progress=false",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
    "teacher.train.eval_every=0",
    "student.train.eval_every=0",
]


def require_extra(module: str, extra: str):
    """Import a sweep or launcher plugin for a test marked ``extras``: skipped where the extra is not installed,
    but a failure where it must be (``make test-extras`` sets ``KDPRUNE_REQUIRE_EXTRAS=1``)."""
    import importlib
    import os

    if os.environ.get("KDPRUNE_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} not installed (pip install -c constraints.txt '.[{extra}]')")


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def hold_lock(path, seconds: float):
    """Hold ``file_lock(path)`` in a thread for ``seconds`` (another job making the artifact); returns the
    started thread once the lock is held."""
    import threading
    import time

    from kdprune_cli.store import file_lock

    held = threading.Event()

    def holder():
        with file_lock(path):
            held.set()
            time.sleep(seconds)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    return t


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides)``: the quickstart config made tiny, with the store under ``tmp_path``."""
    def make(*overrides):
        return compose_cfg([*TINY, f"store.root={tmp_path / 'store'}", *overrides])
    return make


@pytest.fixture
def make_ctx(tiny_cfg):
    """``make_ctx(*overrides)``: a runner Context on digits (CPU) for method tests."""
    from kdprune_cli.data import load_data
    from kdprune_cli.runner import Context

    def make(*overrides):
        cfg = tiny_cfg(*overrides)
        return Context(cfg, load_data(cfg.data, torch.device("cpu")), torch.device("cpu"))
    return make


class TinyNet(nn.Module):
    """conv(1→2, 3×3) → ReLU → global avg pool → linear(2→3): small enough for hand computation."""

    def __init__(self, in_ch: int = 1, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()
