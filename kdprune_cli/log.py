"""kdprune's own console lines, also written to the run folder's ``kdprune.log``.

Under the ``kdprune`` command Hydra's job logging (``conf/hydra/job_logging/kdprune.yaml``) gives the ``kdprune``
logger one handler, the run folder's log file; :func:`say` prints a line as it always did and logs it there, so
the console keeps its plain lines and the file gets them with a time stamp. Outside Hydra (the Python API, tests)
the logger has no handler and only the printed line remains.
"""
from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("kdprune")
LOG.addHandler(logging.NullHandler())  # without Hydra's handlers: no "last resort" second copy on stderr


def say(line: str, err: bool = False, level: int = logging.INFO) -> None:
    """Print ``line`` (to stderr with ``err``) and log it to ``kdprune.log``."""
    print(line, file=sys.stderr if err else sys.stdout, flush=True)
    LOG.log(level, line)


def note(line: str) -> None:
    """Log ``line`` to ``kdprune.log`` only (per-epoch lines: the console has the progress bar)."""
    LOG.info(line)


def warn(msg: str) -> None:
    """One line ``kdprune: warning: <msg>`` on stderr (and in ``kdprune.log``)."""
    say(f"kdprune: warning: {' '.join(str(msg).split())}", err=True, level=logging.WARNING)
