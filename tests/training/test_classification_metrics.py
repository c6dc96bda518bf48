"""Accuracy, NLL and ECE against hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from kdprune_cli.training.evaluate import classification_metrics


def test_metrics_by_hand():
    # probabilities chosen directly (logits = log p)
    p = torch.tensor([[0.9, 0.05, 0.05],   # conf 0.9, correct
                      [0.6, 0.3, 0.1],     # conf 0.6, wrong (y=1)
                      [0.2, 0.7, 0.1],     # conf 0.7, correct
                      [0.5, 0.25, 0.25]])  # conf 0.5, wrong (y=2)
    y = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(p.log(), y, n_bins=15)
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)  # 3 classes: top-k clipped to 3
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.3) + math.log(0.7) + math.log(0.25)) / 4, rel=1e-5)
    # 15 equal bins of width 1/15: 0.9, 0.6, 0.7, 0.5 land in four different bins, one sample each
    ece = (abs(0.9 - 1) + abs(0.6 - 0) + abs(0.7 - 1) + abs(0.5 - 0)) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-5)


def test_top5_differs_from_top1():
    logits = torch.arange(10.0).repeat(2, 1)  # best class 9, top-5 = {5..9}
    m = classification_metrics(logits, torch.tensor([9, 6]))
    assert m["top1"] == pytest.approx(50.0) and m["top5"] == pytest.approx(100.0)
