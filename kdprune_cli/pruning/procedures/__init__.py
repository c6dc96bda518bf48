"""pruning.procedures."""
