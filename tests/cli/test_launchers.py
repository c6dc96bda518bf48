"""Launchers: a small multirun through the Ray launcher (local instance, 2 CPUs) and through submitit_local,
jobs in parallel on one shared store; every record ok, the teacher trained once. Skipped without the extras
(pip install -c constraints.txt '.[ray,slurm]'); `make test-extras` runs them, failing where a plugin is missing."""
from __future__ import annotations

import json

import pytest
from conftest import compose_cfg, require_extra
from omegaconf import OmegaConf
from runs import kdprune

# debug=default: digits, ResNet-20 pair, 2 batches an epoch, seconds per job on CPU
JOBS = ["experiment=quickstart", "debug=default", "progress=false", "print_config=false", "sparsity=0.5,0.9"]


def _two_jobs_one_teacher(r, tmp_path):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    recs = [json.loads((tmp_path / "multi" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [x["status"] for x in recs] == ["ok", "ok"], [x["error"] for x in recs]
    assert sorted(x["sparsity_target"] for x in recs) == [0.5, 0.9]
    # both jobs asked for the same teacher at once: one trained it, the other waited on its lock and read it
    assert sorted(x["cost"]["stages"]["teacher"]["cached"] for x in recs) == [False, True]
    assert len([p for p in (tmp_path / "store" / "teacher").iterdir() if p.is_dir()]) == 1
    assert recs[0]["metrics"]["teacher"] == recs[1]["metrics"]["teacher"]
    assert "2 ok, 0 failed" in r.stdout


@pytest.mark.extras
def test_ray_launcher_multirun_shares_the_store(tmp_path):
    require_extra("hydra_plugins.hydra_ray_launcher", "ray")
    r = kdprune(["-m", "hydra/launcher=kdprune_ray", "hydra.launcher.ray.init.num_cpus=2",
                 "hydra.launcher.ray.remote.num_gpus=0", *JOBS, f"store.root={tmp_path / 'store'}"], tmp_path,
                env_extra={"OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""})
    _two_jobs_one_teacher(r, tmp_path)


@pytest.mark.extras
def test_submitit_local_multirun_shares_the_store(tmp_path):
    require_extra("hydra_plugins.hydra_submitit_launcher", "slurm")
    r = kdprune(["-m", "hydra/launcher=submitit_local", *JOBS, f"store.root={tmp_path / 'store'}"], tmp_path,
                env_extra={"OMP_NUM_THREADS": "1"})
    _two_jobs_one_teacher(r, tmp_path)


@pytest.mark.extras
def test_ray_launcher_config_composes_when_installed():
    require_extra("hydra_plugins.hydra_ray_launcher", "ray")
    launcher = compose_cfg(["hydra/launcher=kdprune_ray", "experiment=paper_cifar10"], hydra=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.init.address is None and launcher.ray.remote.num_gpus == 0.25  # four jobs per GPU


def test_ray_asking_for_a_gpu_the_local_instance_lacks_is_one_error_line(monkeypatch):
    """Without the check Ray would wait for ever; runs without the extra (it only reads the config)."""
    import torch

    from kdprune_cli.cli.callbacks import ray_gpu_problem
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def launcher(address=None, want=0.25, have=None):
        return OmegaConf.create({"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
                                 "ray": {"init": {"address": address, "num_gpus": have},
                                         "remote": {"num_gpus": want, "num_cpus": 1}}})

    assert "remote.num_gpus=0.25 but the local Ray instance has 0 GPU(s)" in ray_gpu_problem(launcher())
    assert ray_gpu_problem(launcher(want=0)) is None  # CPU jobs
    assert ray_gpu_problem(launcher(address="auto")) is None  # a cluster: its GPUs are not ours to count
    assert ray_gpu_problem(launcher(have=1)) is None
    assert ray_gpu_problem(launcher(want=2, have=1)) is not None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ray_gpu_problem(launcher()) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_gpu_problem(launcher(have=0)) is None
    assert ray_gpu_problem(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})) is None


def test_jobs_starting_together_check_the_store_without_tripping_on_each_other(tmp_path):
    import threading

    from kdprune_cli.store.atomic import check_writable
    errors, start = [], threading.Barrier(2)

    def job():
        start.wait()
        for _ in range(100):
            try:
                check_writable(tmp_path)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert not list(tmp_path.iterdir())  # every probe removed


@pytest.mark.extras
def test_ray_launcher_without_a_gpu_stops_with_one_line(tmp_path):
    require_extra("hydra_plugins.hydra_ray_launcher", "ray")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default num_gpus=0.25 is fine here")
    r = kdprune(["-m", "hydra/launcher=kdprune_ray", *JOBS], tmp_path, env_extra={"RAY_ADDRESS": ""})
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdprune: error: hydra.launcher.ray.remote.num_gpus=0.25"), r.stderr
    assert not (tmp_path / "multi" / "0").exists()  # no job started, and Ray was not waited on
