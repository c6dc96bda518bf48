"""Reading a user's state-dict checkpoint (``teacher.checkpoint=...``, ``kdprune-eval --checkpoint``) into a
model: ``weights_only`` (never an unpickled object), with a one-line reason when it cannot be used."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_error(e: Exception) -> str:
    """What is wrong with a file torch could not load, in our words (never torch's advice to unpickle it)."""
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or isinstance(e, pickle.UnpicklingError):
        return "it holds Python objects other than tensors, which kdprune refuses to unpickle"
    if isinstance(e, (IsADirectoryError, PermissionError, FileNotFoundError)):
        return e.strerror or type(e).__name__
    return "it is truncated, damaged or not a PyTorch checkpoint"


def load_checkpoint(path: str, model: nn.Module, what: str) -> None:
    """Load a state dict (or ``{"state_dict"|"model": ...}``) with ``weights_only=True``; clear errors."""
    try:
        obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {read_error(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        obj = obj.get("state_dict", obj.get("model"))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [k for k in obj if k not in own]
    shape = [k for k in own if k in obj and obj[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {len(missing)} missing keys "
                              f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
                              f"{len(shape)} of other shape {shape[:2]}")
    model.load_state_dict(obj)
