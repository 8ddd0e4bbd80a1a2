"""The README and the guides in docs/: every relative link resolves, the front door stays short.

A relative link (``[text](path)``, ``[text](path#anchor)``, ``![alt](path)`` or a reference
definition ``[id]: path``) must name a file or directory that exists, resolved against the
file that holds the link; an anchor into a markdown file must name one of its headings
(GitHub's slugs). http(s), mailto and pure ``#anchor`` links are not checked: the first two
need the network, and a page's own anchors move with its headings, which the page's author
sees. Code (fenced blocks and inline spans) is not markdown, so links there are ignored.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 150

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[^)]*)?\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def markdown_files() -> list[Path]:
    """README.md and every guide under docs/."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks, inline code spans replaced by their bare text
    (a link's text may be code, the link itself still counts). Line breaks are kept, so
    line numbers still match the file."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _CODE_SPAN.sub(lambda m: re.sub(r"[\[\]()]", " ", m.group(2)), text)


def find_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in markdown ``text``, in order."""
    prose = _prose(text)
    found = [(m.start(), m.group(1)) for m in _INLINE.finditer(prose)]
    found += [(m.start(), m.group(1)) for m in _REFERENCE.finditer(prose)]
    return [(prose.count("\n", 0, pos) + 1, target.strip("<>")) for pos, target in sorted(found)]


def is_checked(target: str) -> bool:
    """Only relative links to files: no scheme (http:, mailto:, ...), no bare ``#anchor``."""
    return not (target.startswith(("#", "//")) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated headings get -1, -2, ... as on
    GitHub."""
    slugs, counts = set(), {}
    for m in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(m.group(2))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        slugs.add(f"{slug}-{n}" if n else slug)
    return slugs


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """'file:line: target (why)' for each relative link of ``path`` that points nowhere."""
    text = path.read_text(encoding="utf-8") if text is None else text
    problems = []
    for line, target in find_links(text):
        if not is_checked(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part.split("?")[0]).resolve()
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        if not dest.exists():
            problems.append(f"{where}: {target} (no such file or directory)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {target} (no heading with anchor #{anchor} in {file_part})")
    return problems


# --------------------------------------------------------------------- the link finder


def test_link_finder_reports_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `code`, and more\n\n## Twice\n## Twice\n")
    (tmp_path / "sub").mkdir()
    page = tmp_path / "page.md"
    text = (
        "Good: [a](there.md), [b](there.md#a-heading-code-and-more), [dir](sub/),\n"
        '[c](there.md#twice-1), ![img](sub) and [`code` text](there.md "title").\n'
        "Skipped: [web](https://example.com/x.md), [mail](mailto:a@b.c), [self](#top).\n"
        "```bash\necho [not a link](missing_in_code.md)\n```\n"
        "Inline `[not a link](missing_inline.md)` either.\n"
        "Broken: [gone](missing.md) and [bad anchor](there.md#nowhere)\n"
        "[ref]: ../nope/file.txt\n"
    )
    problems = broken_links(page, text)
    assert problems == [
        f"{page}:8: missing.md (no such file or directory)",
        f"{page}:8: there.md#nowhere (no heading with anchor #nowhere in there.md)",
        f"{page}:9: ../nope/file.txt (no such file or directory)",
    ]
    targets = [t for _, t in find_links(text)]
    assert "there.md" in targets and "https://example.com/x.md" in targets
    assert not any("missing_in" in t for t in targets)


def test_github_slug():
    assert github_slug("Speed against Hugging Face PyTorch") == "speed-against-hugging-face-pytorch"
    assert github_slug("`harness/`: small lm-evaluation-harness tasks") == (
        "harness-small-lm-evaluation-harness-tasks"
    )
    assert github_slug("A run's workdir") == "a-runs-workdir"


# ---------------------------------------------------------------------- the real files


def test_docs_exist():
    names = {p.name for p in markdown_files()}
    assert {"README.md", "configs.md", "reference.md"} <= names, names


def test_no_relative_link_points_nowhere():
    problems = [p for path in markdown_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"
    head = "\n".join(lines[:30])
    assert "make demo" in head and "make test" in head, "README.md must open with the two commands"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_readme_layout_repeats_the_layer_order():
    """The layer order is written in tests/test_structure.py; the README's Layout lists it."""
    tree = ast.parse((ROOT / "tests" / "test_structure.py").read_text(encoding="utf-8"))
    layers = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LAYERS"
    )
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    block = layout[layout.index("```") : layout.index("```", layout.index("```") + 3)]
    listed = [m.group(1) for m in re.finditer(r"^  (\w+)\s", block, re.M)]
    assert tuple(listed) == tuple(layers), listed
    assert "tests/test_structure.py" in layout
