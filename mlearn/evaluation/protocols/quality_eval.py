"""Quality-aware evaluation as a suite option (docs/protocols.md g.4): ``quality: [head, norm]`` on the
``own_data`` and ``bin`` protocols (and ``ijb``, which also uses these helpers: g.5).

Per input, quality comes from the same forward pass as the embedding (``model.embed(...,
with_quality=)``): ``head`` the model's trained quality head, ``norm`` the L2 norm of the raw
embedding. Pair quality is the min of the two sides; the rows are those of
:func:`mlearn.evaluation.metrics.quality.quality_rows` over every pair the protocol scored, and the
curves go to the run's output folder when the suite run has one (``run_cache()[OUT_DIR_KEY]``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.evaluation.metrics.quality import EDC, pair_quality, quality_rows
from mlearn.evaluation.report import ResultRow

OUT_DIR_KEY = "out_dir"  # the suite run's output folder in the protocols' shared cache
SOURCES = {"head": "the model's trained quality head", "norm": "L2 norm of the raw embedding"}
Qualities = Dict[str, np.ndarray]  # source -> quality [N] (float64, higher = better)


def check_sources(model: Any, sources: Sequence[str], where: str) -> List[str]:
    """The requested quality ``sources`` (duplicates dropped), checked against the model before anything
    is embedded: ``ValueError`` starting with ``where`` for an audio model or ``head`` without a
    quality head (the inference layer's line)."""
    wanted = list(dict.fromkeys(sources))
    if not wanted:
        return wanted
    if getattr(model, "modality", "image") == "audio":
        raise ValueError(f"{where}: quality={wanted} is supported for image models only (this one is audio)")
    for source in wanted:
        check = getattr(model, "check_quality", None)
        try:
            if check is not None:
                check(source)
            elif source == "head" and not getattr(model, "has_quality", False):
                raise ValueError("the model has no quality head; use quality: [norm]")
        except ValueError as exc:
            raise ValueError(f"{where}: quality: {exc}") from None
    return wanted


def embed_with_quality(model: Any, batch: Any, sources: Sequence[str]) -> Tuple[np.ndarray, Qualities]:
    """Raw float32 embeddings [N, D] of ``batch`` and ``{source: quality [N]}`` from one forward pass
    (``head`` when asked, and ``norm`` computed from the same raw embeddings)."""
    raw, quality = model.embed(batch, normalize=False, with_quality="head" if "head" in sources else "norm")
    raw = np.asarray(raw, np.float32)
    out: Qualities = {}
    for source in sources:
        out[source] = (np.asarray(quality, np.float64).reshape(-1) if source == "head" else
                       np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float64)))
    return raw, out


def embed_batches_with_quality(model: Any, batches: Iterable[np.ndarray], sources: Sequence[str],
                               flip: bool = False) -> Tuple[np.ndarray, Qualities]:
    """:func:`mlearn.inference.embed_batches` (raw embeddings [N, D], flip-fused when ``flip``) plus the
    quality [N] of each unflipped image (the mirror adds to the embedding only, as CR-FIQA scores)."""
    chunks: List[np.ndarray] = []
    parts: Dict[str, List[np.ndarray]] = {s: [] for s in sources}
    for batch in batches:
        raw, quality = embed_with_quality(model, batch, sources)
        if flip:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])
            raw = raw + np.asarray(model.embed(mirrored, normalize=False), np.float32)
        chunks.append(raw)
        for source in sources:
            parts[source].append(quality[source])
    if not chunks:
        return np.zeros((0, 0), np.float32), {s: np.zeros(0) for s in sources}
    return np.concatenate(chunks), {s: np.concatenate(v) for s, v in parts.items()}


def quality_results(main: ResultRow, scores: np.ndarray, labels: np.ndarray, first: np.ndarray,
                    second: np.ndarray, qualities: Qualities, benchmark: str, model: Any,
                    fmrs: Sequence[float], seed: int,
                    cache: Optional[MutableMapping[Any, Any]]) -> List[ResultRow]:
    """Rows of :func:`quality_rows` for the pairs (``first[p]``, ``second[p]``) [P] with ``scores`` and
    ``labels`` [P], pair quality = min of the per-input ``qualities`` [N]; PNG curves written to the
    suite's output folder when there is one (each row's ``figure``). The protocol's own row ``main``
    gets the summary (sources, FMR message, figures) in its values and the FMR message in its legend."""
    pairs = {s: pair_quality(q[first], q[second]) for s, q in qualities.items()}
    rows, message = quality_rows(scores, labels, pairs, benchmark, "model", fmrs=fmrs, seed=seed)
    method = (model.metadata.get("quality") or {}).get("method") if isinstance(
        getattr(model, "metadata", None), dict) else None
    for row in rows:
        source = str(row["quality"])
        row.values["quality_source"] = SOURCES[source] + (f" ({method})" if source == "head" and method
                                                          else "")
    out_dir = cache.get(OUT_DIR_KEY) if cache is not None else None
    figures: List[str] = []
    if out_dir is not None:
        blocks: Dict[Tuple[str, float], List[ResultRow]] = {}
        for row in rows:
            blocks.setdefault((str(row["convention"]), float(row["fmr"])), []).append(row)
        for block in blocks.values():
            name = plot_quality_rows(block, Path(out_dir))[0].name  # next to results.json
            figures.append(name)
            for row in block:
                row.values["figure"] = name
    main.values.update({"quality": list(qualities), "quality_fmr_message": message,
                        "quality_rows": len(rows), "quality_figures": figures})
    if message:
        main.legend = f"{main.legend or ''}\n{benchmark} quality: {message}"
    return rows


Curve = Union[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]


def plot_curves(path: Union[str, Path], curves: Mapping[str, Curve], title: str = "",
                xlabel: str = "pairs rejected (%)") -> Path:
    """One PNG at ``path``: FNMR against the rejected fraction for each ``name -> (fractions [F],
    fnmr [F][, std [F]])``; a curve with ``std`` is drawn dashed with a +-std band (the random line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        x, v = 100 * np.asarray(curve[0], np.float64), np.asarray(curve[1], np.float64)
        if len(curve) > 2:
            band = np.asarray(curve[2], np.float64)
            line = ax.plot(x, v, "--", label=name)[0]
            ax.fill_between(x, v - band, v + band, color=line.get_color(), alpha=0.2)
        else:
            ax.plot(x, v, label=name)
    ax.set(xlabel=xlabel, ylabel="FNMR", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out




def plot_quality_rows(rows: Sequence[ResultRow], out: Union[str, Path]) -> List[Path]:
    """``quality_<edc|erc>_fmr<f>_<benchmark>_<method>.png`` in ``out`` for rows of :func:`quality_rows`:
    every quality's curve next to the random line (mean +- std); returns the files written."""
    groups: Dict[Tuple[str, str, str, float], List[ResultRow]] = {}
    for row in rows:
        key = (row.benchmark, row.method, str(row["convention"]), float(row["fmr"]))
        groups.setdefault(key, []).append(row)
    written = []
    for (benchmark, method, convention, fmr), block in groups.items():
        first = block[0]
        x = np.asarray(first["reject_fractions"])
        curves: Dict[str, Curve] = {str(r["quality"]): (x, np.asarray(r["fnmr"])) for r in block}
        curves[f"random (mean ± std, {first['random_draws']} draws)"] = (
            x, np.asarray(first["random_fnmr_mean"]), np.asarray(first["random_fnmr_std"]))
        tag = "edc" if convention == EDC else "erc"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"quality_{tag}_fmr{fmr:g}_{benchmark}_{method}") + ".png"
        written.append(plot_curves(Path(out) / name, curves,
                                   title=f"{benchmark} {method}: {convention}, FMR {fmr:g}"))
    return written
