"""kdprune: knowledge-distillation-guided pruning experiments (CA-KLD and baselines)."""
__version__ = "0.1.0"


def load_pruned(path, device="cpu"):
    """Rebuild a saved model (``model.pt`` or a run folder) without its training config; see
    :func:`kdprune_cli.models.modelfile.load_pruned`."""
    from kdprune_cli.models.modelfile import load_pruned as _load

    return _load(path, device)
