"""The services a method sees through its :class:`Context`, one job each: cost booking (:class:`Costs`), seeded
randomness (:class:`Seeds`), training (:class:`Trainer`), evaluation (:class:`Evaluator`) and the cached models
(:class:`Artifacts`); the selection (:class:`~kdprune_cli.pruning.selection.Pruner`) comes from the pruning layer.
A test spies on a service (``ctx.trainer.train = spy``) and the methods and artifacts reach the spy too."""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdprune_cli.config.schema import model_kwargs, recipe
from kdprune_cli.data import DeviceData
from kdprune_cli.distill.objectives import CrossEntropy
from kdprune_cli.errors import DivergedError, config_path, non_finite_metrics
from kdprune_cli.experiment.identity import STORE_VERSION, checkpoint_digest
from kdprune_cli.models import build_model
from kdprune_cli.models.checkpoint import load_checkpoint
from kdprune_cli.pruning.selection import Pruner
from kdprune_cli.store.artifacts import Store
from kdprune_cli.store.digests import config_hash
from kdprune_cli.training.evaluate import evaluate, evaluate_splits
from kdprune_cli.training.loop import train


@dataclass
class StageCost:
    """What one stage cost: a row of the record's ``cost.stages``."""

    seconds: float = 0.0
    samples: int = 0  # samples pushed forward and backward through the network being trained or scored
    teacher_samples: int = 0  # samples pushed forward through a teacher
    cached: bool = False
    artifact: Optional[dict] = None  # for a cached artifact: what it cost when it was made
    lock_wait_seconds: float = 0.0  # waited for another job making the same artifact (not in ``seconds``)
    compile_seconds: float = 0.0  # part of ``seconds``: training steps in which torch.compile compiled
    recompiles: int = 0  # dynamo recompilations during the stage's training
    fallbacks: int = 0  # compiled forwards that ran eagerly (past dynamo's limits); 0 normally
    # Memory, by ``memory_kind``: ``cuda_allocated``, ``peak_memory_bytes`` = the most bytes torch's CUDA allocator
    # held while the stage itself ran (a stage opened inside it is not its memory, as with ``seconds``; the
    # highest of its runs when it runs several times). ``process_rss`` (CPU and other devices): torch tracks no
    # allocations there, so ``peak_rss_bytes`` is the whole process's peak resident set so far when the stage
    # ended (getrusage ru_maxrss): process-wide and monotone over the job, an upper bound, not the stage's own.
    peak_memory_bytes: Optional[int] = None
    peak_rss_bytes: Optional[int] = None
    memory_kind: Optional[str] = None

    def add(self, stats: dict) -> None:
        """Add a training's counts (:func:`~kdprune_cli.training.loop.train`'s stats) to the stage."""
        for k in ("samples", "teacher_samples", "compile_seconds", "recompiles", "fallbacks"):
            setattr(self, k, getattr(self, k) + stats.get(k, 0))


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS);
    None where ``resource`` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


class Costs:
    """Cost accounting: a :class:`StageCost` per stage, the open one ``current``; methods only call :meth:`count`.

    ``device`` decides how memory is booked (see :class:`StageCost`): CUDA's peak allocated bytes per stage, or
    elsewhere the process's peak resident set."""

    def __init__(self, device: Optional[torch.device] = None):
        self.stages, self.current = {}, StageCost()
        self.teacher: Optional[nn.Module] = None  # forwards through it are ``teacher_samples`` (set by the artifacts)
        self.device = device
        self._open: list = []  # CUDA: each open stage's peak before the stages opened inside it, innermost last
        self._watched: set = set()  # ids of the modules an open count() hooks (a nested one does not hook them again)

    def _cuda(self) -> Optional[torch.device]:
        dev = torch.device(self.device) if self.device is not None else None
        return dev if dev is not None and dev.type == "cuda" and torch.cuda.is_available() else None

    @contextlib.contextmanager
    def stage(self, name: str):
        st = self.stages.setdefault(name, StageCost())
        prev, self.current = self.current, st
        dev = self._cuda()
        if dev is not None:
            if self._open:  # the outer stage's peak so far is kept before the counter restarts for this one
                self._open[-1] = max(self._open[-1], int(torch.cuda.max_memory_allocated(dev)))
            torch.cuda.reset_peak_memory_stats(dev)
            self._open.append(0)
        t = time.perf_counter()
        try:
            yield st
        finally:
            dt = time.perf_counter() - t
            st.seconds += dt
            prev.seconds -= dt  # a stage opened inside another (evaluate during gmp) is not the outer's time
            self.current = prev
            if dev is None:
                rss = peak_rss_bytes()
                if rss is not None:
                    st.peak_rss_bytes, st.memory_kind = max(st.peak_rss_bytes or 0, rss), "process_rss"
            else:
                peak = max(self._open.pop(), int(torch.cuda.max_memory_allocated(dev)))
                st.peak_memory_bytes, st.memory_kind = max(st.peak_memory_bytes or 0, peak), "cuda_allocated"
                if self._open:  # the outer stage goes on: its peak from here on
                    torch.cuda.reset_peak_memory_stats(dev)

    @contextlib.contextmanager
    def count(self, *models: nn.Module, stage: Optional[str] = None):
        """Count the samples pushed through ``models`` (and copies made of them meanwhile, e.g. a scoring
        copy) into the open stage, or into ``stage`` (opened here): a forward with gradient is ``samples``, a
        forward without (a self-teacher pass) or through the teacher is ``teacher_samples``."""
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                if module is self.teacher or not torch.is_grad_enabled():
                    self.current.teacher_samples += args[0].shape[0]
                else:
                    self.current.samples += args[0].shape[0]

        watched = {id(m): m for m in (*models, *([self.teacher] if self.teacher is not None else []))
                   if id(m) not in self._watched}
        handles = [m.register_forward_pre_hook(hook) for m in watched.values()]
        self._watched |= set(watched)
        try:
            with self.stage(stage) if stage else contextlib.nullcontext():
                yield
        finally:
            for h in handles:
                h.remove()
            self._watched -= set(watched)


class Seeds:
    """Seeded randomness: every stage draws its own reproducible stream from (seed, name)."""

    def __init__(self, cfg: DictConfig, data: DeviceData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device

    seed = property(lambda self: int(self.cfg.seed))

    def generator(self, name: str, seed: Optional[int] = None) -> torch.Generator:
        """A CPU generator seeded from (seed, name)."""
        s = int(config_hash([self.seed if seed is None else seed, name]), 16) % (2 ** 62)
        return torch.Generator().manual_seed(s)

    def new_model(self, role: str = "student", seed: Optional[int] = None, name: str = "init") -> nn.Module:
        """A freshly initialised ``role`` model, seeded from (seed, role, name)."""
        torch.manual_seed(int(self.generator(f"{role}/{name}", seed).initial_seed()))
        d = self.data
        return build_model(self.cfg[role].name, d.num_classes, d.channels, d.image_size,
                           model_kwargs(self.cfg[role])).to(self.device)


class Trainer:
    """The one trainer: trains with the one loop and books the cost to its stage; the job's training checkpoints
    go to ``checkpoints`` (None: kept nowhere), ``calls`` counts the trainings per stage (rounds)."""

    def __init__(self, cfg: DictConfig, data: DeviceData, costs: Costs, seeds: Seeds, log: Callable[[dict], None],
                 checkpoints: Optional[Path] = None):
        self.cfg, self.data, self.costs, self.seeds = cfg, data, costs, seeds
        self.log, self.checkpoints, self.calls = log, checkpoints, {}

    def objective(self):
        """Plain CE (distilling methods build their objective with the artifacts' teacher)."""
        return CrossEntropy()

    def train(self, model: nn.Module, recipe_node, objective, stage: str, masks: Optional[dict] = None,
              step_hook=None, record: bool = True, data: Optional[DeviceData] = None,
              checkpoint: Optional[Path] = None) -> dict:
        """Train with the one loop; with ``record`` the cost is added to ``stage``.

        ``data`` trains (and evaluates for the log) on other splits than the job's, e.g. COLT's class
        partitions. ``checkpoint``: where to keep the per-epoch training checkpoint (an artifact's own
        ``partial.pt``); by default ``<checkpoints>/<stage>.<n>.pt``."""
        data = data if data is not None else self.data
        r = recipe(recipe_node, stage)
        n = self.calls[stage] = self.calls.get(stage, 0) + 1  # the n-th training of this stage (rounds)
        ev = (lambda m: evaluate(m, data, "test", self.cfg.eval.batch_size, self.cfg.eval.ece_bins))
        checkpoint = checkpoint or (self.checkpoints / f"{stage}.{n}.pt" if self.checkpoints else None)
        with (self.costs.stage(stage) if record else contextlib.nullcontext()) as st:
            stats = train(model, data, r, objective, gen=self.seeds.generator(stage if n == 1 else f"{stage}.{n}"),
                          masks=masks, desc=stage, log=self.log, progress=self.cfg.progress, amp=self.cfg.amp,
                          step_hook=step_hook, evaluate=ev, checkpoint=checkpoint,
                          max_batches=self.cfg.get("max_batches"), compile=self.cfg.get("compile", "auto"),
                          where=config_path(recipe_node))
            if record:
                st.add(stats)
        return stats

    def skip_trainings(self, stage: str, n: int = 1) -> None:
        """Count ``n`` trainings of ``stage`` that a stored artifact stands in for (a shared round of an
        iterative method), so the next training of ``stage`` draws the generator stream and uses the
        checkpoint it would have had if they had run."""
        self.calls[stage] = self.calls.get(stage, 0) + int(n)


class Evaluator:
    """Evaluation: a model's metrics, and the record's ``metrics`` (test) and ``metrics_val`` (held out)."""

    def __init__(self, cfg: DictConfig, data: DeviceData, costs: Costs):
        self.cfg, self.data, self.costs, self.metrics, self.metrics_val = cfg, data, costs, {}, {}

    def all(self, model: nn.Module) -> dict:
        """Test and, if held out, validation metrics, with the calibration of :func:`evaluate_splits`."""
        splits = ("test",) if self.data.val is None else ("test", "val")
        return evaluate_splits(model, self.data, splits, self.cfg.eval.batch_size, self.cfg.eval.ece_bins)

    def record_metrics(self, key: str, model: nn.Module, cached: Optional[dict] = None) -> None:
        """Put test (and validation, if held out) metrics of ``model`` into the record under ``key``."""
        with self.costs.stage("evaluate"):
            m = cached or self.all(model)
        self.metrics[key] = m["test"]
        if "val" in m:
            self.metrics_val[key] = m["val"]


class Artifacts:
    """The cached models: the dense teacher and student, and any cached stage (trained once per spec, then read);
    ``metrics`` and ``files``: each dense artifact's test (and val) metrics and the file it was read from."""

    def __init__(self, cfg: DictConfig, data: DeviceData, costs: Costs, seeds: Seeds, trainer: Trainer,
                 evaluator: Evaluator):
        self.cfg, self.data, self.costs, self.seeds, self.trainer = cfg, data, costs, seeds, trainer
        self.evaluator, self.store = evaluator, Store(cfg.store.root, version=STORE_VERSION)
        self.models, self.metrics, self.files = {}, {}, {}  # stage -> state dict, made or read once per job

    def recipe_spec(self, node, where: str) -> dict:
        """What determines a training: the recipe, and the batch cap when the config sets one."""
        spec = OmegaConf.to_container(recipe(node, where), resolve=True)
        if self.cfg.get("max_batches") is not None:  # a capped training is another artifact
            spec["max_batches"] = self.cfg.max_batches
        return spec

    def data_spec(self) -> dict:
        """What determines the data: the content fingerprint of the cached tensors, split and augmentation."""
        d = self.cfg.data
        return {"name": d.name, "fingerprint": self.data.fingerprint, "val_split": d.val_split,
                "split_seed": d.split_seed, "crop_padding": d.crop_padding, "flip": d.flip}

    def spec(self, role: str) -> dict:
        """What determines the dense ``role`` model: data, architecture, recipe and seed, or the checkpoint's
        bytes (a new file at the same path is a new model)."""
        m = self.cfg[role]
        if m.checkpoint is not None:
            return {"checkpoint_sha256": checkpoint_digest(self.cfg, m.checkpoint), "name": m.name}
        kw = model_kwargs(m)
        return {"data": self.data_spec(), "name": m.name, **({"kwargs": kw} if kw else {}), "seed": m.seed,
                "recipe": self.recipe_spec(m.train, f"{role}.train")}

    def cached_model(self, stage: str, spec: dict, init: Callable[[], nn.Module],
                     fit: Callable[[nn.Module, Optional[Path]], dict]) -> nn.Module:
        """Return the model of a cached stage, making it (``fit(init(), checkpoint)``) once if it is not stored.

        ``checkpoint`` is the artifact's own training checkpoint (``partial.pt`` beside it; None without a
        store), so a killed job's artifact resumes whichever job asks for it next."""
        if stage not in self.models:
            self._make(stage, spec, init, fit)
        model = init()
        model.load_state_dict(self.models[stage])
        return model

    def _make(self, stage: str, spec: dict, init: Callable[[], nn.Module],
              fit: Callable[[nn.Module, Optional[Path]], dict]) -> None:
        """Read the stage's state from the store or make and store it, booking its cost; keep the state and its
        metrics for :meth:`cached_model`."""
        d = self.store.dir(stage, self.store.key(spec))

        def create():
            model = init()
            ckpt = d / "partial.pt" if self.cfg.store.enabled else None
            if ckpt is not None and not self.cfg.resume:  # resume=false never reads an earlier attempt's
                ckpt.unlink(missing_ok=True)
            stats = fit(model, ckpt)
            metrics = self.evaluator.all(model)
            bad = non_finite_metrics(metrics)
            if bad:  # a diverged model is never stored (the store refuses non-finite weights too)
                raise DivergedError(f"training diverged in stage {stage}: its evaluation gave "
                                    f"{', '.join(bad)}; lower the learning rate")
            return {"model": model.state_dict()}, {"cost": stats, "metrics": metrics}

        with self.costs.stage(stage) as st:
            state, meta, cached = self.store.get_or_create(stage, spec, create, enabled=self.cfg.store.enabled,
                                                           check=lambda st_: init().load_state_dict(st_["model"]))
            if self.cfg.store.enabled:
                self.files[stage] = str(d / "artifact.pt")
            st.seconds -= self.store.waited  # waiting for another job to make the artifact is not this stage's work
            st.lock_wait_seconds += self.store.waited
            st.cached = cached
            if cached:
                st.artifact = meta.get("cost")
            else:
                st.add(meta["cost"])
        self.models[stage] = state["model"]
        self.metrics[stage] = meta["metrics"]

    def _dense(self, role: str) -> nn.Module:
        m = self.cfg[role]
        if m.checkpoint is not None:
            if role not in self.models:
                with self.costs.stage(role):
                    model = self.seeds.new_model(role, name="dense")
                    load_checkpoint(m.checkpoint, model, f"{m.name} for {self.cfg.data.name}")
                    self.files[role] = str(Path(m.checkpoint).expanduser().resolve())
                    self.models[role] = model.state_dict()
                self.metrics[role] = self.evaluator.all(model)
            model = self.seeds.new_model(role, name="dense")
            model.load_state_dict(self.models[role])
            return model
        return self.cached_model(role, self.spec(role), lambda: self.seeds.new_model(role, seed=m.seed, name="dense"),
                                 lambda model, ck: self.trainer.train(model, m.train, CrossEntropy(), stage=role,
                                                                      record=False, checkpoint=ck))

    def teacher(self) -> nn.Module:
        """The trained dense teacher, frozen, in eval mode (trained once per spec, then loaded)."""
        if self.costs.teacher is None:  # the costs book forwards through it as ``teacher_samples``
            self.costs.teacher = self._dense("teacher").eval()
            for p in self.costs.teacher.parameters():
                p.requires_grad_(False)
        return self.costs.teacher

    def dense_student(self) -> nn.Module:
        """A fresh copy of the trained dense student (methods may change it)."""
        return self._dense("student")


class Context:
    """What a method sees: the config, the data, the device, ``log`` (a line into the run's log) and the services;
    ``checkpoints``: where the trainer keeps the job's training checkpoints (None: nowhere)."""

    def __init__(self, cfg: DictConfig, data: DeviceData, device: torch.device,
                 log: Callable[[dict], None] = lambda rec: None, costs: Optional[Costs] = None,
                 checkpoints: Optional[Path] = None):
        self.cfg, self.data, self.device, self.log = cfg, data, device, log
        self.costs = costs or Costs(device=device)
        self.seeds = Seeds(cfg, data, device)
        self.trainer = Trainer(cfg, data, self.costs, self.seeds, lambda rec: self.log(rec), checkpoints)
        self.evaluator = Evaluator(cfg, data, self.costs)
        self.artifacts = Artifacts(cfg, data, self.costs, self.seeds, self.trainer, self.evaluator)
        self.pruner = Pruner(cfg, data, device)
