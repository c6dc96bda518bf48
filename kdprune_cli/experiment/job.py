"""One job: config → data → teacher → dense student → method (score, prune, retrain) → evaluate → record.

A method sees a :class:`Context`: ``cfg``, ``data``, ``device``, ``log`` and small services, one job each (costs,
seeds, trainer, evaluator, artifacts, pruner), and returns a :class:`~kdprune_cli.pruning.methods.base.Result`.
:func:`run_job` validates everything first, then writes ``results.json`` atomically, last (``status: failed``
with the error when anything raises).
"""
from __future__ import annotations

import contextlib
import functools
import json
import pickle
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdprune_cli.config import schema as config
from kdprune_cli.config.schema import ConfigError, model_kwargs, recipe
from kdprune_cli.data import DATASETS, DeviceData, load_data
from kdprune_cli.errors import DivergedError, config_path, non_finite_metrics
from kdprune_cli.training.evaluate import count_flops, evaluate, evaluate_splits, latency_record
from kdprune_cli.experiment.loggers import RunLogger
from kdprune_cli.models import build_model, is_known, model_names
from kdprune_cli.distill.objectives import CrossEntropy
from kdprune_cli.pruning.methods import get_method, method_names
from kdprune_cli.models.modelfile import model_file
from kdprune_cli.models.checkpoint import load_checkpoint, read_error
from kdprune_cli.pruning.masks import assert_masked, check_exclude, sparsity_report
from kdprune_cli.pruning.structure.channels import ChannelGroups
from kdprune_cli.experiment.reuse import describe_model_file, reuse
from kdprune_cli.log import say
from kdprune_cli.experiment.threads import apply_threads
from kdprune_cli.store.files import Store, atomic_save, atomic_write_json, check_writable, clean_orphans, config_hash, defer_while_writing, warn
from kdprune_cli.training.loop import train
from kdprune_cli.pruning.selection import check_reachable, Pruner, check_round_to
from kdprune_cli.experiment.identity import versions, content_ids, job_id, checkpoint_digest


@dataclass
class StageCost:
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

    def __init__(self, stages: Optional[dict] = None, device: Optional[torch.device] = None):
        self.stages, self.current = stages if stages is not None else {}, StageCost()
        self.teacher: Optional[nn.Module] = None  # forwards through it are ``teacher_samples`` (set by the artifacts)
        self.device = device
        self._open: list = []  # CUDA: [stage, its peak before the stages opened inside it], innermost last

    def _cuda(self) -> Optional[torch.device]:
        dev = torch.device(self.device) if self.device is not None else None
        return dev if dev is not None and dev.type == "cuda" and torch.cuda.is_available() else None

    def _memory_enter(self, st: StageCost) -> None:
        dev = self._cuda()
        if dev is None:
            return
        if self._open:  # the outer stage's peak so far is kept before the counter restarts for this one
            self._open[-1][1] = max(self._open[-1][1], int(torch.cuda.max_memory_allocated(dev)))
        torch.cuda.reset_peak_memory_stats(dev)
        self._open.append([st, 0])

    def _memory_exit(self, st: StageCost) -> None:
        dev = self._cuda()
        if dev is None:
            rss = peak_rss_bytes()
            if rss is not None:
                st.peak_rss_bytes, st.memory_kind = max(st.peak_rss_bytes or 0, rss), "process_rss"
            return
        _, before = self._open.pop()
        peak = max(before, int(torch.cuda.max_memory_allocated(dev)))
        st.peak_memory_bytes, st.memory_kind = max(st.peak_memory_bytes or 0, peak), "cuda_allocated"
        if self._open:  # the outer stage goes on: its peak from here on
            torch.cuda.reset_peak_memory_stats(dev)

    @contextlib.contextmanager
    def stage(self, name: str):
        st = self.stages.setdefault(name, StageCost())
        prev, self.current = self.current, st
        self._memory_enter(st)
        t = time.perf_counter()
        try:
            yield st
        finally:
            dt = time.perf_counter() - t
            st.seconds += dt
            prev.seconds -= dt  # a stage opened inside another (evaluate during gmp) is not the outer's time
            self.current = prev
            self._memory_exit(st)

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

        watched = [*models, *([self.teacher] if self.teacher is not None else [])]
        handles = [m.register_forward_pre_hook(hook) for m in watched]
        try:
            with self.stage(stage) if stage else contextlib.nullcontext():
                yield
        finally:
            for h in handles:
                h.remove()


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
                for k in ("samples", "teacher_samples", "compile_seconds", "recompiles", "fallbacks"):
                    setattr(st, k, getattr(st, k) + stats.get(k, 0))
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

    def evaluate(self, model: nn.Module, split: str = "test") -> dict:
        return evaluate(model, self.data, split, self.cfg.eval.batch_size, self.cfg.eval.ece_bins)

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
        self.evaluator, self.store = evaluator, Store(cfg.store.root)
        self.models, self.metrics, self.files = {}, {}, {}  # stage -> state dict, made or read once per job

    def recipe_spec(self, node, where: str) -> dict:
        spec = OmegaConf.to_container(recipe(node, where), resolve=True)
        if spec.get("optimizer") == "sgd":  # the default before the field existed: stored artifacts keep their key
            del spec["optimizer"]
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
        if stage in self.models:
            model = init()
            model.load_state_dict(self.models[stage])
            return model
        with self.costs.stage(stage) as st:
            def create():
                model = init()
                ckpt = self.store.dir(stage, config_hash(spec)) / "partial.pt" if self.cfg.store.enabled else None
                if ckpt is not None and not self.cfg.resume:  # resume=false never reads an earlier attempt's
                    ckpt.unlink(missing_ok=True)
                stats = fit(model, ckpt)
                metrics = self.evaluator.all(model)
                bad = non_finite_metrics(metrics)
                if bad:  # a diverged model is never stored (the store refuses non-finite weights too)
                    raise DivergedError(f"training diverged in stage {stage}: its evaluation gave "
                                        f"{', '.join(bad)}; lower the learning rate")
                return {"model": model.state_dict()}, {"cost": stats, "metrics": metrics}

            state, meta, cached = self.store.get_or_create(stage, spec, create, enabled=self.cfg.store.enabled,
                                                           check=lambda st_: init().load_state_dict(st_["model"]))
            if self.cfg.store.enabled:
                self.files[stage] = str(self.store.dir(stage, config_hash(spec)) / "artifact.pt")
            if self.store.waited > 0:  # waiting for another job to make the artifact is not this stage's work
                st.seconds -= self.store.waited
                st.lock_wait_seconds += self.store.waited
            st.cached = cached
            if cached:
                st.artifact = meta.get("cost")
            else:
                st.samples += meta["cost"]["samples"]
                st.teacher_samples += meta["cost"]["teacher_samples"]
        self.models[stage] = state["model"]
        self.metrics[stage] = meta["metrics"]
        model = init()
        model.load_state_dict(state["model"])
        return model

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
        if self.costs.device is None:
            self.costs.device = device
        self.seeds = Seeds(cfg, data, device)
        self.trainer = Trainer(cfg, data, self.costs, self.seeds, lambda rec: self.log(rec), checkpoints)
        self.evaluator = Evaluator(cfg, data, self.costs)
        self.artifacts = Artifacts(cfg, data, self.costs, self.seeds, self.trainer, self.evaluator)
        self.pruner = Pruner(cfg, data, device)


def _via(service: str, attr: str) -> property:
    """``ctx.<name>`` reads ``ctx.<service>.<attr>``; setting it (a test's spy on ``ctx.train``) sets the service's."""
    return property(lambda ctx: getattr(getattr(ctx, service), attr),
                    lambda ctx, value: setattr(getattr(ctx, service), attr, value))


# Compatibility for tests and user code written against the one-object context: ``ctx.cost["score"]`` reads
# ``ctx.costs.stages["score"]``, ``ctx.train = spy`` replaces ``ctx.trainer.train``. Methods call the services.
ALIASES = {"cost": "costs.stages", "current_stage": "costs.current", "stage": "costs.stage", "count": "costs.count",
           "seed": "seeds.seed", "generator": "seeds.generator", "new_model": "seeds.new_model",
           "train": "trainer.train", "objective": "trainer.objective", "evaluate": "evaluator.evaluate",
           "record_metrics": "evaluator.record_metrics", "metrics": "evaluator.metrics",
           "metrics_val": "evaluator.metrics_val", "store": "artifacts.store", "teacher": "artifacts.teacher",
           "dense_student": "artifacts.dense_student", "cached_model": "artifacts.cached_model",
           "spec": "artifacts.spec", "recipe_spec": "artifacts.recipe_spec", "data_spec": "artifacts.data_spec",
           "artifact_metrics": "artifacts.metrics", "artifact_files": "artifacts.files", "prune": "pruner.prune",
           "sparsity": "pruner.sparsity", "scope": "pruner.scope", "exclude": "pruner.exclude"}
for _old, _new in ALIASES.items():
    setattr(Context, _old, _via(*_new.split(".")))


def job_dir(cfg: DictConfig, job_id: str) -> Path:
    """Where a job keeps its training checkpoints and, once finished, a copy of its record."""
    return Path(cfg.store.root) / "jobs" / job_id


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def base_record(cfg: DictConfig) -> dict:
    method = cfg.method
    retrain = method.get("retrain") or {}
    return {
        "status": "running", "error": None, "job_id": None,
        "dataset": cfg.data.name, "teacher": cfg.teacher.name, "student": cfg.student.name,
        "method": method.get("name"), "method_variant": None, "seed": cfg.seed, "sparsity_target": cfg.sparsity,
        "sparsity_actual": None, "retrain_kd": retrain.get("kd") if isinstance(retrain, DictConfig) else None,
        "metrics": {}, "params": {}, "flops": {}, "cost": {"stages": {}, "total_seconds": None},
        "versions": {}, "device": None,
    }


class Interrupted(BaseException):
    """SIGTERM / SIGUSR1 (a scheduler's warning before a kill or a preemption) during a job."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _interrupt(signum: int):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt():
    """Turn SIGTERM and SIGUSR1 into :class:`Interrupted` (once: a second signal while the job winds down
    is ignored), so the job writes a ``failed`` record and keeps its last checkpoint. A signal that arrives
    during an atomic write (:class:`~kdprune_cli.store.writing`) is raised once the write is complete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGUSR1)

    def handler(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        if not defer_while_writing(lambda: _interrupt(signum)):
            raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_overrides(overrides) -> None:
    """Options the command line must not set: ``method.name`` is chosen by selecting ``method=<name>``."""
    for o in overrides or ():
        key = str(o).split("=", 1)[0].lstrip("+~")
        if key == "method.name":
            raise ConfigError(f"{o}: choose the method with method=<name> (method.name comes from the "
                              f"selected method config, whose settings belong to that method)")


def validate(cfg: DictConfig) -> None:
    """The config's own checks, then the names only the registries know: dataset, models, method, and the
    modules ``prune.exclude`` names (on a model built for the dataset's shape); raises :class:`ConfigError`."""
    config.validate(cfg)
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    for role in ("teacher", "student"):
        if not is_known(cfg[role].name):
            raise ConfigError(f"unknown {role} model {cfg[role].name!r}; choose one of {', '.join(model_names())}")
    if cfg.method.get("name") not in method_names():
        raise ConfigError(f"unknown method {cfg.method.get('name')!r}; choose one of {', '.join(method_names())}")
    if cfg.prune.granularity not in get_method(cfg.method.name).granularities:
        able = [n for n in method_names() if cfg.prune.granularity in get_method(n).granularities]
        raise ConfigError(f"method {cfg.method.name} does not prune at prune.granularity={cfg.prune.granularity} "
                          f"; methods that do: {', '.join(able)}")
    models = {role: runnable_model(cfg, role) for role in ("teacher", "student")}
    for role, model in models.items():  # read and matched now, not after the teacher trained
        if cfg[role].checkpoint is not None:
            load_checkpoint(cfg[role].checkpoint, model, f"{cfg[role].name} for {cfg.data.name}")
    student, (_, channels, size) = models["student"], DATASETS[cfg.data.name]
    example = torch.zeros(1, channels, size, size)
    groups = functools.cache(lambda: ChannelGroups(student, example, cfg.prune.exclude))  # traced once, if asked
    try:
        check_exclude(student, cfg.prune.exclude)
        check_round_to(cfg, groups)
        get_method(cfg.method.name).check_model(student, example)
        if cfg.prune.granularity == "channel" and get_method(cfg.method.name).plans_channels:
            check_reachable(cfg, groups)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def runnable_model(cfg: DictConfig, role: str) -> nn.Module:
    """The ``role`` model built for the dataset's shape and run once on an all-zero batch of two (eval mode,
    no gradient), so a model that cannot be built or cannot run at that size is refused before any work."""
    m = cfg[role]
    classes, channels, size = DATASETS[cfg.data.name]
    kwargs = model_kwargs(m)
    at = f"{cfg.data.name}'s {channels}x{size}x{size} inputs"
    try:
        model = build_model(m.name, classes, channels, size, kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # timm's own failures, e.g. a checkpoint_path kwarg torch refuses to read
        if "checkpoint_path" in kwargs and isinstance(e, (OSError, RuntimeError, pickle.UnpicklingError)):
            raise ConfigError(f"{role}.kwargs.checkpoint_path {kwargs['checkpoint_path']} could not be read: "
                              f"{read_error(e)}") from None
        raise ConfigError(f"{role} model {m.name} cannot be built for {at}: {_error_line(e)}") from None
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, channels, size, size))
    except Exception as e:
        raise ConfigError(f"{role} model {m.name} cannot run on {at}: {_error_line(e)}") from None
    return model.train()


def _finished_record(cfg: DictConfig, jid: str) -> Optional[dict]:
    """The stored record of a finished job with this identity, if any (a damaged one is discarded), with
    ``reused_from``: where it was read."""
    done = job_dir(cfg, jid) / "results.json"
    if not (cfg.resume and cfg.store.enabled and done.is_file()):
        return None
    try:
        previous = json.loads(done.read_text())
        if not isinstance(previous, dict) or "status" not in previous:
            raise ValueError("not a record")
    except (ValueError, OSError) as e:
        warn(f"{done} is damaged ({type(e).__name__}); discarded, the job runs again")
        done.unlink(missing_ok=True)
        return None
    return {**previous, "reused_from": str(done)} if previous["status"] == "ok" else None


def _error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__


def run_job(cfg: DictConfig, run_dir: Path, group: str = "single", summary: bool = True,
            overrides=(), on_valid: Optional[Callable[[], None]] = None) -> dict:
    """Run one job and write ``results.json`` into ``run_dir`` (also on failure). Returns the record.

    The run folder's record is written last, after the store copy, the checkpoint clean-up and the logger
    have finished, so ``status: ok`` on disk means everything succeeded. Bad input (``overrides`` are the
    command-line overrides) raises :class:`ConfigError` before any data is read or any training runs;
    ``on_valid()`` is called once the config has passed validation (the CLI prints the config tree there).
    """
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    record = base_record(cfg)
    logger = None
    ctx = None
    with signals_interrupt():
        try:
            check_overrides(overrides)
            validate(cfg)
            method = get_method(cfg.method.name)(cfg.method)
            try:
                method.validate()
            except (TypeError, ValueError) as e:  # a value of the wrong type met a comparison
                raise e if isinstance(e, ConfigError) else ConfigError(f"method: {e}") from None
            record["method_variant"] = method.variant()
            device = resolve_device(cfg.device)
            if on_valid is not None:
                on_valid()
            check_writable(run_dir)
            if cfg.store.enabled:
                check_writable(Path(cfg.store.root))
                clean_orphans(cfg.store.root)
            record["job_id"] = job_id(cfg, content_ids(cfg))
            previous = _finished_record(cfg, record["job_id"])
            reused = None
            if previous is not None:  # a finished job is not run again: its model and results are reused
                previous.setdefault("method_variant", method.variant())  # a record from before the field
                reused = reuse(cfg, previous, Path(previous["reused_from"]), run_dir, group, t_start)
            if reused is not None:
                record = reused
            else:
                logger = _start(cfg, run_dir, group, device, record)
                ctx = _context(cfg, device, logger, record)
                _run(ctx, method, record, run_dir)
                _complete(record, cfg, ctx, t_start)
                if cfg.store.enabled and cfg.resume:
                    jd = job_dir(cfg, record["job_id"])
                    atomic_write_json(record, jd / "results.json")
                    for ck in jd.glob("*.pt"):  # the record is kept; the training checkpoints are not needed
                        ck.unlink()
                logger.finish(record)
                logger = None
        except BaseException as e:  # also KeyboardInterrupt and signals: the record says the job did not finish
            record["status"] = "failed"
            record["error"] = _error_line(e)
            _complete(record, cfg, ctx, t_start)
            if logger is not None:
                with contextlib.suppress(Exception):
                    logger.finish(record)
            with contextlib.suppress(OSError):  # an unwritable run folder cannot take the record either
                atomic_write_json(record, run_dir / "results.json")
            raise
        atomic_write_json(record, run_dir / "results.json")
    if summary:
        print_summary(record, run_dir)
    return record


def _start(cfg: DictConfig, run_dir: Path, group: str, device: torch.device, record: dict) -> RunLogger:
    record["versions"] = versions()
    record["threads"] = apply_threads(cfg.get("threads", "auto"))
    record["device"] = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    logger = RunLogger(cfg, run_dir, record["job_id"], group)
    if logger.wandb_info:
        record["wandb"] = logger.wandb_info
    return logger


def _context(cfg: DictConfig, device: torch.device, logger: RunLogger, record: dict) -> Context:
    costs = Costs(device=device)
    with costs.stage("data"):
        data = load_data(cfg.data, device)
    ckpts = job_dir(cfg, record["job_id"]) if cfg.resume and cfg.store.enabled else None  # training checkpoints
    return Context(cfg, data, device, log=logger.log, costs=costs, checkpoints=ckpts)


def _run(ctx: Context, method, record: dict, run_dir: Path) -> None:
    """Teacher → dense student → the method → evaluate; fills ``record`` (status ``ok`` at the end)."""
    cfg, data = ctx.cfg, ctx.data
    record["retrain_kd"] = method.retrain_kd
    art, ev, exclude = ctx.artifacts, ctx.evaluator, ctx.pruner.exclude
    art.teacher()
    art.dense_student()
    for role in ("teacher", "student"):
        ev.record_metrics("teacher" if role == "teacher" else "dense_student", None, cached=art.metrics[role])

    result = method.run(ctx)
    model, masks = result.model, result.masks
    assert_masked(model, masks)
    ev.record_metrics("final", model)
    bad = non_finite_metrics({**ev.metrics, **{f"{k} (val)": v for k, v in ev.metrics_val.items()}})
    if bad:  # never an ok record (or a saved model) with NaN metrics
        raise DivergedError(f"training diverged: the evaluation gave {', '.join(bad)}; lower the learning rate")
    dense = art.dense_student()
    sp = sparsity_report(model, exclude, reference=dense)
    shape = (data.channels, data.image_size, data.image_size)
    final_flops = count_flops(model, shape, exclude)
    record.update({
        "granularity": "channel" if "structure" in result.facts else cfg.prune.granularity,
        "sparsity_actual": sp["global"],
        "sparsity_per_layer": sp["per_layer"],
        "params": {"prunable": sp["prunable"], "nonzero": sp["nonzero"],
                   "total": sum(p.numel() for p in model.parameters()),
                   "total_dense": sum(p.numel() for p in dense.parameters())},
        # MACs for one input (Conv2d/Linear and attention's products): the dense student's, the final model's
        # with zero weights skipped, and the final model's as it runs (fewer only when channels were removed)
        "flops": {"dense": count_flops(dense, shape, exclude)["dense"], "sparse": final_flops["sparse"],
                  "executed": final_flops["dense"]},
    })
    if cfg.eval.latency:
        with ctx.costs.stage("latency"):
            record["latency"] = latency_record({"dense_student": dense, "final": model}, shape,
                                               int(cfg.eval.latency_batch), int(cfg.eval.latency_iters),
                                               cfg.eval.latency_compile)
    record.update(result.facts)
    arch = {"name": cfg.student.name, "num_classes": data.num_classes, "in_channels": data.channels,
            "image_size": data.image_size, "kwargs": model_kwargs(cfg.student)}
    atomic_save(model_file(model, arch, OmegaConf.to_container(cfg.data, resolve=True), masks, role="final",
                           granularity=cfg.prune.granularity, artifacts=art.files,
                           teacher=cfg.teacher.name, teacher_kwargs=model_kwargs(cfg.teacher)), run_dir / "model.pt")
    record["checkpoint"] = str(run_dir / "model.pt")
    record["model_file"] = describe_model_file(run_dir / "model.pt")  # path, bytes, sha256 (checked on reuse)
    record["status"] = "ok"


def _complete(record: dict, cfg: DictConfig, ctx: Optional[Context], t_start: float) -> None:
    """Metrics, per-stage cost, total time and the config into ``record`` (not for a reused record)."""
    if "reused_from" in record:
        return
    if ctx is not None:
        record["metrics"] = ctx.evaluator.metrics
        if ctx.evaluator.metrics_val:
            record["metrics_val"] = ctx.evaluator.metrics_val
        optional = ("lock_wait_seconds", "compile_seconds", "recompiles", "fallbacks")  # shown when not 0
        record["cost"]["stages"] = {k: {kk: vv for kk, vv in asdict(v).items()
                                        if vv is not None and not (kk in optional and vv == 0)}
                                    for k, v in ctx.costs.stages.items()}
    record["cost"]["total_seconds"] = time.perf_counter() - t_start
    record["config"] = OmegaConf.to_container(cfg, resolve=False)


DEFAULT_TOLERANCE = 0.01  # how far the achieved fraction may miss the target where the record states no tolerance


def _frac(x) -> str:
    return "?" if not isinstance(x, (int, float)) else f"{x:.4f}"


def pruned_amount(record: dict) -> tuple[str, Optional[str]]:
    """The headline's account of what was pruned, in the unit that was asked for (``prune.target``: params or
    MACs; achieved vs target, the other unit beside it), and a warning line when the achieved fraction misses
    the target by more than the plan's ``tolerance`` (``structure.tolerance``; 0.01 where none is recorded)."""
    target = record.get("sparsity_target")
    st = record.get("structure") if isinstance(record.get("structure"), dict) else None
    if st is not None and st.get("target") in ("params", "macs") and isinstance(st.get("achieved"), (int, float)):
        kind, other = st["target"], "macs" if st["target"] == "params" else "params"
        asked = st.get("requested", target)
        unit = {"params": "params", "macs": "MACs"}
        text = (f"{unit[kind]} removed {_frac(st['achieved'])} (target {asked:g}), "
                f"{unit[other]} removed {_frac(st.get(f'{other}_removed'))}")
        got, tol = st["achieved"], st.get("tolerance", DEFAULT_TOLERANCE)
    else:  # weight granularity: the fraction of prunable weights that are zero
        kind, asked, got, tol = "params", target, record.get("sparsity_actual"), DEFAULT_TOLERANCE
        text = f"params pruned {_frac(got)} (target {asked:g})"
    warning = None
    if isinstance(got, (int, float)) and isinstance(asked, (int, float)) and abs(got - asked) > tol + 1e-9:
        warning = (f"asked for {asked:g} of the {kind} removed, got {got:.4f} ({got - asked:+.4f}, more than the "
                   f"tolerance {tol:.4f}); see `structure` in the record")
    return text, warning


def _cell(x, nd: int) -> str:
    """A summary cell: fixed decimals for ordinary values, 3 significant digits past 1e5 (never wider than 9)."""
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"


def print_summary(record: dict, run_dir: Path) -> None:
    method = record["method"] + (f" [{record['method_variant']}]" if record.get("method_variant") else "")
    amount, warning = pruned_amount(record)
    lines = [f"kdprune: {method} on {record['dataset']} "
             f"({record['teacher']} → {record['student']}), {amount}, seed {record['seed']}"]
    lines.append(f"  {'':<14}{'top1':>9}{'top5':>10}{'nll':>10}{'ece':>10}")
    for k in ("teacher", "dense_student", "pruned", "final"):
        m = record["metrics"].get(k)
        if m:
            lines.append(f"  {k:<14}" + "".join(f" {_cell(m.get(c), nd):>{w - 1}}" for c, nd, w in
                                                (("top1", 2, 9), ("top5", 2, 10), ("nll", 3, 10), ("ece", 3, 10))))
    p, f = record["params"], record["flops"]
    line = f"  params {p['nonzero']:,}/{p['prunable']:,} non-zero · MACs {f['sparse']:,}/{f['dense']:,}"
    if record.get("granularity") == "channel":  # physically smaller: what it has and runs
        line += f" · {p['total']:,}/{p['total_dense']:,} parameters and {f['executed']:,} MACs as run"
    lines.append(line)
    cost = record["cost"]
    if cost.get("reused"):
        before = (cost.get("original") or {}).get("total_seconds")
        lines.append(f"  time {cost['total_seconds']:.1f}s (reused"
                     + (f"; the run that made it took {before:.1f}s)" if isinstance(before, (int, float)) else ")"))
    else:
        stages = ", ".join(f"{k} {v['seconds']:.1f}s{' (cached)' if v.get('cached') else ''}"
                           for k, v in cost["stages"].items())
        lines.append(f"  time {cost['total_seconds']:.1f}s: {stages}")
    if record.get("reused_from"):
        mf = record.get("model_file") or {}
        how = "linked" if mf.get("linked") else "copied"
        lines.append(f"  finished earlier with the same config ({record['reused_from']}); not run again: "
                     f"model.pt {how} from {mf.get('source')} (resume=false runs it anew)")
    lines.append(f"  record: {run_dir / 'results.json'}")
    say("\n".join(lines))
    if warning:
        warn(warning)
