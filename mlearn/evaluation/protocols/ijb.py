"""IJB-B / IJB-C template evaluation, insightface protocol (docs/protocols.md b): suite type ``ijb``,
1:1 TAR@FAR and 1:N TPIR@FPIR + CMC.

Meta files are read by :mod:`~mlearn.evaluation.protocols.ijb_meta`; the scoring is
:mod:`mlearn.evaluation.metrics.ijb`. Here: ``extract_features`` (align 5 points -> 112x112, embed
raw, flip sum), ``score_ijb`` (features -> report rows) and the suite adapter ``run``.

With ``quality: [head, norm]`` each image's quality comes from the same forward pass (unflipped
image), template quality = mean of its images', pair quality = min of the two templates', and the
EDC / ERC rows of the 1:1 pairs follow; ``pooling: quality`` adds 1:1 rows with image features
weighted by quality inside each template (docs/protocols.md g.5).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.data import align_face
from mlearn.evaluation.metrics.ijb import (
    identification_1n,
    pair_scores,
    quality_pooling_weights,
    template_features,
    template_index,
    template_quality,
)
from mlearn.evaluation.metrics.roc import DEFAULT_FARS, roc_metrics
from mlearn.evaluation.protocols.ijb_meta import IJBMeta, load_ijb_meta, subset_info
from mlearn.evaluation.protocols.options import QUALITY_FMRS, IJBOptions, build_options
from mlearn.evaluation.protocols.quality_eval import (
    Qualities,
    check_sources,
    embed_batches_with_quality,
    quality_results,
)
from mlearn.evaluation.report import ResultRow
from mlearn.inference import SupportsEmbed, embed_batches

PathLike = Union[str, Path]
POOLING = "detector-score-weighted images, mean per media, sum of medias, L2"
QUALITY_POOLING = ("images weighted by detector score x max(q, 0) / sum over the template of max(q, 0) "
                   "(equal weights when none is > 0), mean per media, sum of medias, L2")


# ------------------------------------------------------------------------------------------- rows


def verification_rows(benchmark: str, scores: np.ndarray, labels: np.ndarray, n_templates: int,
                      info: Optional[Dict[str, Any]] = None,
                      fars: Sequence[float] = DEFAULT_FARS, method: str = "model") -> List[ResultRow]:
    """Two report rows for 1:1 scores: TAR@FAR by the insightface rule (nearest FPR on sklearn's
    default ROC, ties to the larger TPR) and the strict rule (max TPR with FPR <= FAR). TAR is a
    fraction; ``table`` shows it in %. ``info``: descriptive fields copied into both rows."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(np.int8)
    metrics = roc_metrics(scores, labels, fars)
    n_genuine = int(labels.sum())
    common = {"benchmark": benchmark, "method": method, "templates": int(n_templates),
              "pairs": int(len(labels)), "genuine": n_genuine, "impostor": int(len(labels) - n_genuine),
              **(info or {}), "distance": "cosine", "eer": metrics["eer"], "auc": metrics["auc"],
              "min_dcf": metrics["min_dcf"], "eer_variant": "NIST linear interpolation", "p_target": 0.01}
    rows = []
    for rule, key, short in (("nearest FPR on sklearn ROC, ties to larger TPR (insightface)", "tar_at_far",
                              "nearest"),
                             ("max TPR with FPR <= FAR (strict)", "tar_at_far_strict", "strict")):
        tar = {float(f): float(metrics[key][f]) for f in fars}
        table = {"benchmark": benchmark, "method": method, "TAR rule": short,
                 "templates": f"{n_templates:,}", "pairs": f"{len(labels):,}"}
        table.update({f"TAR@{f:.0e}".replace("e-0", "e-"): f"{100 * v:.2f}" for f, v in tar.items()})
        rows.append(ResultRow({**common, "tar_rule": rule, "tar_at_far": tar}, table=table))
    rows[0].scores, rows[0].labels = scores, labels
    return rows


def identification_row(benchmark: str, result: Dict[str, Any],
                       info: Optional[Dict[str, Any]] = None) -> ResultRow:
    """The report row of :func:`identification_1n`'s result (rates as fractions; % in ``table``)."""
    galleries = result["galleries"]
    table = {"benchmark": benchmark, "method": "model", "galleries": "+".join(galleries),
             "gallery templates": "+".join(f"{g['templates']:,}" for g in galleries.values()),
             "probes": f"{result['probes']:,}"}
    table.update({f"TPIR@FPIR={f:g}": f"{100 * v:.2f}" for f, v in result["tpir"].items()})
    table.update({f"rank-{k}": f"{100 * v:.2f}" for k, v in result["cmc"].items()})
    values = {"benchmark": benchmark, "method": "model", **(info or {}), "distance": "cosine",
              "protocol": "open-set (NIST): TPIR needs rank 1 and score > threshold; "
                          "floor-rule FPIR threshold",
              "probes": result["probes"],
              "gallery_templates": {n: g["templates"] for n, g in galleries.items()},
              "tpir_at_fpir": result["tpir"], "cmc": result["cmc"],
              "per_gallery": {n: {k: g[k] for k in ("mated", "non_mated", "tpir", "threshold", "cmc")}
                              for n, g in galleries.items()}}
    return ResultRow(values, table=table)


def score_ijb(meta: IJBMeta, features: np.ndarray, detector_score: bool = True, one_to_n: bool = True,
              fusion: str = "flip-sum", qualities: Optional[Qualities] = None, pooling: str = "standard",
              quality_fmrs: Sequence[float] = QUALITY_FMRS, model: Any = None,
              cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """Rows (1:1 nearest, 1:1 strict, [quality-pooled 1:1 pairs], [1:N], [quality rows]) from image
    features [N, D] already extracted (raw, flip-fused as ``fusion`` says) in the order of
    ``meta.images``. ``qualities`` {source: quality [N]} (same order) adds the EDC / ERC rows of the
    1:1 pairs (:func:`~mlearn.evaluation.protocols.quality_eval.quality_results`; ``model`` names the
    head's method, ``cache`` holds the output folder for the figures); ``pooling="quality"`` adds a
    nearest / strict pair of 1:1 rows per source, pooled with :func:`quality_pooling_weights`."""
    if len(features) != len(meta.images):
        raise ValueError(f"{meta.name}: {len(features)} features for {len(meta.images)} images")
    if pooling not in ("standard", "quality"):
        raise ValueError(f"{meta.name}: pooling={pooling!r}; expected 'standard' or 'quality'")
    if pooling == "quality" and not qualities:
        raise ValueError(f"{meta.name}: pooling: quality needs image qualities; set quality: [head] or "
                         "[norm]")
    weights = meta.detector_scores if detector_score else None
    template_ids, feats = template_features(features, meta.templates, meta.medias, weights)
    info = {"fusion": fusion, "detector_score": bool(detector_score), "pooling": POOLING,
            "normalisation": "image norm kept; template L2", "pair_list": meta.files.get("pairs", "")}
    scores = pair_scores(template_ids, feats, meta.pairs[:, 0], meta.pairs[:, 1])
    benchmark = f"{meta.name} 1:1"
    rows = verification_rows(benchmark, scores, meta.labels, len(template_ids), info)
    if pooling == "quality" and qualities:
        base = np.ones(len(features)) if weights is None else np.asarray(weights, np.float64)
        for source, quality in qualities.items():
            pooled_w = base * quality_pooling_weights(quality, meta.templates)
            _, pooled = template_features(features, meta.templates, meta.medias, pooled_w)
            pooled_scores = pair_scores(template_ids, pooled, meta.pairs[:, 0], meta.pairs[:, 1])
            rows += verification_rows(benchmark, pooled_scores, meta.labels, len(template_ids),
                                      {**info, "pooling": QUALITY_POOLING, "pooling_quality": source},
                                      method=f"model, quality pooling ({source})")
    if one_to_n:
        if meta.probes is None or not meta.galleries:
            raise ValueError(f"{meta.name}: 1:N needs the gallery / probe CSVs "
                             "(load_ijb_meta(..., one_to_n=True))")
        result = identification_1n(template_ids, feats, meta.galleries, meta.probes)
        rows.append(identification_row(f"{meta.name} 1:N", result, {k: v for k, v in info.items()
                                                                     if k != "pair_list"}))
    if qualities:
        rows += _quality_rows(meta, rows[0], template_ids, qualities, quality_fmrs, model, cache)
    return rows


def _quality_rows(meta: IJBMeta, main: ResultRow, template_ids: np.ndarray, qualities: Qualities,
                  fmrs: Sequence[float], model: Any,
                  cache: Optional[MutableMapping[Any, Any]]) -> List[ResultRow]:
    """EDC / ERC rows over the standard-pooling 1:1 scores of ``main``; template quality = mean of its
    images' quality, pair quality = min of the two templates' (applied in ``quality_results``)."""
    per_template = {}
    for source, quality in qualities.items():
        ids, mean = template_quality(quality, meta.templates)
        if not np.array_equal(ids, template_ids):
            raise ValueError(f"{meta.name}: quality templates differ from the feature templates")
        per_template[source] = mean
    first = template_index(template_ids, meta.pairs[:, 0], "pair template")
    second = template_index(template_ids, meta.pairs[:, 1], "pair template")
    rows = quality_results(main, np.asarray(main.scores), meta.labels, first, second, per_template,
                           str(main.benchmark), model, fmrs, 0, cache)
    for row in rows:
        row.values["quality_level"] = "template: mean of its images' quality; pair: min of the two templates"
    return rows


# ------------------------------------------------------------------------------------ extraction


def extract_features(model: SupportsEmbed, image_paths: Sequence[PathLike], landmarks: np.ndarray,
                     batch_size: int = 128, flip: bool = True, workers: int = 4,
                     progress: bool = True) -> np.ndarray:
    """Raw image features float32 [N, D]: each loose crop read (OpenCV), aligned from its 5
    ``landmarks`` [N, 5, 2] to 112x112 RGB, embedded by ``model.embed(batch, normalize=False)``;
    with ``flip`` the embedding of the mirrored crop is added. ``workers`` threads decode ahead."""
    batches = _progress_batches(image_paths, landmarks, batch_size, workers, progress)
    return embed_batches(model, batches, flip)


def extract_features_with_quality(model: SupportsEmbed, image_paths: Sequence[PathLike],
                                  landmarks: np.ndarray, sources: Sequence[str], batch_size: int = 128,
                                  flip: bool = True, workers: int = 4,
                                  progress: bool = True) -> Tuple[np.ndarray, Qualities]:
    """:func:`extract_features` plus ``{source: quality [N]}`` from the same forward pass: the quality
    of each unflipped aligned crop (the mirror adds to the feature only, as the ``bin`` protocol)."""
    batches = _progress_batches(image_paths, landmarks, batch_size, workers, progress)
    return embed_batches_with_quality(model, batches, sources, flip)


def _progress_batches(image_paths: Sequence[PathLike], landmarks: np.ndarray, batch_size: int, workers: int,
                      progress: bool) -> Iterator[np.ndarray]:
    """The aligned crops in batches (:func:`_aligned_batches`) behind a progress bar."""
    from tqdm import tqdm

    n = len(image_paths)
    if len(landmarks) != n:
        raise ValueError(f"extract_features: {len(landmarks)} landmark sets for {n} images")
    return iter(tqdm(_aligned_batches(image_paths, landmarks, batch_size, workers), total=-(-n // batch_size),
                     desc="IJB features", unit="batch", disable=not progress))


def load_aligned(path: PathLike, landmarks: np.ndarray) -> np.ndarray:
    """One loose crop -> aligned uint8 RGB [112, 112, 3]."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read the image (missing or not an image file)")
    try:
        return align_face(image, landmarks)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _aligned_batches(paths: Sequence[PathLike], landmarks: np.ndarray, batch_size: int,
                     workers: int) -> Iterator[np.ndarray]:
    starts = range(0, len(paths), batch_size)

    def indices(s: int) -> range:
        return range(s, min(s + batch_size, len(paths)))

    if workers <= 0:
        for s in starts:
            yield np.stack([load_aligned(paths[i], landmarks[i]) for i in indices(s)])
        return
    with ThreadPoolExecutor(workers) as pool:
        def submit(s: int) -> List[Future]:
            return [pool.submit(load_aligned, paths[i], landmarks[i]) for i in indices(s)]

        pending = deque(submit(s) for s in starts[:2])  # decode one batch ahead of the model
        for s in starts[2:]:
            ready = pending.popleft()
            pending.append(submit(s))
            yield np.stack([f.result() for f in ready])
        while pending:
            yield np.stack([f.result() for f in pending.popleft()])


# --------------------------------------------------------------------------------- suite adapter


def run(model: SupportsEmbed, options: IJBOptions, root: Path, batch_size: int,
        cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """Rows: 1:1 nearest rule, 1:1 strict rule, and with ``one_to_n`` the 1:N row."""
    name = options.name.upper()
    subset = subset_info(name)
    if getattr(model, "modality", "image") != "image":
        raise ValueError(f"{name}: needs an image model, got modality={getattr(model, 'modality', None)!r}")
    path = Path(options.path or name)
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: {path} not found (see {subset['card']} for the layout and where to "
                                "obtain it)")
    sources = check_sources(model, options.quality, f"ijb protocol {name}")
    if options.pooling == "quality" and not sources:
        raise ValueError(f"ijb protocol {name}: pooling: quality needs quality: [head] or [norm] "
                         "(the image quality to weight by)")
    workers = options.workers if options.workers is not None else min(8, os.cpu_count() or 1)
    meta = load_ijb_meta(path, name, options.one_to_n)
    image_paths = _image_paths(meta, subset["card"])
    fusion = "flip-sum" if options.flip else "none"
    if not sources:
        features = extract_features(model, image_paths, meta.landmarks, batch_size, options.flip, workers)
        return score_ijb(meta, features, options.detector_score, options.one_to_n, fusion)
    features, qualities = extract_features_with_quality(model, image_paths, meta.landmarks, sources,
                                                        batch_size, options.flip, workers)
    return score_ijb(meta, features, options.detector_score, options.one_to_n, fusion, qualities,
                     options.pooling, options.quality_fmrs, model, cache)


def run_protocol(model: SupportsEmbed, protocol: Dict[str, Any], root: Path,
                 batch_size: int) -> List[ResultRow]:
    """:func:`run` on a suite entry (a dict; ``type`` may be left out)."""
    return run(model, build_options({**protocol, "type": "ijb"}, "ijb protocol"), Path(root), batch_size)


def _image_paths(meta: IJBMeta, card: str) -> List[str]:
    crops = meta.root / "loose_crop"
    if not crops.is_dir():
        raise FileNotFoundError(f"{meta.name}: {crops} not found (see {card})")
    present = set(os.listdir(crops))
    paths = [f"{crops}/{n}" for n in meta.images.tolist()]
    missing = [p for n, p in zip(meta.images.tolist(), paths) if n not in present and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{meta.name}: {len(missing)} image(s) listed in {meta.files['5pts']} are "
                                f"missing under {crops}, e.g. {missing[0]}")
    return paths
