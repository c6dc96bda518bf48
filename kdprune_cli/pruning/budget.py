"""A job's samples counted before it runs: what each stage will push through its networks, as its record's
``cost.stages`` will book it (``samples``: forward and backward through the network trained or scored;
``teacher_samples``: forward only, through a teacher or the network as its own teacher).

Each method says what its stages do in :meth:`~kdprune_cli.pruning.methods.base.Method.budget`, with the
calls of :class:`Budget` (a training, a scoring pass, a shared artifact or round). ``kdprune-estimate`` walks a
sweep's jobs in order with one ``made`` set, so an artifact or a shared round that an earlier job of the sweep
makes costs a later one nothing, as the store makes it in a sequential sweep.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from kdprune_cli.config.schema import model_kwargs, recipe
from kdprune_cli.data.batching import batch_count
from kdprune_cli.models import build_model
from kdprune_cli.pruning.selection import round_count, weight_targets


@dataclass
class Count:
    """One stage's samples (a row of the record's ``cost.stages``, its sample columns)."""

    samples: int = 0
    teacher_samples: int = 0
    self_teacher: bool = False  # the teacher samples go through the student itself, not the teacher
    exact: bool = True  # False where the count depends on the data (see the stage's ``note``)
    note: Optional[str] = None


class Budget:
    """The stages of one job. ``train_images``: the training split's size after ``data.val_split``;
    ``classes``, ``channels``, ``size``: the dataset's shape; ``made``: keys of the artifacts and rounds the
    sweep's earlier jobs make (shared by every job of a sweep, updated here)."""

    def __init__(self, cfg: DictConfig, train_images: int, classes: int, channels: int, size: int,
                 made: Optional[set] = None):
        self.cfg, self.n, self.classes, self.channels, self.size = cfg, train_images, classes, channels, size
        self.made = made if made is not None else set()
        self.stages: dict[str, Count] = {}

    def stage(self, name: str) -> Count:
        return self.stages.setdefault(name, Count())

    def batches(self, batch_size: int, max_batches: Optional[int] = None, drop_last: bool = False,
                n: Optional[int] = None) -> int:
        """Batches of one pass over the training split (or ``n`` samples), at most ``max_batches``."""
        count = batch_count(self.n if n is None else n, batch_size, drop_last)
        return count if max_batches is None else min(count, int(max_batches))

    def pass_samples(self, batch_size: int, max_batches: Optional[int] = None) -> int:
        """Samples in the first ``max_batches`` batches of a pass (all of them: one pass over the split)."""
        return min(self.n, self.batches(batch_size, max_batches) * batch_size)

    def train(self, stage: str, node, where: str, objective=None, n: Optional[int] = None) -> None:
        """A training with recipe ``node`` booked to ``stage``: full batches only, ``max_batches`` per epoch; the
        ``objective`` class adds its own forwards per trained sample (``teacher_rate``, ``extra_rate``, less its
        ``extra_skip`` first batches)."""
        r = recipe(node, where)
        spe = self.batches(r.batch_size, self.cfg.get("max_batches"), drop_last=True, n=n)
        self.steps(stage, int(r.epochs) * spe, r.batch_size, objective)

    def steps(self, stage: str, steps: int, batch_size: int, objective=None) -> None:
        """``steps`` objective calls on batches of ``batch_size``, with the objective's own forwards."""
        st = self.stage(stage)
        samples = steps * batch_size
        st.samples += samples
        if objective is not None and steps:
            st.teacher_samples += objective.teacher_rate * samples
            st.self_teacher |= bool(objective.teacher_rate and objective.self_teacher)
            st.samples += objective.extra_rate * max(steps - objective.extra_skip, 0) * batch_size

    def forward(self, stage: str, samples: int = 0, teacher_samples: int = 0) -> None:
        st = self.stage(stage)
        st.samples += int(samples)
        st.teacher_samples += int(teacher_samples)

    def approximate(self, stage: str, note: str) -> None:
        """Say that ``stage``'s count depends on the data (it is an estimate, not the number the record books)."""
        st = self.stage(stage)
        st.exact, st.note = False, note

    def first(self, *key) -> bool:
        """Whether the artifact or round named by ``key`` is made by this job (no earlier job of the sweep made
        it); with ``store.enabled=false`` nothing is shared, so every job makes its own."""
        if not self.cfg.store.enabled:
            return True
        k = json.dumps(key, sort_keys=True, default=str)
        if k in self.made:
            return False
        self.made.add(k)
        return True

    def dense(self, role: str) -> None:
        """The dense ``role`` model (``teacher`` or ``student``): a stored artifact, trained once per spec."""
        m = self.cfg[role]
        if m.checkpoint is None and self.first(role, self.dense_key(role)):
            self.train(role, m.train, f"{role}.train")

    def dense_key(self, role: str) -> tuple:
        """What determines the dense ``role`` model (as the store's spec: data, architecture, seed, recipe)."""
        m = self.cfg[role]
        if m.checkpoint is not None:
            return ("checkpoint", str(m.checkpoint))
        return (self.data_key(), m.name, model_kwargs(m), m.seed, self.recipe_key(m.train, f"{role}.train"))

    def data_key(self) -> dict:
        d = OmegaConf.to_container(self.cfg.data, resolve=True)
        return {k: d.get(k) for k in ("name", "root", "val_split", "split_seed", "crop_padding", "flip")}

    def recipe_key(self, node, where: str) -> dict:
        spec = OmegaConf.to_container(recipe(node, where), resolve=True)
        return {**spec, "max_batches": self.cfg.get("max_batches")}

    def round_key(self, method: str, node, **extra) -> tuple:
        """What determines a shared round besides its index (as :func:`~kdprune_cli.pruning.procedures.rounds.
        round_spec`): data, student, seed, the round recipe, scope, exclusions, bf16, the method's options."""
        c = self.cfg
        return (method, self.data_key(), c.student.name, model_kwargs(c.student), c.seed,
                self.recipe_key(node, "method.round"), c.prune.scope, list(c.prune.exclude), c.amp, str(c.device),
                extra)

    def rounds(self, rate: float, convs_only: bool = False) -> list[bool]:
        """Whether each round of an iterative method (IMP, COLT) is full (shared between targets) or clipped
        to this job's target, as :class:`~kdprune_cli.pruning.selection.WeightProgress` runs them; at channel
        granularity round ``r`` plans to ``1 − (1 − rate)^r`` of the target and no round is shared."""
        s = float(self.cfg.sparsity)
        if self.cfg.prune.granularity == "channel":
            r = 1
            while 1 - (1 - rate) ** r < s:
                r += 1
            return [False] * r
        c = self.cfg.student
        model = build_model(c.name, self.classes, self.channels, self.size, model_kwargs(c))
        sizes, _, targets = weight_targets(model, list(self.cfg.prune.exclude), s, self.cfg.prune.scope, convs_only)
        groups = [(sum(sizes[n] for n in names), kk) for names, kk in targets]
        removed, out = [0] * len(groups), []
        while any(r < kk for r, (_, kk) in zip(removed, groups)):
            steps = [round_count(r, size, kk, rate) for r, (size, kk) in zip(removed, groups)]
            out.append(all(full for _, full in steps))
            removed = [count for count, _ in steps]
        return out

