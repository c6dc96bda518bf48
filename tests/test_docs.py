"""The manual ships with the code and agrees with it: the README is a short front door whose commands, methods
and links exist; docs/methods.md covers every method with its reference check and every "docs/methods.md §n"
citation resolves; the configuration page lists every option of every config group; every link, anchor and
repository path the docs name exists; and the docs give today's reasons, not the history of the code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdprune_cli.pruning.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
METHODS_DOC = DOCS / "methods.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
FRONT_DOOR_LINES = 250


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    body = re.sub(r"^```.*?^```", "", text(path), flags=re.M | re.S)  # a '#' in a code block is no heading
    for heading in re.findall(r"^#{1,6} (.+)$", body, re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def cited_files():
    yield from sorted((ROOT / "kdprune_cli").rglob("*.py"))
    yield from sorted((ROOT / "conf").rglob("*.yaml"))
    yield from sorted(p for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name)
    yield from PAGES


def method_options() -> list[str]:
    """Every `method=` choice: the conf/method YAMLs (a registered method, or a variant of one such as cakld_ce)."""
    return sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def test_the_readme_is_a_short_front_door():
    lines = text(README).splitlines()
    assert len(lines) <= FRONT_DOOR_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    readme = "\n".join(lines)
    for command in ("make quickstart", "make test", "kdprune-report", "kdprune -m", "kdprune experiment="):
        assert command in readme, f"the README does not show `{command}`"
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in readme, f"the README's 'where to read more' does not link docs/{page.name}"


def test_the_commands_the_docs_name_exist():
    makefile = text(ROOT / "Makefile")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    section = text(ROOT / "pyproject.toml").partition("[project.scripts]")[2].partition("\n[")[0]
    scripts = set(re.findall(r"^([\w-]+) = ", section, re.M))
    for page in PAGES:
        body = text(page)
        for target in re.findall(r"(?:`|^)make ([a-z][\w-]*)", body, re.M):
            assert target in targets, f"{rel(page)} names `make {target}`, which the Makefile does not have"
        for tool in set(re.findall(r"\b(kdprune-[a-z]+)\b", body)):
            assert tool in scripts, f"{rel(page)} names {tool}, which is no entry point of pyproject.toml"


def config_groups() -> dict[str, list[str]]:
    """Every config group a user chooses from and its options, as `kdprune --help` lists them."""
    from hydra import initialize_config_dir

    from kdprune_cli.cli.main import config_dir, config_groups_text

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        lines = config_groups_text().splitlines()
    return {g.strip(): o.split(", ") for g, _, o in (line.partition(": ") for line in lines if line.strip())}


# Choices the docs show on purpose although kdprune has none of them: the examples of what is refused, and the
# model and dataset docs/adding.md adds (its method has its YAML on that page).
NOT_SHIPPED = {("experiment", "quickstrat"), ("method", "nope"), ("teacher", "resnet44"), ("student", "resnet44"),
               ("dataset", "mnist")}


def test_group_choices_in_the_docs_exist():
    groups = config_groups()
    choice = re.compile(r"(?<![\w./+@])(" + "|".join(map(re.escape, groups)) + r")=([a-z][\w,]*)")
    for page in PAGES:
        body = text(page)
        for group, options in choice.findall(body):
            for option in filter(None, options.split(",")):
                if (group, option) in NOT_SHIPPED or f"conf/{group}/{option}.yaml" in body:
                    continue  # refused on purpose, or the page shows how to add that very file
                assert option in groups[group], f"{rel(page)} uses {group}={option}, which is no {group} option"


def test_the_configuration_page_lists_every_option_of_every_group():
    page = text(DOCS / "configuration.md")
    rows = {}
    for first, options in re.findall(r"^\| (`[^|]+`) \| (.+) \|$", page, re.M):
        for group in re.findall(r"`(\w+)`", first):
            rows[group] = options
    for group, options in config_groups().items():
        assert group in rows, f"docs/configuration.md has no row for the config group {group}"
        for option in options:
            assert f"`{option}`" in rows[group], f"docs/configuration.md: group {group} does not list `{option}`"


def test_every_method_has_a_readme_row_and_a_specification_section():
    readme = text(README)
    rows = set(re.findall(r"^\| `(\w+)` \|", readme, re.M))
    for name in method_options():
        assert name in rows, f"the README's methods table has no row for method={name}"
    for name in rows:
        assert name in method_options(), f"the README's methods table lists {name}, which conf/method does not have"
    doc = text(METHODS_DOC)
    headings = [(m.start(), m.group(0)) for m in re.finditer(r"^#{2,3} .*$", doc, re.M)]
    for name in method_names():
        starts = [i for i, (_, h) in enumerate(headings) if re.search(rf"`{name}`", h)]
        assert starts, f"no section heading of docs/methods.md names method {name}"
        i = starts[0]
        end = headings[i + 1][0] if i + 1 < len(headings) else len(doc)
        body = doc[headings[i][0]:end]
        assert re.search(r"Checked\s+against", body), f"the section of {name} names no reference check"


def test_every_citation_resolves_to_a_section_of_the_shipped_spec():
    sections = {int(n) for n in re.findall(r"^## §(\d+) ", text(METHODS_DOC), re.M)}
    assert sections == set(range(8))
    cited = 0
    for path in cited_files():
        body = text(path)
        assert "METHODS.md" not in body, f"{rel(path)} cites a file that is not in the repository"
        for first, last in re.findall(r"docs/methods\.md §(\d+)(?:[–-](\d+))?", body):
            cited += 1
            for n in range(int(first), int(last or first) + 1):
                assert n in sections, f"{rel(path)} cites docs/methods.md §{n}, which does not exist"
    assert cited >= 25


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_and_anchor_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{rel(page)} links {target}, and {file} does not exist"
        if anchor:
            assert anchor in anchors(dest), f"{rel(page)} links {target}: {dest.name} has no heading #{anchor}"


# Paths the docs name that are not files of this repository: where the wheel ships conf/, the git-ignored
# machine config a user creates, and a file of NutePrune's official code (docs/methods.md §5).
NOT_OURS = {"kdprune_cli/conf", "conf/local/default.yaml", "scripts/train_mask.sh"}
REPO_PATH = re.compile(r"(?<![\w/.])((?:kdprune_cli|tests|scripts|conf|docs)/[\w./-]*\w)")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_repository_path_the_docs_name_exists(page):
    body = text(page)
    examples = set(re.findall(r"^```\w*\n# (\S+)\n", body, re.M))  # files a page shows how to write
    for m in REPO_PATH.finditer(body):
        path = m.group(1)
        if path in NOT_OURS | examples or body[m.end():m.end() + 1] in ("<", "*", "{"):
            continue  # a pattern (conf/method_budget/quick_<method>.yaml), not a path
        assert (ROOT / path).exists(), f"{rel(page)} names {path}, which is not in the repository"


HISTORY = re.compile(r"(?<![\w&/(])#\d+(?![\w-])|\bchanged in\b|\bformer(ly)?\b|\bas before\b|\bused to be\b", re.I)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_the_docs_give_todays_reasons_not_history(page):
    body = re.sub(r"^```.*?^```", "", text(page), flags=re.M | re.S)
    hits = [line for line in body.splitlines() if HISTORY.search(line)]
    assert not hits, f"{rel(page)} tells the history of the code instead of today's reason:\n" + "\n".join(hits)


def test_every_readme_section_the_code_cites_exists():
    """A comment that sends the reader to "README, <section>" names a section the README has."""
    headings = [h.lower() for h in re.findall(r"^#{2,3} (.+)$", text(README), re.M)]
    for path in cited_files():
        if path in PAGES:
            continue
        for section in re.findall(r"README,? '?([A-Z][A-Za-z ]*[a-z])", text(path)):
            assert any(h.startswith(section.lower()) for h in headings), \
                f"{rel(path)} cites README, {section}; the README has no such section (the manual is in docs/)"
