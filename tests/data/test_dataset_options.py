"""Every dataset source is a ``dataset=<name>`` option whose ``data`` node and shape come from the source."""
from __future__ import annotations

import pytest
from conftest import compose_cfg

from kdprune_cli.data import DATASETS, SOURCES, DataError, get_source
from kdprune_cli.experiment.validate import validate


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_is_a_dataset_option(name):
    source = SOURCES[name]
    cfg = compose_cfg([f"dataset={name}"])
    assert cfg.data.name == name and DATASETS[name] == (source.classes, source.channels, source.size)
    for key, value in source.config.items():
        assert cfg.data[key] == value or key == "root"  # root interpolates paths.data_dir
    validate(cfg)


def test_the_known_datasets_and_an_unknown_one():
    assert DATASETS == {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "digits": (10, 1, 8),
                        "tinyimagenet": (200, 3, 64)}
    assert compose_cfg(["dataset=tinyimagenet"]).data.root.endswith("/tiny-imagenet-200")
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of cifar10, "):
        get_source("mnist")
