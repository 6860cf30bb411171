"""docs/architecture.md stays true: it names every module file of mlearn/, and every mlearn/ path it
names exists.

A module counts as named when its path from the repository root appears in the page
(``mlearn/heads/margins.py``); a package's ``__init__.py`` also counts as named through its folder
(``mlearn/heads/``).
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"(?<![\w/.])mlearn/[\w./]*")


def named_paths() -> set:
    """Every ``mlearn/...`` path written in the page (trailing sentence punctuation removed)."""
    return {match.rstrip(".") for match in PATH.findall(PAGE.read_text(encoding="utf-8"))}


def module_files() -> list:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mlearn").rglob("*.py")
                  if "__pycache__" not in p.parts)


def is_named(module: str, named: set) -> bool:
    if module in named:
        return True
    return module.endswith("/__init__.py") and module[: -len("__init__.py")] in named


def test_every_module_file_is_named():
    named = named_paths()
    missing = [m for m in module_files() if not is_named(m, named)]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_named_path_exists():
    absent = sorted(p for p in named_paths() if not (ROOT / p).exists())
    assert not absent, f"docs/architecture.md names paths that do not exist: {absent}"

