"""The method context: small services sharing one cost book, each a seam a test can spy on."""
import os
import resource

import torch

from kdprune_cli.experiment.services import Costs, peak_rss_bytes
from kdprune_cli.training import compiling


def test_services_share_one_cost_book_and_a_spy_on_a_service_reaches_everyone(make_ctx):
    ctx = make_ctx()
    for service in (ctx.trainer, ctx.evaluator, ctx.artifacts):
        assert service.costs is ctx.costs
    assert ctx.trainer.seeds is ctx.seeds and ctx.artifacts.trainer is ctx.trainer
    assert ctx.pruner.sparsity == float(ctx.cfg.sparsity)
    with ctx.costs.stage("probe"):
        assert ctx.costs.current is ctx.costs.stages["probe"]
    spy = lambda *a, **k: "spied"  # noqa: E731
    ctx.trainer.train = spy  # a test's spy replaces the trainer's method, so the artifacts and methods reach it too
    assert ctx.artifacts.trainer.train is spy
    logged = []
    ctx.log = logged.append  # the trainer logs through the context's current log
    ctx.trainer.log({"x": 1})
    assert logged == [{"x": 1}]


def test_a_stored_dense_model_books_its_training_compile_time(make_ctx, monkeypatch):
    """The dense teacher and student are store artifacts: the stage that trains one books what its training
    counted, compile time included, as every other training stage does; the stage that reads it books none."""
    monkeypatch.setattr(compiling.BACKEND, "name", "aot_eager")  # dynamo's graphs without code generation
    made = make_ctx("compile=true", "max_batches=2")
    made.artifacts.dense_student()
    st = made.costs.stages["student"]
    assert not st.cached and st.samples > 0 and st.compile_seconds > 0 and st.fallbacks == 0
    read = make_ctx("compile=true", "max_batches=2")  # the same store
    read.artifacts.dense_student()
    st = read.costs.stages["student"]
    assert st.cached and st.samples == 0 and st.compile_seconds == 0 and st.artifact["compile_seconds"] > 0


def test_every_stage_books_the_process_peak_rss_on_cpu(make_ctx):
    """CPU: torch tracks no allocations, so a stage books the process's peak resident set when it ends (bytes,
    kind ``process_rss``), never a ``peak_memory_bytes``; it is process-wide, so it only grows."""
    ctx = make_ctx()
    assert ctx.costs.device == torch.device("cpu")
    with ctx.costs.stage("outer"):
        with ctx.costs.stage("inner"):
            big = torch.ones(4_000_000)  # 16 MB touched
        del big
    st = ctx.costs.stages
    for name in ("outer", "inner"):
        assert isinstance(st[name].peak_rss_bytes, int) and st[name].peak_rss_bytes > 16_000_000
        assert st[name].memory_kind == "process_rss" and st[name].peak_memory_bytes is None
    assert st["inner"].peak_rss_bytes <= st["outer"].peak_rss_bytes <= peak_rss_bytes()
    with open("/proc/self/status") as f:  # bytes, not KiB: at least the resident set now (Linux)
        rss_now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    # Linux folds each thread's cached RSS count (up to 64 pages) into the process's lazily, so two reads of
    # "the resident set now" through different calls may differ by that much per thread.
    slack = 64 * resource.getpagesize() * len(os.listdir("/proc/self/task"))
    assert peak_rss_bytes() >= rss_now - slack


class FakeAllocator:
    """torch.cuda's peak statistics, simulated: ``use(n)`` sets the bytes held now."""

    def __init__(self):
        self.now = self.peak = 0
        self.resets = 0

    def use(self, n):
        self.now = n
        self.peak = max(self.peak, n)

    def max_memory_allocated(self, device=None):
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.now
        self.resets += 1


def test_cuda_stage_peak_is_its_own_also_around_nested_stages(monkeypatch):
    """CUDA: each stage's peak allocated bytes while it ran, restarted per stage; an inner stage's peak is
    not the outer's (as its seconds), the outer's peaks before and after the inner one both count, and a stage
    run twice keeps the higher."""
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    costs = Costs(device=torch.device("cuda"))
    fake.use(500)  # before any stage: nobody's
    fake.use(10)
    with costs.stage("train"):
        fake.use(100)
        fake.use(40)
        with costs.stage("evaluate"):
            fake.use(300)
            fake.use(50)
        fake.use(70)
    with costs.stage("evaluate"):
        fake.use(200)
        fake.use(15)  # freed before it ends
    with costs.stage("train"):
        fake.use(20)
        with costs.stage("evaluate"):
            fake.use(60)
        fake.use(130)
    st = costs.stages
    assert st["train"].peak_memory_bytes == 130 and st["evaluate"].peak_memory_bytes == 300
    assert {s.memory_kind for s in st.values()} == {"cuda_allocated"}
    assert all(s.peak_rss_bytes is None for s in st.values())
    with costs.stage("train"):
        with costs.stage("evaluate"):
            fake.use(400)
            fake.use(5)
        fake.use(10)
    assert st["train"].peak_memory_bytes == 130  # max(peak before the inner stage, after it), not the inner's
    assert not costs._open


def test_nested_counts_book_each_teacher_forward_once():
    """A stage opened with count() around a count() of the scored model: the teacher is hooked once."""
    costs, teacher, student = Costs(), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    costs.teacher = teacher
    x = torch.zeros(5, 3)
    with costs.count(stage="score"), costs.count(student):
        with torch.no_grad():
            teacher(x)
        student(x)
    assert (costs.stages["score"].samples, costs.stages["score"].teacher_samples) == (5, 5)
