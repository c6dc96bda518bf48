"""The datasets: one module per dataset in this package, each with a ``SOURCES`` list (see :mod:`.base`).

Every module here is imported, so adding a dataset is one file: its name, shape and ``dataset=<name>`` config
option (registered with Hydra's ConfigStore, group ``dataset``, package ``data``) come from its source.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from hydra.core.config_store import ConfigStore

from kdprune_cli.data.sources.base import DataError, Source, Splits

SOURCES: dict[str, Source] = {}
for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        SOURCES.update((s.name, s) for s in importlib.import_module(f"{__name__}.{_m.name}").SOURCES)

# name -> (num_classes, channels, image_size)
DATASETS: dict[str, tuple[int, int, int]] = {n: (s.classes, s.channels, s.size) for n, s in SOURCES.items()}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return SOURCES[name]


def read_raw(name: str, root: Path, download: bool, verify: bool = True) -> Splits:
    """``((x_train, y_train), (x_test, y_test))`` as uint8 / int64 CPU tensors, through the real readers."""
    return get_source(name).read(Path(root), download, verify)


for _name, _source in SOURCES.items():  # dataset=<name>: the data node (name, root, download, crop_padding, flip)
    ConfigStore.instance().store(group="dataset", name=_name, package="data", node={"name": _name, **_source.config})
