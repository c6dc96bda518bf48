"""pruning.structure."""
