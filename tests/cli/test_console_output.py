"""What a user sees: `kdprune --help`, one line for an unknown option or a missing extra, the config tree once
(after validation, once per sweep), quiet W&B, progress bars only on a terminal, and the run's kdprune.log."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAFETY_S, compose_cfg
from hydra.errors import MissingConfigException

from kdprune_cli.cli.main import config_dir, missing_config_line
from kdprune_cli.pruning.methods import method_names

CONF = Path(config_dir())


def _cli(args, cwd, **env_extra):
    env = {**os.environ, "KDPRUNE_STORE": str(Path(cwd) / "store"), **env_extra}
    for k in ("HYDRA_FULL_ERROR", *(k for k, v in env_extra.items() if v is None)):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "kdprune_cli.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _done(p):
    out, err = p.communicate(timeout=SAFETY_S)
    return p.returncode, out, err


def test_help_page_and_one_line_refusals_from_the_cli(tmp_path):
    # started together: each is mostly start-up time
    procs = {"help": _cli(["--help"], tmp_path),
             "schema": _cli(["method=cakld_schema"], tmp_path),
             "nope": _cli(["-m", "method=cakld,nope", "print_config=false"], tmp_path)}
    rc, out, err = _done(procs["help"])
    assert rc == 0, err[-2000:]
    assert "knowledge-distillation-guided pruning" in out and "powered by Hydra" not in out
    groups = {ln.split(":")[0].strip(): ln.split(":", 1)[1] for ln in out.splitlines() if ln.startswith("  ")
              and ":" in ln and ln.split(":")[0].strip() in ("method", "dataset", "experiment", "teacher")}
    assert set(groups) == {"method", "dataset", "experiment", "teacher"}
    assert [o.strip() for o in groups["method"].split(",")] == sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert "_schema" not in out and "method_budget" not in out and "schema/" not in out
    examples = [ln for ln in out.splitlines() if ln.strip().startswith("kdprune ")]
    assert len(examples) >= 5
    assert "kdprune-eval" in out and "kdprune-report" in out
    assert "pip install 'kdprune[optuna]'" in out and "hydra/launcher=kdprune_slurm" in out
    for name in ("schema", "nope"):
        rc, out, err = _done(procs[name])
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        bad = "cakld_schema" if name == "schema" else "nope"
        assert lines[0].startswith(f"kdprune: error: unknown method option '{bad}'; choose one of cakld, ")
        assert "_schema," not in lines[0] and lines[0].endswith(", synflow")
    assert not list(tmp_path.rglob("results.json"))  # no job ran (Hydra checks every job's config first)


def _missing(overrides, plugin, node, via):
    """The exception Hydra raises for ``overrides``; where the plugin is installed here, the one it raises
    without it (the same text: ``In '<via>': Could not load '<node>'.``)."""
    try:
        installed = importlib.util.find_spec(plugin) is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        installed = False
    if not installed:
        with pytest.raises(MissingConfigException) as e:
            compose_cfg(overrides)
        return e.value
    return MissingConfigException(f"In '{via}': Could not load '{node}'.", missing_cfg_file=node)


@pytest.mark.parametrize("overrides,plugin,node,via,install", [
    (["hparams_search=cakld_optuna"], "hydra_plugins.hydra_optuna_sweeper", "hydra/sweeper/optuna",
     "hydra/sweeper/kdprune_optuna", "pip install 'kdprune[optuna]'"),
    (["hydra/launcher=kdprune_slurm"], "hydra_plugins.hydra_submitit_launcher", "hydra/launcher/submitit_slurm",
     "hydra/launcher/kdprune_slurm", "pip install 'kdprune[slurm]'"),
    (["hydra/launcher=kdprune_ray"], "hydra_plugins.hydra_ray_launcher", "hydra/launcher/ray",
     "hydra/launcher/kdprune_ray", "pip install -c constraints.txt 'kdprune[ray]'"),
])
def test_a_missing_extra_names_its_pip_install(overrides, plugin, node, via, install):
    line = missing_config_line(_missing(overrides, plugin, node, via))
    assert line is not None and "\n" not in line and line.endswith(f"which is not installed: {install}")
    assert via in line


def test_unknown_options_list_the_valid_ones_without_internal_nodes():
    for bad in ("nope", "cakld_schema"):
        with pytest.raises(MissingConfigException) as e:
            compose_cfg([f"method={bad}"])
        assert missing_config_line(e.value) == (f"unknown method option {bad!r}; choose one of "
                                                f"{', '.join(sorted(p.stem for p in (CONF / 'method').glob('*.yaml')))}")
    assert set(method_names()) <= {p.stem for p in (CONF / "method").glob("*.yaml")}
    with pytest.raises(MissingConfigException) as e:
        compose_cfg(["hydra/launcher=nope"])
    assert missing_config_line(e.value).startswith("unknown hydra/launcher option 'nope'; choose one of basic, ")
    assert missing_config_line(ValueError("x")) is None


def test_a_sweep_prints_the_tree_once_logs_to_kdprune_log_and_runs_wandb_quietly(tmp_path):
    pytest.importorskip("wandb")
    args = ["-m", "debug=default", "seed=0,1", "logger=wandb", "logger.mode=offline", "progress=auto",
            f"hydra.sweep.dir={tmp_path}/multi"]
    rc, out, err = _done(_cli(args, tmp_path, WANDB_API_KEY=None, WANDB_SILENT=None))
    assert rc == 0, err[-3000:]
    assert out.count("├── sparsity: 0.9") == 1  # once per sweep, not per job
    assert "\r" not in err and "\r" not in out  # stderr is a pipe: no progress bars
    lines = (out + err).splitlines()
    assert len([ln for ln in lines if ln.startswith("kdprune: W&B run ")]) == 2
    assert not [ln for ln in lines if ln.startswith("wandb:")]  # none of W&B's ~30 banner lines per run
    for job in (0, 1):
        rec = json.loads((tmp_path / "multi" / str(job) / "results.json").read_text())
        assert rec["status"] == "ok" and rec["threads"]["intra_op"] >= 1
        log = (tmp_path / "multi" / str(job) / "kdprune.log").read_text()
        assert "kdprune: W&B run " in log and "stage=retrain epoch=1" in log
        assert "kdprune: cakld on digits" in log and "results.json" in log  # the summary
        assert not (tmp_path / "multi" / str(job) / "cli.log").exists()


def test_progress_bars_only_on_a_terminal(tmp_path):
    import io

    from tqdm.auto import tqdm

    from kdprune_cli.training.loop import bars_disabled

    assert bars_disabled("auto") is None and bars_disabled(True) is False and bars_disabled(False) is True
    assert bars_disabled("true") is False and bars_disabled("false") is True

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, drawn in ((io.StringIO(), False), (Tty(), True)):  # a file or pipe / a terminal
        for _ in tqdm(range(3), file=stream, disable=bars_disabled("auto"), mininterval=0):
            pass
        assert ("\r" in stream.getvalue()) is drawn
