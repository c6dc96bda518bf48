"""The resolved config as a compact rich tree, printed once the config is valid (``print_config=false``: none)."""
from __future__ import annotations

from typing import Any, Optional, TextIO

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.text import Text
from rich.tree import Tree


def config_tree(cfg: DictConfig) -> Tree:
    """Top-level values, then one branch per group with its ``key: value`` leaves; a node inside a group
    (a training recipe, say) is one leaf in flow style, ``train: {epochs: 15, lr: 0.1, ...}``. No ``hydra``."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a broken interpolation is reported by the run itself; show the config as written
        c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    tree = Tree(Text("config", style="bold"))
    for k, v in sorted(c.items(), key=lambda kv: isinstance(kv[1], dict)):  # top-level values first
        if isinstance(v, dict):
            branch = tree.add(Text(str(k), style="bold"))
            for kk, vv in v.items():
                branch.add(Text(f"{kk}: {_fmt(vv)}"))
        else:
            tree.add(Text(f"{k}: {_fmt(v)}"))
    return tree


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def print_config(cfg: DictConfig, file: Optional[TextIO] = None) -> None:
    Console(file=file, highlight=False).print(config_tree(cfg))
