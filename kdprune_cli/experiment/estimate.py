"""A sweep's cost before it runs: its jobs in the basic sweeper's order, each job's samples by stage (what its
record's ``cost.stages`` will book), with the dense models, CA-KLD's fine-tuned student and the iterative
methods' full rounds counted once per sweep, as the store shares them; from a rates file, GPU-hours.

The count assumes an empty store (artifacts already stored cost nothing when the sweep runs) and the sweep's
jobs run one after another (with a parallel launcher the same artifacts are made once; which job books them
may differ, the total does not).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.data.sources import get_source
from kdprune_cli.experiment.validate import check_overrides, split_sizes, validate
from kdprune_cli.pruning.budget import Budget
from kdprune_cli.pruning.methods import get_method


@dataclass
class JobCount:
    """One job of the sweep: its overrides, method (the ``method=`` option chosen) and stages; ``counted`` is False
    for a method that cannot count its own stages (then only the dense models are in ``stages``)."""

    overrides: list
    method: str
    sparsity: float
    seed: int
    stages: dict = field(default_factory=dict)  # stage -> Count
    counted: bool = True
    teacher: str = ""
    student: str = ""

    def total(self, key: str) -> int:
        return sum(getattr(c, key) for c in self.stages.values())


def sweep_overrides(config_dir: str, overrides: list) -> list[list[str]]:
    """Every job's overrides, as the basic sweeper makes them: the config's ``hydra.sweeper.params`` (a preset's
    grid) then the command line, each key's values in their order, the product of all keys."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("config", overrides=plain, return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    if "_target_" in sweeper and not sweeper._target_.endswith("BasicSweeper"):
        raise ConfigError(f"kdprune-estimate counts the basic sweeper's grids; {sweeper._target_} (a search) "
                          "chooses its trials as it runs")
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    return BasicSweeper.split_arguments(parser.parse_overrides(params + list(overrides)), None)[0]


def count_job(cfg: DictConfig, overrides: list, made: set) -> JobCount:
    """Validate one job as ``kdprune`` would (raises ConfigError) and count its stages."""
    check_overrides(overrides)
    validate(cfg)
    method = get_method(cfg.method.name)(cfg.method)
    src = get_source(cfg.data.name)
    n, _ = split_sizes(src.train_images, float(cfg.data.val_split))
    b = Budget(cfg, n, src.classes, src.channels, src.size, made)
    b.dense("teacher")
    b.dense("student")
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]  # e.g. cakld_ce, not cakld
    job = JobCount(list(overrides), chosen[-1] if chosen else method.name,
                   float(cfg.sparsity), int(cfg.seed), teacher=cfg.teacher.name, student=cfg.student.name)
    try:
        method.budget(b)
    except NotImplementedError:
        job.counted = False
    job.stages = {k: v for k, v in b.stages.items() if v.samples or v.teacher_samples or not v.exact}
    return job


def count_sweep(config_dir: str, overrides: list) -> list[JobCount]:
    made: set = set()
    jobs = sweep_overrides(config_dir, overrides)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):  # once for the sweep, not per job
        return [count_job(compose("config", overrides=ov), ov, made) for ov in jobs]


def read_rates(path: Path) -> dict:
    """A rates file of ``scripts/bench_train.py --rates``: images per second, ``train`` (forward and backward,
    a training step) and ``forward`` (no gradient) by architecture, and the device they were measured on."""
    try:
        rates = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--rates {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not (isinstance(rates, dict) and isinstance(rates.get("train"), dict) and isinstance(rates.get("forward"), dict)):
        raise ConfigError(f"--rates {path}: not a rates file of scripts/bench_train.py --rates (train/forward)")
    return rates


def _priced(job: JobCount):
    """``(samples, "train", model)`` and ``(teacher samples, "forward", model)`` for each stage: samples at the
    training rate of the network trained (the teacher in its own stage, else the student), teacher samples at
    the forward rate of the network they go through (the teacher, or the student as its own teacher)."""
    for name, c in job.stages.items():
        if c.samples:
            yield c.samples, "train", job.teacher if name == "teacher" else job.student
        if c.teacher_samples:
            yield c.teacher_samples, "forward", job.student if c.self_teacher else job.teacher


def needed_rates(job: JobCount) -> set:
    """The ``(kind, model)`` rates the job is priced at."""
    return {(kind, model) for _, kind, model in _priced(job)}


def gpu_seconds(job: JobCount, rates: dict) -> Optional[float]:
    """The job's seconds at the measured rates (see :func:`_priced`); None when a rate it needs is missing."""
    if any(not rates[kind].get(model) for kind, model in needed_rates(job)):
        return None
    return sum(n / rates[kind][model] for n, kind, model in _priced(job))
