"""scikit-learn's bundled 8×8 handwritten digits (offline): 1437 train / 360 test, stratified, fixed split.
``data.root`` is unused (the digits ship with scikit-learn); no flips (a flipped digit is another symbol)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdprune_cli.data.sources.base import Source, Splits


class Digits(Source):
    name, classes, channels, size, train_images, uses_root = "digits", 10, 1, 8, 1437, False
    config = {"root": "./data", "download": False, "crop_padding": 1, "flip": False}

    def read(self, root: Path, download: bool, verify: bool) -> Splits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
        y = torch.from_numpy(d.target.astype(np.int64))
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
        return (x[tr], y[tr]), (x[te], y[te])

    def signature(self, root: Path) -> Optional[dict]:
        """The scikit-learn version: the images come with it."""
        import sklearn

        return {"sklearn": sklearn.__version__}


SOURCES = [Digits()]
