"""Every relative link in README.md and docs/*.md points at a file or folder of the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "datasets").glob("*.md"))]


def relative_links(document: Path):
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # URLs and in-page anchors
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    missing = [t for t in relative_links(document) if not (document.parent / t).exists()]
    assert not missing, f"{document.relative_to(ROOT)}: links to missing files {missing}"
