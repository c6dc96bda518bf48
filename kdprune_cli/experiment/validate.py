"""Everything a job is checked for before any data is read or any training runs; each refusal is a
:class:`~kdprune_cli.config.schema.ConfigError` with one line saying what is wrong and what would be right."""
from __future__ import annotations

import functools
import pickle

import torch
from omegaconf import DictConfig
from torch import nn

from kdprune_cli.config import schema as config
from kdprune_cli.config.schema import ConfigError, model_kwargs
from kdprune_cli.data import DATASETS, get_source
from kdprune_cli.models import build_model, is_known, model_names
from kdprune_cli.models.checkpoint import load_checkpoint, read_error
from kdprune_cli.models.masks import check_exclude
from kdprune_cli.pruning.methods import get_method, method_names
from kdprune_cli.pruning.selection import check_reachable, check_round_to
from kdprune_cli.pruning.structure.channels import ChannelGroups


def error_line(e: BaseException) -> str:
    """``<type>: <first line of the message>`` (the type alone for an empty message)."""
    return f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__


def resolve_device(name: str) -> torch.device:
    """The torch device ``device=<name>`` names (``auto``: CUDA when there is one); a missing one is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def check_overrides(overrides) -> None:
    """Options the command line must not set: ``method.name`` is chosen by selecting ``method=<name>``."""
    for o in overrides or ():
        key = str(o).split("=", 1)[0].lstrip("+~")
        if key == "method.name":
            raise ConfigError(f"{o}: choose the method with method=<name> (method.name comes from the "
                              f"selected method config, whose settings belong to that method)")


def split_sizes(n: int, val_split: float) -> tuple[int, int]:
    """``(training, validation)`` images when ``val_split`` of ``n`` training images are held out."""
    n_val = int(round(val_split * n)) if val_split > 0 else 0
    return n - n_val, n_val


def check_val_split(data) -> None:
    """A held-out split must leave at least one training batch (one image) and hold at least one image."""
    n = get_source(data.name).train_images
    train, val = split_sizes(n, data.val_split)
    if data.val_split > 0 and (train < 1 or val < 1):
        raise ConfigError(f"data.val_split={data.val_split} leaves {train} of the {n} {data.name} training images "
                          f"for training and {val} for validation; both need at least one")


def validate(cfg: DictConfig) -> None:
    """The config's own checks, then the names only the registries know: dataset, models, method, and the
    modules ``prune.exclude`` names (on a model built for the dataset's shape); raises :class:`ConfigError`."""
    config.validate(cfg)
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    check_val_split(cfg.data)
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
        raise ConfigError(f"{role} model {m.name} cannot be built for {at}: {error_line(e)}") from None
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, channels, size, size))
    except Exception as e:
        raise ConfigError(f"{role} model {m.name} cannot run on {at}: {error_line(e)}") from None
    return model.train()
