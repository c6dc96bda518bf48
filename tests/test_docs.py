"""The method specification ships with the code: docs/methods.md exists, covers every registered method
(with the reference implementation it was checked against), and every "docs/methods.md §n" citation in the
code, configs, tests and README points at one of its sections."""
from __future__ import annotations

import re
from pathlib import Path

from kdprune_cli.pruning.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"


def cited_files():
    yield from sorted((ROOT / "kdprune_cli").rglob("*.py"))
    yield from sorted((ROOT / "conf").rglob("*.yaml"))
    yield from sorted(p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name)
    yield ROOT / "README.md"


def test_every_citation_resolves_to_a_section_of_the_shipped_spec():
    assert DOC.is_file(), "docs/methods.md must ship with the code"
    sections = {int(n) for n in re.findall(r"^## §(\d+) ", DOC.read_text(encoding="utf-8"), re.M)}
    assert sections == set(range(8))
    cited = 0
    for path in cited_files():
        text = path.read_text(encoding="utf-8")
        assert "METHODS.md" not in text, f"{path.relative_to(ROOT)} cites a file that is not in the repository"
        for first, last in re.findall(r"docs/methods\.md §(\d+)(?:[–-](\d+))?", text):
            cited += 1
            for n in range(int(first), int(last or first) + 1):
                assert n in sections, f"{path.relative_to(ROOT)} cites docs/methods.md §{n}, which does not exist"
    assert cited >= 25


def test_every_method_has_a_section_that_names_its_reference_check():
    doc = DOC.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(0)) for m in re.finditer(r"^#{2,3} .*$", doc, re.M)]
    for name in method_names():
        starts = [i for i, (_, h) in enumerate(headings) if re.search(rf"`{name}`", h)]
        assert starts, f"no section heading names method {name}"
        i = starts[0]
        end = headings[i + 1][0] if i + 1 < len(headings) else len(doc)
        body = doc[headings[i][0]:end]
        assert re.search(r"Checked\s+against", body), f"the section of {name} names no reference check"
