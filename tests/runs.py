"""Running kdprune as a user does (a subprocess with its own store and run folders), and the short recipes the
end-to-end tests share."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import SAFETY_S

FAST = ["method.finetune.epochs=1", "method.retrain.epochs=1", "method.score_batches=2", "method.gamma_batches=2"]


def kdprune(args, tmp_path, env_extra=None):
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kdprune_cli.cli.main", *args,
                           f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multi"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=SAFETY_S)


TINY_CLI = ["experiment=quickstart", "progress=false", "teacher=resnet20", "teacher.train.epochs=1",
            "student.train.epochs=1", *FAST]


def recipe(which, epochs=1):
    """Overrides that make the method's training recipe ``which`` small: batch 64, lr 0.05, no evaluation."""
    return [f"++method.{which}.epochs={epochs}", f"++method.{which}.batch_size=64", f"++method.{which}.lr=0.05",
            f"++method.{which}.eval_every=0"]
