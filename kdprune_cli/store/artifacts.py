"""Content-addressed artifacts (the open_lth idea).

A stage's artifact lives under ``<root>/<stage>/<key>/`` where ``key`` is a hash of exactly the spec that
determines it. A stage whose artifact exists is loaded, not recomputed; two jobs that need the same artifact at
once serialise on a file lock, so it is computed once. A model with a NaN or infinite tensor is never stored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kdprune_cli.errors import DivergedError, describe, non_finite_state
from kdprune_cli.log import warn
from kdprune_cli.store.atomic import atomic_save, atomic_write_json, writing
from kdprune_cli.store.digests import config_hash
from kdprune_cli.store.locks import acquire, file_lock


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Store:
    """``root/<stage>/<key>/{artifact.pt, meta.json}``.

    ``version`` (the job layer's ``STORE_VERSION``) goes into every key, so artifacts a different layout made are
    other keys, never read. ``waited`` holds the seconds the last :meth:`get_or_create` spent waiting for
    another job's lock.
    """

    def __init__(self, root: str | os.PathLike, version: Optional[int] = None):
        self.root, self.version = Path(root), version
        self.waited = 0.0

    def key(self, spec: dict) -> str:
        """The hash naming the artifact that ``spec`` determines."""
        return config_hash(spec if self.version is None else {"store_version": self.version, "spec": spec})

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_create(self, stage: str, spec: dict, create: Callable[[], tuple[dict, dict]],
                      enabled: bool = True, check: Optional[Callable[[dict], Any]] = None
                      ) -> tuple[dict, dict, bool]:
        """Return ``(state, meta, cached)``; ``create()`` returns ``(state, meta)`` and runs at most once.

        ``spec`` is the config subset that determines the artifact; its hash is the key. ``check(state)``
        raises when a stored artifact does not fit (e.g. another architecture); such an artifact, or one
        that cannot be read, is reported in one warning line, discarded and made anew. ``create()`` may
        return ``(None, meta)`` when what it made turned out not to be this artifact (e.g. an iterative
        method's round that had to be clipped to the job's own target): nothing is stored and
        ``(None, meta, False)`` is returned.
        """
        self.waited = 0.0
        key = self.key(spec)
        d = self.dir(stage, key)
        art, meta_path = d / "artifact.pt", d / "meta.json"
        if not enabled:
            return (*create(), False)
        d.mkdir(parents=True, exist_ok=True)
        lock = file_lock(d / "stage")
        self.waited = acquire(lock)
        try:
            if art.exists():
                loaded, problem = self._load(art, meta_path)
                if loaded is not None and check is not None:
                    try:
                        check(loaded[0])
                    except Exception as e:
                        loaded, problem = None, f"does not fit ({_first_line(e)})"
                if loaded is not None:
                    return loaded[0], loaded[1], True
                warn(f"stored {stage} artifact {d} {problem}; discarded, making it anew")
                for f in (art, meta_path, d / "partial.pt"):  # partial.pt: an attempt at the same artifact
                    f.unlink(missing_ok=True)
            state, meta = create()
            if state is None:  # not this artifact after all: nothing to store
                return None, meta, False
            bad = non_finite_state(state)
            if bad:  # a diverged model is not an artifact
                raise DivergedError(f"training diverged in stage {stage}: non-finite values in {describe(bad)}; "
                                    f"not stored; lower the learning rate")
            meta = {**meta, "stage": stage, "key": key, "spec": spec}
            with writing():  # the artifact, its meta.json and the clean-up land together, whatever signal comes
                atomic_save(state, art)
                atomic_write_json(meta, meta_path)
                (d / "partial.pt").unlink(missing_ok=True)  # training checkpoint of an interrupted attempt
            return state, meta, False
        finally:
            lock.release()

    @staticmethod
    def _load(art: Path, meta_path: Path) -> tuple[Optional[tuple[dict, dict]], str]:
        """``((state, meta), "")`` or ``(None, what is wrong)``."""
        try:
            state = torch.load(art, map_location="cpu", weights_only=True)
        except Exception as e:
            return None, f"cannot be read ({_first_line(e)})"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "has no meta.json"
        except (OSError, ValueError) as e:
            return None, f"has an unreadable meta.json ({_first_line(e)})"
        if not isinstance(state, dict) or not isinstance(meta, dict):
            return None, "is not a dict of tensors with a meta.json object"
        return (state, meta), ""
