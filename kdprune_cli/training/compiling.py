"""The compiled training (``compile: auto | true | false | step``): ``torch.compile`` of the student's and the
teacher's forward (``true``; ``auto`` on CUDA), or of the whole training step (``step``: :class:`GraphStep`),
CUDA graphs and channels_last on CUDA, and counts that make recompiles and eager fallbacks visible instead of
silent.

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
from torch.optim.sgd import sgd

from kdprune_cli.config.schema import COMPILE, one_of
from kdprune_cli.log import note

RECOMPILE_LIMIT = 64  # cache entries per code object (dynamo's default is 8)


def wanted(setting, device: torch.device) -> bool:
    """``compile`` resolved for ``device``: ``auto`` compiles on CUDA only."""
    one_of("compile", setting, COMPILE, lower=True)
    s = str(setting).lower()
    return device.type == "cuda" if s == "auto" else s != "false"


def training_mode(setting, device: torch.device, objective, optimizer: str) -> str:
    """How a training runs: ``eager``, ``forward`` (the objective's forwards of the model and of its teacher
    compiled; CUDA graphs and channels_last on CUDA) or ``step`` (loss, backward, SGD update and masking in one
    graph: :class:`GraphStep`). ``step`` needs an objective that is a pure loss (``graph_step``) and SGD;
    otherwise the forwards are compiled, and the log file says so."""
    if not wanted(setting, device) or objective.eager_only:
        return "eager"
    if str(setting).lower() != "step":
        return "forward"
    if objective.graph_step and optimizer == "sgd":
        return "step"
    note(f"compile=step: {type(objective).__name__} with {optimizer} trains with compiled forwards only")
    return "forward"


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
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        patches = {"config_patches": {"triton.cudagraphs": on_cuda}} if self.name == "inductor" else {}
        fn = torch._dynamo.lookup_backend(self.name)(gm, example_inputs, **patches)

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
        self.fn = torch.compile(module, backend=BACKEND, dynamic=False)
        self.channels_last = channels_last
        self.eager = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        calls = BACKEND.calls
        out = self.fn(x)
        self.eager += BACKEND.calls == calls
        return out.clone() if out.is_cuda else out


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class Session:
    """What one ``train()`` call compiles: the model's forward and the objective's teacher (swapped for its
    compiled forward while training and put back after), or with ``whole_step`` neither (the loop's
    :class:`GraphStep` traces both), and the counts of this call."""

    def __init__(self, model: nn.Module, objective, device: torch.device, whole_step: bool = False):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        self.device, self.whole_step = device, whole_step
        self.channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.model, self.objective = model, objective
        self.teacher: Optional[nn.Module] = objective.teacher
        self.forward = Compiled(model, self.channels_last) if not whole_step else None
        self.teacher_forward = Compiled(self.teacher, self.channels_last) \
            if self.teacher is not None and not whole_step else None
        self.start = (BACKEND.recompiles, _graph_breaks())
        self.compile_seconds = 0.0
        self.eager_steps = 0  # whole steps that ran no compiled graph

    @contextlib.contextmanager
    def active(self):
        """channels_last and the compiled teacher for the duration; after it the weights are contiguous
        again (pruning code may ``view`` them) and the objective has its teacher module back."""
        nets = [m for m in (self.model, self.teacher) if m is not None] if self.channels_last else []
        for m in nets:
            m.to(memory_format=torch.channels_last)
        if self.teacher_forward is not None:
            self.objective.teacher = self.teacher_forward
        try:
            yield self.forward if self.forward is not None else self.model
        finally:
            if self.teacher_forward is not None:
                self.objective.teacher = self.teacher
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
        eager = sum(f.eager for f in (self.forward, self.teacher_forward) if f is not None) + self.eager_steps
        return {"compile_seconds": self.compile_seconds, "recompiles": BACKEND.recompiles - self.start[0],
                "graph_breaks": _graph_breaks() - self.start[1], "fallbacks": eager}


class GraphStep:
    """One SGD training step as one compiled graph (``compile=step``): the objective's loss (the student's
    forward, a teacher's), the backward, the gradient masking, the update with the step's learning rate and
    the re-masking, traced together (``fullgraph``: a graph break is an error, not a silent split) and, on
    CUDA, replayed as one CUDA graph.

    The schedule's learning rates sit in one device tensor indexed by a step counter on the device; the masks
    are copied into static device tensors when the selection replaces them (gradual pruning); the momentum
    buffers are the optimizer's own state, so checkpoints save and resume ``optimizer.state_dict()`` as in
    the eager loop. ``torch.optim.SGD`` starts a buffer at the first gradient and this step at zero: with no
    dampening both give ``μ·0 + g = g``."""

    def __init__(self, model: nn.Module, objective, opt: torch.optim.SGD, masks: Optional[dict], lrs: torch.Tensor,
                 step: int, amp: bool):
        group = opt.param_groups[0]
        self.params = list(group["params"])
        self.hyper = {k: group[k] for k in ("weight_decay", "momentum", "dampening", "nesterov", "maximize")}
        if group["momentum"]:
            for p in self.params:
                opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        self.buffers = [opt.state[p].get("momentum_buffer") for p in self.params]
        name = {id(p): n for n, p in model.named_parameters()}
        self.masks, self.names = masks, [name[id(p)] for p in self.params if masks and name[id(p)] in masks]
        self.masked = [p for p in self.params if masks and name[id(p)] in masks]
        self.held = [masks[n] for n in self.names]  # the mask objects the static copies hold
        self.static = [masks[n].to(p.device, copy=True) for n, p in zip(self.names, self.masked)]
        self.lrs, self.tick = lrs, torch.tensor(step, device=lrs.device)
        self.model, self.objective = model, objective
        torch._dynamo.config.trace_autograd_ops = True  # lets dynamo trace ``loss.backward()`` into the graph
        self.device_type, self.amp = lrs.device.type, amp and lrs.is_cuda
        for t in [lrs, self.tick, *self.static, *(b for b in self.buffers if b is not None)]:
            torch._dynamo.mark_static_address(t)
        self.fn = torch.compile(self._step, backend=BACKEND, fullgraph=True, dynamic=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, session: Session) -> tuple:
        for i, n in enumerate(self.names):
            if self.masks[n] is not self.held[i]:
                self.static[i].copy_(self.masks[n])
                self.held[i] = self.masks[n]
        if session.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        calls = BACKEND.calls
        loss, logits = self.fn(x, y, idx)
        session.eager_steps += BACKEND.calls == calls
        return loss, logits

    def _step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            loss, logits = self.objective.loss(self.model, x, y, idx)
        loss.backward()
        with torch.no_grad():
            if self.masked:
                torch._foreach_mul_([p.grad for p in self.masked], self.static)
            sgd(self.params, [p.grad for p in self.params], self.buffers, lr=self.lrs[self.tick], foreach=True,
                **self.hyper)
            if self.masked:
                torch._foreach_mul_(self.masked, self.static)
            self.tick += 1
        for p in self.params:
            p.grad = None
        return loss.detach(), logits.detach()
