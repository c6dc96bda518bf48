"""NutePrune: structured progressive pruning with numerous teachers (arXiv 2402.09773; docs/methods.md §5).

Vision adaptation for CNNs and timm ViTs (our mapping of the LLaMA source, Lucius-lsr/NutePrune, read for its
constants). For ViTs the structures are attention heads, MLP channels and the hidden width shared by all
blocks, with a LayerNorm over the kept dims (:mod:`.vit`); LoRA adapts the q and v blocks of the fused qkv only,
as the source adapts q_proj and v_proj. For CNNs:

1. **Hard-concrete (L0) gates** on every coupled channel group (:class:`~.structured.ChannelGroups`): the
   inner channels of each residual block, one shared gate vector per residual stage for the channels the
   additions carry, every conv's outputs in VGG, MobileNetV2's expanded and block channels. A gate multiplies
   the output of every BatchNorm over its channels (after BN, before the activation; pre-activation nets also
   gate the convs that write into the additions, so the residual stream is zero on a closed channel). Constants
   as the source: β=2/3, l=−0.1, r=1.1, ``log α ~ N(log((1−d)/d), 0.01)`` with ``d = droprate_init``
   (0.01 as the source's script: the gates start open; its code default is 0.5), clamped to ``[log 1e-2, log 1e2]`` (±4.6) after each
   step; AdamW with lr 0.1 for ``log α``.
2. **Expected remaining size** from the gates' open probabilities ``P(z>0) = 1 − Q(0)`` with the
   architecture's real parameter (or MAC) counts, per layer ``E[out]·E[in]·k``, so ``sparsity`` means the
   fraction of prunable weights removed as everywhere (``prune.target=macs``: of MACs). Lagrangian
   ``λ1·(ŝ−t)+λ2·(ŝ−t)²``, ``t`` ramped linearly from 0 to the target over ``ramp_epochs``
   (``ramp_epochs=0``: the full target from the first step, as the source without a Lagrangian warm-up), λ by
   gradient ascent (AdamW, lr −0.1). ViT MACs include attention's ``Q·Kᵀ`` and ``A·V`` per kept head.
3. **One copy of the weights** serves as student and every teacher: the base is frozen and the student trains
   LoRA adapters (peft, on every Conv2d and Linear, r=8, α=8) by the one trainer; ``lora=false`` trains the
   weights directly and keeps snapshot copies of them. A snapshot (deterministic gates + the adapters) is
   taken each time the expected sparsity passes the next multiple of ``delta`` (1%) below the target. The
   teacher follows the source's schedule exactly: the intact model (no adapters, gates open) until
   ``teacher_ahead`` (10) snapshots exist, then the snapshot ``teacher_ahead`` back; once the target is
   reached, ``phase = remaining_steps // (steps_left_at_target // (N+1)) − teacher_ahead`` (clipped to
   ``N−1``) walks back toward the intact model, which teaches the last ``teacher_ahead`` intervals.
   ``teachers=intact`` is the ablation with the intact model as the only teacher.
4. **Loss**, distillation only: ``0.1·τ²·KL(p_T^τ ‖ p_S^τ)`` (τ=2/3) + ``0.9·Σ_blocks MSE`` of the block
   outputs over the positions where the student's output is non-zero (as the source), + the Lagrangian.
   BatchNorm stays in eval mode with its statistics frozen while the gates learn.
5. **Export**: the deterministic gates (the source's: ``sigmoid(log α/β·0.8)``, the expected number of zeros
   set to 0) keep their soft values and are folded into the BatchNorm scale and shift, the adapters are
   merged, and the channels with z=0 are removed physically (Torch-Pruning), so the saved model is
   really smaller; its outputs equal the gated model's. ``retrain`` (epochs 0 by default, as the source's
   pruning run) optionally fine-tunes the exported model with CE (our choice, like the source's separate
   LoRA fine-tuning step).

Pre-activation networks (WRN) are gated at the BatchNorms that read each channel and at the convs that write
into the residual additions (:func:`gate_points`); layers with no BatchNorm on their channels are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe
from kdprune_cli.errors import DivergedError
from kdprune_cli.training.loop import steps_per_epoch
from kdprune_cli.training.objective import Objective
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.structure.channels import ChannelGroups, Plan
from kdprune_cli.pruning.structure.vit import ViTGates, check_vit, is_vit

L, R, EPS = -0.1, 1.1, 1e-6  # the stretch interval of the hard concrete, and the source's clamp
TEACHERS = ("snapshots", "intact")
BLOCKS = ("BasicBlock", "Bottleneck", "InvertedResidual", "WideBlock", "Block")  # Block: timm's ViT block


@dataclass
class NutePruneConfig(MethodConfig):
    prune: TrainRecipe = MISSING  # the recipe of the adapters (or weights) while the gates learn
    ramp_epochs: int = MISSING  # the target ramps linearly from 0 over this many epochs (0: full from the start)
    mask_lr: float = MISSING
    lambda_lr: float = MISSING
    droprate_init: float = MISSING
    beta: float = MISSING  # hard-concrete temperature
    lora: bool = MISSING
    lora_r: int = MISSING
    lora_alpha: int = MISSING
    teachers: str = MISSING  # snapshots | intact
    teacher_ahead: int = MISSING
    delta: float = MISSING
    temperature: float = MISSING  # τ of the logit distillation
    kd_weight: float = MISSING
    hidden_weight: float = MISSING
    retrain: TrainRecipe = MISSING  # after export, CE retraining of the smaller model (epochs 0: none, as the source)


class HardConcrete(nn.Module):
    """One gate per root channel of every group (Louizos et al. 2018, as in the source's L0 module)."""

    def __init__(self, sizes: List[int], droprate_init: float, beta: float, gen: torch.Generator):
        super().__init__()
        mean = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.ParameterList([nn.Parameter(mean + 0.01 * torch.randn(n, generator=gen)) for n in sizes])
        self.beta = beta

    def open_prob(self) -> List[torch.Tensor]:
        """``P(z > 0) = 1 − Q(0)``, with the source's CDF of the stretched concrete."""
        x = (0 - L) / (R - L)
        logit = math.log(x) - math.log(1 - x)
        return [1 - torch.sigmoid(logit * self.beta - a).clamp(EPS, 1 - EPS) for a in self.log_alpha]

    def sample(self, gen: torch.Generator) -> List[torch.Tensor]:
        out = []
        for a in self.log_alpha:
            u = torch.rand(a.shape, generator=gen).clamp(EPS, 1 - EPS).to(a.device)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / self.beta)
            out.append(F.hardtanh(s * (R - L) + L, 0, 1))
        return out

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


def _index(it) -> torch.Tensor:
    index = torch.empty(len(it.local), dtype=torch.long)
    index[it.local] = it.root
    return index


def gate_points(model: nn.Module, groups: ChannelGroups, example: torch.Tensor) -> List[list]:
    """Per group, ``(module, index)`` pairs whose outputs the gates multiply; ``index[j]`` is the root channel
    of the module's output channel ``j``.

    Every BatchNorm over the group's channels is gated (after BN, before the activation): in a post-activation
    net those are the BNs right after the producing convs; in a pre-activation one (WRN) the BNs that read the
    residual stream. A producing conv whose output is not normalised by one of them (it feeds an addition,
    pre-activation) is gated as well, so the stream itself is zero on a closed channel. Raises when a group's
    channels pass through no BatchNorm."""
    produced, follows = {}, {}
    named = dict(model.named_modules())

    def conv_hook(m, i, o):
        produced[id(o)] = (m, o)  # the output kept alive: its id cannot be reused by a later tensor

    def bn_hook(m, i, o):
        if id(i[0]) in produced:
            follows[produced[id(i[0])][0]] = m
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    points = []
    for g in groups.groups:
        if not g.norms:
            raise ValueError(f"nuteprune gates BatchNorms; the channels of {groups.names[g.root]} pass through none "
                             "(BN-free layers are not supported)")
        pts = [(named[it.module], _index(it)) for it in g.norms]
        gated = {named[it.module] for it in g.norms}
        for it in g.items:
            conv = named[it.module]
            if it.kind == "out" and isinstance(conv, nn.Conv2d) and follows.get(conv) not in gated:
                pts.append((conv, _index(it)))
        points.append(pts)
    return points


class Gating:
    """Forward hooks that multiply each gated module's output (BN, or a conv feeding an addition) by the
    current gates (``None``: open). With ``model``, a module that a LoRA adapter wraps is gated at the
    wrapper's output (base + adapter), so build it after the adapters are in."""

    def __init__(self, points: List[list], model: Optional[nn.Module] = None):
        self.z: Optional[List[torch.Tensor]] = None
        self.handles = []
        wrapped = {w.base_layer: w for w in (model.modules() if model is not None else ())
                   if isinstance(getattr(w, "base_layer", None), nn.Module)}
        for g, pts in enumerate(points):
            for m, index in pts:  # the index on the module's device once, not copied there every forward
                index = index.to(next(m.parameters()).device)
                self.handles.append(wrapped.get(m, m).register_forward_hook(self._hook(g, index)))

    def _hook(self, g: int, index: torch.Tensor):
        def hook(m, i, o):
            if self.z is None:
                return o
            return o * self.z[g][index].view(1, -1, 1, 1).to(o.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ConvGates:
    """A CNN's gated structures: :class:`ChannelGroups` costs, gates after the BatchNorms (:class:`Gating`),
    the export by :func:`fold_and_remove`; the same interface as :class:`~.vit.ViTGates`. Built on the plain
    model; :meth:`attach` puts the gates in once the adapters are."""

    def __init__(self, model: nn.Module, groups: ChannelGroups, example: torch.Tensor):
        self.model, self.groups = model, groups
        self.points = gate_points(model, groups, example)
        self.gating = Gating([])
        self.sizes = [g.channels for g in groups.groups]
        self.counts, self.expected = groups.counts, groups.expected

    def attach(self) -> None:
        self.gating = Gating(self.points, self.model)

    z = property(lambda self: self.gating.z, lambda self, v: setattr(self.gating, "z", v))

    def remove_hooks(self) -> None:
        self.gating.remove()

    def export(self, z: List[torch.Tensor], sparsity: float, target: str, exclude=()) -> dict:
        return fold_and_remove(self.model, self.groups, self.points, z, sparsity, target, exclude)


def gated_structures(model: nn.Module, ctx):
    """:class:`~.vit.ViTGates` for a timm ViT, else :class:`ConvGates` on the model's channel groups."""
    example = ctx.pruner.example_input()
    if is_vit(model):
        return ViTGates(model, example, ctx.pruner.exclude)
    return ConvGates(model, ctx.pruner.channel_groups(model), example)


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
        if len(self.taken) == len(self.marks):
            if sparsity >= self.target:
                self.reached, self.steps_at_target = True, remaining
            return
        if sparsity >= self.marks[len(self.taken)]:
            self.taken.append(take())

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

    eager_only = True  # the gates and the hidden states are forward hooks: the trainer does not compile this

    def __init__(self, method: "NutePrune", model: nn.Module, structures, gates: HardConcrete, total_steps: int,
                 ramp_steps: int, target: float, unit: str, exclude, gen: torch.Generator, log, intact: dict):
        c = method.cfg
        self.c, self.model, self.structures, self.gates = c, model, structures, gates
        self.total, self.ramp, self.target, self.unit, self.exclude = total_steps, ramp_steps, target, unit, exclude
        self.gen, self.log = gen, log
        self.lambdas = nn.Parameter(torch.zeros(2, device=gates.log_alpha[0].device))
        self.gate_opt = torch.optim.AdamW(gates.parameters(), lr=float(c.mask_lr), weight_decay=0.0)
        self.lambda_opt = torch.optim.AdamW([self.lambdas], lr=float(c.lambda_lr), weight_decay=0.0, maximize=True)
        self.dense = float(structures.counts([0] * len(structures.sizes), exclude)[unit])
        self.snapshots = Snapshots(target, float(c.delta), int(c.teacher_ahead))
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.hidden_at = hidden_modules(model)
        self.steps, self.teacher_samples, self.last = 0, 0, {}
        self.intact = {n: intact[n] for n, _ in self.trainable if n in intact}

    # --- the pieces of one step ------------------------------------------------------------------------
    def expected_sparsity(self) -> torch.Tensor:
        return 1 - self.structures.expected(self.gates.open_prob(), self.exclude)[self.unit] / self.dense

    def target_now(self) -> float:
        """The Lagrangian's target: linear from 0 over the ramp's steps; no ramp, the full target from step 0
        (as the source without a Lagrangian warm-up)."""
        if self.ramp <= 0:
            return self.target
        return self.target * min(1.0, self.steps / self.ramp)

    def forward(self, x):
        hidden = []
        hooks = [m.register_forward_hook(lambda m, i, o: hidden.append(o)) for m in self.hidden_at]
        try:
            logits = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return logits, hidden

    @torch.no_grad()
    def teacher_forward(self, x):
        which = None if self.c.teachers == "intact" else self.snapshots.teacher(self.total - self.steps)
        saved = None
        if which is None:
            self.structures.z = None
            for m in _lora_layers(self.model):
                m.enable_adapters(False)
            if not self.c.lora:  # the intact model: the dense student's weights
                saved = self._swap(self.intact)
        else:
            z, params = self.snapshots.taken[which]
            self.structures.z = z
            saved = self._swap(params)
        try:
            logits, hidden = self.forward(x)
        finally:
            if which is None:
                for m in _lora_layers(self.model):
                    m.enable_adapters(True)
            if saved is not None:
                self._swap(saved)
        self.teacher_samples += x.shape[0]
        return logits, hidden, -1 if which is None else which

    def _swap(self, params: dict) -> dict:
        current = dict(self.trainable)
        old = {n: current[n].detach().clone() for n in params}
        with torch.no_grad():
            for n, v in params.items():
                current[n].copy_(v)
        return old

    def __call__(self, model, x, y, idx):
        for bn in self.bns:  # BN statistics frozen while the gates learn
            bn.eval()
        t_logits, t_hidden, which = self.teacher_forward(x)
        self.structures.z = self.gates.sample(self.gen)
        s_logits, s_hidden = self.forward(x)
        self.structures.z = None
        tau = float(self.c.temperature)
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
        loss = float(self.c.kd_weight) * kd + float(self.c.hidden_weight) * hid + lag
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
        self.gate_opt.step()
        self.lambda_opt.step()
        self.gate_opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
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
                "gate_opt": self.gate_opt.state_dict(), "lambda_opt": self.lambda_opt.state_dict(),
                "steps": self.steps, "gen": self.gen.get_state(), "teacher_samples": self.teacher_samples,
                "snapshots": {"taken": [(z, p) for z, p in self.snapshots.taken], "reached": self.snapshots.reached,
                              "steps_at_target": self.snapshots.steps_at_target}}

    def load_state_dict(self, st: dict) -> None:
        self.gates.load_state_dict(st["gates"])
        with torch.no_grad():
            self.lambdas.copy_(st["lambdas"])
        self.gate_opt.load_state_dict(st["gate_opt"])
        self.lambda_opt.load_state_dict(st["lambda_opt"])
        self.steps, self.teacher_samples = int(st["steps"]), int(st["teacher_samples"])
        self.gen.set_state(st["gen"].cpu())
        sn = st["snapshots"]
        self.snapshots.taken = [(list(z), dict(p)) for z, p in sn["taken"]]
        self.snapshots.reached, self.snapshots.steps_at_target = bool(sn["reached"]), int(sn["steps_at_target"])


def _lora_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def add_lora(model: nn.Module, r: int, alpha: int) -> nn.Module:
    """peft LoRA adapters, the base weights (and BN) frozen: on every Conv2d and Linear of a CNN; on the q and
    v blocks of a ViT's fused qkv (the source adapts q_proj and v_proj).

    For the fused qkv, one peft adapter of rank ``2r`` (α ``2α``: the same scale ``α/r``) whose ``B`` is kept
    block-diagonal, ``[[B_q, 0], [0, 0], [0, B_v]]`` over (q, k, v) rows × (r, r) columns, by masking its
    gradient (``B`` starts at 0): exactly two independent rank-``r`` adapters on q and on v, none on k."""
    from peft import LoraConfig, inject_adapter_in_model

    if is_vit(model):
        targets = [n for n, m in model.named_modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
        targets = [f"{n}.qkv" for n in targets]
        model = inject_adapter_in_model(LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_modules=targets), model)
        for n in targets:
            layer = model.get_submodule(n)
            a = layer.base_layer.out_features // 3
            b = layer.lora_B["default"].weight
            mask = torch.zeros_like(b)
            mask[:a, :r] = 1  # q rows from the first r components
            mask[2 * a:, r:] = 1  # v rows from the second r
            b.register_hook(lambda g, mask=mask: g * mask)
    else:
        targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the plain base layer back."""
    for name, m in list(model.named_modules()):
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            m.merge()
            model.set_submodule(name, m.get_base_layer())
    return model


@torch.no_grad()
def fold_and_remove(model: nn.Module, groups: ChannelGroups, points: List[list], z: List[torch.Tensor],
                    sparsity: float = 0.0, target: str = "params", exclude=()) -> dict:
    """Fold the soft gates into the gated modules (a BatchNorm's ``z·(γx̂+β)``, a conv's output rows and bias),
    then remove the z=0 channels; returns the record's ``structure`` against ``sparsity``."""
    for g, pts in enumerate(points):
        for m, index in pts:
            scale = z[g][index].to(m.weight.device)
            m.weight.mul_(scale.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(scale)
    removed = [torch.nonzero(zg.cpu() == 0).flatten() for zg in z]
    facts = {**groups.describe(removed, sparsity, target, exclude), "method": "nuteprune"}
    groups.remove(Plan(groups.groups, removed, facts))
    return facts


class NutePrune(Method):
    """NutePrune (arXiv 2402.09773), structured, progressive, many teachers; vision mapping for CNNs."""

    name = "nuteprune"
    Config = NutePruneConfig
    granularities = ("weight", "channel")  # always structured: channels are removed whatever the setting
    plans_channels = False  # the gates learn the widths (each group keeps one channel), not Pruner.plan

    def validate(self) -> None:
        c = self.cfg
        if c.teachers not in TEACHERS:
            raise ConfigError(f"method.teachers must be {' or '.join(TEACHERS)}, got {c.teachers!r}")
        if not 0 < c.droprate_init < 1:
            raise ConfigError(f"method.droprate_init must be in (0, 1), got {c.droprate_init}")
        if not 0 < c.delta < 1 or c.teacher_ahead < 1 or c.beta <= 0 or c.ramp_epochs < 0:
            raise ConfigError("method.delta must be in (0, 1), method.teacher_ahead >= 1, method.beta > 0, "
                              "method.ramp_epochs >= 0")
        if c.lora:
            try:
                import peft  # noqa: F401
            except ImportError:
                raise ConfigError("method=nuteprune with method.lora=true needs peft: pip install '.[nuteprune]' "
                                  "(or method.lora=false)") from None

    @classmethod
    def check_model(cls, model: nn.Module, example) -> None:
        """Plain timm ViTs, and CNNs with a BatchNorm after every producing conv (checked before any training)."""
        if is_vit(model):
            return check_vit(model)
        if any(type(m).__name__.endswith("Attention") for m in model.modules()):
            raise ValueError("method=nuteprune supports plain timm ViTs and CNNs with BN; this model has attention "
                             "outside a ViT")
        points = gate_points(model, ChannelGroups(model, example), example)
        if not points or any(not p for p in points):
            raise ValueError("method=nuteprune gates the BatchNorm after each conv: it supports CNNs with BN "
                             "(not BN-free layers)")

    def run(self, ctx) -> Result:
        c = self.cfg
        model = ctx.artifacts.dense_student()
        structures = gated_structures(model, ctx)
        gates = HardConcrete(structures.sizes, float(c.droprate_init), float(c.beta),
                             ctx.seeds.generator("nuteprune/init")).to(ctx.device)
        # lora=false: the intact teacher's weights (with adapters the frozen base is the intact model)
        intact = {} if c.lora else {n: p.detach().clone() for n, p in model.named_parameters()}
        if c.lora:
            model = add_lora(model, int(c.lora_r), int(c.lora_alpha))
        else:
            for n, p in model.named_parameters():
                p.requires_grad_(not any(n.startswith(f"{b}.") for b in self._bn_names(model)))
        structures.attach()
        spe = steps_per_epoch(ctx.data, int(c.prune.batch_size), ctx.cfg.get("max_batches"))
        total = spe * int(c.prune.epochs)
        objective = NuteObjective(self, model, structures, gates, total, int(c.ramp_epochs) * spe,
                                  ctx.pruner.sparsity, ctx.cfg.prune.target, ctx.pruner.exclude,
                                  ctx.seeds.generator("nuteprune/z"), ctx.log, intact)
        ctx.trainer.train(model, c.prune, objective, stage="prune")
        z = gates.deterministic()
        structures.z = z
        ctx.evaluator.record_metrics("pruned", model)  # the gated model before export (deterministic gates)
        with torch.no_grad():
            probe = next(iter(ctx.data.batches("test", 64)))[0]
            model.eval()
            gated = model(probe)
        structures.remove_hooks()
        if c.lora:
            model = merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
        facts = structures.export(z, ctx.pruner.sparsity, ctx.cfg.prune.target, ctx.pruner.exclude)
        with torch.no_grad():
            model.eval()
            facts["export_max_abs_diff"] = float((model(probe) - gated).abs().max())
        facts.update(snapshots=len(objective.snapshots.taken),
                     expected_sparsity_final=float(objective.expected_sparsity().detach()))
        if int(c.retrain.epochs) > 0:
            ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain")
        return Result(model, {}, {"structure": facts})

    @staticmethod
    def _bn_names(model: nn.Module) -> list:
        return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def variant(self) -> Optional[str]:
        """``teachers=intact`` (the ablation) is reported as its own row: ``nuteprune [intact teacher]``."""
        return "intact teacher" if self.cfg.teachers == "intact" else None
