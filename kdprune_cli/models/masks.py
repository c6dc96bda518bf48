"""The one mask mechanism (docs/methods.md §0): prunable set, selection, application, enforcement, counting.

Masks are ``{parameter name: bool tensor}``; ``True`` = keep. Scores are ``{name: float tensor}`` with
higher = keep. Every method produces scores or masks and goes through :func:`select`.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, Mapping

import torch
from torch import nn

from kdprune_cli.errors import DivergedError, describe, non_finite_tensors

Masks = Dict[str, torch.Tensor]
Scores = Dict[str, torch.Tensor]


def prunable_modules(model: nn.Module, exclude: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """Every Conv2d and Linear (first conv and classifier included) except the module names in ``exclude``."""
    exclude = set(exclude)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in exclude}


def prunable_params(model: nn.Module, exclude: Iterable[str] = ()) -> Dict[str, nn.Parameter]:
    """The prunable set P: ``{"<module>.weight": weight}`` in module order."""
    return {f"{name}.weight": m.weight for name, m in prunable_modules(model, exclude).items()}


def check_exclude(model: nn.Module, exclude: Iterable[str]) -> None:
    """Raise a clear error when ``prune.exclude`` names a module that is not a Conv2d/Linear, or every one."""
    names = set(prunable_modules(model))
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"prune.exclude names no Conv2d/Linear module: {unknown}; "
                         f"choices start with {sorted(names)[:6]}")
    if not names - set(exclude):
        raise ValueError(f"prune.exclude names every Conv2d/Linear module ({len(names)}): nothing is left to prune")


def removal_groups(sizes: Mapping[str, int], sparsity: float, scope: str) -> list[tuple[list[str], int]]:
    """``[(names, removed count)]`` that remove exactly ``round(s·N)`` of the ``N`` weights ``sizes`` counts: one
    group of every tensor (``global``), or one group per tensor (``layer``)."""
    names = list(sizes)
    k = int(round(sparsity * sum(sizes.values())))
    if scope == "global":
        return [(names, k)]
    if scope != "layer":
        raise ValueError(f"prune.scope must be 'global' or 'layer', got {scope!r}")
    # Same ratio in every tensor; largest-remainder rounding so the total is still exactly k.
    exact = [sparsity * sizes[n] for n in names]
    counts = [int(e) for e in exact]
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return [([n], c) for n, c in zip(names, counts)]


def select(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global",
           keep: Masks | None = None) -> Masks:
    """Keep the highest scores so that exactly ``round(s·|P|)`` weights are removed (docs/methods.md §0, "Scores
    and selection"): ranked in their widest floating dtype (at least float32, never narrowed); a NaN or ±inf
    score of a weight still there is an error naming the parameter; ties go in parameter order, then flat
    index; ``keep`` (an earlier mask) keeps its pruned weights pruned and counts them towards the total (in
    ``layer`` scope the per-tensor ratio is taken over the whole tensor).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(scores)
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names), torch.float32)
    flat = {}
    for n in names:
        s = scores[n].detach().to(dtype).flatten().clone()
        live = torch.ones_like(s, dtype=torch.bool) if keep is None else keep[n].flatten().to(s.device)
        bad = int((~torch.isfinite(s) & live).sum())
        if bad:
            raise ValueError(f"scores of {n} have {bad} non-finite values (NaN or inf) in {dtype}: the ranking "
                             "would lose their order (score in float64, e.g. method.double=true for synflow)")
        s[~live] = -float("inf")
        flat[n] = s
    groups = removal_groups({n: f.numel() for n, f in flat.items()}, sparsity, scope)
    if keep is not None and scope == "global":
        already = sum(int((~keep[n]).sum()) for n in names)
        if already > groups[0][1]:
            raise ValueError(f"mask already removes {already} weights, more than the target {groups[0][1]}")
    masks: Masks = {}
    for group, count in groups:  # one ranking of every tensor (global) or of each tensor (layer)
        parts = [flat[n] for n in group]
        order = torch.sort(torch.cat([f.to("cpu") for f in parts]), stable=True).indices
        kept = torch.ones(len(order), dtype=torch.bool)
        kept[order[:count]] = False
        for n, m in zip(group, kept.split([f.numel() for f in parts])):
            if keep is not None:  # a tensor that already lost more than its share stays pruned
                m = m & keep[n].flatten().to(m.device)
            masks[n] = m.view_as(scores[n]).to(scores[n].device)
    return masks


def dense_masks(model: nn.Module, exclude: Iterable[str] = ()) -> Masks:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_params(model, exclude).items()}


def _params(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Dict[str, nn.Parameter]:
    """The parameters the masks name; a ``torch.compile``'d model is resolved to the module behind it,
    whose parameters are the same objects without the wrapper's ``_orig_mod.`` prefix."""
    named = dict(getattr(model, "_orig_mod", model).named_parameters())
    missing = [n for n in masks if n not in named]
    if missing:
        raise KeyError(f"mask names parameters the model lacks: {missing[:3]}")
    return {n: named[n] for n in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (also used after every optimizer step to re-mask).

    One fused ``_foreach_mul_`` by the boolean masks: a few kernel launches per step, not one per tensor.
    """
    params = _params(model, masks)
    if params:
        torch._foreach_mul_([p.data for p in params.values()], [masks[n].to(p.device) for n, p in params.items()])


@torch.no_grad()
def mask_grads(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights before the optimizer step."""
    pairs = [(p.grad, masks[n].to(p.device)) for n, p in _params(model, masks).items() if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


@torch.no_grad()
def assert_masked(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """The final check: every pruned weight is exactly zero. Weights that are NaN or infinite (a diverged
    training: a pruned NaN stays NaN when masked) raise :class:`~kdprune_cli.errors.DivergedError` instead."""
    params = _params(model, masks)
    broken = non_finite_tensors(params)
    if broken:
        raise DivergedError(f"training diverged: non-finite weights in {describe(broken)}; "
                            f"lower the learning rate")
    for n, p in params.items():
        bad = int((p[~masks[n].to(p.device)] != 0).sum())
        if bad:
            raise AssertionError(f"{bad} pruned weights of {n} are non-zero")


@torch.no_grad()
def sparsity_report(model: nn.Module, exclude: Iterable[str] = (), reference: nn.Module | None = None) -> dict:
    """Sparsity measured from the weights themselves, not from the mask: global and per layer.

    With ``reference`` (the dense model a physically smaller ``model`` came from), a weight counts as removed
    when it is zero or no longer exists: the fraction is ``(reference size − non-zero) / reference size``."""
    ref = prunable_params(reference if reference is not None else model, exclude)
    per_layer, total, nonzero = {}, 0, 0
    for n, p in prunable_params(model, exclude).items():
        nz = int((p != 0).sum())
        per_layer[n] = (ref[n].numel() - nz) / ref[n].numel()
        total += ref[n].numel()
        nonzero += nz
    return {"global": (total - nonzero) / max(total, 1), "per_layer": per_layer, "prunable": total, "nonzero": nonzero}
