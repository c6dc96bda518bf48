"""One job: config → data → teacher → dense student → method (score, prune, retrain) → evaluate → record.

The :class:`Context` is what a method sees: data, cached teacher and dense student, seeded generators,
the one trainer, the evaluator, and per-stage cost accounting. :func:`run_job` writes ``results.json``
atomically at the end, ``status: failed`` with the error when anything raises.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import __version__
from .config import ConfigError, recipe, validate
from .data import DeviceData, load_data
from .evaluate import count_flops, evaluate, latency_ms
from .loggers import RunLogger
from .models import build_model
from .objectives import CrossEntropy, Distill
from .pruning import get_method
from .pruning.masks import assert_masked, check_exclude, masks_to_cpu, sparsity_report
from .store import Store, atomic_save, atomic_write_json, config_hash
from .train import train


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class StageCost:
    seconds: float = 0.0
    samples: int = 0  # samples pushed forward and backward through the network being trained or scored
    teacher_samples: int = 0  # samples pushed forward through a teacher
    cached: bool = False
    artifact: Optional[dict] = None  # for a cached artifact: what it cost when it was made


@dataclass
class Context:
    cfg: DictConfig
    data: DeviceData
    device: torch.device
    log: Callable[[dict], None] = lambda rec: None
    cost: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    metrics_val: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    job_id: Optional[str] = None  # set by run_job: training checkpoints go to <store>/jobs/<job_id>/

    def __post_init__(self):
        self.store = Store(self.cfg.store.root)
        self.current_stage: StageCost = StageCost()
        self._models: dict = {}
        self._calls: dict = {}  # stage -> number of train() calls so far (iterative methods train repeatedly)
        self._artifact_ckpt: Optional[Path] = None

    def _checkpoint(self, stage: str, n: int) -> Optional[Path]:
        if self._artifact_ckpt is not None:
            return self._artifact_ckpt
        if self.job_id is None or not self.cfg.store.enabled:
            return None
        return job_dir(self.cfg, self.job_id) / f"{stage}.{n}.pt"

    # --- plain facts -------------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        return float(self.cfg.sparsity)

    @property
    def scope(self) -> str:
        return self.cfg.prune.scope

    @property
    def exclude(self) -> list:
        return list(self.cfg.prune.exclude)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def generator(self, name: str, seed: Optional[int] = None) -> torch.Generator:
        """A CPU generator seeded from (seed, name): every stage draws its own reproducible stream."""
        s = int(config_hash([self.seed if seed is None else seed, name]), 16) % (2 ** 62)
        return torch.Generator().manual_seed(s)

    def new_model(self, role: str = "student", seed: Optional[int] = None, name: str = "init") -> nn.Module:
        """A freshly initialised ``role`` model, seeded from (seed, role, name)."""
        torch.manual_seed(int(self.generator(f"{role}/{name}", seed).initial_seed()))
        d = self.data
        return build_model(self.cfg[role].name, d.num_classes, d.channels, d.image_size).to(self.device)

    # --- cost accounting ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str):
        st = self.cost.setdefault(name, StageCost())
        prev, self.current_stage = self.current_stage, st
        t = time.perf_counter()
        try:
            yield st
        finally:
            st.seconds += time.perf_counter() - t
            self.current_stage = prev

    # --- training and evaluation -------------------------------------------------------------------
    def objective(self, kd: bool = False, **kw):
        return self.distill(**kw) if kd else CrossEntropy()

    def distill(self, *, alpha: float, gamma: float, temperature: float, logit_norm: bool) -> Distill:
        return Distill(self.teacher(), alpha=alpha, gamma=gamma, temperature=temperature, logit_norm=logit_norm)

    def train(self, model: nn.Module, recipe_node, objective, stage: str, masks: Optional[dict] = None,
              step_hook=None, record: bool = True, data: Optional[DeviceData] = None) -> dict:
        """Train with the one loop; with ``record`` the cost is added to ``stage``.

        ``data`` trains (and evaluates for the log) on other splits than ``ctx.data``, e.g. COLT's class
        partitions."""
        data = data if data is not None else self.data
        r = recipe(recipe_node, stage)
        n = self._calls[stage] = self._calls.get(stage, 0) + 1  # the n-th training of this stage (rounds)
        ev = (lambda m: evaluate(m, data, "test", self.cfg.eval.batch_size, self.cfg.eval.ece_bins))
        with (self.stage(stage) if record else contextlib.nullcontext()) as st:
            stats = train(model, data, r, objective, gen=self.generator(stage if n == 1 else f"{stage}.{n}"),
                          masks=masks, desc=stage, log=self.log, progress=self.cfg.progress, amp=self.cfg.amp,
                          step_hook=step_hook, evaluate=ev, checkpoint=self._checkpoint(stage, n))
            if record:
                st.samples += stats["samples"]
                st.teacher_samples += stats["teacher_samples"]
        return stats

    def evaluate(self, model: nn.Module, split: str = "test") -> dict:
        return evaluate(model, self.data, split, self.cfg.eval.batch_size, self.cfg.eval.ece_bins)

    def record_metrics(self, key: str, model: nn.Module, cached: Optional[dict] = None) -> None:
        """Put test (and validation, if held out) metrics of ``model`` into the record under ``key``."""
        with self.stage("evaluate"):
            m = cached or self._eval_all(model)
        self.metrics[key] = m["test"]
        if "val" in m:
            self.metrics_val[key] = m["val"]

    def _eval_all(self, model: nn.Module) -> dict:
        out = {"test": self.evaluate(model, "test")}
        if self.data.val is not None:
            out["val"] = self.evaluate(model, "val")
        return out

    # --- artifacts ---------------------------------------------------------------------------------
    def recipe_spec(self, node, where: str) -> dict:
        return OmegaConf.to_container(recipe(node, where), resolve=True)

    def data_spec(self) -> dict:
        d = self.cfg.data
        return {"name": d.name, "val_split": d.val_split, "split_seed": d.split_seed,
                "crop_padding": d.crop_padding, "flip": d.flip}

    def spec(self, role: str) -> dict:
        """What determines the dense ``role`` model: data, architecture, recipe and seed, or a checkpoint."""
        m = self.cfg[role]
        if m.checkpoint is not None:
            p = Path(m.checkpoint).expanduser().resolve()
            st = p.stat()
            return {"checkpoint": str(p), "size": st.st_size, "mtime": st.st_mtime, "name": m.name}
        return {"data": self.data_spec(), "name": m.name, "seed": m.seed,
                "recipe": self.recipe_spec(m.train, f"{role}.train")}

    def cached_model(self, stage: str, spec: dict, init: Callable[[], nn.Module],
                     fit: Callable[[nn.Module], dict]) -> nn.Module:
        """Return the model of a cached stage, making it (``fit(init())``) once if it is not stored."""
        if stage in self._models:
            model = init()
            model.load_state_dict(self._models[stage])
            return model
        with self.stage(stage) as st:
            def create():
                model = init()
                # a killed job resumes this artifact's training from its own folder, whichever job asks next
                if self.cfg.store.enabled:
                    self._artifact_ckpt = self.store.dir(stage, config_hash(spec)) / "partial.pt"
                try:
                    stats = fit(model)
                finally:
                    self._artifact_ckpt = None
                return {"model": model.state_dict()}, {"cost": stats, "metrics": self._eval_all(model)}

            state, meta, cached = self.store.get_or_create(stage, spec, create, enabled=self.cfg.store.enabled)
            st.cached = cached
            if cached:
                st.artifact = meta.get("cost")
            else:
                st.samples += meta["cost"]["samples"]
                st.teacher_samples += meta["cost"]["teacher_samples"]
        self._models[stage] = state["model"]
        self.extra.setdefault("artifact_metrics", {})[stage] = meta["metrics"]
        model = init()
        model.load_state_dict(state["model"])
        return model

    def _dense(self, role: str) -> nn.Module:
        m = self.cfg[role]
        if m.checkpoint is not None:
            if role not in self._models:
                with self.stage(role):
                    model = self.new_model(role, name="dense")
                    load_checkpoint(m.checkpoint, model, f"{m.name} for {self.cfg.data.name}")
                    self._models[role] = model.state_dict()
                self.extra.setdefault("artifact_metrics", {})[role] = self._eval_all(model)
            model = self.new_model(role, name="dense")
            model.load_state_dict(self._models[role])
            return model
        return self.cached_model(role, self.spec(role), lambda: self.new_model(role, seed=m.seed, name="dense"),
                                 lambda model: self.train(model, m.train, CrossEntropy(), stage=role, record=False))

    def teacher(self) -> nn.Module:
        """The trained dense teacher, frozen, in eval mode (trained once per spec, then loaded)."""
        if "_teacher" not in self.extra:
            t = self._dense("teacher").eval()
            for p in t.parameters():
                p.requires_grad_(False)
            self.extra["_teacher"] = t
        return self.extra["_teacher"]

    def dense_student(self) -> nn.Module:
        """A fresh copy of the trained dense student (methods may change it)."""
        return self._dense("student")


def job_dir(cfg: DictConfig, job_id: str) -> Path:
    """Where a job keeps its training checkpoints and, once finished, a copy of its record."""
    return Path(cfg.store.root) / "jobs" / job_id


def load_checkpoint(path: str, model: nn.Module, what: str) -> None:
    """Load a state dict (or ``{"state_dict"|"model": ...}``) with ``weights_only=True``; clear errors."""
    try:
        obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        obj = obj.get("state_dict", obj.get("model"))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [k for k in obj if k not in own]
    shape = [k for k in own if k in obj and obj[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {len(missing)} missing keys "
                              f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
                              f"{len(shape)} of other shape {shape[:2]}")
    model.load_state_dict(obj)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return dev


def versions() -> dict:
    import hydra
    import timm
    import torchvision

    return {"kdprune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "hydra": hydra.__version__}


def job_id(cfg: DictConfig) -> str:
    """Deterministic job identity: the hash of the resolved config minus what does not change results."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("logger", "progress", "store", "experiment", "resume", "fail_fast"):
        c.pop(k, None)
    for k in ("root", "cache_dir", "download", "verify_checksums"):
        c["data"].pop(k, None)
    return config_hash(c)


def base_record(cfg: DictConfig) -> dict:
    method = cfg.method
    retrain = method.get("retrain") or {}
    return {
        "status": "running", "error": None, "job_id": None,
        "dataset": cfg.data.name, "teacher": cfg.teacher.name, "student": cfg.student.name,
        "method": method.get("name"), "seed": cfg.seed, "sparsity_target": cfg.sparsity,
        "sparsity_actual": None, "retrain_kd": retrain.get("kd") if isinstance(retrain, DictConfig) else None,
        "metrics": {}, "params": {}, "flops": {}, "cost": {"stages": {}, "total_seconds": None},
        "versions": {}, "device": None,
    }


def run_job(cfg: DictConfig, run_dir: Path, group: str = "single", summary: bool = True) -> dict:
    """Run one job and write ``results.json`` into ``run_dir`` (also on failure). Returns the record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    record = base_record(cfg)
    logger = None
    ctx = None
    try:
        validate(cfg)
        method = get_method(cfg.method.name)(cfg.method)
        method.validate()
        record["job_id"] = job_id(cfg)
        done = job_dir(cfg, record["job_id"]) / "results.json"
        if cfg.resume and cfg.store.enabled and done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("status") == "ok":  # a finished job is not run again
                record = {**previous, "resumed_from": str(done)}
                return record
        record["retrain_kd"] = method.retrain_kd
        record["versions"] = versions()
        device = resolve_device(cfg.device)
        record["device"] = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        logger = RunLogger(cfg, run_dir, record["job_id"], group)
        if logger.wandb_info:
            record["wandb"] = logger.wandb_info
        cost: dict = {}
        t = time.perf_counter()
        data = load_data(cfg.data, device)
        cost["data"] = StageCost(seconds=time.perf_counter() - t)
        ctx = Context(cfg, data, device, log=logger.log, cost=cost,
                      job_id=record["job_id"] if cfg.resume else None)
        check_exclude(ctx.new_model("student"), ctx.exclude)

        ctx.teacher()
        ctx.dense_student()
        for role in ("teacher", "student"):
            key = "teacher" if role == "teacher" else "dense_student"
            ctx.record_metrics(key, None, cached=ctx.extra["artifact_metrics"][role])

        model, masks = method.run(ctx)
        assert_masked(model, masks)
        ctx.record_metrics("final", model)
        sp = sparsity_report(model, ctx.exclude)
        shape = (data.channels, data.image_size, data.image_size)
        record.update({
            "sparsity_actual": sp["global"],
            "sparsity_per_layer": sp["per_layer"],
            "params": {"prunable": sp["prunable"], "nonzero": sp["nonzero"],
                       "total": sum(p.numel() for p in model.parameters())},
            "flops": count_flops(model, shape, ctx.exclude),
        })
        if cfg.eval.latency:
            record["latency_ms"] = {"pruned": latency_ms(model, shape), "dense": latency_ms(ctx.dense_student(), shape)}
        if "gamma" in ctx.extra:
            record["gamma"] = ctx.extra["gamma"]
        atomic_save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                     "masks": masks_to_cpu(masks), "model": cfg.student.name,
                     "dataset": cfg.data.name}, run_dir / "model.pt")
        record["checkpoint"] = str(run_dir / "model.pt")
        record["status"] = "ok"
    except BaseException as e:  # also KeyboardInterrupt: the record says the job did not finish
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        if ctx is not None:
            record["metrics"] = ctx.metrics
            if ctx.metrics_val:
                record["metrics_val"] = ctx.metrics_val
            record["cost"]["stages"] = {k: {kk: vv for kk, vv in asdict(v).items() if vv is not None}
                                        for k, v in ctx.cost.items()}
        if "resumed_from" not in record:
            record["cost"]["total_seconds"] = time.perf_counter() - t_start
            record["config"] = OmegaConf.to_container(cfg, resolve=False)
        atomic_write_json(record, run_dir / "results.json")
        if record["status"] == "ok" and "resumed_from" not in record and cfg.store.enabled and cfg.resume:
            jd = job_dir(cfg, record["job_id"])
            atomic_write_json(record, jd / "results.json")
            for ck in jd.glob("*.pt"):  # the record is kept; the training checkpoints are no longer needed
                ck.unlink()
        if logger is not None:
            logger.finish(record)
        if summary and record["status"] == "ok":
            print_summary(record, run_dir)
    return record


def print_summary(record: dict, run_dir: Path) -> None:
    lines = [f"kdprune: {record['method']} on {record['dataset']} "
             f"({record['teacher']} → {record['student']}), sparsity {record['sparsity_target']} "
             f"(actual {record['sparsity_actual']:.4f}), seed {record['seed']}"]
    lines.append(f"  {'':<14}{'top1':>8}{'top5':>8}{'nll':>8}{'ece':>8}")
    for k in ("teacher", "dense_student", "pruned", "final"):
        m = record["metrics"].get(k)
        if m:
            lines.append(f"  {k:<14}{m['top1']:>8.2f}{m['top5']:>8.2f}{m['nll']:>8.3f}{m['ece']:>8.3f}")
    p, f = record["params"], record["flops"]
    lines.append(f"  params {p['nonzero']:,}/{p['prunable']:,} non-zero · MACs {f['sparse']:,}/{f['dense']:,}")
    stages = ", ".join(f"{k} {v['seconds']:.1f}s{' (cached)' if v.get('cached') else ''}"
                       for k, v in record["cost"]["stages"].items())
    lines.append(f"  time {record['cost']['total_seconds']:.1f}s: {stages}")
    if record.get("resumed_from"):
        lines.append(f"  finished earlier with the same config ({record['resumed_from']}); not run again "
                     f"(resume=false runs it anew)")
    lines.append(f"  record: {run_dir / 'results.json'}")
    print("\n".join(lines))
