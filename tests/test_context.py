"""The method context: small services sharing one cost book; methods call the services, not the old names."""
import re
from pathlib import Path

import kdprune_cli.pruning as pruning
from kdprune_cli.runner import ALIASES


def test_methods_call_the_services_not_the_compatibility_names():
    old = re.compile(r"\bctx\.(%s)\b" % "|".join(ALIASES))
    for f in sorted(Path(pruning.__file__).parent.glob("*.py")):
        hits = [f"{f.name}:{i}: {line.strip()}" for i, line in enumerate(f.read_text().splitlines(), 1)
                if old.search(line)]
        assert not hits, "use ctx.<service>.<name> (see README 'Adding a method'):\n" + "\n".join(hits)


def test_services_share_one_cost_book_and_aliases_reach_them(make_ctx):
    ctx = make_ctx()
    for service in (ctx.trainer, ctx.evaluator, ctx.artifacts):
        assert service.costs is ctx.costs
    assert ctx.trainer.seeds is ctx.seeds and ctx.artifacts.trainer is ctx.trainer
    assert ctx.cost is ctx.costs.stages and ctx.metrics is ctx.evaluator.metrics
    assert ctx.sparsity == ctx.pruner.sparsity == float(ctx.cfg.sparsity)
    with ctx.stage("probe"):
        assert ctx.current_stage is ctx.costs.stages["probe"]
    spy = lambda *a, **k: "spied"  # noqa: E731
    ctx.train = spy  # a test's spy replaces the trainer's method, so the artifacts and methods reach it too
    assert ctx.trainer.train is spy and ctx.train is spy
    logged = []
    ctx.log = logged.append  # the trainer logs through the context's current log
    ctx.trainer.log({"x": 1})
    assert logged == [{"x": 1}]
