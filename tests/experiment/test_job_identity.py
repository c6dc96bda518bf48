"""A job's identity: its config minus what changes no result, and the store version."""
from __future__ import annotations

from kdprune_cli.experiment import identity
from kdprune_cli.experiment.identity import job_id


def test_the_store_version_is_part_of_the_job_id(tiny_cfg, monkeypatch):
    ids = {"data": "x"}
    before = job_id(tiny_cfg(), ids)
    assert job_id(tiny_cfg(), ids) == before  # deterministic
    monkeypatch.setattr(identity, "STORE_VERSION", identity.STORE_VERSION + 1)
    assert job_id(tiny_cfg(), ids) != before  # a finished job of another store version is never reused
