"""kdprune: knowledge-distillation-guided pruning experiments (CA-KLD and baselines)."""
__version__ = "0.1.0"
