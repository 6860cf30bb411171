"""Reports of an evaluation run: one printed table, ``results.json``, ROC and DET plots (PNG), and
one-line summaries of skipped inputs (``{path: "kind: detail"}``, counted by kind)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Rows grouped by their ``_table`` columns (one block per protocol type), columns sized to fit."""
    blocks: Dict[Tuple[str, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        table = row.get("_table") or {"benchmark": str(row.get("benchmark")), "method": str(row.get("method"))}
        blocks.setdefault(tuple(table), []).append(row)
    out: List[str] = []
    for headers, block in blocks.items():
        cells = [[str(r.get("_table", r).get(h, "")) for h in headers] for r in block]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
        out += [line, "-" * len(line)]
        for c in cells:
            out.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
        legends = dict.fromkeys(r["_legend"] for r in block if r.get("_legend"))
        out += list(legends) + [""]
    return "\n".join(out).rstrip()


def public_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows without their private (``_``-prefixed) keys, ready for JSON."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def write_results(suite: str, rows: List[Dict[str, Any]], out: Path) -> Dict[str, Any]:
    """Write ``out/results.json`` ({suite, results: [row, ...]}); returns what was written."""
    results = {"suite": suite, "results": public_rows(rows)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return float(value)


def plot_curves(rows: List[Dict[str, Any]], out: Path) -> List[Path]:
    """``roc.png`` (TAR vs FAR, log x) and ``det.png`` (miss vs false-alarm rate, normal-deviate axes) for
    every row with ``_scores``/``_labels``; returns the files written (none when no row has scores)."""
    scored = [r for r in rows if r.get("_scores") is not None and len(np.unique(r["_labels"])) == 2]
    if not scored:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import roc_curve

    curves = [(r, *roc_curve(np.asarray(r["_labels"]).astype(int), r["_scores"])[:2]) for r in scored]
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, fpr, tpr in curves:
        ax.plot(np.maximum(fpr, 1e-6), tpr, label=f"{r['benchmark']} {r['method']}")
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
        ax.plot(clip(fpr), clip(1 - tpr), label=f"{r['benchmark']} {r['method']}")
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
