"""Evaluate and threshold a model on the user's own files (docs/protocols.md f): suite type ``own_data``.

Inputs: a folder ``<folder>/<identity>/<file>`` (every genuine pair and a seeded sample of impostor
pairs, :mod:`~mlearn.evaluation.protocols.own_data_pairs`), a pair list ``path1 path2 label`` or a
speaker trial list (official or Kaldi format) over images or wavs, by the model's modality. Embeds
every file once (no flip fusion, so the scores are exactly those of :meth:`Embedder.verify`), scores
pairs by cosine, reports ROC / DET, TAR@FAR (only at FARs the impostor count supports), EER, minDCF,
rank-1/5 (folders) and the thresholds at target FARs with bootstrap intervals
(:mod:`mlearn.evaluation.metrics.thresholds`). Unreadable files are counted and reported, never fatal.
With ``quality: [head, norm]`` (images), quality-aware rows over the same pairs follow the model's row
(:mod:`~mlearn.evaluation.protocols.quality_eval`; ``max_impostors: null`` uses every impostor pair).

Also here: reading those thresholds back from ``results.json`` (:func:`read_thresholds`, used by
``mlearn export --thresholds`` and ``mlearn verify``), the model probe that ties thresholds to the
model they were computed with, and batch verification of a pair list (:func:`verify_pair_list`).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.data import summarize_failures
from mlearn.embed import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, read_image
from mlearn.evaluation.metrics.roc import min_dcf, roc_metrics
from mlearn.evaluation.metrics.thresholds import far_key, far_thresholds, split_supported, unsupported_message
from mlearn.evaluation.protocols.options import OwnDataOptions, build_options
from mlearn.evaluation.protocols.own_data_pairs import (
    pair_cosines,
    pairs_of,
    read_pair_list,
    scan_identity_folder,
)
from mlearn.evaluation.protocols.quality_eval import (
    Qualities,
    check_sources,
    embed_with_quality,
    quality_results,
)
from mlearn.evaluation.report import ResultRow, latest_results_with, one_row, read_rows_with
from mlearn.inference import l2_normalize

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
MAX_LISTED = 1000  # unreadable files listed by name in a row (all are counted)
SCORE = "cosine of L2-normalised embeddings, one embedding per file (no flip fusion)"
PROBE_DIMS = 32  # leading dimensions of the probe embedding stored with thresholds
PROBE_MIN_COSINE = 0.99


# ---------------------------------------------------------------------------------------- embedding


def embed_files(model: Any, root: Path, files: Sequence[str], batch_size: int = 64, workers: int = 0,
                quality: Sequence[str] = ()) -> Tuple[np.ndarray, np.ndarray, Dict[str, str], Qualities]:
    """Embed ``root / f`` for each of ``files`` (images, or wavs for an audio model), each once.

    Returns (L2-normalised float32 [N, D], zero rows where a file failed; ok mask [N];
    ``{file: "kind: detail"}`` of the failed ones; ``{source: quality [N]}`` for each of ``quality``
    (images only; NaN where a file failed), from the same forward pass)."""
    if getattr(model, "modality", "image") == "audio":
        from mlearn.inference_audio import embed_wavs

        vectors, ok, failed = embed_wavs(model, [root / f for f in files], batch_size, desc="own data")
        wav_failures = {f: failed[str(root / f)] for f, good in zip(files, ok) if not good}
        return l2_normalize(vectors["model"]).astype(np.float32), ok, wav_failures, {}
    size = model.spec["input_size"]

    def decode(rel: str) -> Any:
        try:
            return read_image(root / rel, size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file error, never fatal
            return exc

    chunks: List[Tuple[int, np.ndarray]] = []
    failures: Dict[str, str] = {}
    qualities: Qualities = {source: np.full(len(files), np.nan) for source in quality}
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            names = files[start:start + batch_size]
            decoded = list(pool.map(decode, names))
            good = [k for k, image in enumerate(decoded) if isinstance(image, np.ndarray)]
            for k, image in enumerate(decoded):
                if not isinstance(image, np.ndarray):
                    failures[names[k]] = str(image) if isinstance(image, ValueError) else \
                        f"unreadable: {type(image).__name__}: {image}"
            if good:
                batch = np.stack([decoded[k] for k in good])
                if quality:
                    raw, measured = embed_with_quality(model, batch, quality)
                    for source, values in measured.items():
                        qualities[source][start + np.asarray(good)] = values
                else:
                    raw = model.embed(batch, normalize=False)
                for k, row in zip(good, l2_normalize(np.asarray(raw, np.float32))):
                    chunks.append((start + k, row))
    dim = chunks[0][1].shape[0] if chunks else int(getattr(model, "embedding_size", 0))
    out = np.zeros((len(files), dim), np.float32)
    ok = np.zeros(len(files), bool)
    for index, row in chunks:
        out[index], ok[index] = row, True
    return out, ok, failures, qualities


def model_probe(model: Any) -> List[float]:
    """The first :data:`PROBE_DIMS` values of the L2-normalised embedding of a fixed seeded input
    (uint8 image at the input size, or 200 frames of fbank features): stored with thresholds so that
    they are never attached to another model."""
    rng = np.random.default_rng(12345)
    spec = model.spec
    probe: np.ndarray
    if spec.get("modality") == "audio":
        probe = rng.standard_normal((1, 200, int(spec["num_mel_bins"]))).astype(np.float32)
    else:
        height, width = spec["input_size"]
        probe = rng.integers(0, 256, (1, int(height), int(width), 3), dtype=np.uint8)
    unit = l2_normalize(np.asarray(model.embed(probe, normalize=False), np.float64))[0]
    return [round(float(v), 6) for v in unit[:PROBE_DIMS]]


def check_probe(model: Any, record: Dict[str, Any], source: str) -> None:
    """``ValueError`` when ``record``'s thresholds were computed with another model than ``model``."""
    stored = record.get("model_probe")
    if not stored:
        return
    mine = np.asarray(model_probe(model), np.float64)[:len(stored)]
    theirs = np.asarray(stored, np.float64)
    cosine = float(mine @ theirs / max(np.linalg.norm(mine) * np.linalg.norm(theirs), 1e-12))
    if cosine < PROBE_MIN_COSINE:
        raise ValueError(f"the thresholds in {source} were computed with another model (probe embedding "
                         f"cosine {cosine:.3f} < {PROBE_MIN_COSINE}); evaluate this model on your data "
                         "again (mlearn eval --model M --folder DIR)")


# ------------------------------------------------------------------------------------------ the run


def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _list_key(key: str, audio: bool) -> str:
    return key + ".wav" if audio and not key.lower().endswith(AUDIO_EXTENSIONS) else key


def run(model: Any, options: OwnDataOptions, root: Path, batch_size: int = 64,
        cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """One row: verification metrics, thresholds and (folders) rank-k of the model on the user's files;
    with ``options.quality`` the quality-aware rows of the same pairs after it."""
    name = options.benchmark
    root = Path(root)
    audio = getattr(model, "modality", "image") == "audio"
    sources = check_sources(model, options.quality, f"own_data protocol {name}")
    rng = np.random.default_rng(options.seed)
    info: Dict[str, Any] = {}
    groups = None
    if options.folder is not None:
        folder = _resolve(root, options.folder)
        extensions = AUDIO_EXTENSIONS if audio else IMAGE_EXTENSIONS
        files, identities, loose = scan_identity_folder(folder, extensions)
        base, mode = folder, "folder"
        if loose:
            log.warning("%s: %d file(s) directly in %s ignored (not in an identity folder)", name, loose,
                        folder)
        info["loose_files_ignored"] = loose
    else:
        listed = options.pairs if options.pairs is not None else options.trials
        list_path = _resolve(root, str(listed))
        mode = "pairs" if options.pairs is not None else "trials"
        if mode == "pairs":
            pairs = read_pair_list(list_path)
            first, second, list_labels = pairs.first, pairs.second, pairs.labels
        else:
            from mlearn.evaluation.protocols.trials import read_trials

            trials = read_trials(list_path)
            first, second, list_labels = trials.enroll, trials.test, trials.labels
            info["trial_format"] = trials.format
        base = _resolve(root, options.files_root) if options.files_root else list_path.parent
        if not base.is_dir():
            raise FileNotFoundError(f"{name}: files_root {base} not found (the folder the list's paths "
                                    "start from)")
        first = [_list_key(k, audio) for k in first]
        second = [_list_key(k, audio) for k in second]
        files = sorted(set(first) | set(second))
        info["list"] = str(list_path)
    unit, ok, failures, qualities = embed_files(model, base, files, batch_size, options.workers, sources)
    if not ok.any():
        raise ValueError(f"{name}: none of the {len(files)} files under {base} can be read: "
                         f"{summarize_failures(failures)}")
    if failures:
        log.warning("%s: %d of %d files unreadable, left out: %s", name, len(failures), len(files),
                    summarize_failures(failures))
    if mode == "folder":
        names = np.array(identities)[ok]
        kept = np.flatnonzero(ok)
        _, labels = np.unique(names, return_inverse=True)
        if labels.max() < 1:
            raise ValueError(f"{name}: the readable files of {base} hold a single identity ({names[0]!r}); "
                             f"need at least 2 ({summarize_failures(failures)})")
        (g1, g2), genuine_total = pairs_of(labels, True, options.max_genuine, rng)
        (i1, i2), impostor_total = pairs_of(labels, False, options.max_impostors, rng)
        if len(g1) == 0:
            raise ValueError(f"{name}: no identity of {base} has 2 readable files; no genuine pair")
        first_idx, second_idx = kept[np.r_[g1, i1]], kept[np.r_[g2, i2]]
        pair_labels = np.r_[np.ones(len(g1), np.int8), np.zeros(len(i1), np.int8)]
        groups = (labels[i1], labels[i2])
        info.update({"identities": int(labels.max() + 1), "genuine_pairs_possible": genuine_total,
                     "impostor_pairs_possible": impostor_total,
                     "impostor_sampling": ("all" if len(i1) == impostor_total else
                                           f"uniform sample without replacement, seed {options.seed}")})
        skipped_pairs = 0
    else:
        index = {f: i for i, f in enumerate(files)}
        a = np.array([index[k] for k in first])
        b = np.array([index[k] for k in second])
        scorable = ok[a] & ok[b]
        first_idx, second_idx, pair_labels = a[scorable], b[scorable], np.asarray(list_labels)[scorable]
        skipped_pairs = int((~scorable).sum())
        if pair_labels.size == 0 or pair_labels.min() == pair_labels.max():
            kind = "no" if pair_labels.size == 0 else ("only genuine" if pair_labels[0] else "only impostor")
            raise ValueError(f"{name}: {kind} scorable pairs in {info['list']} ({skipped_pairs} left out for "
                             f"unreadable files); need both genuine (1) and impostor (0) pairs")
    scores = pair_cosines(unit, first_idx, second_idx)
    info.update({"mode": mode, "files": len(files), "unreadable_files": len(failures),
                 "unreadable": dict(list(failures.items())[:MAX_LISTED]), "skipped_pairs": skipped_pairs})
    rank = _rank_k(unit[ok], np.array(identities)[ok], options.ks) if mode == "folder" else \
        {"rank_k": "not computed: a pair or trial list gives no identity labels"}
    row = _row(name, options, scores, pair_labels, groups, info, rank, model, failures)
    if not sources:
        return [row]
    return [row, *quality_results(row, scores, pair_labels, first_idx, second_idx, qualities, name, model,
                                  options.quality_fmrs, options.seed, cache)]


def _rank_k(unit: np.ndarray, identities: np.ndarray, ks: Sequence[int]) -> Dict[str, Any]:
    """Leave-one-out rank-k identification (recall@k) over the readable files of a folder."""
    from mlearn.evaluation.metrics.retrieval import retrieval_metrics

    metrics = retrieval_metrics(unit, identities, unit, identities, tuple(ks), exclude_self=True)
    return {**{f"rank_{k}": metrics[f"recall@{k}"] for k in ks}, "rank_queries": metrics["num_queries"]}


def _row(name: str, options: OwnDataOptions, scores: np.ndarray, labels: np.ndarray,
         groups: Optional[Tuple[np.ndarray, np.ndarray]], info: Dict[str, Any], rank: Dict[str, Any],
         model: Any, failures: Dict[str, str]) -> ResultRow:
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    report_fars, unsupported = split_supported(options.fars, len(impostor))
    roc = roc_metrics(scores, labels, fars=report_fars)
    thresholds = far_thresholds(genuine, impostor, options.fars, options.bootstrap, options.seed, groups)
    message = unsupported_message(unsupported, len(impostor))
    if message:
        log.warning("%s: %s", name, message)
    values: Dict[str, Any] = {
        "benchmark": name, "method": "model", **info, "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)), "distance": SCORE, "normalisation": "L2", "fusion": "none",
        "tar_at_far": roc["tar_at_far_strict"], "tar_at_far_nearest": roc["tar_at_far"],
        "far_not_reported": unsupported, "far_message": message, "eer": roc["eer"],
        "eer_variant": "NIST linear interpolation", "auc": roc["auc"],
        "min_dcf": {"0.01": roc["min_dcf"], "0.05": min_dcf(scores, labels, p_target=0.05)},
        "thresholds": thresholds["thresholds"], "threshold_bootstrap": thresholds["bootstrap"],
        "decision": thresholds["decision"], **rank,
    }
    try:
        values["model_probe"] = model_probe(model)
    except Exception as exc:  # noqa: BLE001 - a test double without a spec: thresholds just go unchecked
        log.debug("no model probe: %s", exc)
    table = {"benchmark": name, "method": "model", "genuine": str(len(genuine)),
             "impostor": str(len(impostor)), "skipped files": str(info["unreadable_files"]),
             "EER %": f"{roc['eer'] * 100:.2f}", "minDCF0.01": f"{roc['min_dcf']:.4f}"}
    for far in options.fars:
        key = far_key(far)
        tar = roc["tar_at_far_strict"].get(far)
        table[f"TAR@{far:g} %"] = f"{tar * 100:.2f}" if tar is not None else "n/a"
        record = thresholds["thresholds"].get(key)
        table[f"thr@{far:g}"] = f"{record['threshold']:.4f}" if record else "n/a"
    for key in ("rank_1", "rank_5"):
        table[key.replace("_", "-") + " %"] = f"{rank[key] * 100:.2f}" if key in rank else "n/a"
    legend = ("TAR@FAR: strict (max TAR with FAR <= target); thr: accept iff cosine >= threshold; "
              "n/a: FAR below 10 / impostor pairs")
    if message:
        legend += f"\n{name}: {message}"
    if info["unreadable_files"]:
        legend += (f"\n{name}: {info['unreadable_files']} unreadable file(s) left out: "
                   f"{summarize_failures(failures)} (all in results.json 'unreadable')")
    return ResultRow(values, table=table, legend=legend, scores=scores, labels=labels.astype(np.int64))


def run_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int = 64) -> List[ResultRow]:
    """:func:`run` on a suite entry (a dict; ``type`` may be left out)."""
    return run(model, build_options({**protocol, "type": "own_data"}, "own_data protocol"), Path(root),
               batch_size)


# ---------------------------------------------------------------------------- thresholds read back


def latest_results(run_dir: PathLike) -> Path:
    """The newest ``<run>/eval/*/results.json`` holding thresholds (``FileNotFoundError`` if none)."""
    return latest_results_with(Path(run_dir), "thresholds", "thresholds",
                               f"run `mlearn eval --model {run_dir} --folder DIR` first")


def read_thresholds(source: PathLike, benchmark: Optional[str] = None) -> Dict[str, Any]:
    """The thresholds of one ``own_data`` row as stored with a model: ``{"far": {far_key: {threshold,
    threshold_ci95, far_ci95, tar}}, "score", "decision", "benchmark", "source", "impostor_pairs",
    "model_probe"}``.

    ``source``: a ``results.json``, the eval folder holding it, or a run / model dir (its newest
    ``eval/*/results.json`` with thresholds). ``benchmark`` picks the row when several have thresholds."""
    source = Path(source)
    if source.is_dir():
        source = source / "results.json" if (source / "results.json").is_file() else latest_results(source)
    if not source.is_file():
        raise FileNotFoundError(f"thresholds: {source} not found (expected an eval results.json)")
    row = one_row(read_rows_with(source, "thresholds"), benchmark, f"thresholds: {source}", "thresholds",
                  "pick one of", "evaluate with --folder / --pairs / --trials")
    table = {key: {k: r[k] for k in ("threshold", "threshold_ci95", "far_ci95", "tar") if k in r}
             for key, r in row["thresholds"].items()}
    return {"far": table, "score": row.get("distance", SCORE), "decision": row.get("decision"),
            "benchmark": row.get("benchmark"), "source": str(source),
            "impostor_pairs": row.get("impostor_pairs"), "model_probe": row.get("model_probe")}


# --------------------------------------------------------------------------------- batch verification


def verify_pair_list(model: Any, pairs_path: PathLike, output: PathLike, far: float = 1e-3,
                     thresholds: Optional[Dict[str, Any]] = None, files_root: Optional[PathLike] = None,
                     batch_size: int = 64, workers: int = 0) -> Dict[str, Any]:
    """Score every pair of a list (``path1 path2 [label]``) and decide at the model's threshold for
    ``far`` (or ``thresholds``, as from :func:`read_thresholds`). Writes ``output`` (TSV: path1, path2,
    score, decision = accept / reject / ``error: reason``, and the label when the list has them).
    Returns a summary (pairs, accepted, errors, threshold; with labels the realised FAR and TAR)."""
    threshold = model.threshold(far, thresholds)
    pairs = read_pair_list(pairs_path, labels_required=False)
    root = Path(files_root) if files_root else Path(pairs_path).parent
    audio = getattr(model, "modality", "image") == "audio"
    first = [_list_key(k, audio) for k in pairs.first]
    second = [_list_key(k, audio) for k in pairs.second]
    files = sorted(set(first) | set(second))
    index = {f: i for i, f in enumerate(files)}
    unit, ok, failures, _ = embed_files(model, root, files, batch_size, workers)
    a = np.array([index[k] for k in first])
    b = np.array([index[k] for k in second])
    scores = pair_cosines(unit, a, b)
    scorable = ok[a] & ok[b]
    accepted = scorable & (scores >= threshold)
    lines = []
    for p in range(len(pairs)):
        if scorable[p]:
            decision, score = ("accept" if accepted[p] else "reject"), f"{scores[p]:.6f}"
        else:
            bad = first[p] if not ok[a[p]] else second[p]
            decision, score = f"error: {bad}: {failures.get(bad, 'unreadable')}", "nan"
        label = f"\t{pairs.labels[p]}" if pairs.labels is not None else ""
        lines.append(f"{pairs.first[p]}\t{pairs.second[p]}\t{score}\t{decision}{label}\n")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("path1\tpath2\tscore\tdecision" + ("\tlabel" if pairs.labels is not None else "")
                      + "\n" + "".join(lines))
    summary: Dict[str, Any] = {"pairs": len(pairs), "accepted": int(accepted.sum()),
                               "errors": int((~scorable).sum()), "threshold": threshold, "far": far}
    if pairs.labels is not None:
        for key, wanted in (("realised_far", 0), ("tar", 1)):
            sel = scorable & (pairs.labels == wanted)
            summary[key] = float(accepted[sel].mean()) if sel.any() else None
    return summary
