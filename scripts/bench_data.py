"""Benchmark: one training epoch with the on-device uint8 data path vs a torchvision DataLoader + transforms.

Same model (CIFAR ResNet-20), same data (CIFAR-10-shaped images written as real CIFAR python batches and read
by torchvision's CIFAR10 class), same batch size, same optimizer. Reports images/s and the ratio.

    python scripts/bench_data.py [--device cuda] [--images 10000] [--batch-size 512] [--workers 4]
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdprune_cli.data import DeviceData, read_raw  # noqa: E402
from kdprune_cli.distill.objectives import CrossEntropy  # noqa: E402
from kdprune_cli.models import build_model  # noqa: E402
from kdprune_cli.training.loop import train  # noqa: E402


def write_cifar10(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    per = n // 5
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, per).tolist()}, f)
    for name, obj in (("test_batch", {"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
                                      "labels": rng.integers(0, 10, 100).tolist()}),
                      ("batches.meta", {"label_names": [str(i) for i in range(10)]})):
        with open(d / name, "wb") as f:
            pickle.dump(obj, f)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def epoch_torchvision(root, dev, bs, workers, model, mean, std):
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    cls = type("C", (CIFAR10,), {"train_list": [[f, None] for f, _ in CIFAR10.train_list],
                                  "test_list": [[f, None] for f, _ in CIFAR10.test_list],
                                  "meta": {**CIFAR10.meta, "md5": None}})
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = cls(str(root), train=True, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=dev.type == "cuda", persistent_workers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loss_fn = CrossEntropy()
    sync(dev)
    t = time.perf_counter()
    n = 0
    model.train()
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss, _ = loss_fn(model, x, y, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    sync(dev)
    return n / (time.perf_counter() - t)


def epoch_device(data, dev, bs, model):
    recipe = SimpleNamespace(epochs=1, batch_size=bs, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True,
                             schedule="constant", milestones=[], lr_decay=0.1, warmup_epochs=0, augment=True,
                             eval_every=0)
    sync(dev)
    t = time.perf_counter()
    stats = train(model, data, recipe, CrossEntropy(), gen=torch.Generator().manual_seed(0), progress=False)
    sync(dev)
    return stats["samples"] / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar10(root, args.images)
        (xtr, ytr), (xte, yte) = read_raw("cifar10", root, False, verify=False)
        data = DeviceData("cifar10", {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}, dev)
        mean, std = data.mean.flatten().tolist(), data.std.flatten().tolist()
        res = {"device": [], "torchvision": []}
        for r in range(args.repeats + 1):  # first round warms up (cudnn autotune, workers)
            torch.manual_seed(0)
            m1 = build_model("resnet20", 10).to(dev)
            a = epoch_device(data, dev, args.batch_size, m1)
            torch.manual_seed(0)
            m2 = build_model("resnet20", 10).to(dev)
            b = epoch_torchvision(root, dev, args.batch_size, args.workers, m2, mean, std)
            if r:
                res["device"].append(a)
                res["torchvision"].append(b)
    dv, tv = max(res["device"]), max(res["torchvision"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; ResNet-20, {args.images} CIFAR-10-shaped images, batch {args.batch_size}, "
          f"DataLoader workers {args.workers}")
    print(f"on-device uint8 path : {dv:10.0f} img/s")
    print(f"torchvision DataLoader: {tv:10.0f} img/s")
    print(f"ratio (on-device / DataLoader): {dv / tv:.2f}x")


if __name__ == "__main__":
    main()
