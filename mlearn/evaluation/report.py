"""Reports of an evaluation run: one printed table, ``results.json``, ROC and DET plots (PNG), and
one-line summaries of skipped inputs (``{path: "kind: detail"}``, counted by kind)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


@dataclass
class ResultRow:
    """One result of one method on one benchmark.

    ``values``: the public values as written to ``results.json`` (``benchmark`` and ``method`` among
    them; metric rates as fractions); ``table``: the printed columns (formatted strings, e.g. %);
    ``legend``: a line printed under the table; ``scores`` / ``labels`` [P]: pair or trial scores and
    their 0/1 labels, for the ROC / DET plots. ``row[key]`` reads ``values[key]``.
    """

    values: Dict[str, Any]
    table: Dict[str, str] = field(default_factory=dict)
    legend: Optional[str] = None
    scores: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    @property
    def benchmark(self) -> str:
        return str(self.values.get("benchmark"))

    @property
    def method(self) -> str:
        return str(self.values.get("method"))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def format_table(rows: List[ResultRow]) -> str:
    """Rows grouped by their ``table`` columns (one block per protocol type), columns sized to fit."""
    blocks: Dict[Tuple[str, ...], List[Tuple[ResultRow, Dict[str, str]]]] = {}
    for row in rows:
        table = row.table or {"benchmark": row.benchmark, "method": row.method}
        blocks.setdefault(tuple(table), []).append((row, table))
    out: List[str] = []
    for headers, block in blocks.items():
        cells = [[str(table.get(h, "")) for h in headers] for _, table in block]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        line = _table_line(list(headers), widths)
        out += [line, "-" * len(line)]
        out += [_table_line(c, widths) for c in cells]
        legends = dict.fromkeys(r.legend for r, _ in block if r.legend)
        out += list(legends) + [""]
    return "\n".join(out).rstrip()


def _table_line(cells: List[str], widths: List[int]) -> str:
    """The first two columns (benchmark, method) left-aligned, the numbers right-aligned."""
    return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))


def public_rows(rows: List[ResultRow]) -> List[Dict[str, Any]]:
    """The rows' public values, ready for JSON."""
    return [dict(r.values) for r in rows]


def write_results(suite: str, rows: List[ResultRow], out: Path) -> Dict[str, Any]:
    """Write ``out/results.json`` ({suite, results: [row, ...]}); returns what was written."""
    results = {"suite": suite, "results": public_rows(rows)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def rows_with(results: Any, key: str) -> List[Dict[str, Any]]:
    """The rows of a parsed ``results.json`` whose ``key`` holds a non-empty dict (stored thresholds, a
    fitted calibration)."""
    rows = results.get("results", []) if isinstance(results, dict) else []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get(key), dict) and r[key]]


def read_rows_with(path: Path, key: str) -> List[Dict[str, Any]]:
    """:func:`rows_with` of the ``results.json`` at ``path`` ([] when it cannot be read)."""
    try:
        return rows_with(json.loads(path.read_text()), key)
    except (OSError, ValueError):
        return []


def one_row(rows: List[Dict[str, Any]], benchmark: Optional[str], where: str, what: str, pick: str,
            none_hint: str) -> Dict[str, Any]:
    """The one row of ``rows`` (of ``benchmark`` when given); else ``ValueError``: "``where`` has no rows
    / N rows / no row of benchmark B with ``what``" and either "; ``pick`` [names]" or " (``none_hint``)"."""
    chosen = rows if benchmark is None else [r for r in rows if r.get("benchmark") == benchmark]
    if len(chosen) != 1:
        names = [r.get("benchmark") for r in rows]
        count = f"no row of benchmark {benchmark!r}" if benchmark is not None and not chosen else (
            f"{len(chosen)} rows" if chosen else "no rows")
        hint = f"; {pick} {names}" if names else f" ({none_hint})"
        raise ValueError(f"{where} has {count} with {what}{hint}")
    return chosen[0]


def latest_results_with(run_dir: Path, key: str, what: str, hint: str) -> Path:
    """The newest ``<run_dir>/eval/*/results.json`` with a row carrying ``key``; ``FileNotFoundError``
    naming ``what`` and how to get one (``hint``) when there is none."""
    found = [p for p in (Path(run_dir) / "eval").glob("*/results.json") if read_rows_with(p, key)]
    if not found:
        raise FileNotFoundError(f"no evaluation with {what} under {run_dir}/eval/*/results.json; {hint}")
    return max(found, key=lambda p: p.stat().st_mtime)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return float(value)


def plot_curves(rows: List[ResultRow], out: Path) -> List[Path]:
    """``roc.png`` (TAR vs FAR, log x) and ``det.png`` (miss vs false-alarm rate, normal-deviate axes) for
    every row with ``scores``/``labels``; returns the files written (none when no row has scores)."""
    scored = [r for r in rows
              if r.scores is not None and r.labels is not None and len(np.unique(r.labels)) == 2]
    if not scored:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import roc_curve

    curves = [(r, *roc_curve(np.asarray(r.labels).astype(int), r.scores)[:2]) for r in scored]
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, fpr, tpr in curves:
        ax.plot(np.maximum(fpr, 1e-6), tpr, label=f"{r.benchmark} {r.method}")
    ax.set(xscale="log", xlabel="FAR", ylabel="TAR", title="ROC", xlim=(1e-4, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5])
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, fpr, tpr in curves:
        clip = lambda p: norm.ppf(np.clip(p, 1e-4, 1 - 1e-4))  # noqa: E731
        ax.plot(clip(fpr), clip(1 - tpr), label=f"{r.benchmark} {r.method}")
    ax.set(xticks=norm.ppf(ticks), yticks=norm.ppf(ticks), xlabel="false alarm rate (%)",
           ylabel="miss rate (%)", title="DET", xlim=norm.ppf([5e-4, 0.6]), ylim=norm.ppf([5e-4, 0.6]))
    ax.set_xticklabels([f"{t * 100:g}" for t in ticks])
    ax.set_yticklabels([f"{t * 100:g}" for t in ticks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "det.png", dpi=100)
    plt.close(fig)
    return [out / "roc.png", out / "det.png"]
