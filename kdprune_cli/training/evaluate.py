"""Evaluation (docs/methods.md §6): top-1, top-5, NLL, calibration (ECE, MCE, RMSCE with torchmetrics;
temperature scaling on held-out data; reliability bins), FLOPs, latency."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from kdprune_cli.models.masks import prunable_modules
from kdprune_cli.models.matmuls import MatmulCounter
from kdprune_cli.training.compiling import wanted


@torch.no_grad()
def predict(model: nn.Module, data, split: str = "test", batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    batches = [(model(x).float(), y) for x, y, _ in data.batches(split, batch_size)]
    model.train(was_training)
    logits, ys = zip(*batches)
    return torch.cat(logits), torch.cat(ys)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict:
    """Accuracy in percent; NLL in nats; top-label calibration errors over ``n_bins`` equal-width confidence
    bins (torchmetrics' ``multiclass_calibration_error``): ECE (``norm="l1"``, the bins' |accuracy −
    confidence| weighted by their share of samples), MCE (``norm="max"``, the largest gap of any bin) and
    RMSCE (``norm="l2"``, the square root of the weighted mean squared gap)."""
    c = logits.shape[1]
    probs = F.softmax(logits, dim=1)
    out = {"top1": 100.0 * float(multiclass_accuracy(logits, y, num_classes=c, top_k=1, average="micro")),
           "top5": 100.0 * float(multiclass_accuracy(logits, y, num_classes=c, top_k=min(5, c), average="micro")),
           "nll": float(F.cross_entropy(logits, y))}
    for key, norm in (("ece", "l1"), ("mce", "max"), ("rmsce", "l2")):
        out[key] = float(multiclass_calibration_error(probs, y, num_classes=c, n_bins=n_bins, norm=norm))
    return out


def evaluate(model: nn.Module, data, split: str = "test", batch_size: int = 1000, n_bins: int = 15) -> dict:
    return classification_metrics(*predict(model, data, split, batch_size), n_bins)


def reliability_bins(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict:
    """What a reliability diagram draws: per equal-width bin of top-label confidence (bin k holds
    [k/n, (k+1)/n), the last one closed at 1), the number of samples, their mean confidence and their accuracy
    (fractions; None for an empty bin). The bins are torchmetrics' (same boundaries, same float32 softmax),
    except that torchmetrics keeps a confidence of exactly 1.0 in a bin of its own: ``ece`` recomputed from
    these bins equals the recorded one unless some confidence rounds to 1.0 in float32."""
    probs = F.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred.eq(y).to(conf.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp_(0, n_bins - 1)
    count, conf_sum, acc_sum = (torch.bincount(idx, weights, minlength=n_bins).tolist()
                                for weights in (None, conf.double(), correct.double()))
    return {"count": count,
            "confidence": [s / n if n else None for s, n in zip(conf_sum, count)],
            "accuracy": [s / n if n else None for s, n in zip(acc_sum, count)]}


T_RANGE = (0.01, 100.0)
LOG_T_RANGE = (math.log(T_RANGE[0]), math.log(T_RANGE[1]))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks",
    ICML 2017): the single T > 0 that minimises the NLL of ``softmax(logits / T)`` on held-out ``(logits, y)``.

    LBFGS (strong-Wolfe line search) on log T, so T stays positive, from T = 1, in float64, with T held in
    [0.01, 100] (a held-out set that the model separates perfectly drives T towards 0). Dividing by T keeps
    every prediction's ranking, so accuracy does not change; only the confidences do."""
    z, y = logits.detach().double(), y.detach()
    log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(*LOG_T_RANGE).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return min(max(float(log_t.detach().exp()), T_RANGE[0]), T_RANGE[1])


def temperature_scaled(val: tuple, test: tuple, n_bins: int = 15) -> dict:
    """``temperature`` fitted on the validation ``(logits, y)`` by :func:`fit_temperature`, and the test
    split's ECE and NLL after dividing its logits by it (``ece_ts``, ``nll_ts``)."""
    t = fit_temperature(*val)
    logits, y = test
    scaled = classification_metrics(logits.float() / t, y, n_bins)
    return {"temperature": t, "ece_ts": scaled["ece"], "nll_ts": scaled["nll"]}


def evaluate_splits(model: nn.Module, data, splits=("test",), batch_size: int = 1000, n_bins: int = 15) -> dict:
    """The record's metrics of ``model`` on each of ``splits``: :func:`classification_metrics`, and
    ``reliability`` (:func:`reliability_bins`); when ``val`` is among them, the test split also gets the
    temperature fitted on ``val`` and its ECE and NLL after scaling (:func:`temperature_scaled`). Never fitted
    on the split it is scored on: without ``val`` these keys are absent."""
    logits = {s: predict(model, data, s, batch_size) for s in splits}
    out = {s: classification_metrics(*logits[s], n_bins) for s in splits}
    if "val" in logits and "test" in logits:
        out["test"].update(temperature_scaled(logits["val"], logits["test"], n_bins))
    for s in splits:
        out[s]["reliability"] = reliability_bins(*logits[s], n_bins)
    return out


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple, exclude=()) -> dict:
    """Multiply–accumulates for one input, dense and with the zeros skipped: every Conv2d and Linear, plus
    the products between activations (attention's Q·Kᵀ and A·V, :class:`~.matmuls.MatmulCounter`).

    Sparse FLOPs scale each layer's count by its weight density (what a sparse kernel would execute).
    Convolutions and linear layers outside the prunable set, and the activation products (no weights),
    count densely in both.
    """
    dense, sparse = 0, 0
    prunable = set(id(m) for m in prunable_modules(model, exclude).values())

    def hook(m, inp, out):
        nonlocal dense, sparse
        # per output value, one weight row: in_channels / groups × kernel (Conv2d) or in_features (Linear)
        macs = out.numel() // out.shape[0] * m.weight.shape[1:].numel()
        density = float((m.weight != 0).float().mean()) if id(m) in prunable else 1.0
        dense += macs
        sparse += macs * density

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        with MatmulCounter() as products:
            model(torch.zeros(1, *input_shape, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"dense": int(dense + products.macs), "sparse": int(round(sparse + products.macs))}


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple, *, batches=(1, 256), iters: int = 100, warmup: int = 20,
                    compiled: bool = False) -> list[dict]:
    """Time forward passes of ``model`` on its device: per batch size and mode (eager, and ``torch.compile``d
    when ``compiled``; compile time is reported apart, not timed), ``warmup`` untimed passes, then ``iters``
    timed ones (CUDA events on CUDA, ``perf_counter`` on CPU): median, 10th and 90th percentile and images/s.

    On CUDA the model runs in bf16 with channels_last (the fast inference path), on CPU in fp32; a copy is
    timed, ``model`` is left as it was."""
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    m = copy.deepcopy(model).eval()
    if cuda:
        m = m.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = []
    for mode in ("eager", "compiled") if compiled else ("eager",):
        fn = m if mode == "eager" else torch.compile(m, mode="reduce-overhead" if cuda else None, dynamic=False)
        for b in batches:
            x = torch.randn(b, *input_shape, device=dev)
            if cuda:
                x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            row = {"batch": int(b), "mode": mode}
            if mode == "compiled":
                t = time.perf_counter()
                fn(x)
                _sync(dev)
                row["compile_seconds"] = time.perf_counter() - t
            for _ in range(warmup):
                fn(x)
            _sync(dev)
            times = []
            for _ in range(iters):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    fn(x)
                    times.append((time.perf_counter() - t) * 1000)
            q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
            row.update(median_ms=float(q[1]), p10_ms=float(q[0]), p90_ms=float(q[2]),
                       images_per_s=float(b * 1000.0 / q[1]))
            rows.append(row)
    return rows


def latency_record(models: dict, input_shape: tuple, batch: int, iters: int, compile_setting="auto") -> dict:
    """Each of ``models`` (on one device) timed by :func:`measure_latency` at batch 1 and ``batch``, eager and
    compiled where ``compile_setting`` (auto | true | false; auto: on CUDA) says, with the device, dtype and
    torch version (docs/methods.md §6)."""
    dev = next(next(iter(models.values())).parameters()).device
    cuda = dev.type == "cuda"
    out = {"device": f"{dev} ({torch.cuda.get_device_name(dev)})" if cuda else str(dev),
           "dtype": "bfloat16" if cuda else "float32", "channels_last": cuda, "torch": torch.__version__,
           "iters": int(iters), "warmup": 20}
    for name, m in models.items():
        out[name] = measure_latency(m, input_shape, batches=(1, int(batch)), iters=int(iters), warmup=20,
                                    compiled=wanted(compile_setting, dev))
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
