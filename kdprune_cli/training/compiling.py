"""The compiled training forward (``compile: auto | true | false``): ``torch.compile`` of the
student's and the teacher's forward, CUDA graphs and channels_last on CUDA, and counts that make
recompiles and eager fallbacks visible instead of silent.

Dynamo caches compiled code per code object (e.g. ``ResNet.forward``), guarded on the module's structure,
not on its identity: a new instance of an architecture, trained the same way, reuses the compiled graph
(COLT's partitions and rounds, IMP's rounds, several jobs in one process). Every other variant (another
architecture, the teacher's eval mode, no-grad, another batch shape) adds one cache entry, a recompile.
Past dynamo's recompile limit a code object runs eagerly for good, without an error, so the limit is
raised to :data:`RECOMPILE_LIMIT` and every forward that ran no compiled graph is counted as a fallback.
All compiles go through the one :data:`BACKEND` object: a backend per call would itself force recompiles.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
from torch import nn

RECOMPILE_LIMIT = 64  # cache entries per code object (dynamo's default is 8)


def wanted(setting, device: torch.device) -> bool:
    """``compile`` resolved for ``device``: ``auto`` compiles on CUDA only."""
    s = str(setting).lower()
    if s not in ("auto", "true", "false"):
        raise ValueError(f"compile must be auto, true or false, got {setting!r}")
    return device.type == "cuda" if s == "auto" else s == "true"


class CountingBackend:
    """A dynamo backend (inductor by default; CUDA graphs for graphs on CUDA) that counts the graphs it
    compiles, the recompiles among them (a code object compiled again for another variant) and the calls
    of compiled graphs (a forward that made none ran eagerly)."""

    def __init__(self, name: str = "inductor"):
        self.name = name  # tests use "aot_eager": the same graphs and autograd, no code generation
        self.graphs = self.recompiles = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        cid = torch._guards.CompileContext.current_compile_id()
        if cid is not None and cid.frame_compile_id:
            self.recompiles += 1
        compiler = torch._dynamo.lookup_backend(self.name)
        if self.name == "inductor":
            on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
            fn = compiler(gm, example_inputs, config_patches={"triton.cudagraphs": on_cuda})
        else:
            fn = compiler(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return fn(*args)
        return run


BACKEND = CountingBackend()


class Compiled:
    """``module(x)`` through its compiled forward. On CUDA the input goes in channels_last (conv nets) and
    the output is cloned: a CUDA graph overwrites its output at the next replay, and objectives may keep
    logits across steps (DLB). ``eager`` counts the calls that ran no compiled graph."""

    def __init__(self, module: nn.Module, channels_last: bool = False):
        self.module = module
        self.fn = torch.compile(module, backend=BACKEND, dynamic=False)
        self.channels_last = channels_last
        self.eager = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        n = BACKEND.calls
        out = self.fn(x)
        if BACKEND.calls == n:
            self.eager += 1
        return out.clone() if out.is_cuda else out


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class Session:
    """What one ``train()`` call compiles: the model's forward, the objective's teacher (swapped for its
    compiled forward while training and put back after), and the counts of this call."""

    def __init__(self, model: nn.Module, objective, device: torch.device):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        self.device = device
        self.channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.model, self.objective = model, objective
        self.teacher: Optional[nn.Module] = objective.teacher
        self.forward = Compiled(model, self.channels_last)
        self.teacher_forward = Compiled(self.teacher, self.channels_last) if self.teacher is not None else None
        self.start = (BACKEND.recompiles, _graph_breaks())
        self.compile_seconds = 0.0

    @contextlib.contextmanager
    def active(self):
        """channels_last and the compiled teacher for the duration; after it the weights are contiguous
        again (pruning code may ``view`` them) and the objective has its teacher module back."""
        fmt = torch.channels_last if self.channels_last else None
        nets = [self.model] + ([self.teacher] if self.teacher is not None else [])
        if fmt is not None:
            for m in nets:
                m.to(memory_format=fmt)
        if self.teacher is not None:
            self.objective.teacher = self.teacher_forward
        try:
            yield self.forward
        finally:
            if self.teacher is not None:
                self.objective.teacher = self.teacher
            if fmt is not None:
                for m in nets:
                    m.to(memory_format=torch.contiguous_format)

    def mark(self) -> tuple:
        """Call at the start of a step, and :meth:`book` with the result at its end."""
        return time.perf_counter(), BACKEND.graphs

    def book(self, mark: tuple) -> None:
        """A step in which something compiled counts (whole, up to its last kernel) as compile time."""
        t, graphs = mark
        if BACKEND.graphs != graphs:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds += time.perf_counter() - t

    def stats(self) -> dict:
        eager = self.forward.eager + (self.teacher_forward.eager if self.teacher_forward is not None else 0)
        return {"compile_seconds": self.compile_seconds, "recompiles": BACKEND.recompiles - self.start[0],
                "graph_breaks": _graph_breaks() - self.start[1], "fallbacks": eager}
