"""The documentation points at things that exist: every relative link in README.md, CHANGELOG.md,
docs/*.md, datasets/*.md and evaluation/*.md resolves to a file or folder (and a ``#section`` to a
heading of the page it names), and every dotted ``mlearn.*`` name they mention (the changelog aside)
imports."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOTTED = re.compile(r"\bmlearn(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = {"json", "yaml", "yml", "txt", "md", "csv", "onnx", "pt", "ckpt"}  # `mlearn.json`: a file
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "datasets").glob("*.md")), *sorted((ROOT / "evaluation").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_links(document: Path):
    """(path, anchor) of each link that is not a URL; path '' for an in-page ``#anchor``."""
    for target in LINK.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # URLs, mailto:
        path, _, anchor = target.partition("#")
        yield path, anchor


def heading_anchors(document: Path) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    missing, bad_anchors = [], []
    for path, anchor in relative_links(document):
        target = document.parent / path if path else document
        if not target.exists():
            missing.append(path)
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target):
            bad_anchors.append(f"{path}#{anchor}")
    assert not missing, f"{document.relative_to(ROOT)}: links to missing files {missing}"
    assert not bad_anchors, f"{document.relative_to(ROOT)}: links to missing sections {bad_anchors}"


def resolves(dotted: str) -> bool:
    """``mlearn.a.b.c`` names a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # the module exists but one of its own imports is broken
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


# the changelog names modules that were removed or renamed: its links are checked, not its names
CURRENT_DOCUMENTS = [d for d in DOCUMENTS if d.name != "CHANGELOG.md"]


@pytest.mark.parametrize("document", CURRENT_DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_dotted_mlearn_names_resolve(document):
    names = {n for n in DOTTED.findall(document.read_text(encoding="utf-8"))
             if n.rsplit(".", 1)[-1] not in FILE_SUFFIXES}
    unresolved = sorted(n for n in names if not resolves(n))
    assert not unresolved, f"{document.relative_to(ROOT)}: names that do not import {unresolved}"
