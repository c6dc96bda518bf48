"""SIGTERM sent from inside the write of a training checkpoint, for the signal tests: patched in-process, or
``python tests/sigterm_write.py <kdprune arguments>`` runs ``kdprune`` with the signal sent while
``retrain.1.pt`` is written after epoch 2."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from kdprune_cli.cli.main import main
from kdprune_cli.store import atomic
from kdprune_cli.training import loop as train


def sigterm_in_checkpoint_write(setattr, name: str, epoch: int) -> list:
    """Send SIGTERM from inside the write of the training checkpoint ``name`` after ``epoch``; ``setattr``
    installs the patches (``monkeypatch.setattr``, or the builtin in a process of its own). Returns the list
    that holds ``True`` once the signal was sent."""
    real_save, real_write, armed, sent = train.atomic_save, atomic.write_all, [], []

    def save(obj, path):
        if Path(path).name == name and obj["epoch"] == epoch:
            armed.append(True)
        try:
            real_save(obj, path)
        finally:
            armed.clear()

    def write_all(fd, data):
        if armed and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        real_write(fd, data)

    setattr(train, "atomic_save", save)
    setattr(atomic, "write_all", write_all)
    return sent


if __name__ == "__main__":
    sigterm_in_checkpoint_write(setattr, "retrain.1.pt", 2)
    sys.argv = ["kdprune", *sys.argv[1:]]
    main()
