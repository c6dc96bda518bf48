"""The one training loop: any objective (CE, distillation, self-distillation), an optional fixed or
evolving mask, optional bf16 autocast on CUDA, an optional compiled forward (kdprune_cli/training/compiling.py),
per-epoch logging and a progress bar.

With a mask, gradients of pruned weights are zeroed before every optimizer step and the weights are
re-masked after it, so momentum and weight decay cannot revive a pruned weight (docs/methods.md §0).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from kdprune_cli.errors import describe, diverged, non_finite_tensors
from kdprune_cli.log import warn
from kdprune_cli.models.masks import apply_masks, assert_masked, mask_grads
from kdprune_cli.store.atomic import atomic_save
from kdprune_cli.training import compiling
from kdprune_cli.training.objective import Objective

NO_COMPILE = {"compile_seconds": 0.0, "recompiles": 0, "graph_breaks": 0, "fallbacks": 0}


def make_optimizer(model: nn.Module, recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(recipe, "optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                           nesterov=bool(recipe.nesterov) and recipe.momentum > 0)


def lr_at(recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step ``step`` (linear warm-up, then cosine / multistep / constant)."""
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    if step < warm:
        return recipe.lr * (step + 1) / warm
    if recipe.schedule == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * t))
    if recipe.schedule == "multistep":
        epoch = step // max(1, steps_per_epoch)
        return recipe.lr * recipe.lr_decay ** sum(epoch >= m for m in recipe.milestones)
    return recipe.lr


def steps_per_epoch(data, batch_size: int, max_batches: Optional[int] = None) -> int:
    """Optimizer steps in one training epoch: full batches only, at most ``max_batches``."""
    n = data.num_batches("train", batch_size, drop_last=True)
    return n if max_batches is None else min(n, max_batches)


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bars_disabled(progress) -> Optional[bool]:
    """tqdm's ``disable`` for the ``progress`` setting: ``auto`` draws bars only when stderr is a terminal (tqdm's
    ``None``: a log file or a pipe gets no carriage-return lines), ``true`` always, ``false`` never."""
    s = str(progress).lower()
    return None if s == "auto" else s != "true"


def train(model: nn.Module, data, recipe, objective: Objective, *, gen: torch.Generator,
          masks: Optional[dict] = None, desc: str = "train", log: Optional[Callable[[dict], None]] = None,
          progress=True, amp: bool = False, step_hook: Optional[Callable[[int, int], None]] = None,
          evaluate: Optional[Callable[[nn.Module], dict]] = None, checkpoint: Optional[Path] = None,
          max_batches: Optional[int] = None, compile="false", where: Optional[str] = None) -> dict:
    """Train ``model`` in place for ``recipe.epochs``; return the cost ``{seconds, samples, teacher_samples}``
    and the compile counts ``{compile_seconds, recompiles, graph_breaks, fallbacks}`` (zero when eager).

    ``step_hook(step, total_steps)`` may change ``masks`` (gradual pruning); the current masks are enforced
    after every step. ``evaluate(model)`` runs every ``recipe.eval_every`` epochs for the log. With
    ``checkpoint``, the model, optimizer, masks, generator, objective state and cost are saved atomically after
    every epoch, and a call that finds the file continues after its last epoch (a finished one returns at once),
    so a killed job resumes with the same numbers. ``max_batches`` caps the batches of every epoch (the
    learning-rate and pruning schedules count the capped steps).

    ``compile`` (auto | true | false | step; auto: true on CUDA): :func:`~kdprune_cli.training.compiling.
    training_mode`. Masks, optimizer and checkpoints work on ``model`` itself. ``compile_seconds`` is the time
    of the steps in which something compiled; ``fallbacks`` the forwards (or steps) that ran no compiled graph.

    A non-finite loss, or weights or buffers no longer finite at the end of an epoch, raise
    :class:`~kdprune_cli.errors.DivergedError` naming ``desc``, the epoch and the value (``where``, the recipe's
    config path, names the learning rate to lower) before that epoch's checkpoint is written. The loss is
    checked once per epoch, through the epoch's loss sum that stays on the device until then.
    """
    model = getattr(model, "_orig_mod", model)  # given a torch.compile'd model: train the module behind it
    device = next(model.parameters()).device
    if int(recipe.epochs) <= 0:
        return {"seconds": 0.0, "samples": 0, "teacher_samples": 0, **NO_COMPILE}
    mode = compiling.training_mode(compile, device, objective, getattr(recipe, "optimizer", "sgd"))
    session = compiling.Session(model, objective, device, whole_step=mode == "step") if mode != "eager" else None
    run = _Training(model, data, recipe, objective, gen, masks, session, max_batches)
    if checkpoint is not None and Path(checkpoint).is_file():
        run.resume(checkpoint)
    bar = tqdm(total=run.total, initial=run.step, desc=desc, disable=bars_disabled(progress), leave=False,
               mininterval=1.0, dynamic_ncols=True)
    with session.active() if session is not None else contextlib.nullcontext(model) as net:
        for epoch in range(run.first_epoch, run.epochs):
            loss_sum, correct, seen = run.epoch(net, epoch, bar, amp, step_hook)
            _check_finite(model, float(loss_sum) / max(seen, 1), desc, epoch + 1, where)
            rec = {"stage": desc, "epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"],
                   "train_loss": float(loss_sum) / max(seen, 1), "train_top1": 100.0 * float(correct) / max(seen, 1)}
            if session is not None:
                rec["compile_seconds"] = session.compile_seconds
            if evaluate is not None and recipe.eval_every and ((epoch + 1) % recipe.eval_every == 0
                                                               or epoch + 1 == run.epochs):
                rec.update({f"test_{k}": v for k, v in evaluate(model).items()})
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_top1']:.1f}",
                            **({"test": f"{rec['test_top1']:.1f}"} if "test_top1" in rec else {}))
            if log is not None:
                log(rec)
            if checkpoint is not None:
                run.save(checkpoint, epoch + 1)
    bar.close()
    if masks is not None:
        assert_masked(model, masks)
    return run.cost()


class _Training:
    """One :func:`train` call's state: the optimizer, the step and epoch counters, the samples so far and the
    cost booked before a resume."""

    def __init__(self, model: nn.Module, data, recipe, objective: Objective, gen: torch.Generator,
                 masks: Optional[dict], session: Optional[compiling.Session], max_batches: Optional[int]):
        self.start, self.base = time.perf_counter(), (objective.teacher_samples, objective.extra_samples)
        self.model, self.data, self.recipe, self.objective, self.gen = model, data, recipe, objective, gen
        self.masks, self.session, self.max_batches = masks, session, max_batches
        self.device, self.epochs = next(model.parameters()).device, int(recipe.epochs)
        self.spe = steps_per_epoch(data, recipe.batch_size, max_batches)
        self.total = self.epochs * self.spe
        self.opt = make_optimizer(model, recipe)
        if masks is not None:
            apply_masks(model, masks)
        self.step, self.first_epoch, self.samples = 0, 0, 0
        self.graph: Optional[compiling.GraphStep] = None  # built at the first step, after a resume
        self.done_before = {"seconds": 0.0, "samples": 0, "teacher_samples": 0}

    def cost(self) -> dict:
        """This stage so far, the part before a resume included."""
        now = {"seconds": time.perf_counter() - self.start,
               "samples": self.samples + self.objective.extra_samples - self.base[1],
               "teacher_samples": self.objective.teacher_samples - self.base[0],
               **(self.session.stats() if self.session is not None else NO_COMPILE)}
        return {k: self.done_before.get(k, 0) + v for k, v in now.items()}

    def epoch(self, net, epoch: int, bar, amp: bool, step_hook) -> tuple:
        """One epoch of steps; returns the loss sum (on the device), the correct predictions and the samples."""
        self.model.train()
        self.objective.on_epoch_start(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y, idx in self.data.batches("train", self.recipe.batch_size, shuffle=True, augment=self.recipe.augment,
                                           gen=self.gen, drop_last=True, max_batches=self.max_batches):
            mark = self.session.mark() if self.session is not None else None
            if step_hook is not None:
                step_hook(self.step, self.total)
            loss, logits = self.one_step(net, x, y, idx, amp)
            self.step += 1
            self.samples += x.shape[0]
            loss_sum += loss.detach().float() * x.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += x.shape[0]
            if self.session is not None:
                self.session.book(mark)
            bar.update(1)
        self.objective.on_epoch_end(epoch)
        return loss_sum, correct, seen

    def one_step(self, net, x, y, idx, amp: bool) -> tuple:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.recipe, self.step, self.total, self.spe)
        if self.session is not None and self.session.whole_step:
            return self.graph_step(x, y, idx, amp)
        with autocast(self.device, amp):
            loss, logits = self.objective(net, x, y, idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.masks is not None:
            mask_grads(self.model, self.masks)
        self.opt.step()
        self.objective.step()  # an objective with parameters of its own (NutePrune's gates, λ)
        if self.masks is not None:
            apply_masks(self.model, self.masks)
        return loss, logits

    def graph_step(self, x, y, idx, amp: bool) -> tuple:
        if self.graph is None:
            lrs = torch.tensor([lr_at(self.recipe, s, self.total, self.spe) for s in range(self.total)],
                               device=self.device)
            self.graph = compiling.GraphStep(self.model, self.objective, self.opt, self.masks, lrs, self.step, amp)
        self.objective.count(x.shape[0])
        return self.graph(x, y, idx, self.session)

    def save(self, checkpoint: Path, epochs_done: int) -> None:
        atomic_save({"epoch": epochs_done, "step": self.step, "model": self.model.state_dict(),
                     "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                     "masks": self.masks if self.masks is not None else {},
                     "objective": self.objective.state_dict(), "cost": self.cost()}, checkpoint)

    def resume(self, path: Path) -> None:
        """Continue after the checkpoint's last epoch; when it cannot be read or does not fit this model,
        optimizer, masks or objective: one warning line, the file removed, and the stage starts over from the
        model, masks and objective it was given and a fresh optimizer."""
        model, masks, objective = self.model, self.masks, self.objective
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "objective": objective.state_dict(),
                 "masks": dict(masks) if masks is not None else None}
        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
            model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["opt"])
            if masks is not None:
                if set(st["masks"]) != set(masks):
                    raise KeyError("masks of other parameters")
                for n, m in st["masks"].items():
                    masks[n] = m.to(masks[n].device)
            objective.load_state_dict(st["objective"])
            self.gen.set_state(st["gen"].cpu())
            self.first_epoch, self.step, self.done_before = int(st["epoch"]), int(st["step"]), dict(st["cost"])
        except Exception as e:
            model.load_state_dict(saved["model"])
            objective.load_state_dict(saved["objective"])
            if masks is not None:
                masks.update(saved["masks"])
            warn(f"training checkpoint {path} is damaged or does not fit ({type(e).__name__}); "
                 f"discarded, the stage starts from its beginning")
            Path(path).unlink(missing_ok=True)
            self.opt = make_optimizer(model, self.recipe)


def _check_finite(model: nn.Module, mean_loss: float, stage: str, epoch: int, where: Optional[str]) -> None:
    """Raise :class:`~kdprune_cli.errors.DivergedError` when a loss of the epoch or the model is not finite.

    The epoch's loss sum, accumulated on the device, is non-finite whenever some step's loss was (NaN and
    infinity do not cancel), so the steps need no check of their own and no host sync."""
    if not math.isfinite(mean_loss):
        raise diverged(stage, f"epoch {epoch}", f"loss {mean_loss:.4g}", where)
    broken = non_finite_tensors(model.state_dict())
    if broken:
        raise diverged(stage, f"epoch {epoch}", f"loss {mean_loss:.4g}, non-finite values in {describe(broken)}",
                       where)
