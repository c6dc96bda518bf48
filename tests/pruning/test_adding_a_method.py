"""Adding a method takes one file (its typed config, which scorer, which procedure) plus one YAML, and pruning
channel groups comes with it: a toy method defined in a temporary module runs through ``debug=default`` at both
granularities."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_dir

from kdprune_cli.cli.main import config_dir
from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.pruning.methods import REGISTRY, get_method

METHOD = '''
"""Toy: keep the weights farthest from their tensor's mean (an importance made up for this test)."""
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from kdprune_cli.config.schema import MethodConfig, TrainRecipe, option
from kdprune_cli.pruning.procedures.one_shot import OneShot, scoring_params


@torch.no_grad()
def spread(params: dict, power: float) -> dict:
    """The scorer: a pure function of the parameters."""
    return {n: (p - p.mean()).abs() ** power for n, p in params.items()}


@dataclass
class ToyConfig(MethodConfig):
    power: float = option("positive")
    retrain: TrainRecipe = MISSING


class Toy(OneShot):
    name = "toy"
    Config = ToyConfig

    def score(self, ctx, model):
        return spread(scoring_params(ctx, model), self.cfg.power)
'''

YAML = '''
# @package method
defaults:
  - /schema/method/toy@_here_
  - _self_
name: toy
power: 2.0
retrain: {epochs: 1, batch_size: 64, lr: 0.05}
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method's module imported from ``tmp_path`` and its YAML in a config folder there; returns a
    ``compose(*overrides)`` that finds it. The method is unregistered afterwards."""
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(METHOD))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy.yaml").write_text(textwrap.dedent(YAML))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_method")

    def make(*overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "debug=default",
                                                "method=toy", "threads=1", "progress=false",
                                                f"paths.output_dir={tmp_path / 'out'}", *overrides])
    yield make
    REGISTRY.pop("toy", None)
    sys.modules.pop("toy_method", None)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_a_toy_method_runs_at_both_granularities(toy, tmp_path, granularity):
    rec = run_job(toy(f"prune.granularity={granularity}"), tmp_path / granularity, summary=False)
    assert rec["status"] == "ok" and rec["method"] == "toy" and rec["granularity"] == granularity
    assert abs(rec["sparsity_actual"] - 0.9) < 0.01
    assert rec["cost"]["stages"]["score"]["samples"] == 0 and rec["cost"]["stages"]["retrain"]["samples"] > 0
    assert ("structure" in rec) == (granularity == "channel")


def test_a_toy_option_is_checked_by_its_rule(toy):
    with pytest.raises(ConfigError, match="method.power must be a finite number > 0, got -1.0"):
        get_method("toy")(toy("method.power=-1").method)
