"""NutePrune's procedure (arXiv 2402.09773; docs/methods.md §5): hard-concrete gates on the gated structures
(a CNN's :class:`~kdprune_cli.pruning.structure.conv_gates.ConvGates`, a ViT's
:class:`~kdprune_cli.pruning.structure.vit.ViTGates`) learn under a Lagrangian, one copy of the weights serving
as student and every teacher (snapshots); the export folds the gates in and removes the closed structures."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdprune_cli.errors import DivergedError
from kdprune_cli.pruning.structure.conv_gates import ConvGates
from kdprune_cli.pruning.structure.vit import ViTGates, is_vit
from kdprune_cli.training.loop import steps_per_epoch
from kdprune_cli.training.objective import Objective

L, R, EPS = -0.1, 1.1, 1e-6  # the stretch interval of the hard concrete, and the source's clamp
X0 = (0 - L) / (R - L)  # where z = 0 falls in the unstretched concrete's (0, 1)
LOGIT_X0 = math.log(X0) - math.log(1 - X0)
BLOCKS = ("BasicBlock", "Bottleneck", "InvertedResidual", "WideBlock", "Block")  # Block: timm's ViT block


class HardConcrete(nn.Module):
    """One gate per root channel of every group (Louizos et al. 2018, as in the source's L0 module)."""

    def __init__(self, sizes: List[int], droprate_init: float, beta: float, gen: torch.Generator):
        super().__init__()
        mean = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.ParameterList([nn.Parameter(mean + 0.01 * torch.randn(n, generator=gen)) for n in sizes])
        self.beta = beta

    def open_prob(self) -> List[torch.Tensor]:
        """``P(z > 0) = 1 − Q(0)``, with the source's CDF of the stretched concrete."""
        return [1 - torch.sigmoid(LOGIT_X0 * self.beta - a).clamp(EPS, 1 - EPS) for a in self.log_alpha]

    def sample(self, gen: torch.Generator) -> List[torch.Tensor]:
        us = [torch.rand(a.shape, generator=gen).clamp(EPS, 1 - EPS).to(a.device) for a in self.log_alpha]
        return [F.hardtanh(torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / self.beta) * (R - L) + L, 0, 1)
                for u, a in zip(us, self.log_alpha)]

    @torch.no_grad()
    def deterministic(self) -> List[torch.Tensor]:
        """The source's inference gates: soft ``sigmoid(log α/β·0.8)`` with the expected number of zeros set to 0."""
        out = []
        for a, p in zip(self.log_alpha, self.open_prob()):
            zeros = round(a.numel() - float(p.sum()))
            z = torch.sigmoid(a / self.beta * 0.8)
            if zeros > 0:
                z[torch.topk(z, k=min(zeros, a.numel() - 1), largest=False).indices] = 0.0  # a group keeps one
            out.append(z.detach().clone())
        return out

    @torch.no_grad()
    def clamp_(self) -> None:
        for a in self.log_alpha:
            a.clamp_(math.log(1e-2), math.log(1e2))


class Snapshots:
    """The source's IterativeDistillManager: snapshots at each ``delta`` of expected sparsity, and which one
    teaches now."""

    def __init__(self, target: float, delta: float, ahead: int):
        self.marks = [i * delta for i in range(1, int(target / delta))]
        self.target, self.ahead = target, ahead
        self.taken: list = []
        self.reached, self.steps_at_target = False, -1

    def update(self, sparsity: float, remaining: int, take) -> None:
        if self.reached:
            return
        if len(self.taken) < len(self.marks):
            if sparsity >= self.marks[len(self.taken)]:
                self.taken.append(take())
        elif sparsity >= self.target:
            self.reached, self.steps_at_target = True, remaining

    def teacher(self, remaining: int) -> Optional[int]:
        """Index of the teaching snapshot, or None for the intact model."""
        if not self.reached:
            return None if len(self.taken) < self.ahead else len(self.taken) - self.ahead
        interval = max(1, self.steps_at_target // (len(self.taken) + 1))
        phase = min(remaining // interval - self.ahead, len(self.taken) - 1)
        return None if phase < 0 else phase


def hidden_modules(model: nn.Module) -> List[nn.Module]:
    """The blocks whose outputs are distilled: residual / inverted-residual blocks, else every ReLU."""
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCKS]
    return blocks or [m for m in model.modules() if isinstance(m, nn.ReLU)]


class NuteObjective(Objective):
    """Student forward with sampled gates, teacher forward (same weights, a snapshot or intact), the loss, and
    the gates' and λ's own optimizer steps (called by the trainer after its step)."""

    teacher_rate, self_teacher = 1, True  # a forward per batch through a snapshot or the intact model
    eager_only = True  # the gates and the hidden states are forward hooks: the trainer does not compile this

    def __init__(self, c, model: nn.Module, structures, gates: HardConcrete, total_steps: int,
                 ramp_steps: int, target: float, unit: str, exclude, gen: torch.Generator, log, intact: dict):
        self.c, self.model, self.structures, self.gates = c, model, structures, gates
        self.total, self.ramp, self.target, self.unit, self.exclude = total_steps, ramp_steps, target, unit, exclude
        self.gen, self.log = gen, log
        self.lambdas = nn.Parameter(torch.zeros(2, device=gates.log_alpha[0].device))
        # descent on log α, ascent on λ
        self.opt = torch.optim.AdamW([{"params": gates.parameters(), "lr": c.mask_lr},
                                      {"params": [self.lambdas], "lr": c.lambda_lr, "maximize": True}], weight_decay=0.0)
        self.dense = float(structures.counts([0] * len(structures.sizes), exclude)[unit])
        self.snapshots = Snapshots(target, c.delta, c.teacher_ahead)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.hidden_at = hidden_modules(model)
        self.steps, self.teacher_samples, self.last = 0, 0, {}
        self.intact = {n: intact[n] for n, _ in self.trainable if n in intact}  # none of the adapters

    # --- the pieces of one step ------------------------------------------------------------------------
    def expected_sparsity(self) -> torch.Tensor:
        return 1 - self.structures.expected(self.gates.open_prob(), self.exclude)[self.unit] / self.dense

    def target_now(self) -> float:
        """The Lagrangian's target: linear from 0 over the ramp's steps; no ramp, the full target from step 0
        (as the source without a Lagrangian warm-up)."""
        if self.ramp <= 0:
            return self.target
        return self.target * min(1.0, self.steps / self.ramp)

    def forward(self, x, params: Optional[dict] = None):
        """The logits and the hidden states, the trained tensors replaced by ``params`` (a snapshot's) if given."""
        hidden = []
        hooks = [m.register_forward_hook(lambda m, i, o: hidden.append(o)) for m in self.hidden_at]
        try:
            logits = functional_call(self.model, params, (x,)) if params else self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return logits, hidden

    @torch.no_grad()
    def teacher_forward(self, x):
        which = None if self.c.teachers == "intact" else self.snapshots.teacher(self.total - self.steps)
        # the intact model: gates open, no adapters (or, without adapters, the dense student's weights)
        self.structures.z, params = (None, self.intact) if which is None else self.snapshots.taken[which]
        adapters = _lora_layers(self.model).values() if which is None else []
        for m in adapters:
            m.enable_adapters(False)
        try:
            logits, hidden = self.forward(x, params)
        finally:
            for m in adapters:
                m.enable_adapters(True)
        self.teacher_samples += x.shape[0]
        return logits, hidden, -1 if which is None else which

    def __call__(self, model, x, y, idx):
        for bn in self.bns:  # BN statistics frozen while the gates learn
            bn.eval()
        t_logits, t_hidden, which = self.teacher_forward(x)
        self.structures.z = self.gates.sample(self.gen)
        s_logits, s_hidden = self.forward(x)
        self.structures.z = None
        tau = self.c.temperature
        kd = F.kl_div(F.log_softmax(s_logits.float() / tau, 1), F.softmax(t_logits.float() / tau, 1),
                      reduction="batchmean") * tau ** 2
        hid = s_logits.new_zeros(())
        for s, t in zip(s_hidden, t_hidden):
            keep = s != 0
            if keep.any():
                hid = hid + F.mse_loss(s.float()[keep], t.float()[keep])
        sparsity = self.expected_sparsity()
        gap = sparsity - self.target_now()
        lag = self.lambdas[0] * gap + self.lambdas[1] * gap ** 2
        loss = self.c.kd_weight * kd + self.c.hidden_weight * hid + lag
        self.last = {"expected_sparsity": float(sparsity.detach()), "target": self.target_now(),
                     "kd": float(kd.detach()), "hidden": float(hid.detach()), "lagrangian": float(lag.detach()),
                     "lambda1": float(self.lambdas[0].detach()), "lambda2": float(self.lambdas[1].detach()),
                     "teacher": which}
        if not math.isfinite(self.last["kd"] + self.last["hidden"] + self.last["lagrangian"]):
            raise DivergedError(f"training diverged in stage prune (step {self.steps}): the loss is not finite "
                                f"(kd {self.last['kd']}, hidden {self.last['hidden']}, lagrangian "
                                f"{self.last['lagrangian']}); lower the learning rate (method.prune.lr=...) or check "
                                "the dense student")
        return loss, s_logits

    def step(self) -> None:
        """After the trainer's step: the gates' and λ's steps, the clamp, the snapshots, the log."""
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.gates.clamp_()
        self.steps += 1
        self.snapshots.update(self.last["expected_sparsity"], self.total - self.steps, self.take)
        if self.steps % 10 == 0 or self.steps == self.total:
            self.log({"stage": "nuteprune", "step": self.steps, **self.last})

    def take(self):
        """A snapshot: deterministic gates and a copy of the trained tensors (adapters, or weights)."""
        return self.gates.deterministic(), {n: p.detach().clone() for n, p in self.trainable}

    # --- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"gates": self.gates.state_dict(), "lambdas": self.lambdas.detach().clone(),
                "opt": self.opt.state_dict(),
                "steps": self.steps, "gen": self.gen.get_state(), "teacher_samples": self.teacher_samples,
                "snapshots": {"taken": list(self.snapshots.taken), "reached": self.snapshots.reached,
                              "steps_at_target": self.snapshots.steps_at_target}}

    def load_state_dict(self, st: dict) -> None:
        self.gates.load_state_dict(st["gates"])
        self.opt.load_state_dict(st["opt"])
        with torch.no_grad():
            self.lambdas.copy_(st["lambdas"])
        self.steps, self.teacher_samples = int(st["steps"]), int(st["teacher_samples"])
        self.gen.set_state(st["gen"].cpu())
        sn = st["snapshots"]
        self.snapshots.taken = [(list(z), dict(p)) for z, p in sn["taken"]]
        self.snapshots.reached, self.snapshots.steps_at_target = bool(sn["reached"]), int(sn["steps_at_target"])


def _lora_layers(model: nn.Module) -> dict:
    """The layers a LoRA adapter wraps, by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def add_lora(model: nn.Module, r: int, alpha: int) -> nn.Module:
    """peft LoRA adapters, the base weights (and BN) frozen: on every Conv2d and Linear of a CNN; on the q and
    v blocks of a ViT's fused qkv (the source adapts q_proj and v_proj): one adapter of rank ``2r`` whose ``B``
    a gradient mask keeps block-diagonal, two independent rank-``r`` adapters (docs/methods.md §5, ViTs)."""
    from peft import LoraConfig, inject_adapter_in_model

    vit = is_vit(model)
    targets = [f"{n}.qkv" for n, m in model.named_modules() if isinstance(getattr(m, "qkv", None), nn.Linear)] if vit \
        else [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    k = 2 if vit else 1  # the fused qkv: one adapter for q and v
    model = inject_adapter_in_model(LoraConfig(r=k * r, lora_alpha=k * alpha, target_modules=targets), model)
    for n in targets if vit else ():
        layer = model.get_submodule(n)
        a = layer.base_layer.out_features // 3
        b = layer.lora_B["default"].weight
        mask = torch.zeros_like(b)
        mask[:a, :r] = 1  # q rows from the first r components
        mask[2 * a:, r:] = 1  # v rows from the second r
        b.register_hook(lambda g, mask=mask: g * mask)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the plain base layer back."""
    for name, m in _lora_layers(model).items():
        m.merge()
        model.set_submodule(name, m.get_base_layer())
    return model


def learn_gates(ctx, model: nn.Module, c, stage: str = "prune"):
    """Train the gates of ``model`` (the dense student) with the ``c.prune`` recipe under the Lagrangian towards
    the target; returns ``(model, structures, objective)``: the model with its adapters (``c.lora``), the gated
    structures (gates attached) and the objective holding the gates and the snapshots."""
    structures = ViTGates(model, ctx.pruner.example_input(), ctx.pruner.exclude) if is_vit(model) else \
        ConvGates(model, ctx.pruner.channel_groups(model))
    gates = HardConcrete(structures.sizes, c.droprate_init, c.beta, ctx.seeds.generator("nuteprune/init")).to(ctx.device)
    # lora=false: the intact teacher's weights (with adapters the frozen base is the intact model)
    intact = {} if c.lora else {n: p.detach().clone() for n, p in model.named_parameters()}
    if c.lora:
        model = add_lora(model, c.lora_r, c.lora_alpha)
    else:  # the weights train, BatchNorm stays frozen
        model.requires_grad_(True)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
    structures.attach()
    spe = steps_per_epoch(ctx.data, c.prune.batch_size, ctx.cfg.get("max_batches"))
    objective = NuteObjective(c, model, structures, gates, spe * c.prune.epochs, c.ramp_epochs * spe,
                              ctx.pruner.sparsity, ctx.pruner.target, ctx.pruner.exclude,
                              ctx.seeds.generator("nuteprune/z"), ctx.log, intact)
    ctx.trainer.train(model, c.prune, objective, stage=stage)
    return model, structures, objective


def export(ctx, model: nn.Module, structures, objective: "NuteObjective", lora: bool):
    """Record the gated model's ``pruned`` metrics (deterministic gates), merge the adapters, fold the soft gates
    in and remove the closed structures; returns ``(model, the record's structure)``, with the largest output
    difference between the gated and the exported model on a test batch."""
    z = objective.gates.deterministic()
    structures.z = z
    ctx.evaluator.record_metrics("pruned", model)
    with torch.no_grad():
        probe = next(iter(ctx.data.batches("test", 64)))[0]
        gated = model.eval()(probe)
    structures.remove_hooks()
    if lora:
        model = merge_lora(model)
    model.requires_grad_(True)
    facts = structures.export(z, ctx.pruner.sparsity, ctx.pruner.target, ctx.pruner.exclude)
    with torch.no_grad():
        facts["export_max_abs_diff"] = float((model.eval()(probe) - gated).abs().max())
    facts.update(snapshots=len(objective.snapshots.taken),
                 expected_sparsity_final=float(objective.expected_sparsity().detach()))
    return model, facts
