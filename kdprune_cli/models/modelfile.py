"""The saved model file (``model.pt``): a model that reloads without the training config.

The file holds the architecture's name and the dataset shape it was built for, the width of every layer
(``in_channels``, ``out_features``, ... : plain integers), the state dict, the masks and the resolved data
config, all plain tensors and containers, so it loads with ``torch.load(weights_only=True)``: no pickled
code. :func:`load_pruned` builds the architecture, gives each layer its saved width (so a physically
smaller model comes back smaller) and loads the weights strictly; a damaged or mismatched file is refused
with one line (:class:`ModelFileError`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

FORMAT = "kdprune-model/1"


class ModelFileError(ValueError):
    """A model file that cannot be read, or whose weights do not fit the architecture it names."""


def model_file(model: nn.Module, arch: dict, data: Optional[dict] = None, masks: Optional[dict] = None,
               **facts) -> dict:
    """What :func:`~kdprune_cli.store.atomic_save` writes: ``arch`` = ``{name, num_classes, in_channels,
    image_size}``; ``facts`` (e.g. ``role``, ``granularity``) are kept as they are."""
    from kdprune_cli.pruning.structure.channels import module_shapes

    return {"format": FORMAT, "arch": dict(arch), "shapes": module_shapes(model),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "masks": {k: v.detach().cpu() for k, v in (masks or {}).items()}, "data": data or {}, **facts}


def read_model_file(path: str | Path) -> dict:
    """The file's contents (weights_only); earlier kdprune files (state dict + architecture name) too."""
    from kdprune_cli.data.loading import DATASETS
    from kdprune_cli.models.checkpoint import read_error

    try:
        obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"model file {path} could not be read: {read_error(e)}") from None
    if isinstance(obj, dict) and "format" not in obj and isinstance(obj.get("model"), str) \
            and obj.get("dataset") in DATASETS:  # written before the format had a name: dense-shaped
        classes, channels, size = DATASETS[obj["dataset"]]
        obj = {"format": FORMAT, "arch": {"name": obj["model"], "num_classes": classes, "in_channels": channels,
                                          "image_size": size}, "shapes": {}, "state_dict": obj.get("state_dict"),
               "masks": obj.get("masks") or {}, "data": {"name": obj["dataset"]}}
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("state_dict"), dict):
        raise ModelFileError(f"model file {path} is not a kdprune model file (format {FORMAT})")
    return obj


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in ``path`` (a ``model.pt`` or a run folder holding one), in eval mode.

    >>> model = kdprune_cli.load_pruned("outputs/runs/2026-11-23/10-00-00-000000")
    """
    return build_from(read_model_file(_model_path(path)), _model_path(path)).to(device).eval()


def build_from(obj: dict, path: Path) -> nn.Module:
    from kdprune_cli.models import build_model
    from kdprune_cli.pruning.structure.channels import reshape_to

    arch = obj["arch"]
    try:
        model = build_model(arch["name"], int(arch["num_classes"]), int(arch["in_channels"]), int(arch["image_size"]),
                            arch.get("kwargs"))
        reshape_to(model, obj.get("shapes") or {}, obj["state_dict"])
        model.load_state_dict(obj["state_dict"], strict=True)
        check_widths(model)
        with torch.no_grad():  # the widths agree with each other: one input of the saved shape runs
            model.eval()(torch.zeros(1, int(arch["in_channels"]), int(arch["image_size"]), int(arch["image_size"])))
        model.train()
    except Exception as e:  # any failure to rebuild or run is the file's disagreement with the architecture
        raise ModelFileError(f"model file {path} does not fit {arch.get('name')!r}: "
                             f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    return model


def check_widths(model: nn.Module) -> None:
    """Each layer's tensors have the shapes its width attributes say (a file whose widths, ``groups`` or
    weights were edited apart is refused here, not by a shape error in the first forward)."""
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
                raise ValueError(f"{n}: groups={m.groups} does not divide in_channels={m.in_channels} and "
                                 f"out_channels={m.out_channels}")
            want = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        elif isinstance(m, nn.Linear):
            want = (m.out_features, m.in_features)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            want = (m.num_features,)
        elif isinstance(m, nn.LayerNorm):
            want = tuple(m.normalized_shape)
        else:
            continue
        if m.weight is not None and tuple(m.weight.shape) != want:
            raise ValueError(f"{n}: weight of shape {tuple(m.weight.shape)} where its widths say {want}")
        vector = want if isinstance(m, nn.LayerNorm) else want[:1]
        for k in ("bias", "running_mean", "running_var"):
            t = getattr(m, k, None)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != vector:
                raise ValueError(f"{n}: {k} of shape {tuple(t.shape)} where its widths say {vector}")


def _model_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "model.pt" if path.is_dir() else path
