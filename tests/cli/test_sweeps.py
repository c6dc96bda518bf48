"""Sweeps: a failing job does not end the sweep; W&B offline groups jobs; launcher/sweeper configs compose."""
from __future__ import annotations

import json

import pytest
from conftest import compose_cfg, require_extra
from runs import TINY_CLI, kdprune


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    r = kdprune(["-m", *TINY_CLI, "sparsity=0.5,1.0", "seed=0,1"], tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    recs = {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "multi").glob("*/results.json")}
    assert sorted(recs) == [0, 1, 2, 3]
    ok = [k for k, v in recs.items() if v["status"] == "ok"]
    failed = [k for k, v in recs.items() if v["status"] == "failed"]
    assert len(ok) == 2 and len(failed) == 2
    for k in failed:
        assert recs[k]["sparsity_target"] == 1.0 and "sparsity must be in [0, 1)" in recs[k]["error"]
        assert f"multi/{k}" in r.stderr  # the end-of-sweep summary names the failed jobs
    assert "2 ok, 2 failed" in r.stdout


def test_fail_fast_stops_at_the_first_error(tmp_path):
    r = kdprune(["-m", *TINY_CLI, "sparsity=1.0,0.5", "fail_fast=true"], tmp_path)
    assert r.returncode == 2
    assert not (tmp_path / "multi" / "1" / "results.json").exists()


def test_wandb_offline_one_run_per_job_one_group_no_secret(tmp_path):
    pytest.importorskip("wandb")
    secret = "kdprune-test-secret-0123456789abcdef0123456789abcdef"
    r = kdprune(["-m", *TINY_CLI, "logger=wandb", "logger.mode=offline", "sparsity=0.5,0.8"], tmp_path,
                env_extra={"WANDB_API_KEY": secret, "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads((tmp_path / "multi" / str(i) / "results.json").read_text()) for i in (0, 1)]
    groups = {x["wandb"]["group"] for x in recs}
    ids = {x["wandb"]["id"] for x in recs}
    assert len(groups) == 1 and len(ids) == 2 and all(x["wandb"]["id"] == x["job_id"] for x in recs)
    for i, x in enumerate(recs):
        runs = list((tmp_path / "multi" / str(i) / "wandb").glob(f"offline-run-*-{x['job_id']}"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert secret.encode() not in f.read_bytes(), f


def test_paper_presets_are_multiruns_over_the_papers_grid():
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        cfg = compose_cfg([f"experiment=paper_{ds}"], hydra=True)
        assert cfg.data.name == ds and cfg.hydra.mode.name == "MULTIRUN"
        p = cfg.hydra.sweeper.params
        assert p.method.split(",") == ["cakld", "cakld_ce", "epg", "epsd", "colt"]
        assert p.sparsity.split(",") == ["0.5", "0.7", "0.8", "0.9", "0.95", "0.98"] and p.seed == "0,1,2"
    assert compose_cfg(["method=cakld_ce"]).method.retrain.kd is False


def test_structured_presets_sweep_nuteprune_and_its_intact_teacher_ablation():
    """experiment=structured_<ds>: 7 methods × 3 MACs targets × 3 seeds = 63 jobs; nuteprune_intact is method
    nuteprune with teachers=intact, recorded as the variant "intact teacher" (its own report row)."""
    from kdprune_cli.pruning.methods import get_method
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        cfg = compose_cfg([f"experiment=structured_{ds}"], hydra=True)
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.prune.granularity == "channel"
        p = cfg.hydra.sweeper.params
        methods = p.method.split(",")
        assert methods == ["cakld", "cakld_ce", "magnitude", "snip", "random", "nuteprune", "nuteprune_intact"]
        assert len(methods) * len(p.sparsity.split(",")) * len(p.seed.split(",")) == 63
    variants = {}
    for choice in ("nuteprune", "nuteprune_intact"):
        m = compose_cfg(["experiment=structured_cifar10", f"method={choice}"]).method
        variants[choice] = (m.name, m.teachers, get_method(m.name)(m).variant())
    assert variants == {"nuteprune": ("nuteprune", "snapshots", None),
                        "nuteprune_intact": ("nuteprune", "intact", "intact teacher")}
    quick = compose_cfg(["experiment=quickstart", "method=nuteprune_intact"]).method  # the quick budget applies
    assert quick.prune == compose_cfg(["experiment=quickstart", "method=nuteprune"]).method.prune


@pytest.mark.extras
def test_submitit_launcher_config_composes_when_installed():
    require_extra("hydra_plugins.hydra_submitit_launcher", "slurm")
    cfg = compose_cfg(["hydra/launcher=kdprune_slurm", "experiment=paper_cifar10"], hydra=True)
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.max_num_timeout == 3
    assert "submitit" in cfg.hydra.launcher._target_.lower()


@pytest.mark.extras
def test_optuna_sweeper_config_composes_when_installed():
    require_extra("hydra_plugins.hydra_optuna_sweeper", "optuna")
    cfg = compose_cfg(["hparams_search=cakld_optuna", "experiment=quickstart"], hydra=True)
    assert cfg.hydra.sweeper.direction == "maximize" and "method.alpha" in cfg.hydra.sweeper.params
