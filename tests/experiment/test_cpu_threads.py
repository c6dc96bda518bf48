"""torch's CPU threads follow the cores a job may use (affinity, cgroup quota), OMP_NUM_THREADS or ``threads``."""
from __future__ import annotations

import pytest
import torch

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment import job as runner
from kdprune_cli.experiment.identity import job_id
from kdprune_cli.experiment.record import base_record
from kdprune_cli.experiment.threads import apply_threads, cgroup_quota, resolve_threads, usable_cores
from kdprune_cli.experiment.validate import validate


def test_usable_cores_is_the_affinity_capped_by_the_quota():
    assert usable_cores(affinity=16, quota=None) == 16
    assert usable_cores(affinity=16, quota=2.0) == 2
    assert usable_cores(affinity=16, quota=2.5) == 3  # a partial core still runs a thread
    assert usable_cores(affinity=2, quota=8.0) == 2
    assert usable_cores(affinity=4, quota=0.2) == 1


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_quota(v2) == 2.0
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1) is None
    assert cgroup_quota(tmp_path / "nothing") is None


def test_resolution_order_setting_then_omp_then_cores():
    assert resolve_threads(3, env={"OMP_NUM_THREADS": "8"}, affinity=16) == (3, "threads")
    assert resolve_threads("auto", env={"OMP_NUM_THREADS": "8"}, affinity=16)[0] == 8
    n, why = resolve_threads("auto", env={}, affinity=16, quota=4.0)
    assert n == 4 and "16 CPUs" in why and "quota 4" in why
    assert resolve_threads("auto", env={"OMP_NUM_THREADS": ""}, affinity=2, quota=None)[0] == 2
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ValueError):
            resolve_threads(bad, env={})


def test_threads_is_validated_recorded_and_not_part_of_the_job_identity(tiny_cfg, tmp_path):
    for bad in ("threads=0", "threads=lots", "progress=sometimes"):
        with pytest.raises(ConfigError):
            validate(tiny_cfg(bad))
    before = (torch.get_num_threads(), torch.get_num_interop_threads())
    try:
        record = base_record(tiny_cfg())
        runner._start(tiny_cfg("threads=2", "logger=none"), tmp_path, "g", torch.device("cpu"), record)
        assert record["threads"]["intra_op"] == 2 and record["threads"]["source"] == "threads"
        assert torch.get_num_threads() == 2
        assert apply_threads(1)["intra_op"] == 1
    finally:
        torch.set_num_threads(before[0])
    ids = {"data": "x"}
    assert job_id(tiny_cfg("threads=2"), ids) == job_id(tiny_cfg(), ids)

