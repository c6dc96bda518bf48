"""lightning-hydra-template conventions: paths/, local/, debug/, hparams_search/, print_config, max_batches."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAFETY_S, TinyNet, compose_cfg, require_extra
from hydra import compose, initialize_config_dir

from kdprune_cli.cli.main import config_dir
from kdprune_cli.config.schema import ConfigError, recipe
from kdprune_cli.experiment.identity import job_id
from kdprune_cli.experiment.validate import validate
from kdprune_cli.training.loop import train

CONF = Path(config_dir())
ROOT = Path(__file__).resolve().parents[2]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["paths", "debug"])
def test_every_option_of_the_new_groups_composes_and_validates(group):
    assert options(group), group
    for opt in options(group):
        validate(compose_cfg([f"{group}={opt}"]))
        validate(compose_cfg(["experiment=quickstart", f"{group}={opt}"]))


@pytest.mark.parametrize("method", options("method"))
def test_debug_is_tiny_for_every_method(method):
    cfg = compose_cfg(["debug=default", f"method={method}"])
    validate(cfg)
    assert cfg.data.name == "digits" and cfg.device == "cpu" and cfg.logger.name == "none"
    assert cfg.max_batches == 2 and cfg.detect_anomaly is True and cfg.resume is False
    assert cfg.teacher.train.epochs == cfg.student.train.epochs == cfg.method.retrain.epochs == 1
    assert cfg.store.root == "outputs/debug/store"  # never the real store
    quick = compose_cfg(["experiment=quickstart", f"method={method}"]).method
    for k, v in cfg.method.items():  # the other stages at the quickstart's scale (conf/method_budget/)
        if k != "retrain" and hasattr(v, "get") and v.get("epochs") is not None:
            assert v.epochs == quick[k].epochs, k


def _old_roots(ds):
    """data.root and store.root as the configs spelled them before paths/ existed."""
    data = os.environ.get("KDPRUNE_DATA", "./data")
    root = {"digits": "./data", "tinyimagenet": f"{data}/tiny-imagenet-200"}.get(ds, data)
    return root, os.environ.get("KDPRUNE_STORE", "outputs/store")


@pytest.mark.parametrize("env", [{}, {"KDPRUNE_DATA": "/d", "KDPRUNE_STORE": "/s"}])
def test_paths_defaults_resolve_to_the_same_folders_as_before(monkeypatch, env):
    for k in ("KDPRUNE_DATA", "KDPRUNE_STORE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for ds in options("dataset"):
        cfg = compose_cfg([f"dataset={ds}"])
        assert (cfg.data.root, cfg.store.root) == _old_roots(ds), ds
        assert cfg.data.cache_dir == f"{cfg.store.root}/data"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        h = compose("config", return_hydra_config=True).hydra
    assert h.run.dir.startswith("outputs/runs/") and h.sweep.dir.startswith("outputs/multirun/")
    cfg = compose_cfg(["dataset=tinyimagenet", "paths.data_dir=/data"])
    assert cfg.data.root == "/data/tiny-imagenet-200"


def test_local_config_is_optional_git_ignored_and_overrides_paths(tmp_path, monkeypatch):
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    assert {"optional local": "default"} in defaults
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=ROOT)
        assert ignored.returncode == 0
        example = subprocess.run(["git", "check-ignore", "-q", "conf/local/example.yaml.txt"], cwd=ROOT)
        assert example.returncode == 1 and (ROOT / "conf/local/example.yaml.txt").is_file()
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /datasets\n  store_dir: /scratch/store\n  output_dir: /scratch/out\n")
    monkeypatch.delenv("KDPRUNE_STORE", raising=False)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=tinyimagenet"], return_hydra_config=True)
        dbg = compose("config", overrides=["debug=default"])
    assert cfg.data.root == "/datasets/tiny-imagenet-200" and cfg.store.root == "/scratch/store"
    assert cfg.hydra.run.dir.startswith("/scratch/out/runs/")
    assert dbg.store.root == "/scratch/out/debug/store"  # debug still keeps off the real store


def test_bookkeeping_keys_leave_the_job_identity_alone_max_batches_does_not():
    base = job_id(compose_cfg(), {})
    for o in ("print_config=false", "detect_anomaly=true", "paths.data_dir=/x", "paths.output_dir=/y",
              "max_batches=null", "compile=false", "prune.granularity=weight", "eval.latency_iters=5"):
        assert job_id(compose_cfg([o]), {}) == base, o
    assert job_id(compose_cfg(["max_batches=2"]), {}) != base
    assert job_id(compose_cfg(["prune.granularity=channel"]), {}) != base


def test_max_batches_must_be_positive():
    with pytest.raises(ConfigError, match="max_batches"):
        validate(compose_cfg(["max_batches=0"]))


def test_max_batches_caps_the_optimizer_steps_of_every_epoch(make_ctx):
    ctx = make_ctx("max_batches=2")
    steps = []
    r = recipe({"epochs": 3, "batch_size": 16, "eval_every": 0, "schedule": "constant"}, "t")
    stats = train(TinyNet(classes=10), ctx.data, r, ctx.trainer.objective(), gen=torch.Generator().manual_seed(0),
                  progress=False, step_hook=lambda s, total: steps.append((s, total)), max_batches=2)
    assert steps == [(s, 6) for s in range(6)] and stats["samples"] == 3 * 2 * 16
    # through the runner, as every method trains: the config's max_batches reaches the loop
    stats = ctx.trainer.train(TinyNet(classes=10), {"epochs": 2, "batch_size": 16, "eval_every": 0},
                              ctx.trainer.objective(), stage="t", record=False)
    assert stats["samples"] == 2 * 2 * 16
    assert ctx.artifacts.recipe_spec({"epochs": 1}, "t")["max_batches"] == 2  # a capped training is its own artifact
    assert "max_batches" not in make_ctx().artifacts.recipe_spec({"epochs": 1}, "t")


def _cli(args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("KDPRUNE_STORE", None)  # debug keeps its own store under ./outputs/debug
    return subprocess.run([sys.executable, "-m", "kdprune_cli.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=SAFETY_S)


def test_debug_runs_in_seconds_and_prints_the_config_tree(tmp_path):
    r = _cli(["debug=default", "progress=false", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "ok" and rec["dataset"] == "digits"
    # "seconds on CPU" as work, not wall-clock (a loaded machine is slow): 2 batches of 64 per training epoch
    stages = rec["cost"]["stages"]
    assert stages["teacher"]["samples"] == stages["student"]["samples"] == stages["retrain"]["samples"] == 2 * 64
    assert "anomaly detection is on" in r.stderr
    assert (tmp_path / "outputs" / "debug" / "store").is_dir()
    out = r.stdout
    assert "config\n├── " in out and "├── sparsity: 0.9" in out and "├── data" in out
    assert "max_batches: 2" in out and "── hydra" not in out
    assert "results.json" in out  # the summary still follows
    # print_config=false: no tree
    r = _cli(["debug=default", "print_config=false", "sparsity=1.0", f"hydra.run.dir={tmp_path}/bad"], tmp_path)
    assert r.returncode == 2 and "sparsity must be in" in r.stderr
    assert "sparsity:" not in r.stdout and "├──" not in r.stdout
    # print_config=true: the tree is printed once the config is valid, so a refused run prints only its line
    r = _cli(["debug=default", "sparsity=1.0", f"hydra.run.dir={tmp_path}/bad2"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["kdprune: error: sparsity must be in [0, 1), got 1.0"]
    assert "├──" not in r.stdout and "config\n" not in r.stdout


def test_hparams_search_presets_replace_method_keys_in_the_sweeper():
    base = yaml.safe_load((CONF / "hydra" / "sweeper" / "kdprune_optuna.yaml").read_text())
    assert "params" not in base and base["direction"] == "maximize"
    assert options("hparams_search") == ["cakld_optuna", "magnitude_optuna"]
    for opt in options("hparams_search"):
        text = (CONF / "hparams_search" / f"{opt}.yaml").read_text()
        assert text.startswith("# @package _global_") and "override /hydra/sweeper: kdprune_optuna" in text
        assert yaml.safe_load(text)["hydra"]["sweeper"]["params"]


@pytest.mark.extras
@pytest.mark.parametrize("preset,method,keys", [
    ("cakld_optuna", "cakld", {"method.alpha", "method.temperature", "method.retrain.lr"}),
    ("magnitude_optuna", "magnitude", {"method.retrain.lr", "method.retrain.weight_decay"}),
])
def test_hparams_search_presets_compose_when_optuna_is_installed(preset, method, keys):
    require_extra("hydra_plugins.hydra_optuna_sweeper", "optuna")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={preset}", "experiment=quickstart"],
                      return_hydra_config=True)
        plain = compose("config", overrides=[f"hparams_search={preset}", "experiment=quickstart"])
    sw = cfg.hydra.sweeper
    assert "optuna" in sw._target_.lower() and sw.direction == "maximize" and set(sw.params) == keys
    assert cfg.method.name == method and cfg.method.retrain.epochs < 20  # the quickstart budget still applies
    validate(plain)
