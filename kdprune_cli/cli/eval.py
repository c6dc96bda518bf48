"""``kdprune-eval RUN_DIR``: reload a saved model in a fresh process, evaluate it, time it, export it.

    kdprune-eval outputs/runs/<date>/<time>                      # top-1, top-5, NLL, ECE on the test split
    kdprune-eval outputs/runs/<date>/<time> --latency            # + batch 1 / large-batch latency
    kdprune-eval outputs/runs/<date>/<time> --onnx model.onnx    # + ONNX export checked with onnxruntime
    kdprune-eval outputs/runs/<date>/<time> --model teacher      # the dense teacher (or dense_student)

The model is rebuilt from ``model.pt`` alone (:func:`kdprune_cli.load_pruned`); the dataset from the data
config saved in it (``--data-root`` when the data moved). When the run folder holds the record, the row is
compared with the record's. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from kdprune_cli.config.schema import SWITCH, ConfigError, DataConfig
from kdprune_cli.data import DataError, load_data
from kdprune_cli.experiment.validate import resolve_device
from kdprune_cli.models import build_model
from kdprune_cli.models.checkpoint import CheckpointError, load_checkpoint
from kdprune_cli.models.modelfile import ModelFileError, build_from, model_path, read_model_file
from kdprune_cli.training.evaluate import count_flops, evaluate_splits, latency_record

MODELS = ("dense_student", "final", "teacher")  # as the record's metrics name them
METRICS = ("top1", "top5", "nll", "ece")


class EvalError(ValueError):
    """Bad input to kdprune-eval (one line)."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kdprune-eval", description="Evaluate, time and export a saved kdprune model.")
    p.add_argument("path", help="a run folder (with model.pt) or a model.pt file")
    p.add_argument("--model", choices=MODELS, default="final",
                   help="which model of the run: the final pruned model (default) or a dense artifact")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-root", help="where the dataset is now (default: the path the run used)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--latency", action="store_true", help="time batch 1 and --latency-batch")
    p.add_argument("--latency-batch", type=positive_int, default=256)
    p.add_argument("--iters", type=positive_int, default=100, help="timed iterations per setting")
    p.add_argument("--compile", choices=SWITCH, default="auto",
                   help="also time the torch.compile'd model (auto: on CUDA)")
    p.add_argument("--onnx", metavar="PATH", help="export to ONNX and check it with onnxruntime on a test batch")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def load(args) -> tuple[nn.Module, dict, Optional[dict]]:
    """The chosen model, the model file's contents and the run's record (if the folder has one)."""
    path = model_path(args.path)
    if not path.is_file():
        raise EvalError(f"{args.path}: no model.pt there (a run folder of kdprune or a model.pt file)")
    obj = read_model_file(path)
    record = None
    with contextlib.suppress(ValueError, OSError):
        record = json.loads((path.parent / "results.json").read_text())
    if args.model == "final":
        return build_from(obj, path), obj, record
    role = "teacher" if args.model == "teacher" else "student"
    source = (obj.get("artifacts") or {}).get(role)
    name = obj.get("teacher") if role == "teacher" else obj["arch"]["name"]
    if not source or not name:
        raise EvalError(f"{path} does not name its {args.model} artifact (runs with store.enabled=false keep none)")
    a = obj["arch"]
    kwargs = obj.get("teacher_kwargs") if role == "teacher" else a.get("kwargs")
    model = build_model(name, int(a["num_classes"]), int(a["in_channels"]), int(a["image_size"]), kwargs)
    load_checkpoint(source, model, f"{name} ({args.model})")
    return model, obj, record


def data_for(obj: dict, args, device: torch.device):
    saved = dict(obj.get("data") or {})
    if args.data_root:
        saved["root"] = args.data_root
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), saved)
    except Exception as e:
        raise EvalError(f"the data config saved in the model file does not fit: {str(e).splitlines()[0]}") from None
    return load_data(cfg, device)


ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with room for the graph


def onnx_check(model: nn.Module, x: torch.Tensor, path: str) -> str:
    """Export with ``torch.onnx.export`` (dynamic batch), run the file in onnxruntime on ``x``, compare."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EvalError("--onnx needs onnx, onnxscript and onnxruntime: pip install 'kdprune[onnx]'") from None
    model = model.float().eval().cpu()
    x = x.float().cpu()
    # one self-contained file; ONNX's protobuf cannot hold more than 2 GB, so a larger model keeps its weights
    # in a side file PATH.data beside it
    side = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > ONNX_SINGLE_FILE_BYTES
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False, external_data=side)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        diff = float((got - model(x)).abs().max())
    ok = "matches" if diff <= 1e-4 else "DOES NOT match"
    path = f"{path} (weights in {path}.data)" if side else path
    return f"onnx: {path} written; onnxruntime's output on {x.shape[0]} test images {ok} the model's (max |Δ| {diff:.2e})"


def metrics_row(label: str, m: dict) -> str:
    return f"  {label:<14}" + "".join(f"{m[k]:>8.{2 if k.startswith('top') else 3}f}" for k in METRICS)


def run(args) -> int:
    device = resolve_device(args.device)
    model, obj, record = load(args)
    model = model.to(device).eval()
    data = data_for(obj, args, device)
    if args.split == "val" and data.val is None:
        raise EvalError("--split val: this run held out no validation split (data.val_split=0)")
    ev = record.get("config", {}).get("eval", {}) if record else {}
    splits = (args.split, "val") if args.split == "test" and data.val is not None else (args.split,)  # as recorded
    metrics = evaluate_splits(model, data, splits, int(ev.get("batch_size", 1000)),
                              int(ev.get("ece_bins", 15)))[args.split]
    params = sum(p.numel() for p in model.parameters())
    macs = count_flops(model, (data.channels, data.image_size, data.image_size))["dense"]
    arch = obj.get("teacher") if args.model == "teacher" else obj["arch"]["name"]
    out = {"path": str(model_path(args.path)), "model": args.model, "architecture": arch,
           "dataset": data.name, "split": args.split, "metrics": metrics, "params": params, "macs": macs}
    lines = [f"kdprune-eval: {args.model} {out['architecture']} on {data.name} ({args.split}), "
             f"{params:,} parameters, {macs:,} MACs",
             f"  {'':<14}{'top1':>8}{'top5':>8}{'nll':>8}{'ece':>8}",
             metrics_row(args.model, metrics)]
    key = "metrics" if args.split == "test" else "metrics_val"
    recorded = ((record or {}).get(key) or {}).get(args.model)
    if recorded:
        same = all(abs(recorded[k] - metrics[k]) <= 1e-9 for k in METRICS)
        out["record_matches"] = same
        lines.append(metrics_row("record", recorded)
                     + ("   (same)" if same else "   (differs: another device or data?)"))
    if args.latency:
        shape = (data.channels, data.image_size, data.image_size)
        out["latency"] = latency_record({args.model: model}, shape, args.latency_batch, args.iters, args.compile)
        lines.append(f"  latency on {out['latency']['device']} ({out['latency']['dtype']}), "
                     f"median [p10, p90] of {args.iters}:")
        for r in out["latency"][args.model]:
            extra = f", compiled in {r['compile_seconds']:.1f}s" if "compile_seconds" in r else ""
            lines.append(f"    batch {r['batch']:>4} {r['mode']:<8} {r['median_ms']:8.3f} ms "
                         f"[{r['p10_ms']:.3f}, {r['p90_ms']:.3f}]  {r['images_per_s']:,.0f} img/s{extra}")
    if args.onnx:
        x = next(iter(data.batches(args.split, 16)))[0]
        out["onnx"] = onnx_check(model, x, args.onnx)
        lines.append("  " + out["onnx"])
    print(json.dumps(out, indent=2) if args.json else "\n".join(lines))
    return 0


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (EvalError, ModelFileError, DataError, CheckpointError, ConfigError, OSError) as e:
        line = f"{e.filename or ''}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        print(f"kdprune-eval: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
