"""Pruning: masks and their selection, channel and ViT structure, importance scores, the procedures that
prune and retrain, and the methods that combine them (:mod:`kdprune_cli.pruning.methods`)."""
