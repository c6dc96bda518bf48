"""A method's options are checked once, when its config dataclass is made: each option by the rule its field
declares, recipes whole, then the rules between options that the config adds in ``__post_init__``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
from conftest import compose_cfg
from omegaconf import MISSING, OmegaConf

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, choice, method_config, option, recipe
from kdprune_cli.pruning.methods import get_method, method_names


@dataclass
class Inner:
    rate: float = option("nonnegative")


@dataclass
class Example(MethodConfig):
    batches: Optional[int] = option("count_or_null")
    steps: int = option("steps")
    lr: float = option("positive")
    share: float = option("unit")
    mode: str = choice("train", "eval")
    inner: Inner = field(default_factory=Inner)
    retrain: TrainRecipe = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "train" and self.batches is None:
            raise ConfigError("method.batches must be set with mode=train")


GOOD = {"name": "example", "batches": None, "steps": 0, "lr": 0.1, "share": 1.0, "mode": "eval",
        "inner": {"rate": 0.0}, "retrain": {"epochs": 1}}


def make(**changes):
    node = OmegaConf.merge(OmegaConf.create(GOOD), OmegaConf.create(changes))
    return method_config(Example, node)


def test_a_good_node_becomes_a_config_instance():
    c = make()
    assert isinstance(c, Example) and isinstance(c.inner, Inner) and c.inner.rate == 0.0
    assert OmegaConf.get_type(c.retrain) is TrainRecipe and c.retrain.epochs == 1  # a node: errors name it
    assert method_config(Example, c) is c


def test_a_composed_recipe_keeps_its_config_path():
    from kdprune_cli.errors import config_path

    method = get_method("snip")(compose_cfg(["method=snip", "student.train.epochs=7"]).method)
    assert config_path(method.cfg.retrain) == "method.retrain" and method.cfg.retrain.epochs == 7


@pytest.mark.parametrize("changes,message", [
    ({"batches": 0}, "method.batches must be an integer > 0 or null, got 0"),
    ({"steps": -1}, "method.steps must be an integer >= 0, got -1"),
    ({"lr": 0.0}, "method.lr must be a finite number > 0, got 0.0"),
    ({"lr": math.inf}, "method.lr must be a finite number > 0, got inf"),
    ({"share": 1.5}, r"method.share must be in \[0, 1\], got 1.5"),
    ({"mode": "test"}, "method.mode must be train or eval, got 'test'"),
    ({"inner": {"rate": math.nan}}, "method.inner.rate must be a finite number >= 0, got nan"),
    ({"retrain": {"lr": 0}}, "method.retrain.lr must be a finite number > 0"),
    ({"retrain": {"batch_size": 0}}, "method.retrain.batch_size must be > 0"),
    ({"mode": "train"}, "method.batches must be set with mode=train"),
])
def test_each_option_is_refused_by_its_rule(changes, message):
    with pytest.raises(ConfigError, match=message):
        make(**changes)


def test_a_recipe_instance_is_a_recipe():
    r = recipe(TrainRecipe(epochs=3, lr=0.05), "method.retrain")
    assert (r.epochs, r.lr, r.batch_size) == (3, 0.05, 128)


@pytest.mark.parametrize("name", method_names())
def test_every_method_yaml_makes_a_checked_config(name):
    cfg = compose_cfg([f"method={name}"])
    method = get_method(name)(cfg.method)
    assert isinstance(method.cfg, get_method(name).Config) and method.cfg.name == name


@pytest.mark.parametrize("name,override,message", [
    ("imp", "method.rate=1.0", r"method.rate must be in \(0, 1\), got 1.0"),
    ("imp", "method.rewind_epoch=-1", "method.rewind_epoch must be an integer >= 0, got -1"),
    ("imp", "method.rewind_epoch=81", r"method.rewind_epoch=81 is past the end of a round \(80 epochs\)"),
    ("imp", "method.round.lr=0", "method.round.lr must be a finite number > 0"),
    ("colt", "method.partitions=1", "method.partitions must be an integer >= 2, got 1"),
    ("colt", "method.rate=0", r"method.rate must be in \(0, 1\), got 0.0"),
    ("gmp", "method.start_from=x", "method.start_from must be dense or init, got 'x'"),
    ("gmp", "method.end=0.0", "method.start and method.end must satisfy 0 <= start < end <= 1, got 0.0, 0.0"),
    ("gmp", "method.frequency=0", "method.frequency must be an integer > 0, got 0"),
    ("gmp", "method.initial_sparsity=1", r"method.initial_sparsity must be in \[0, 1\), got 1.0"),
    ("gmp", "method.retrain.batch_size=0", "method.retrain.batch_size must be > 0"),
    ("synflow", "method.rounds=0", "method.rounds must be an integer > 0, got 0"),
])
def test_iterative_methods_refuse_bad_options_when_made(name, override, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name)(compose_cfg([f"method={name}", override]).method)
