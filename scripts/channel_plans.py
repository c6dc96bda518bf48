"""Channel plans before and after group normalisation and per-group caps (docs/channel_plans.md).

For ResNet-56 (CIFAR shape, 3×32×32) and the quickstart student (ResNet-20 on 1×8×8 digits), plans the
channel groups by magnitude (the L1 group norm, ``method=magnitude``) at 30/50/70 % of the prunable weights
with three settings of the ``prune.*`` options:

- ``sum``: ``reduce=sum normalize=none max_group_ratio=1 min_channels=1`` (the unnormalised sum, no caps);
- ``mean/mean``: ``reduce=mean normalize=mean`` without caps (Torch-Pruning's default importance);
- ``default``: the config's defaults (``mean/mean`` with ``max_group_ratio=0.9 min_channels=4``).

Prints one markdown table per model: the kept width of each stage's residual channels and the range of its
blocks' inner widths, how many groups are at their floor (the caps bind) and at one channel, the achieved
fraction, and the kept-channel overlap (Jaccard over all root channels) with Torch-Pruning's own global
pruning (``BasePruner(global_pruning=True)`` with ``GroupMagnitudeImportance()``) brought to the same
fraction of prunable weights.

    python scripts/channel_plans.py                      # both models at initialisation (seed 0)
    python scripts/channel_plans.py --run outputs/runs/<date>/<time>   # + the dense student of a run
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdprune_cli.config.schema import PruneConfig  # noqa: E402
from kdprune_cli.models import build_model  # noqa: E402
from kdprune_cli.models.masks import prunable_params  # noqa: E402
from kdprune_cli.pruning.structure.channels import ChannelGroups  # noqa: E402

warnings.filterwarnings("ignore")

SETTINGS = {
    "sum": dict(reduce="sum", normalize="none", max_group_ratio=1.0, min_channels=1),
    "mean/mean": dict(reduce="mean", normalize="mean", max_group_ratio=1.0, min_channels=1),
    "default": dict(reduce=PruneConfig.reduce, normalize=PruneConfig.normalize,
                    max_group_ratio=PruneConfig.max_group_ratio, min_channels=PruneConfig.min_channels),
}


def stage_of(root: str) -> tuple[int, str]:
    """(stage, "res" | "inner") of a CIFAR ResNet group's root layer."""
    if root == "conv1":
        return 1, "res"
    m = re.match(r"layer(\d+)\.(\d+)\.(conv1|shortcut\.0)$", root)
    if not m:
        raise ValueError(f"not a CIFAR ResNet group root: {root}")
    return int(m.group(1)), "res" if m.group(3) != "conv1" else "inner"


def torch_pruning_plan(model, groups: ChannelGroups, example, sparsity: float) -> list:
    """Torch-Pruning's global plan (default group importance) at ``sparsity`` of the prunable weights."""
    import torch_pruning as tp

    names = [groups.names[g.root] for g in groups.groups]
    dense = groups.counts([0] * len(names))["params"]

    def removed_at(ratio: float) -> list:
        pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(),
                                      global_pruning=True, pruning_ratio=ratio, ignored_layers=[groups.head])
        out = {groups.names[g[0].dep.target.module]: torch.tensor(g[0].idxs) for g in pruner.step(interactive=True)}
        return [out.get(n, torch.zeros(0, dtype=torch.long)) for n in names]  # planned, nothing pruned

    lo, hi = 0.0, 0.99
    for _ in range(14):
        mid = (lo + hi) / 2
        removed = removed_at(mid)
        lo, hi = (mid, hi) if 1 - groups.counts(removed)["params"] / dense < sparsity else (lo, mid)
    return removed_at(hi)


def kept_set(groups: ChannelGroups, removed) -> set:
    return {(g, c) for g, (grp, r) in enumerate(zip(groups.groups, removed))
            for c in set(range(grp.channels)) - set(r.tolist())}


def table(label: str, model, example, sparsities) -> str:
    model.eval()
    groups = ChannelGroups(model, example)
    scores = {n: p.detach().abs() for n, p in prunable_params(model).items()}
    roots = [groups.names[g.root] for g in groups.groups]
    where = [stage_of(r) for r in roots]
    stages = sorted({s for s, _ in where})

    def widths_of(removed) -> str:
        cells = []
        for s in stages:
            res = [g.channels - len(r) for g, r, w in zip(groups.groups, removed, where) if w == (s, "res")]
            inner = [g.channels - len(r) for g, r, w in zip(groups.groups, removed, where) if w == (s, "inner")]
            cells.append(f"{res[0]} / {min(inner)}–{max(inner)}")
        return " | ".join(cells)

    dense_cells = widths_of([torch.zeros(0, dtype=torch.long)] * len(roots))
    lines = [f"**{label}** ({len(roots)} channel groups; per stage: residual width / inner widths min–max; "
             f"dense: {dense_cells.replace(' | ', ', ')})", "",
             "| params removed | setting | " + " | ".join(f"stage {s}" for s in stages)
             + " | groups at floor | groups at 1 channel | achieved | overlap with TP |",
             "|---|---|" + "---|" * len(stages) + "---|---|---|---|"]
    dense = groups.counts([0] * len(roots))["params"]
    for sparsity in sparsities:
        tp_removed = torch_pruning_plan(model, groups, example, sparsity)
        theirs = kept_set(groups, tp_removed)
        for name, opts in SETTINGS.items():
            plan = groups.plan(scores, sparsity, **opts)
            floors = [g.channels - c for g, c in zip(groups.groups, groups.removable(
                opts["max_group_ratio"], opts["min_channels"]))]
            kept = [g.channels - len(r) for g, r in zip(groups.groups, plan.removed)]
            ours = kept_set(groups, plan.removed)
            at_floor = sum(k == f and f < g.channels for k, f, g in zip(kept, floors, groups.groups))
            lines.append(f"| {sparsity:.0%} | {name} | {widths_of(plan.removed)} | {at_floor} | "
                         f"{sum(k == 1 for k in kept)} | {plan.facts['achieved']:.4f} | "
                         f"{len(ours & theirs) / len(ours | theirs):.2f} |")
        kept = [g.channels - len(r) for g, r in zip(groups.groups, tp_removed)]
        lines.append(f"| {sparsity:.0%} | Torch-Pruning | {widths_of(tp_removed)} | – | {sum(k == 1 for k in kept)} | "
                     f"{1 - groups.counts(tp_removed)['params'] / dense:.4f} | 1.00 |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="a kdprune run folder: plan its dense student too")
    p.add_argument("--sparsity", default="0.3,0.5,0.7")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    torch.manual_seed(args.seed)
    out = [table("ResNet-56, CIFAR shape (3×32×32), initialisation", build_model("resnet56", 10, 3, 32),
                 torch.zeros(1, 3, 32, 32), sparsities)]
    torch.manual_seed(args.seed)
    out.append(table("Quickstart student: ResNet-20 on digits (1×8×8), initialisation",
                     build_model("resnet20", 10, 1, 8), torch.zeros(1, 1, 8, 8), sparsities))
    for run in args.run:
        from kdprune_cli.cli.eval import load

        model, obj, _ = load(SimpleNamespace(path=run, model="dense_student"))
        a = obj["arch"]
        out.append(table(f"{a['name']} dense student of {run}", model,
                         torch.zeros(1, int(a["in_channels"]), int(a["image_size"]), int(a["image_size"])), sparsities))
    print(f"torch {torch.__version__}; magnitude scores (|θ|, L1 group norm); seed {args.seed}\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
