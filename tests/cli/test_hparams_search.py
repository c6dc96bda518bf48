"""Hyper-parameter searches select on a held-out validation split, never on the test split unless asked on the
command line; a failed trial is recorded and the search goes on; best.yaml has the best trial's validation and
test numbers. The tests marked ``extras`` run a real Optuna search (pip install -c constraints.txt '.[optuna]');
`make test-extras` runs them and fails where the plugin is missing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import require_extra
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from runs import kdprune

from kdprune_cli.cli.callbacks import SweepSummary
from kdprune_cli.cli.main import config_dir
from kdprune_cli.config.schema import RunConfig
from kdprune_cli.experiment.search import BEST, objective, search_problem, write_best

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
CONF = Path(config_dir())
QUIET = ["progress=false", "print_config=false"]


def _cfg(*overrides, sweeper=OPTUNA):
    """The quickstart's full config (hydra node included) as a search with ``sweeper`` would see it, composed
    without the plugin: the check runs before any sweeper is instantiated."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", *overrides], return_hydra_config=True)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # plain nodes: the basic sweeper's schema has no direction
    cfg.hydra.sweeper = {"_target_": sweeper, "direction": "maximize"}
    return cfg


def test_a_search_selects_on_validation_and_refuses_the_test_split_unless_asked_on_the_command_line():
    assert OmegaConf.structured(RunConfig).optimized_metric == "metrics_val.final.top1"
    assert search_problem(_cfg("data.val_split=0.1")) is None
    no_val = search_problem(_cfg())
    assert no_val.startswith("optimized_metric=metrics_val.final.top1 needs data.val_split > 0"), no_val
    assert "\n" not in no_val
    # the test split only when the user names it on the command line
    assert search_problem(_cfg("optimized_metric=metrics.final.top1")) is None
    cfg = _cfg("data.val_split=0.1")
    cfg.optimized_metric = "metrics.final.top1"  # e.g. from a preset or an experiment file, not the command line
    assert "is measured on the test split" in search_problem(cfg)
    assert "stage one of" in search_problem(_cfg("data.val_split=0.1", "optimized_metric=metrics_val.last.top1"))
    # Hydra's grid sweeper optimises nothing: no check (a plain multirun needs no validation split)
    assert search_problem(_cfg(sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper")) is None


def test_every_preset_holds_out_a_validation_split_and_seeds_its_sampler():
    sweeper = yaml.safe_load((CONF / "hydra" / "sweeper" / "kdprune_optuna.yaml").read_text())
    assert sweeper["sampler"]["seed"] == "${seed}" and sweeper["max_failure_rate"] == 1.0
    presets = sorted((CONF / "hparams_search").glob("*.yaml"))
    assert presets
    for p in presets:
        conf = yaml.safe_load(p.read_text())
        assert 0 < conf["data"]["val_split"] < 1, p.name
        assert "optimized_metric" not in conf  # the default: the validation split


def test_a_search_without_a_validation_split_stops_in_one_line_before_any_job(tmp_path):
    """Through the real CLI, with the search's sweeper named but not installed: the refusal comes first."""
    r = kdprune(["-m", "experiment=quickstart", "debug=default", *QUIET, f"hydra.sweeper._target_={OPTUNA}"],
                tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert err == ["kdprune: error: optimized_metric=metrics_val.final.top1 needs data.val_split > 0 (a validation "
                   "split held out of the training set), got data.val_split=0.0"], r.stderr
    assert not (tmp_path / "multi").exists() and not (tmp_path / "outputs").exists()


def _job(sweep: Path, n: int, rec: dict, overrides: list) -> Path:
    job = sweep / str(n)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "results.json").write_text(json.dumps(rec))
    return job


def _rec(val_top1, test_top1, status="ok"):
    m = lambda t1: {"final": {"top1": t1, "top5": 100.0, "nll": 0.1, "ece": 0.01}}  # noqa: E731
    return {"status": status, "error": None if status == "ok" else "boom", "metrics": m(test_top1),
            "metrics_val": m(val_top1)}


def test_best_yaml_is_the_best_on_validation_with_its_test_numbers_beside(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, _rec(90.0, 99.0), ["method.alpha=0.1"])  # best on test: must not be chosen
    _job(sweep, 1, _rec(97.0, 95.0), ["method.alpha=0.5"])
    _job(sweep, 2, _rec(99.0, 10.0, status="failed"), ["method.alpha=0.9"])  # failed: never the best
    cfg = _cfg("data.val_split=0.1", f"hydra.sweep.dir={sweep}")
    with pytest.raises(SystemExit) as e:  # a failed trial: the sweep's exit status is 1, after best.yaml
        SweepSummary().on_multirun_end(cfg)
    assert e.value.code == 1
    best = yaml.safe_load((sweep / BEST).read_text())
    assert best["optimized_metric"] == "metrics_val.final.top1" and best["split"] == "val"
    assert best["job"] == "1" and best["value"] == 97.0 and best["overrides"] == ["method.alpha=0.5"]
    assert best["params"] == ["method.alpha=0.5"]  # the command line's overrides (none here) left out
    assert best["final"]["top1"] == {"val": 97.0, "test": 95.0}
    assert best["trials"] == {"ok": 2, "failed": 1}
    out = capsys.readouterr().out
    assert "best trial: job 1, metrics_val.final.top1 = 97" in out and "final top1: val 97 · test 95" in out
    # minimise a validation NLL: the lowest wins
    (sweep / "0" / "results.json").write_text(json.dumps({**_rec(90.0, 99.0), "metrics_val": {"final": {"nll": 0.05}}}))
    cfg.optimized_metric = "metrics_val.final.nll"
    cfg.hydra.sweeper.direction = "minimize"
    assert write_best(sweep, cfg, [sweep / "0", sweep / "1"], 1) is not None
    assert yaml.safe_load((sweep / BEST).read_text())["job"] == "0"


def test_what_a_job_returns_is_the_number_at_the_dotted_path():
    rec = _rec(97.5, 95.0)
    assert objective(rec, "metrics_val.final.top1") == 97.5 and objective(rec, "metrics.final.top1") == 95.0
    assert objective(rec, "metrics_val.final.missing") is None and objective({"metrics": {}}, "metrics_val.final.top1") is None
    assert objective({"status": "ok"}, "status") is None  # not a number


# --- with the Optuna sweeper installed ---------------------------------------------------------------------------
@pytest.mark.extras
def test_the_presets_compose_with_a_seeded_sampler_and_a_validation_split():
    require_extra("hydra_plugins.hydra_optuna_sweeper", "optuna")
    for preset in ("cakld_optuna", "magnitude_optuna"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"hparams_search={preset}", "experiment=quickstart", "seed=7"],
                          return_hydra_config=True)
        sw = cfg.hydra.sweeper
        assert sw.sampler.seed == 7 and "TPESampler" in sw.sampler._target_ and sw.max_failure_rate == 1.0
        assert cfg.data.val_split == 0.1 and cfg.optimized_metric == "metrics_val.final.top1"
        assert search_problem(cfg) is None


@pytest.mark.extras
def test_the_preset_without_a_validation_split_is_refused_in_one_line(tmp_path):
    require_extra("hydra_plugins.hydra_optuna_sweeper", "optuna")
    r = kdprune(["-m", "hparams_search=cakld_optuna", "experiment=quickstart", "debug=default", *QUIET,
                 "data.val_split=0"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdprune: error: optimized_metric=metrics_val.final.top1 needs "
                                               "data.val_split > 0"), r.stderr
    assert not (tmp_path / "multi").exists()
    r = kdprune(["-m", "hparams_search=cakld_optuna", "experiment=quickstart", *QUIET,
                 "optimized_metric=metrics.final.top1", "hydra.sweeper.n_trials=0"], tmp_path)
    assert "kdprune: error" not in r.stderr  # named on the command line: the test split is allowed


@pytest.mark.extras
def test_optuna_search_on_the_quickstart_selects_on_validation_and_survives_a_failing_trial(tmp_path):
    """Three trials; the second fails validation (sparsity 1.0, picked by its job id), the third still runs.
    The study (kept in SQLite to read it back) holds each ok trial's validation top-1, never the test one."""
    optuna = require_extra("optuna", "optuna")
    require_extra("hydra_plugins.hydra_optuna_sweeper", "optuna")
    db = tmp_path / "study.db"
    r = kdprune(["-m", "hparams_search=cakld_optuna", "experiment=quickstart", "debug=default", *QUIET,
                 "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage='sqlite:///{db}'",
                 "+trial_sparsity=[0.5,1.0,0.5]", "sparsity='${trial_sparsity.${hydra:job.id}}'"],
                tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])  # one trial failed: said at the end
    sweep = tmp_path / "multi"
    recs = {n: json.loads((sweep / str(n) / "results.json").read_text()) for n in (0, 1, 2)}
    assert [recs[n]["status"] for n in (0, 1, 2)] == ["ok", "failed", "ok"], [x["error"] for x in recs.values()]
    assert "sparsity must be in [0, 1)" in recs[1]["error"]
    for n in (0, 2):
        rec = recs[n]
        assert rec["config"]["data"]["val_split"] == 0.1 and rec["method"] == "cakld"
        assert set(rec["metrics_val"]) == set(rec["metrics"]) == {"teacher", "dense_student", "pruned", "final"}
    study = optuna.load_study(study_name="cakld", storage=f"sqlite:///{db}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"], states
    for t, n in zip(study.trials, (0, 1, 2)):
        if n != 1:
            assert t.value == recs[n]["metrics_val"]["final"]["top1"]  # what the job returned: validation
            job_overrides = yaml.safe_load((sweep / str(n) / ".hydra" / "overrides.yaml").read_text())
            assert f"method.alpha={t.params['method.alpha']}" in job_overrides
            if n == int(yaml.safe_load((sweep / BEST).read_text())["job"]):
                assert sorted(yaml.safe_load((sweep / BEST).read_text())["params"]) == sorted(
                    f"{k}={v}" for k, v in t.params.items())  # the sampled values, nothing else
    best = yaml.safe_load((sweep / BEST).read_text())
    vals = {n: recs[n]["metrics_val"]["final"]["top1"] for n in (0, 2)}
    assert best["value"] == max(vals.values()) == study.best_value
    assert best["job"] == str(min(n for n in vals if vals[n] == best["value"]))
    won = recs[int(best["job"])]
    assert best["final"]["top1"] == {"val": won["metrics_val"]["final"]["top1"], "test": won["metrics"]["final"]["top1"]}
    assert best["trials"] == {"ok": 2, "failed": 1}
    assert "kdprune: best trial: job" in r.stdout and "2 ok, 1 failed" in r.stdout
