"""Magnitude scores ``|θ|`` (Han et al. 2015, arXiv 1506.02626, §3): keep the largest weights."""
from __future__ import annotations

import torch

from kdprune_cli.models.masks import Scores


@torch.no_grad()
def magnitude(params: dict) -> Scores:
    """``{name: |θ|}`` for the given parameters."""
    return {n: p.detach().abs() for n, p in params.items()}
