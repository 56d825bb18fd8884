"""The README is a front page under 15 KB that links every reference page, and no link in the
README or under docs/ points at a file or heading that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings in code
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def test_slug_matches_githubs_rule() -> None:
    assert slug("Checkpoints, resume and faults") == "checkpoints-resume-and-faults"
    assert slug("Decentralized mode: DIMAT and gossip") == "decentralized-mode-dimat-and-gossip"
    assert slug("`fedwa compare`'s table") == "fedwa-compares-table"


def test_the_front_page_is_short_and_links_every_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 15_000, f"README.md is {len(readme.encode())} bytes"
    targets = {m.group(1).split("#")[0] for m in LINK.finditer(readme)}
    missing = [p.name for p in PAGES if f"docs/{p.name}" not in targets]
    assert not missing, f"README.md does not link {missing}"
    for needed in ("pip install -e . && fedwa run",
                   'pip install -e ".[test]" && python -m pytest -q'):
        assert f"```bash\n{needed}\n```" in readme  # the two set-up commands, verbatim


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for m in LINK.finditer(page.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(REPO)}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not broken, broken


def test_the_quick_start_commands_pass_every_check_before_a_run(tmp_path: Path) -> None:
    """Each `fedwa run` / `fedwa compare` line of the front page's quick start, as written, gets
    through what `fedwa` checks before an engine starts (keys, data, partition, strategy,
    model). The alpha of 0.1 it once showed was refused: with 20 clients a client got fewer
    than 10 examples."""
    import shlex

    from fedwa.cli import build_parser, check_runnable, for_strategy, gather_overrides
    from fedwa.run.config import resolve_config

    readme = (REPO / "README.md").read_text()
    start = readme.index("## Quick start")
    (block,) = re.findall(r"```bash\n(.*?)```", readme[start:readme.index("\n## ", start + 1)],
                          re.S)
    checked = 0
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] not in (["fedwa", "run"], ["fedwa", "compare"]) or "--resume" in words:
            continue
        args = build_parser().parse_args(words[1:])
        overrides = {**gather_overrides(args.config, args.set), "output-dir": str(tmp_path)}
        if words[1] == "compare":
            configs = [resolve_config(for_strategy(overrides, s, int(seed)))
                       for s in args.strategies.split(",") for seed in args.seeds.split(",")]
        else:
            configs = [resolve_config(overrides)]
        for config in configs:
            check_runnable(config)
        checked += 1
    assert checked == 3, block  # fedwa run, the swa run, fedwa compare
