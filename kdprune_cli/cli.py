"""Hydra entry point ``kdprune``.

``conf/`` sits at the repository root (editable installs read it there) and is shipped in the wheel as
``kdprune_cli/conf``. Bad input ends with one line on stderr and exit status 2; the run folder keeps a
``results.json`` with ``status: failed`` and the reason.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, register


def config_dir() -> str:
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError("kdprune: config folder not found (conf/config.yaml); reinstall the package")


def _group(cfg: DictConfig) -> str:
    if cfg.logger.group:
        return cfg.logger.group
    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        p = Path(hc.sweep.dir)
        return f"{cfg.experiment or 'sweep'}-{p.parent.name}_{p.name}"
    return cfg.experiment or "single"


register()
from . import pruning  # noqa: E402,F401  each method registers its typed config (method/<name>_schema)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR}


def storage_error(e: BaseException) -> Optional[str]:
    """One line for a folder or disk that cannot take our files (full, read-only, not a folder), else None."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where}: {e.strerror or os.strerror(e.errno)}"
    return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def run(cfg: DictConfig) -> Optional[float]:
    """Run one job; returns the final top-1 (the objective a sweeper such as Optuna maximises)."""
    from .data import DataError
    from .runner import CheckpointError, Interrupted, run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    try:
        if cfg.print_config:
            from .printing import print_config
            print_config(cfg)
        if cfg.detect_anomaly:
            import torch
            torch.autograd.set_detect_anomaly(True)
            print("kdprune: autograd anomaly detection is on (slower; a NaN in backward names its forward op)",
                  file=sys.stderr)
        record = run_job(cfg, run_dir, group=_group(cfg), overrides=task_overrides(hc))
        return record["metrics"]["final"]["top1"]
    except Interrupted as e:  # the record says failed, the last checkpoint is kept; rerun to resume
        print(f"kdprune: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        line = str(e) if isinstance(e, (ConfigError, DataError, CheckpointError)) else storage_error(e)
        if isinstance(e, OmegaConfBaseException):  # a value read after validation, e.g. by _group
            line = composition_error_line(e)
        if multirun and not cfg.fail_fast:  # the record says failed; the sweep goes on
            print(f"kdprune: job {hc.job.num} failed: {line or f'{type(e).__name__}: {e}'}", file=sys.stderr)
            return None
        if line is not None:
            print(f"kdprune: error: {line}", file=sys.stderr)
            sys.exit(2)
        raise


def task_overrides(hc) -> list:
    """The command line's overrides as written (``teacher.checkpoint=${oc.env:X}`` stays a string; iterating
    Hydra's node would resolve it)."""
    from omegaconf import OmegaConf

    return list(OmegaConf.to_container(hc.overrides.task, resolve=False))


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
    from .store import atomic_write_json

    if "-m" in argv or "--multirun" in argv:
        return
    dirs = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not dirs or "${" in dirs[-1] or not Path(dirs[-1]).is_dir():
        return
    record = {"status": "failed", "error": line, "job_id": None, "overrides": list(argv), "config": None}
    try:
        atomic_write_json(record, Path(dirs[-1]) / "results.json")
    except OSError:
        pass  # a folder that cannot take the record: the error line still says why the command was refused


def main() -> None:
    """The ``kdprune`` command: :func:`run` under Hydra, with Hydra's and OmegaConf's own errors (a wrong type,
    an unresolvable interpolation, an unknown config option or experiment) as one line and exit status 2."""
    from hydra.errors import HydraException

    if hasattr(signal, "SIGXFSZ"):  # a file over `ulimit -f` fails with EFBIG (a storage error), not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them
    try:
        run()
    except (HydraException, OmegaConfBaseException) as e:
        if full:
            raise
        line = composition_error_line(e)
        record_refusal(sys.argv[1:], line)
        print(f"kdprune: error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
