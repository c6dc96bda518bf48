"""The pruning methods: one module per method, registered by name.

A method module defines a subclass of :class:`~kdprune_cli.pruning.methods.base.Method` with a ``name``; every
module in this package is imported here, so adding a method is one file plus one ``conf/method`` YAML.
"""
from __future__ import annotations

import importlib
import pkgutil

from kdprune_cli.pruning.methods.base import REGISTRY, Method

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def method_names() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return REGISTRY[name]
