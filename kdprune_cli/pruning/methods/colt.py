"""COLT — Cyclic Overlapping Lottery Tickets (Hossain et al., IEEE TAI 2025, arXiv 2212.12770; docs/methods.md §3):
one model per contiguous class partition, pruned in rounds by magnitude with their masks intersected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, model_kwargs, option
from kdprune_cli.data import Split
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.procedures.rounds import clone_state, rewind, round_spec, run_rounds
from kdprune_cli.pruning.scores.magnitude import magnitude as magnitudes


def partition_classes(num_classes: int, partitions: int) -> List[range]:
    """``partitions`` contiguous disjoint class ranges covering ``0..num_classes−1`` (sizes differ by ≤ 1;
    the first ones get the extra class)."""
    if not 1 <= partitions <= num_classes:
        raise ConfigError(f"method.partitions must be in [1, {num_classes}] for {num_classes} classes, "
                          f"got {partitions}")
    base, extra = divmod(num_classes, partitions)
    bounds = [i * base + min(i, extra) for i in range(partitions + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def partition_data(data, classes: range):
    """A shallow copy of ``data`` whose splits hold only ``classes``, relabelled ``0..k−1``.

    Normalisation statistics stay those of the whole training set; only ``batches``/``num_batches`` and
    the splits are used by the trainer and the evaluator.
    """
    lo, hi = classes.start, classes.stop

    def restrict(s: Split) -> Split:
        keep = (s.y >= lo) & (s.y < hi)
        return Split(s.x[keep], s.y[keep] - lo)

    sub = copy.copy(data)
    sub.train = restrict(data.train)
    sub.test = restrict(data.test)
    sub.val = restrict(data.val) if data.val is not None else None
    sub.num_classes = hi - lo
    return sub


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """The classifier: the last ``nn.Linear`` with ``num_classes`` outputs."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise ConfigError(f"COLT needs a final nn.Linear classifier with {num_classes} outputs; the student has none")
    return names[-1]


@dataclass
class COLTConfig(MethodConfig):
    partitions: int = option("several")
    rate: float = option("rate")  # fraction of each model's remaining conv weights pruned per round
    round: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING


class COLT(Method):
    """Cyclic Overlapping Lottery Tickets (Hossain et al., IEEE TAI 2025, arXiv 2212.12770).

    Round r: each partition model f_i(θ₀_i ⊙ M) trains on its classes and removes ``rate`` of its remaining
    conv weights by |θ| (``prune.scope``); ``M ← ∧_i M_i``; every model rewinds to θ₀_i ⊙ M. The linear layers
    stay dense, so the conv removals alone reach ``round(s·|P|)``, the last round clipped to land on it. Final:
    θ₀ ⊙ M with θ₀'s own (untrained) full-class head, trained on the whole dataset with the mask fixed
    (``retrain``). Channel groups: docs/methods.md §7 item 5. Rounds cost and log to the ``colt`` stage.
    """

    name = "colt"
    granularities = ("weight", "channel")
    Config = COLTConfig

    def partition_model(self, ctx, theta0: dict, head: str, classes: int, i: int) -> nn.Module:
        """θ₀ everywhere except the classifier, which is partition ``i``'s own ``classes``-way head."""
        d = ctx.data
        torch.manual_seed(int(ctx.seeds.generator(f"colt/head{i}").initial_seed()))
        m = build_model(ctx.cfg.student.name, classes, d.channels, d.image_size,
                        model_kwargs(ctx.cfg.student)).to(ctx.device)
        shared = {k: v for k, v in theta0.items() if not k.startswith(head + ".")}
        missing, unexpected = m.load_state_dict(shared, strict=False)
        if unexpected or any(not k.startswith(head + ".") for k in missing):
            raise RuntimeError(f"partition model does not match θ₀ outside {head}: {missing[:3]} {unexpected[:3]}")
        return m

    def run(self, ctx) -> Result:
        c = self.cfg
        full = ctx.seeds.new_model("student", name="init")
        theta0 = clone_state(full)
        head = classifier_name(full, ctx.data.num_classes)
        parts = partition_classes(ctx.data.num_classes, c.partitions)
        models = [self.partition_model(ctx, theta0, head, len(p), i) for i, p in enumerate(parts)]
        thetas, datas = [clone_state(m) for m in models], [partition_data(ctx.data, p) for p in parts]
        progress = ctx.pruner.progress(full, members=models, convs_only=True)

        def kernel():
            """One round in this job: train every partition model on its classes, each removes by its own
            magnitudes, a unit survives only if all keep it, rewind. None when the round was clipped."""
            for i, (model, data) in enumerate(zip(models, datas)):
                ctx.trainer.train(model, c.round, ctx.trainer.objective(), stage="colt", masks=progress.masks_for(i),
                                  data=data)
            with ctx.costs.count(stage="colt"):
                unclipped = progress.common_round([magnitudes(prunable_params(m, ctx.pruner.exclude))
                                                   for m in models], c.rate)
                restore(None)
            return progress.state() if unclipped else None

        def restore(state):
            for i, (model, th) in enumerate(zip(models, thetas)):
                rewind(model, th, progress.masks_for(i))

        spec = round_spec(ctx, "colt", c.round, "method.round", rate=c.rate, partitions=c.partitions, head=head)
        run_rounds(ctx, "colt", progress, kernel, spec, c.rate, trainings=len(models), restore=restore)
        masks = progress.final_masks()  # the ticket: θ₀ ⊙ M with θ₀'s own full-class head
        rewind(full, theta0, masks)
        ctx.evaluator.record_metrics("pruned", full)
        ctx.trainer.train(full, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        return progress.finish(full)

    def budget(self, b) -> None:
        """Per round, a training of every partition model on its classes' share of the training split (a full
        round once per sweep), then the retraining. Data-dependent: the partitions' sizes (taken as equal
        shares of the classes) and where the partitions' intersection clips a round."""
        c = self.cfg
        parts = partition_classes(b.classes, c.partitions)
        key = b.round_key("colt", c.round, rate=c.rate, partitions=c.partitions)
        for r, full in enumerate(b.rounds(c.rate, convs_only=True), start=1):
            if not full or b.first(*key, r):
                for p in parts:
                    b.train("colt", c.round, "method.round", n=round(b.n * len(p) / b.classes))
        b.approximate("colt", "partition sizes taken as equal shares of the classes; rounds as if no "
                              "intersection passed the target")
        b.train("retrain", c.retrain, "method.retrain")
