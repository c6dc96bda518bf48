"""A job's identity: its config minus what changes no result, with data and checkpoints named by content."""
from __future__ import annotations

import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdprune_cli import __version__
from kdprune_cli.config.identity import identity_config
from kdprune_cli.data import dataset_fingerprint
from kdprune_cli.store.digests import config_hash, file_digest

# The layout of job ids and artifact keys: raising it makes every stored artifact and finished job another key
# (made anew, never misread) when what a spec means changes.
STORE_VERSION = 2


def checkpoint_digest(cfg: DictConfig, path: str) -> str:
    """The sha256 of a checkpoint file's bytes (hashed once per path, size and mtime; cached in the store)."""
    cache = Path(cfg.store.root) / "digests" if cfg.store.enabled else None
    return file_digest(Path(path).expanduser(), cache_dir=cache)


def versions() -> dict:
    import hydra
    import timm
    import torchvision

    return {"kdprune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "hydra": hydra.__version__}


def content_ids(cfg: DictConfig) -> dict:
    """The content behind the paths of a config: the dataset's fingerprint and each checkpoint's sha256."""
    ids = {"data": dataset_fingerprint(cfg.data)}
    for role in ("teacher", "student"):
        if cfg[role].checkpoint is not None:
            ids[f"{role}_checkpoint"] = checkpoint_digest(cfg, cfg[role].checkpoint)
    return ids


def job_id(cfg: DictConfig, ids: dict) -> str:
    """Deterministic job identity: the resolved config minus what does not change results, with the
    dataset and checkpoints identified by their content (``ids``, see :func:`content_ids`), not their paths,
    and the :data:`STORE_VERSION`."""
    return config_hash({"store_version": STORE_VERSION, "content": ids,
                        "config": identity_config(OmegaConf.to_container(cfg, resolve=True))})
