"""Structured configs (the Hydra schema) and the validation every run passes before any work.

The schema types every field, so Hydra rejects a wrong type at composition; :func:`validate` checks what
types cannot (ranges, names, files) and raises :class:`ConfigError` with one clear line. A method's options
are checked where its config dataclass is made (:class:`MethodConfig`, :func:`method_config`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Bad user input; the message is one line that says what to change."""


@dataclass
class TrainRecipe:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: List[int] = field(default_factory=list)
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    augment: bool = True
    eval_every: int = 1  # evaluate on the test split every n epochs for the log (0 = never)
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adamw (β defaults; momentum and nesterov unused)


@dataclass
class KDRecipe(TrainRecipe):
    kd: bool = True  # retrain with the distillation loss (true) or CE only (false)


def follow_student() -> TrainRecipe:
    """A recipe whose every field follows ``student.train`` by interpolation: the training budget the papers
    leave open is the dense student's (change ``student.train`` and it carries over; override a field with
    ``method.retrain.<field>=...``)."""
    return TrainRecipe(**{f: f"${{student.train.{f}}}" for f in TrainRecipe.__dataclass_fields__})


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _int(v) or isinstance(v, float) and math.isfinite(v)


RULES = {  # an option's rule: (accepts the value, what the refusal says it must be)
    "count": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "count_or_null": (lambda v: v is None or (_int(v) and v > 0), "an integer > 0 or null"),
    "steps": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "nonnegative": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "unit": (lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    "rate": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
    "sparsity": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "several": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
}


def option(rule: str, default: Any = MISSING) -> Any:
    """A method option that must satisfy ``rule`` (:data:`RULES`): ``batch_size: int = option("count")``."""
    return field(default=default, metadata={"rule": rule})


def choice(*allowed: str, default: Any = MISSING) -> Any:
    """A method option that is one of the strings ``allowed``."""
    return field(default=default, metadata={"choices": allowed})


def check_options(obj, where: str) -> None:
    """Check every field of a config dataclass instance by its declared rule or choices; a training recipe
    is checked whole, a nested dataclass field by field. Raises :class:`ConfigError` naming ``where.<field>``."""
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), f"{where}.{f.name}"
        if isinstance(v, TrainRecipe):
            _check_recipe(v, name)
        elif dataclasses.is_dataclass(v):
            check_options(v, name)
        elif "rule" in f.metadata:
            accepts, what = RULES[f.metadata["rule"]]
            if not accepts(v):
                raise ConfigError(f"{name} must be {what}, got {v!r}")
        elif "choices" in f.metadata:
            one_of(name, v, f.metadata["choices"])


def one_of(name: str, value: Any, allowed: tuple, lower: bool = False) -> None:
    """Raise :class:`ConfigError` ``<name> must be a, b or c, got <value>`` unless the value (with ``lower``:
    its text in lower case, so YAML's ``true`` passes as ``"true"``) is one of ``allowed``."""
    if (str(value).lower() if lower else value) not in allowed:
        raise ConfigError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")


@dataclass
class MethodConfig:
    """Typed config of a method: each method file subclasses it. Field types, each option's rule
    (:func:`option`, :func:`choice`) and defaults only where a value follows another part of the config; the
    values live in ``conf/method/<name>.yaml``, whose defaults list starts with
    ``/schema/method/<name>@_here_``, so a wrong type or an unknown key fails at composition.

    An instance is checked once, when it is made (``__post_init__``): every option by its rule, then the rules
    between options that a subclass adds by extending ``__post_init__``."""
    name: str = MISSING

    def __post_init__(self) -> None:
        check_options(self, "method")


def method_config(cls: type, node: Any) -> Any:
    """``node`` (the composed ``method`` node, or a mapping of all its options) as a checked ``cls`` instance.
    Its training recipes stay config nodes, so that the trainer's errors name them (``method.retrain.lr``)."""
    if isinstance(node, cls):
        return node
    if not (isinstance(node, DictConfig) and OmegaConf.get_type(node) is cls):
        node = OmegaConf.merge(OmegaConf.structured(cls), node)
    obj = OmegaConf.to_object(node)
    for f in dataclasses.fields(obj):
        if isinstance(getattr(obj, f.name), TrainRecipe):
            setattr(obj, f.name, node[f.name])
    return obj


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "./data"
    download: bool = False
    verify_checksums: bool = True  # CIFAR: check the official md5 sums (false for re-packed subsets)
    cache_dir: str = "${store.root}/data"
    val_split: float = 0.0
    split_seed: int = 0
    crop_padding: int = 4
    flip: bool = True


@dataclass
class ModelConfig:
    name: str = "resnet20"
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm only: timm.create_model's kwargs (e.g. patch_size)
    checkpoint: Optional[str] = None  # load instead of training
    seed: int = 0
    train: TrainRecipe = field(default_factory=TrainRecipe)


@dataclass
class PruneConfig:
    scope: str = "global"  # global | layer
    exclude: List[str] = field(default_factory=list)
    granularity: str = "weight"  # weight (masks) | channel (coupled channel groups, physically removed)
    target: str = "params"  # channel: sparsity is the fraction of prunable weights (params) or of MACs removed
    reduce: str = "mean"  # channel: a channel's importance is the mean | sum of its weights' scores
    normalize: str = "mean"  # channel: each group's importances / their mean | max | sum, standarization, none
    max_group_ratio: float = 0.9  # channel: no group loses more than this fraction of its channels
    min_channels: int = 4  # channel: no group keeps fewer channels (a group with fewer keeps all)
    round_to: int = 1  # channel: keep a multiple of this many channels in every group (e.g. 8 or 16)


@dataclass
class LoggerConfig:
    name: str = "csv"  # none | csv | wandb
    project: str = "kdprune"
    entity: Optional[str] = None
    mode: str = "online"  # online | offline | disabled (wandb)
    group: Optional[str] = None  # default: the sweep folder's name, else the experiment name
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    """Machine-specific folders (conf/paths/, overridden per machine by conf/local/default.yaml)."""
    data_dir: str = "${oc.env:KDPRUNE_DATA,./data}"  # datasets (data.root of cifar10/100, tinyimagenet)
    store_dir: str = "${oc.env:KDPRUNE_STORE,outputs/store}"  # content-addressed artifacts (store.root)
    output_dir: str = "outputs"  # run and multirun folders (hydra.run.dir, hydra.sweep.dir)


@dataclass
class StoreConfig:
    root: str = "${paths.store_dir}"
    enabled: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 1000
    ece_bins: int = 15
    latency: bool = False  # time the dense student and the final model (batch 1 and latency_batch)
    latency_batch: int = 256  # the large batch of the latency measurement
    latency_iters: int = 100  # timed iterations per setting (after warm-up)
    latency_compile: str = "auto"  # also time torch.compile'd models: auto (on CUDA) | true | false


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet56"))
    student: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # a method's typed config (MethodConfig subclass), selected by the method group
    prune: PruneConfig = field(default_factory=PruneConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sparsity: float = 0.9
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast on CUDA
    compile: Any = "auto"  # auto | true | false | step: torch.compile the training forward (auto: on CUDA) or step
    progress: Any = "auto"  # auto: progress bars on a terminal only | true: always | false: never
    threads: Any = "auto"  # torch CPU threads: auto (the usable cores, or OMP_NUM_THREADS) | an integer > 0
    fail_fast: bool = False  # multirun: stop at the first failing job
    resume: bool = True  # continue killed jobs from their last epoch; a finished job is not run again
    experiment: Optional[str] = None  # a name for the run's group (set by experiment configs)
    print_config: bool = True  # print the resolved config as a tree once it is valid (a sweep: once)
    max_batches: Optional[int] = None  # at most this many batches per training epoch (null = all; debug)
    detect_anomaly: bool = False  # torch.autograd.set_detect_anomaly(True) for the run (slow; debug)
    optimized_metric: str = "metrics_val.final.top1"  # what a job returns to a search: a dotted path of the record


def register() -> None:
    ConfigStore.instance().store(name="kdprune_schema", node=RunConfig)


NOT_RECIPE = ("kd",)  # switches that live beside a recipe in a method's node
SWITCH = ("auto", "true", "false")  # progress, eval.latency_compile
COMPILE = (*SWITCH, "step")  # compile: step traces the whole training step (kdprune_cli/training/compiling.py)


def recipe(node: Any, where: str) -> DictConfig:
    """A training recipe from a (possibly partial) node or a recipe instance, type-checked against
    :class:`TrainRecipe`."""
    if dataclasses.is_dataclass(node):
        node = OmegaConf.structured(node)
    node = {k: v for k, v in (node or {}).items() if k not in NOT_RECIPE}
    try:
        r = OmegaConf.merge(OmegaConf.structured(TrainRecipe), node)
    except Exception as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    _check_recipe(r, where)
    return r


def _check_recipe(r, where: str) -> None:
    if r.epochs < 0:
        raise ConfigError(f"{where}.epochs must be >= 0, got {r.epochs}")
    if r.batch_size <= 0:
        raise ConfigError(f"{where}.batch_size must be > 0, got {r.batch_size}")
    if not (math.isfinite(r.lr) and r.lr > 0):
        raise ConfigError(f"{where}.lr must be a finite number > 0, got {r.lr}")
    if not (math.isfinite(r.weight_decay) and r.weight_decay >= 0) or not 0 <= r.momentum < 1:
        raise ConfigError(f"{where}: weight_decay must be a finite number >= 0 and momentum in [0, 1)")
    if not (math.isfinite(r.lr_decay) and r.lr_decay >= 0) or not (math.isfinite(r.warmup_epochs)
                                                                    and r.warmup_epochs >= 0):
        raise ConfigError(f"{where}: lr_decay and warmup_epochs must be finite numbers >= 0")
    one_of(f"{where}.schedule", r.schedule, ("cosine", "multistep", "constant"))
    one_of(f"{where}.optimizer", r.optimizer, ("sgd", "adamw"))


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves (``${oc.env:UNSET}`` does not), said with the key it sits under."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key, msg = getattr(e, "full_key", None), (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def validate(cfg: DictConfig) -> None:
    """What the config itself can tell (ranges, choices, files); raises :class:`ConfigError`.

    Names that only the registries know (datasets, models, methods, module names) are checked by
    :func:`kdprune_cli.experiment.validate.validate`, which calls this first: the config layer imports nothing above it.
    """
    check_resolves(cfg)
    for key in ("sparsity", "data.val_split"):
        if not 0.0 <= OmegaConf.select(cfg, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}")
    for role in ("teacher", "student"):
        m = cfg[role]
        if m.checkpoint is not None and not Path(m.checkpoint).expanduser().is_file():
            raise ConfigError(f"{role}.checkpoint {m.checkpoint} does not exist")
        _check_recipe(m.train, f"{role}.train")
    check_prune(cfg.prune)
    check_outputs(cfg)
    if cfg.get("max_batches") is not None and cfg.max_batches <= 0:
        raise ConfigError(f"max_batches must be an integer > 0 or null, got {cfg.max_batches}")
    one_of("compile", cfg.get("compile", "auto"), COMPILE, lower=True)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check_run_options(cfg)


def check_prune(p) -> None:
    """``prune.*``: the selection's options."""
    choices = {"scope": ("global", "layer"), "granularity": ("weight", "channel"), "target": ("params", "macs"),
               "reduce": ("mean", "sum"), "normalize": ("mean", "max", "sum", "standarization", "none")}
    for key, allowed in choices.items():
        one_of(f"prune.{key}", p[key], allowed)
    if not 0.0 < p.max_group_ratio <= 1.0:
        raise ConfigError(f"prune.max_group_ratio must be in (0, 1], got {p.max_group_ratio}")
    for key in ("min_channels", "round_to"):
        if p[key] < 1:
            raise ConfigError(f"prune.{key} must be an integer >= 1, got {p[key]}")
    if p.granularity == "weight" and (p.target != "params" or p.round_to != 1):
        raise ConfigError("prune.target=macs and prune.round_to apply to prune.granularity=channel only")


def check_outputs(cfg: DictConfig) -> None:
    """``eval.*`` and ``logger.*``: what the run measures and where it logs."""
    if cfg.eval.latency_batch <= 0 or cfg.eval.latency_iters <= 0:
        raise ConfigError("eval.latency_batch and eval.latency_iters must be integers > 0")
    one_of("eval.latency_compile", cfg.eval.latency_compile, SWITCH, lower=True)
    one_of("logger", cfg.logger.name, ("none", "csv", "wandb"))
    one_of("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    if cfg.eval.ece_bins <= 0 or cfg.eval.batch_size <= 0:
        raise ConfigError("eval.ece_bins and eval.batch_size must be > 0")


def check_run_options(cfg: DictConfig) -> None:
    """``progress`` and ``threads``: how the run uses the console and the CPU."""
    one_of("progress", cfg.get("progress", "auto"), SWITCH, lower=True)
    t = cfg.get("threads", "auto")
    if str(t).lower() != "auto" and not (isinstance(t, int) and not isinstance(t, bool) and t > 0):
        raise ConfigError(f"threads must be auto or an integer > 0, got {t!r}")


def model_kwargs(model_cfg) -> dict:
    """``<role>.kwargs`` as a plain dict (``{}`` when absent)."""
    kw = model_cfg.get("kwargs") if hasattr(model_cfg, "get") else None
    return OmegaConf.to_container(kw, resolve=True) if isinstance(kw, DictConfig) else dict(kw or {})
