"""Helpers of the bad-input tests: run ``mlearn`` as a user would and check that it fails cleanly.

``fails_cleanly(result, *expected)`` asserts a non-zero exit, no traceback, and that the last stderr
line is one ``mlearn <cmd>: error: ...`` line containing every ``expected`` substring (the file, key
or value it must name). ``tree(folder)`` snapshots the files below a folder so that a test can assert
that nothing was written (or changed) outside the run/output dir.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[1]


def mlearn(*args: object, cwd: Path | None = None, timeout: float = 600,
           env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mlearn ARGS`` in a subprocess (no MLEARN_DEBUG) and capture its output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("MLEARN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlearn", *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def fails_cleanly(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The error line of a run that must have failed with one clear line naming ``expected``."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"exit 0, expected a failure:\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines, f"nothing on stderr:\n{output}"
    line = lines[-1]
    assert line.startswith("mlearn") and ": error: " in line, f"not an 'mlearn <cmd>: error:' line: {line!r}"
    for text in expected:
        assert text in line, f"{text!r} not named in the error line {line!r}"
    return line


def tree(folder: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` (empty when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
