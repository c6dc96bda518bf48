"""Every config composes; validation turns bad input into one clear ConfigError."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg

from kdprune_cli.cli.main import config_dir
from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.validate import validate

CONF = Path(config_dir())


def options(group):
    """The group's options as Hydra lists them: YAML files and the ConfigStore's (datasets, the zoo)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def test_defaults_are_the_documented_ones():
    cfg = compose_cfg()
    assert (cfg.data.name, cfg.teacher.name, cfg.student.name, cfg.method.name) == \
        ("cifar10", "resnet56", "resnet20", "cakld")
    assert cfg.sparsity == 0.9 and cfg.method.retrain.kd is True and cfg.method.gamma == "auto"
    validate(cfg)


@pytest.mark.parametrize("group", ["dataset", "teacher", "student", "method", "logger", "experiment"])
def test_every_option_of_every_group_composes_and_validates(group):
    assert options(group), group
    for opt in options(group):
        cfg = compose_cfg([f"{group}={opt}"])
        validate(cfg)
        cfg = compose_cfg(["experiment=quickstart", f"{group}={opt}"])
        validate(cfg)


def test_quickstart_budget_applies_only_with_the_quickstart_experiment():
    assert compose_cfg(["experiment=quickstart"]).method.retrain.epochs < compose_cfg().method.retrain.epochs
    assert compose_cfg(["experiment=quickstart", "method.retrain.epochs=7"]).method.retrain.epochs == 7


def test_documented_override_spellings_compose():
    cfg = compose_cfg(["dataset=cifar100", "teacher=resnet110", "student=resnet56", "sparsity=0.95",
                       "method.retrain.kd=false"])
    assert cfg.data.name == "cifar100" and cfg.teacher.name == "resnet110" and cfg.method.retrain.kd is False
    cfg = compose_cfg(["dataset=tinyimagenet", "data.root=/data/tiny-imagenet-200", "teacher=resnet50",
                       "student=resnet18"])
    assert cfg.data.root == "/data/tiny-imagenet-200"
    cfg = compose_cfg(["teacher=timm", "teacher.name=timm/resnet10t"])
    validate(cfg)


@pytest.mark.parametrize("override,match", [
    ("sparsity=1.0", "sparsity must be in"),
    ("sparsity=-0.1", "sparsity must be in"),
    ("teacher.train.epochs=-1", "teacher.train.epochs must be >= 0"),
    ("teacher.checkpoint=/no/such/teacher.pt", "does not exist"),
    ("student.name=resnet57", "unknown student model"),
    ("method.name=nope", "unknown method"),
    ("prune.scope=row", "prune.scope"),
    ("data.val_split=1.5", "val_split"),
    ("logger.mode=sometimes", "logger.mode"),
    ("device=tpu", "device must be"),
])
def test_bad_input_is_a_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg([override]))


def test_the_config_layer_imports_no_layer_above_it():
    import ast

    import kdprune_cli.config.schema as config_module

    tree = ast.parse(Path(config_module.__file__).read_text())
    local = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level > 0 or (
        n.module.startswith("kdprune_cli") and not n.module.startswith("kdprune_cli.config")))]
    assert local == [], local


@pytest.mark.parametrize("method", options("method"))
def test_every_method_config_is_typed_and_refuses_a_wrong_type(method):
    """Each method's YAML sits on its typed schema: a wrong-typed value or an unknown key fails at composition."""
    import dataclasses

    from hydra.errors import ConfigCompositionException

    from kdprune_cli.pruning.methods import get_method

    name = compose_cfg([f"method={method}"]).method.name
    fields = [f.name for f in dataclasses.fields(get_method(name).Config)
              if f.type in ("int", "float", "bool", "Optional[int]", int, float, bool)]
    assert fields, method
    for key in [*fields, "retrain.epochs"]:
        with pytest.raises(ConfigCompositionException):
            compose_cfg([f"method={method}", f"method.{key}=abc"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg([f"method={method}", "method.retrain.batch_sise=1"])


def test_open_recipes_follow_the_student():
    for method in ("snip", "grasp", "synflow", "random", "epsd", "epg"):
        cfg = compose_cfg([f"method={method}", "student.train.epochs=33", "student.train.lr=0.05"])
        assert (cfg.method.retrain.epochs, cfg.method.retrain.lr) == (33, 0.05), method
    cfg = compose_cfg(["method=snip", "student.train.epochs=33", "method.retrain.epochs=5"])
    assert (cfg.method.retrain.epochs, cfg.method.retrain.lr) == (5, 0.1)
