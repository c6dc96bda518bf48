"""Hydra entry point ``kdprune``.

``conf/`` sits at the repository root (editable installs read it there) and is shipped in the wheel as
``kdprune_cli/conf``. Bad input ends with one line on stderr and exit status 2; the run folder keeps a
``results.json`` with ``status: failed`` and the reason. A training that diverged (valid input, a failed run)
ends with one line and exit status 1; SIGTERM / SIGUSR1 with 128 + the signal's number.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra._internal.utils import run_and_report
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdprune_cli.cli.printing import print_config
from kdprune_cli.config.schema import ConfigError, register
from kdprune_cli.data import DataError
from kdprune_cli.errors import DivergedError, storage_error
from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.search import is_search, objective, task_overrides
from kdprune_cli.experiment.signals import Interrupted
from kdprune_cli.log import say
from kdprune_cli.models.checkpoint import CheckpointError
from kdprune_cli.store.atomic import atomic_write_json


def config_dir() -> str:
    package = Path(__file__).resolve().parents[1]  # kdprune_cli/: conf/ beside it in a checkout, inside it in a wheel
    for cand in (package / "conf", package.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError("kdprune: config folder not found (conf/config.yaml); reinstall the package")


def _group(cfg: DictConfig, hc) -> str:
    if cfg.logger.group:
        return cfg.logger.group
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        p = Path(hc.sweep.dir)
        return f"{cfg.experiment or 'sweep'}-{p.parent.name}_{p.name}"
    return cfg.experiment or "single"


register()
from kdprune_cli.pruning import methods  # noqa: E402,F401  each method registers its typed config (schema/method/<name>)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Run one job; returns the record's ``optimized_metric`` (default: the final top-1 on the validation split),
    the objective a search such as Optuna's optimises, or None (a failed trial) when the job failed or the
    record has no such number."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    logging.captureWarnings(True)  # Python warnings also go to the run folder's kdprune.log
    try:
        record = run_job(cfg, run_dir, group=_group(cfg, hc), overrides=task_overrides(hc),
                         on_valid=lambda: announce(cfg, hc))
        value = objective(record, cfg.optimized_metric)
        if value is None and multirun and is_search(hc.sweeper):
            say(f"kdprune: job {hc.job.num}: the record has no number at optimized_metric={cfg.optimized_metric}; "
                "the trial counts as failed", err=True)
        return value
    except Interrupted as e:  # the record says failed, the last checkpoint is kept; rerun to resume
        say(f"kdprune: {e}; rerun the same command to resume", err=True)
        sys.exit(128 + e.signum)
    except Exception as e:
        ours = (ConfigError, DataError, CheckpointError, DivergedError)
        line = str(e) if isinstance(e, ours) else storage_error(e)
        if isinstance(e, OmegaConfBaseException):  # a value read after validation, e.g. by _group
            line = composition_error_line(e)
        if multirun and not cfg.fail_fast:  # the record says failed; the sweep goes on
            say(f"kdprune: job {hc.job.num} failed: {line or f'{type(e).__name__}: {e}'}", err=True)
            return None
        if line is not None:
            say(f"kdprune: error: {line}", err=True)
            sys.exit(1 if isinstance(e, DivergedError) else 2)  # diverged: the run failed, the input was valid
        raise


_SHOWN_FOR: set = set()  # sweep folders whose config tree this process has printed


def announce(cfg: DictConfig, hc) -> None:
    """What a job prints once its config is valid: the config tree (``print_config``; in a sweep only for the
    first valid job this process runs, the others differ by the overrides Hydra prints as ``#N : ...``), and
    the anomaly-detection notice."""
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    if cfg.print_config and not (multirun and hc.sweep.dir in _SHOWN_FOR):
        if multirun:
            _SHOWN_FOR.add(hc.sweep.dir)
            print(f"kdprune: config of sweep job {hc.job.num} (the other jobs differ by their overrides)")
        print_config(cfg)
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
        say("kdprune: autograd anomaly detection is on (slower; a NaN in backward names its forward op)", err=True)


# --- the console entry point: Hydra's own errors (raised before a job runs) in kdprune's words --------------
EXTRAS = {  # a config node a plugin ships -> the install that provides it
    "hydra/sweeper/optuna": ("the Optuna sweeper (hydra-optuna-sweeper)", "pip install 'kdprune[optuna]'"),
    "hydra/launcher/submitit_slurm": ("the SLURM launcher (hydra-submitit-launcher)", "pip install 'kdprune[slurm]'"),
    "hydra/launcher/submitit_local": ("the submitit launcher (hydra-submitit-launcher)",
                                      "pip install 'kdprune[slurm]'"),
    "hydra/launcher/ray": ("the Ray launcher (hydra-ray-launcher)",
                           "pip install -c constraints.txt 'kdprune[ray]'"),
}
HIDDEN_GROUPS = ("hydra", "schema", "method_budget")  # internal: not chosen on the command line


def hidden_option(group: str, name: str) -> bool:
    return name.endswith("_schema") or group.split("/")[0] == "schema"


def missing_config_line(e: BaseException) -> Optional[str]:
    """One line for a config node Hydra could not find: a plugin's node (the extra that installs it), or an
    unknown group option (the valid ones, internal nodes left out). None for anything else."""
    if not isinstance(e, MissingConfigException):
        return None
    text = str(e)
    m = re.search(r"Could not (?:load|find) '([^']+)'", text)
    node = m.group(1) if m else (e.missing_cfg_file or "")
    if node in EXTRAS:
        what, install = EXTRAS[node]
        via = re.search(r"In '([^']+)'", text)
        chosen = f"{via.group(1)} needs " if via and via.group(1) != "config" else ""
        return f"{chosen}{what}, which is not installed: {install}"
    group, _, name = node.rpartition("/")
    if not group:
        return None
    opts = [o for o in (e.options or []) if not hidden_option(group, o)]
    have = f"; choose one of {', '.join(opts)}" if opts else ""
    return f"unknown {group} option {name!r}{have}"


def config_groups_text() -> str:
    """``group: option, option`` lines for ``kdprune --help`` (the OmegaConf resolver ``kdprune_groups``)."""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(loader.list_groups("")):
        if group in HIDDEN_GROUPS:
            continue
        opts = [o for o in sorted(loader.get_group_options(group, ObjectType.CONFIG))
                if not hidden_option(group, o)]
        if opts:
            lines.append(f"  {group}: {', '.join(opts)}")
    return "\n".join(lines) + "\n"


OmegaConf.register_new_resolver("kdprune_groups", config_groups_text, replace=True)


def composition_error_line(e: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing or resolving the config: the message's
    first line, the key it concerns, the underlying cause and the options Hydra offers."""
    def parts(x: BaseException) -> list:
        return [ln.strip() for ln in str(x).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]

    lines = parts(e) or [type(e).__name__]
    line = lines[0]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    if key and key not in line:
        line = f"{key}: {line}"
    cause = e.__cause__ or e.__context__
    if cause is not None and parts(cause) and parts(cause)[0] not in line:
        line = f"{line}: {parts(cause)[0]}"
    if any(ln.startswith("Available options") for ln in lines):
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [ln for ln in lines[start + 1:] if ":" not in ln]
        line = f"{line}; {lines[start].rstrip(':').lower()}: {', '.join(options)}"
    return line


def record_refusal(argv: list, line: str) -> None:
    """A refused command that names an existing run folder (``hydra.run.dir=DIR``) leaves its ``failed``
    record there, so an earlier run's record does not speak for it."""
    dirs = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if "-m" in argv or "--multirun" in argv or not dirs or "${" in dirs[-1] or not Path(dirs[-1]).is_dir():
        return
    record = {"status": "failed", "error": line, "job_id": None, "overrides": list(argv), "config": None}
    try:
        atomic_write_json(record, Path(dirs[-1]) / "results.json")
    except OSError:
        pass  # a folder that cannot take the record: the error line still says why the command was refused


def main() -> None:
    """The ``kdprune`` command: :func:`hydra_main` under Hydra, with Hydra's and OmegaConf's own errors as one
    ``kdprune: error:`` line and exit status 2: a missing config node (an unknown option, a plugin that is not
    installed: the extra that provides it), a wrong type, an unresolvable interpolation, an unknown experiment.
    Other errors as Hydra reports them (``HYDRA_FULL_ERROR=1``: the full traceback)."""
    if hasattr(signal, "SIGXFSZ"):  # a file over `ulimit -f` fails with EFBIG (a storage error), not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    user_full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; reported below
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if user_full == "1":
            raise
        line = missing_config_line(e) or composition_error_line(e)
        record_refusal(sys.argv[1:], line)
        print(f"kdprune: error: {line}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if user_full not in (None, "", "0"):
            raise
        os.environ.pop("HYDRA_FULL_ERROR")
        failure = e

        def again():
            raise failure

        run_and_report(again)  # Hydra's short report: the message, or the traceback without Hydra's frames
    finally:
        if user_full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full


if __name__ == "__main__":
    main()
