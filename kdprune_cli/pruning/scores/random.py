"""Random scores: i.i.d. U[0,1) per weight, the sanity baseline of pruning at initialisation (SNIP
arXiv 1810.02340, GraSP arXiv 2002.07376, SynFlow arXiv 2006.05467; Frankle et al. 2021, arXiv 2009.08576)."""
from __future__ import annotations

import torch

from kdprune_cli.models.masks import Scores


@torch.no_grad()
def uniform(params: dict, gen: torch.Generator) -> Scores:
    """``{name: U[0,1) of the parameter's shape}``, drawn from ``gen`` on the CPU in ``params``' order."""
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}
