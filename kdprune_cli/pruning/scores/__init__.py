"""pruning.scores."""
