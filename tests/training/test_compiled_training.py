"""The compiled trainer (compile: auto | true | false | step): on CPU, a run with compiled forwards and a run
with the whole step in one graph give the same masks, exactly-zero pruned weights and the same loss trajectory
as the eager run. The backend is dynamo's
``aot_eager`` (the same graphs, functionalisation and autograd as inductor, no C++ code generation), so the
test exercises the trainer's compiled path in seconds."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from kdprune_cli.config.schema import ConfigError, TrainRecipe, validate
from kdprune_cli.data import DeviceData
from kdprune_cli.distill.objectives import CrossEntropy, Distill
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import apply_masks, assert_masked, mask_grads, prunable_params, select
from kdprune_cli.training import compiling
from kdprune_cli.training.loop import train


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiling.BACKEND, "name", "aot_eager")


def cifar_like(n_train: int = 96, seed: int = 0) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    blob = {"x_train": torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_train": torch.randint(0, 10, (n_train,), generator=g),
            "x_test": torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_test": torch.randint(0, 10, (16,), generator=g)}
    return DeviceData("cifar10", blob, torch.device("cpu"))


class Recorded:
    """An objective that records the loss of every step."""

    def __init__(self, inner):
        self.__dict__.update(inner=inner, losses=[])

    def __getattr__(self, name):  # the inner objective's teacher, counters and hooks
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def __call__(self, model, x, y, idx):
        loss, logits = self.inner(model, x, y, idx)
        self.losses.append(loss.item())
        return loss, logits


RECIPE = OmegaConf.merge(OmegaConf.structured(TrainRecipe), {"epochs": 3, "batch_size": 32, "lr": 0.1,
                                                             "momentum": 0.9, "weight_decay": 5e-4,
                                                             "eval_every": 0})


def resnet20(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet20", 10, 3, 32)


def run(model, objective, compile: str, masks=None, gradual: bool = False, later=None, **kw):
    """Train 3 epochs of 3 steps; with ``gradual`` the masks go from 50% to 60% at step 4, chosen from the
    weights as they are then (like GMP: a dict update), so the masks depend on the trajectory; with ``later``
    they become ``later`` at step 4. Returns the loss of every step (of every epoch where the whole step is one
    graph) and the cost."""
    def hook(step, total):
        if later is not None and step == 4:
            masks.update({n: m.clone() for n, m in later.items()})
        if gradual and step == 4:
            P = prunable_params(model)
            masks.update(select({n: p.detach().abs() for n, p in P.items()}, 0.6, keep=masks))
    epochs = []
    rec = objective if compile == "step" else Recorded(objective)
    stats = train(model, cifar_like(), kw.pop("recipe", RECIPE), rec, gen=torch.Generator().manual_seed(1),
                  masks=masks, progress=False, step_hook=hook, compile=compile,
                  log=kw.pop("log", lambda r: epochs.append(r["train_loss"])), **kw)
    return (epochs if compile == "step" else rec.losses), stats


def test_compiled_and_eager_runs_give_the_same_masks_zeros_and_losses():
    base = resnet20()
    masks0 = select({n: p.detach().abs() for n, p in prunable_params(base).items()}, 0.5)
    runs = {}
    for mode in ("false", "true"):
        model, masks = copy.deepcopy(base), {n: m.clone() for n, m in masks0.items()}
        graphs = compiling.BACKEND.graphs
        losses, stats = run(model, CrossEntropy(), mode, masks, gradual=True)
        runs[mode] = (model, masks, losses, stats, compiling.BACKEND.graphs - graphs)
    (m_e, k_e, l_e, s_e, g_e), (m_c, k_c, l_c, s_c, g_c) = runs["false"], runs["true"]
    assert g_e == 0 and s_e["compile_seconds"] == 0 and s_e["fallbacks"] == 0
    assert g_c >= 1 and s_c["fallbacks"] == 0 and s_c["compile_seconds"] > 0  # every forward ran compiled
    assert len(l_c) == len(l_e) == 9
    assert l_c == pytest.approx(l_e, rel=1e-4)
    assert k_c.keys() == k_e.keys() and all(torch.equal(k_c[n], k_e[n]) for n in k_e)
    assert sum(int((~m).sum()) for m in k_c.values()) > 0.59 * sum(m.numel() for m in k_c.values())
    for n, p in prunable_params(m_c).items():
        assert (p[~k_c[n]] == 0).all(), n  # the masks were enforced on the model's own parameters
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(m_c.state_dict().values(),
                                                                          m_e.state_dict().values()))
    # the trained module has its own state_dict keys, no wrapper prefix
    assert not any("_orig_mod" in k for k in m_c.state_dict())


@pytest.mark.parametrize("mode", ["true", "step"])
def test_a_new_instance_of_the_same_architecture_does_not_recompile(mode):
    run(resnet20(1), CrossEntropy(), mode)
    _, stats = run(resnet20(2), CrossEntropy(), mode)
    assert stats["recompiles"] == 0 and stats["fallbacks"] == 0 and stats["graph_breaks"] == 0


def test_kd_compiles_the_teacher_too_and_puts_it_back():
    teacher = resnet20(3).eval()
    kd = {"alpha": 0.5, "gamma": 1.0, "temperature": 4.0, "logit_norm": True}
    eager_obj, comp_obj = Distill(copy.deepcopy(teacher), **kd), Distill(teacher, **kd)
    l_e, s_e = run(resnet20(4), eager_obj, "false")
    calls = compiling.BACKEND.calls
    l_c, s_c = run(resnet20(4), comp_obj, "true")
    assert comp_obj.teacher is teacher  # the objective's teacher is the module again
    assert compiling.BACKEND.calls - calls >= 2 * 9  # student and teacher forward, every step
    assert s_c["fallbacks"] == 0 and s_c["teacher_samples"] == s_e["teacher_samples"] == 9 * 32
    assert l_c == pytest.approx(l_e, rel=1e-4)


def test_masks_accept_a_compiled_model():
    """``torch.compile(model)`` names its parameters ``_orig_mod.<name>``: the mask functions and the trainer
    resolve the module behind it instead of failing or, worse, masking nothing."""
    model = resnet20(5)
    masks = select({n: p.detach().abs() for n, p in prunable_params(model).items()}, 0.5)
    wrapped = torch.compile(model, backend="aot_eager")
    apply_masks(wrapped, masks)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    mask_grads(wrapped, masks)
    assert_masked(wrapped, masks)
    for n, p in prunable_params(model).items():
        assert (p[~masks[n]] == 0).all() and (p.grad[~masks[n]] == 0).all()
    _, stats = run(wrapped, CrossEntropy(), "false", masks)
    assert stats["samples"] == 9 * 32
    assert_masked(model, masks)


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiling.wanted("auto", cpu) and compiling.wanted("auto", cuda)
    assert compiling.wanted(True, cpu) and compiling.wanted("true", cpu) and not compiling.wanted(False, cuda)
    for ok in ("compile=auto", "compile=true", "compile=false", "compile=step"):
        validate(compose_cfg([ok]))
    with pytest.raises(ConfigError, match="compile must be auto, true, false or step"):
        validate(compose_cfg(["compile=sometimes"]))
    with pytest.raises(ValueError, match="compile must be auto, true, false or step, got 'sometimes'"):
        compiling.wanted("sometimes", cpu)  # the trainer called directly


def epoch_losses(model, objective, **kw) -> list:
    epochs = []
    run(model, objective, "false", log=lambda r: epochs.append(r["train_loss"]), **kw)
    return epochs


def both(recipe=RECIPE, by_weights: bool = True):
    """An eager run and a whole-step run of CE from the same ResNet-20 whose masks go from 50% to 60% at
    step 4 (gradual pruning), chosen from the weights then (``by_weights``) or from the start:
    ``(losses, model, masks)`` of each, and the whole-step run's cost and graphs made."""
    base = resnet20()
    scores = {n: p.detach().abs() for n, p in prunable_params(base).items()}
    masks0 = select(scores, 0.5)
    kw = {"gradual": True} if by_weights else {"later": select(scores, 0.6, keep=masks0)}
    m_e, k_e = copy.deepcopy(base), {n: m.clone() for n, m in masks0.items()}
    l_e = epoch_losses(m_e, CrossEntropy(), masks=k_e, recipe=recipe, **kw)
    m_s, k_s = copy.deepcopy(base), {n: m.clone() for n, m in masks0.items()}
    graphs = compiling.BACKEND.graphs
    l_s, stats = run(m_s, CrossEntropy(), "step", k_s, recipe=recipe, **kw)
    for k in (k_e, k_s):
        assert sum(int((~m).sum()) for m in k.values()) > 0.59 * sum(m.numel() for m in k.values())
    for n, p in prunable_params(m_s).items():
        assert (p[~k_s[n]] == 0).all(), n
    return (l_e, m_e, k_e), (l_s, m_s, k_s), stats, compiling.BACKEND.graphs - graphs


def test_the_whole_step_is_the_eager_step(monkeypatch):
    """Run uncompiled, the one-graph step (functional SGD, zero-started momentum, the learning-rate table on
    the device, static masks) gives the eager loop's losses, masks and weights to the last bit."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    (l_e, m_e, k_e), (l_s, m_s, k_s), stats, _ = both()
    assert len(l_s) == 3 and l_s == l_e
    assert all(torch.equal(k_s[n], k_e[n]) for n in k_e)
    assert all(torch.equal(a, b) for a, b in zip(m_s.state_dict().values(), m_e.state_dict().values()))


def test_the_whole_step_compiles_into_one_graph():
    """Compiled, the step is one graph, compiled once, through which every step runs; it trains as eager up to
    the rounding of the traced backward (a small learning rate keeps that from growing over the steps, and
    masks fixed in advance keep it from flipping a near tie in a selection)."""
    torch._dynamo.reset()  # no graph of an earlier test's step (without masks) to recompile from
    slow = OmegaConf.merge(RECIPE, {"lr": 0.01})
    (l_e, m_e, k_e), (l_s, m_s, k_s), stats, graphs = both(slow, by_weights=False)
    assert graphs == 1
    assert stats["recompiles"] == 0 and stats["graph_breaks"] == 0 and stats["fallbacks"] == 0
    assert stats["compile_seconds"] > 0 and stats["samples"] == 9 * 32
    assert l_s == pytest.approx(l_e, rel=1e-3)  # within bf16's resolution (4e-3)
    assert all(torch.equal(k_s[n], k_e[n]) for n in k_e)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(m_s.state_dict().values(),
                                                                          m_e.state_dict().values()))


def test_kd_in_one_graph_books_the_teacher_and_matches_eager():
    teacher = resnet20(3).eval()
    kd = {"alpha": 0.5, "gamma": 1.0, "temperature": 4.0, "logit_norm": True}
    l_e = epoch_losses(resnet20(4), Distill(copy.deepcopy(teacher), **kd))
    obj = Distill(teacher, **kd)
    l_s, stats = run(resnet20(4), obj, "step")
    assert obj.teacher is teacher and stats["teacher_samples"] == 9 * 32 and stats["fallbacks"] == 0
    assert l_s == pytest.approx(l_e, rel=1e-2)  # lr 0.1: the backward's rounding grows over the steps


class Stop(Exception):
    pass


def stop_after_epoch_2(rec):
    if rec["epoch"] == 2:
        raise Stop


def test_a_one_graph_checkpoint_resumes_in_either_mode(tmp_path, monkeypatch):
    """The momentum buffers are the optimizer's state and the step counter restarts the learning-rate table: a
    training stopped in one graph goes on from its checkpoint, in one graph or eager, to the weights of an
    uninterrupted run (the step runs uncompiled here, where it is exact)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    whole = resnet20(6)
    run(whole, CrossEntropy(), "step")
    for resume_mode in ("step", "false"):
        model, ck = resnet20(6), tmp_path / f"{resume_mode}.pt"
        with pytest.raises(Stop):
            run(model, CrossEntropy(), "step", checkpoint=ck, log=stop_after_epoch_2)
        assert ck.is_file()
        run(model, CrossEntropy(), resume_mode, checkpoint=ck)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))


def test_what_trains_in_one_graph():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.training_mode("step", cpu, CrossEntropy(), "sgd") == "step"
    assert compiling.training_mode("step", cpu, CrossEntropy(), "adamw") == "forward"
    assert compiling.training_mode("true", cpu, CrossEntropy(), "sgd") == "forward"
    assert compiling.training_mode("auto", cpu, CrossEntropy(), "sgd") == "eager"
    assert compiling.training_mode("auto", cuda, CrossEntropy(), "sgd") == "forward"

    class Hooks(CrossEntropy):
        eager_only = True
    assert compiling.training_mode("step", cpu, Hooks(), "sgd") == "eager"
