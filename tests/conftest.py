"""Shared test helpers: compose the real Hydra config, build a tiny digits Context, a tiny network."""
from __future__ import annotations

import os

# One torch thread per test process (and its kdprune subprocesses, which inherit the environment) unless the
# caller chose: on a small or shared machine the default, one thread per core in each process, oversubscribes the
# cores and makes everything many times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from records import _channel_record, write_grid
from torch import nn

# Subprocess tests bound their work by epochs and batches, not seconds; this wall-clock limit is only a safety net
# against a hung process, generous enough for a heavily loaded machine (KDPRUNE_TEST_TIMEOUT overrides it).
SAFETY_S = float(os.environ.get("KDPRUNE_TEST_TIMEOUT", 1800))

from kdprune_cli.cli.main import config_dir
from kdprune_cli.config.schema import register

register()
import kdprune_cli.pruning  # noqa: E402,F401  the methods' typed configs (schema/method/<name>)

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


def compose_cfg(overrides=(), hydra=False):
    """The run config as ``kdprune`` composes it (``hydra=True``: with its ``hydra`` node: launcher, sweeper)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def hold_lock(path, seconds: float):
    """Hold ``file_lock(path)`` in a thread for ``seconds`` (another job making the artifact); returns the
    started thread once the lock is held."""
    import threading
    import time

    from kdprune_cli.store.locks import file_lock

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
    from kdprune_cli.experiment.services import Context

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
def channel_sweep(tmp_path):
    """A multirun folder of 18 ok channel-pruning jobs (3 rows × 2 sparsities × 3 seeds) with executed MACs
    and latency (report tests)."""
    sweep = tmp_path / "multirun" / "2026-02-01" / "10-00-00"
    write_grid(sweep, _channel_record)
    return sweep


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def explicit_attention():
    """timm attention built while this is active computes ``Q·Kᵀ`` and ``A·V`` as explicit matmuls (the fused
    kernel off), which ``torch.utils.flop_counter`` counts; timm's setting is restored afterwards."""
    from timm.layers import set_fused_attn, use_fused_attn

    was = use_fused_attn()
    set_fused_attn(False)
    try:
        yield
    finally:
        set_fused_attn(was)


def torch_macs(model: nn.Module, x: torch.Tensor) -> float:
    """``torch.utils.flop_counter``'s count for one forward of ``x``, halved (FLOPs = 2·MACs) and per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    model.train(was)
    return fc.get_total_flops() / 2 / x.shape[0]
