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

from kdprune_cli.training import compiling
from kdprune_cli.errors import describe, diverged, non_finite_tensors
from kdprune_cli.pruning.masks import apply_masks, assert_masked, mask_grads
from kdprune_cli.store.atomic import atomic_save


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


def train(model: nn.Module, data, recipe, objective, *, gen: torch.Generator, masks: Optional[dict] = None,
          desc: str = "train", log: Optional[Callable[[dict], None]] = None, progress=True,
          amp: bool = False, step_hook: Optional[Callable[[int, int], None]] = None,
          evaluate: Optional[Callable[[nn.Module], dict]] = None, checkpoint: Optional[Path] = None,
          max_batches: Optional[int] = None, compile="false", where: Optional[str] = None) -> dict:
    """Train ``model`` in place for ``recipe.epochs`` and return ``{seconds, samples, teacher_samples}``
    and the compile counts ``{compile_seconds, recompiles, graph_breaks, fallbacks}`` (zero when eager).

    ``masks`` may be mutated by ``step_hook(step, total_steps)`` (gradual pruning); the current masks are
    enforced after every step. ``evaluate(model)`` runs every ``recipe.eval_every`` epochs for the log.
    With ``checkpoint``, the model, optimizer, masks, generator, objective state and counters are saved
    atomically after every epoch, and a call that finds the file continues after its last epoch (a
    finished one returns at once), so a killed job resumes with the same numbers. ``max_batches`` caps
    the batches of every epoch (the learning-rate and pruning schedules count the capped steps).

    ``compile`` (auto | true | false; auto: on CUDA) runs the objective's forwards of the model and of its
    teacher compiled (CUDA graphs and channels_last on CUDA). Masks, the optimizer and checkpoints work on
    ``model`` itself, never on a compiled wrapper. ``compile_seconds`` is the time of the steps in which
    something compiled; ``fallbacks`` the forwards that ran no compiled graph.

    A non-finite loss in any step, or weights or buffers that are no longer finite at the end of an epoch,
    raise :class:`~kdprune_cli.errors.DivergedError` naming ``desc``, the epoch and the value (``where``,
    the recipe's config path, names the learning rate to lower) before that epoch's checkpoint is written.
    The loss is checked once per epoch, through the epoch's loss sum that stays on the device until then.
    """
    start = time.perf_counter()
    model = getattr(model, "_orig_mod", model)  # given a torch.compile'd model: train the module behind it
    device = next(model.parameters()).device
    samples, t0 = 0, getattr(objective, "teacher_samples", 0)
    x0 = getattr(objective, "extra_samples", 0)  # passes an objective makes itself (DLB's last batch)
    epochs = int(recipe.epochs)
    if epochs <= 0:
        return {"seconds": 0.0, "samples": 0, "teacher_samples": 0, **NO_COMPILE}
    eager_only = getattr(objective, "eager_only", False)  # an objective that hooks into the model (NutePrune)
    session = compiling.Session(model, objective, device) if compiling.wanted(compile, device) and not eager_only \
        else None
    spe = steps_per_epoch(data, recipe.batch_size, max_batches)
    total = epochs * spe
    opt = make_optimizer(model, recipe)
    if masks is not None:
        apply_masks(model, masks)
    step, first_epoch, done_before = 0, 0, {"seconds": 0.0, "samples": 0, "teacher_samples": 0}
    if checkpoint is not None and Path(checkpoint).is_file():
        resumed = _resume(checkpoint, model, opt, gen, masks, objective)
        if resumed is None:  # damaged: the stage starts over, from the model and optimizer it was given
            opt = make_optimizer(model, recipe)
        else:
            first_epoch, step, done_before = resumed

    def cost() -> dict:  # this stage so far, the part before a resume included
        now = {"seconds": time.perf_counter() - start,
               "samples": samples + getattr(objective, "extra_samples", 0) - x0,
               "teacher_samples": getattr(objective, "teacher_samples", 0) - t0,
               **(session.stats() if session is not None else NO_COMPILE)}
        return {k: done_before.get(k, 0) + v for k, v in now.items()}

    bar = tqdm(total=total, initial=step, desc=desc, disable=bars_disabled(progress), leave=False, mininterval=1.0,
               dynamic_ncols=True)
    with session.active() if session is not None else contextlib.nullcontext(model) as net:
        for epoch in range(first_epoch, epochs):
            model.train()
            if hasattr(objective, "on_epoch_start"):
                objective.on_epoch_start(epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y, idx in data.batches("train", recipe.batch_size, shuffle=True, augment=recipe.augment,
                                          gen=gen, drop_last=True, max_batches=max_batches):
                mark = session.mark() if session is not None else None
                if step_hook is not None:
                    step_hook(step, total)
                for g in opt.param_groups:
                    g["lr"] = lr_at(recipe, step, total, spe)
                with autocast(device, amp):
                    loss, logits = objective(net, x, y, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if masks is not None:
                    mask_grads(model, masks)
                opt.step()
                if hasattr(objective, "step"):  # an objective with parameters of its own (NutePrune's gates, λ)
                    objective.step()
                if masks is not None:
                    apply_masks(model, masks)
                step += 1
                samples += x.shape[0]
                loss_sum += loss.detach().float() * x.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += x.shape[0]
                if session is not None:
                    session.book(mark)
                bar.update(1)
            if hasattr(objective, "on_epoch_end"):
                objective.on_epoch_end(epoch)
            _check_finite(model, float(loss_sum) / max(seen, 1), desc, epoch + 1, where)
            rec = {"stage": desc, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                   "train_loss": float(loss_sum) / max(seen, 1),
                   "train_top1": 100.0 * float(correct) / max(seen, 1)}
            if session is not None:
                rec["compile_seconds"] = session.compile_seconds
            if evaluate is not None and recipe.eval_every and ((epoch + 1) % recipe.eval_every == 0
                                                               or epoch + 1 == epochs):
                rec.update({f"test_{k}": v for k, v in evaluate(model).items()})
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_top1']:.1f}",
                            **({"test": f"{rec['test_top1']:.1f}"} if "test_top1" in rec else {}))
            if log is not None:
                log(rec)
            if checkpoint is not None:
                atomic_save({"epoch": epoch + 1, "step": step, "model": model.state_dict(),
                             "opt": opt.state_dict(), "gen": gen.get_state(),
                             "masks": masks if masks is not None else {},
                             "objective": objective.state_dict() if hasattr(objective, "state_dict") else {},
                             "cost": cost()}, checkpoint)
    bar.close()
    if masks is not None:
        assert_masked(model, masks)
    return cost()


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


def _resume(path, model, opt, gen, masks, objective):
    """Continue from a training checkpoint; ``None`` (one warning line, the file removed, nothing changed)
    when it cannot be read or does not fit this model, optimizer, masks or objective."""
    from kdprune_cli.log import warn

    device = next(model.parameters()).device
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "objective": objective.state_dict() if hasattr(objective, "state_dict") else None,
             "masks": dict(masks) if masks is not None else None}
    try:
        st = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if masks is not None:
            if set(st["masks"]) != set(masks):
                raise KeyError("masks of other parameters")
            for n, m in st["masks"].items():
                masks[n] = m.to(masks[n].device)
        if hasattr(objective, "load_state_dict"):
            objective.load_state_dict(st["objective"])
        gen.set_state(st["gen"].cpu())
        return int(st["epoch"]), int(st["step"]), dict(st["cost"])
    except Exception as e:
        model.load_state_dict(saved["model"])
        if saved["objective"] is not None:
            objective.load_state_dict(saved["objective"])
        if masks is not None:
            masks.update(saved["masks"])
        warn(f"training checkpoint {path} is damaged or does not fit ({type(e).__name__}); "
             f"discarded, the stage starts from its beginning")
        Path(path).unlink(missing_ok=True)
        return None
