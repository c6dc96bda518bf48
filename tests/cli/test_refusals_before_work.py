"""Bad input is refused before any work: every number has a range, the models are built and run once at the
dataset's size, checkpoints are read before the teacher trains, Hydra's and OmegaConf's own errors are one
line and exit 2, and the tools around the saved model (kdprune-eval, kdprune-report) refuse damaged input in
one line."""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_S

from kdprune_cli.cli import eval as eval_cli
from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.models import build_model
from kdprune_cli.models.checkpoint import CheckpointError
from kdprune_cli.models.modelfile import model_file
from kdprune_cli.report import cli as report


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _prunable_names() -> str:
    model = build_model("resnet20", 10, 1, 8)
    return ",".join(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


OUT_OF_RANGE = [
    (["teacher.train.lr=nan"], "teacher.train.lr must be a finite number > 0"),
    (["student.train.lr=inf"], "student.train.lr must be a finite number > 0"),
    (["method.retrain.lr=0"], "method.retrain.lr must be a finite number > 0"),
    (["method=nuteprune", "method.kd_weight=-1"], "method.kd_weight must be a finite number >= 0"),
    (["method=nuteprune", "method.hidden_weight=nan"], "method.hidden_weight"),
    (["method=nuteprune", "method.lora_r=0"], "method.lora_r"),
    (["method=nuteprune", "method.lora_r=-1"], "method.lora_r"),
    (["method=nuteprune", "method.mask_lr=inf"], "method.mask_lr"),
    (["prune.granularity=channel", "prune.round_to=1000"], "prune.round_to=1000 leaves no channel removable.*64"),
    (["prune.granularity=channel", "prune.round_to=0"], "prune.round_to"),
    ([f"prune.exclude=[{_prunable_names()}]"], "prune.exclude names every Conv2d/Linear"),
    (["data.val_split=0.9999"], "data.val_split=0.9999 leaves 0 of the 1437 digits training images"),
    (["data.val_split=0.0001"], "data.val_split=0.0001 leaves .* and 0 for validation"),
    (["student=timm", "student.name=timm/resmlp_12_224"], "student model timm/resmlp_12_224 .* 1x8x8"),
    (["teacher=timm", "teacher.name=timm/resmlp_12_224"], "teacher model timm/resmlp_12_224 .* 1x8x8"),
    (["method=nuteprune", "student=timm", "student.name=timm/convnext_atto"],
     "student model timm/convnext_atto cannot run on digits's 1x8x8 inputs"),
    (["teacher.checkpoint=${oc.env:KDPRUNE_TEST_NOT_SET}"], "teacher.checkpoint: .*KDPRUNE_TEST_NOT_SET"),
]


@pytest.mark.parametrize("overrides,match", OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_out_of_range_values_are_refused_before_any_work(tiny_cfg, tmp_path, overrides, match):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=match):
        run_job(cfg, tmp_path / "r", summary=False, overrides=overrides)
    rec = _record(tmp_path / "r")
    assert rec["status"] == "failed" and rec["cost"]["stages"] == {}
    assert not (tmp_path / "store" / "teacher").exists() and not (tmp_path / "store" / "data").exists()


def test_a_truncated_student_checkpoint_is_refused_before_the_teacher_trains(tiny_cfg, tmp_path):
    ck = tmp_path / "student.pt"
    torch.save(build_model("resnet20", 10, 1, 8).state_dict(), ck)
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        run_job(tiny_cfg(f"student.checkpoint={ck}"), tmp_path / "r", summary=False)
    assert _record(tmp_path / "r")["status"] == "failed"
    assert not (tmp_path / "store" / "teacher").exists()


def test_a_student_checkpoint_of_another_model_is_refused_before_the_teacher_trains(tiny_cfg, tmp_path):
    ck = tmp_path / "student.pt"
    torch.save(build_model("resnet32", 10, 1, 8).state_dict(), ck)
    with pytest.raises(CheckpointError, match="does not fit resnet20"):
        run_job(tiny_cfg(f"student.checkpoint={ck}"), tmp_path / "r", summary=False)
    assert not (tmp_path / "store" / "teacher").exists()


def test_a_timm_checkpoint_path_holding_python_objects_is_one_line(tiny_cfg, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": threading.Lock}, evil)
    cfg = tiny_cfg("student=timm", "student.name=timm/resnet10t", f"+student.kwargs.checkpoint_path={evil}")
    with pytest.raises(ConfigError, match="checkpoint_path .* Python objects other than tensors") as info:
        run_job(cfg, tmp_path / "r", summary=False)
    assert "weights_only" not in str(info.value)


# --- the real entry point: Hydra's errors, EFBIG --------------------------------------------------------------
def _cli(args, tmp_path, **kw):
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env.pop("KDPRUNE_TEST_NOT_SET", None)
    return subprocess.run([sys.executable, "-m", "kdprune_cli.cli.main", "experiment=quickstart", "progress=false",
                           "print_config=false", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=SAFETY_S, **kw)


def _one_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdprune: error:"), (r.returncode, r.stderr)
    return lines[0]


def test_composition_errors_are_one_line_and_a_refused_rerun_replaces_the_ok_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "ok", "error": None}))  # an earlier run's record
    line = _one_line(_cli(["method.alpha=abc", f"hydra.run.dir={run}"], tmp_path))
    assert "method.alpha=abc" in line and "Float" in line
    rec = _record(run)
    assert rec["status"] == "failed" and "method.alpha=abc" in rec["error"]

    line = _one_line(_cli(["experiment=quickstrat", f"hydra.run.dir={tmp_path}/r2"], tmp_path))
    assert "quickstrat" in line and "quickstart" in line

    line = _one_line(_cli(["teacher.checkpoint=${oc.env:KDPRUNE_TEST_NOT_SET}", f"hydra.run.dir={tmp_path}/r3"],
                          tmp_path))
    assert "teacher.checkpoint" in line and "KDPRUNE_TEST_NOT_SET" in line
    assert _record(tmp_path / "r3")["status"] == "failed"


def test_a_file_size_limit_is_a_storage_error(tmp_path):
    def limit():  # 64 KiB per file: Hydra's small files fit, the digits cache (~120 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    r = _cli([f"hydra.run.dir={tmp_path}/run"], tmp_path, preexec_fn=limit)
    line = _one_line(r)
    assert "File too large" in line, line
    assert _record(tmp_path / "run")["status"] == "failed"
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file() and ".tmp" in p.name]


# --- kdprune-eval ------------------------------------------------------------------------------------------------
def _model_files(tmp_path) -> dict:
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 1, "image_size": 8, "kwargs": {}}
    base = model_file(build_model("resnet20", 10, 1, 8), arch, {"name": "digits"})

    def edited(shapes=None, weights=None) -> dict:
        obj = {**base, "shapes": {k: dict(v) for k, v in base["shapes"].items()},
               "state_dict": dict(base["state_dict"])}
        for name, attrs in (shapes or {}).items():
            obj["shapes"][name].update(attrs)
        obj["state_dict"].update(weights or {})
        return obj

    w = base["state_dict"]["layer1.0.conv1.weight"]
    files = {"widths": edited(shapes={"layer1.0.conv1": {"out_channels": 8}}),
             "groups": edited(shapes={"layer1.0.conv1": {"groups": 2}}),
             "narrowed": edited(weights={"layer1.0.conv1.weight": w[:8]}),
             "narrowed_with_its_widths": edited(shapes={"layer1.0.conv1": {"out_channels": 8}},
                                                weights={"layer1.0.conv1.weight": w[:8]})}
    out = {}
    for name, obj in files.items():
        out[name] = tmp_path / f"{name}.pt"
        torch.save(obj, out[name])
    return out


def test_kdprune_eval_refuses_a_model_file_whose_widths_or_weights_disagree(tmp_path, capsys):
    for name, path in _model_files(tmp_path).items():
        assert eval_cli.main([str(path)]) == 2, name
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and "does not fit 'resnet20'" in err[0], (name, err)


@pytest.mark.parametrize("args", [["--latency-batch", "0"], ["--iters", "0"], ["--iters", "-3"],
                                  ["--latency-batch", "-1"]])
def test_kdprune_eval_counts_below_one_are_usage_errors(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as info:
        eval_cli.main([str(tmp_path), "--latency", *args])
    assert info.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err


# --- kdprune-report ------------------------------------------------------------------------------------------------
WRONG_TYPES = [("metrics", [1, 2]), ("sparsity_target", "0.5"), ("cost", {"stages": [1]}), ("seed", "zero"),
               ("metrics", {"final": [99.0]}), ("metrics", {"final": {"top1": "high"}}), ("cost", [])]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={v}" for f, v in WRONG_TYPES])
def test_kdprune_report_lists_a_record_with_wrong_types_as_unreadable(tmp_path, field, value):
    from records import _job
    from records import _record as ok_record

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _job(sweep, 0, ok_record("cakld", True, 0.5, 0, 0))
    bad = ok_record("cakld", True, 0.9, 1, 1)
    bad[field] = value
    _job(sweep, 1, bad)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = report.main([str(sweep), "--out", str(tmp_path / "rep"), "--cost", "all"])
    assert rc == 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "unreadable" in md and field in md



def test_a_held_out_split_that_leaves_a_side_empty_is_a_data_error():
    from fakedata import _blob

    from kdprune_cli.data import DataError, DeviceData

    for split in (0.99, 0.01):  # 10 images: none left to train on, or none held out
        with pytest.raises(DataError, match="val_split"):
            DeviceData("cifar10", _blob(n=10, s=32), torch.device("cpu"), val_split=split)
