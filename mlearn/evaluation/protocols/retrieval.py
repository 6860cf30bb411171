"""Identity retrieval on image sets (docs/protocols.md section d): suite type ``retrieval``.

Embeds the ``query`` set (and the ``gallery``; absent = the query set searched against itself, self
excluded) through :func:`mlearn.inference.embed_batches` and reports
:func:`~mlearn.evaluation.metrics.retrieval.retrieval_metrics` as one row.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, MutableMapping, Optional, Tuple

import numpy as np

from mlearn.evaluation.metrics.retrieval import retrieval_metrics
from mlearn.evaluation.protocols.options import RetrievalOptions, build_options
from mlearn.evaluation.report import ResultRow
from mlearn.inference import SupportsEmbed, embed_batches, resize_image

log = logging.getLogger(__name__)

SET_FORMATS = "an image folder <set>/<label>/<image> or a list file of 'path label' lines"
LEGEND = ("queries: evaluated (lone ones dropped); R@k: recall@k (%), mAP: full-ranking mean AP (%), "
          "mAP@R: MAP@R (%); pytorch-metric-learning semantics, cosine, self excluded by index")


def embed_image_set(model: SupportsEmbed, path: Path, batch_size: int = 128, flip: bool = False,
                    workers: int = 0) -> Tuple[np.ndarray, np.ndarray, int]:
    """Raw embeddings of every readable image of an image folder / list file (``mlearn.data.open_dataset``).

    Images are resized to ``model.spec["input_size"]`` (else to the first image's size) and, with
    ``flip``, the embedding of the mirrored image is added before any normalisation. Returns (float32
    [N, D], original labels as strings [N], number of unreadable images skipped).
    """
    from torch.utils.data import DataLoader

    from mlearn.data import collate_skip_corrupt, open_dataset

    dataset = open_dataset(path)
    size = (getattr(model, "spec", None) or {}).get("input_size")
    if size is None:
        first = next((dataset[i][0] for i in range(len(dataset)) if dataset[i] is not None), None)
        if first is None:
            raise ValueError(f"{path}: none of its {len(dataset)} images can be read")
        size = first.shape[:2]
    dataset.transform = functools.partial(resize_image, height=int(size[0]), width=int(size[1]))
    names = np.array([str(name) for name in sorted(dataset.label_map, key=dataset.label_map.get)])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_corrupt)
    labels: List[np.ndarray] = []
    unreadable = 0

    def readable_batches() -> Iterator[np.ndarray]:
        nonlocal unreadable
        for images, batch_labels, corrupt in loader:
            unreadable += corrupt
            if len(batch_labels):
                labels.append(names[batch_labels.numpy()])
                yield images.numpy()

    embeddings = embed_batches(model, readable_batches(), flip)
    if not labels:
        raise ValueError(f"{path}: none of its {len(dataset)} images can be read")
    if unreadable:
        log.warning("%s: %d unreadable image(s) skipped", path, unreadable)
    return embeddings, np.concatenate(labels), unreadable


def _set_path(root: Path, value: Any, name: str, key: str) -> Path:
    path = Path(str(value))
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} not found ({key}: expected {SET_FORMATS}; "
                                f"see datasets/README.md)")
    return path


def run(model: SupportsEmbed, options: RetrievalOptions, root: Path, batch_size: int,
        cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """One row: :func:`retrieval_metrics` of the embedded query set against the gallery."""
    name = options.benchmark
    if getattr(model, "modality", "image") != "image":
        raise ValueError(f"{name}: the retrieval protocol embeds images; this model's modality is "
                         f"{getattr(model, 'modality', None)!r}")
    root = Path(root)
    index_options = options.index_options()
    query_path = _set_path(root, options.query, name, "query")
    gallery_path = _set_path(root, options.gallery, name, "gallery") if options.gallery is not None else None
    embed = functools.partial(embed_image_set, model, batch_size=batch_size, flip=options.flip,
                              workers=options.workers)
    query, query_labels, query_bad = embed(query_path)
    if gallery_path is None:
        gallery, gallery_labels, gallery_bad = query, query_labels, 0
    else:
        gallery, gallery_labels, gallery_bad = embed(gallery_path)
    identities = np.unique(gallery_labels)
    if len(identities) < 2:
        raise ValueError(f"{name}: {gallery_path or query_path} holds a single identity ('{identities[0]}'); "
                         "retrieval needs at least 2, else every neighbour is a match")
    try:
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels, tuple(options.ks),
                                    exclude_self=gallery_path is None, index=options.index, **index_options)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{name}: {exc.args[0] if exc.args else exc}") from None
    map_key = "map" if "map" in metrics else next(k for k in metrics if k.startswith("map@") and k != "map@r")
    table = {"benchmark": name, "method": "model", "queries": str(metrics["num_queries"]),
             "gallery": str(len(gallery))}
    ks = dict.fromkeys(int(k) for k in options.ks)
    table.update({f"R@{k}": _percent(metrics[f"recall@{k}"]) for k in ks})
    table["mAP" if map_key == "map" else f"mAP@{map_key[4:]}"] = _percent(metrics[map_key])
    table["mAP@R"] = _percent(metrics["map@r"])
    values = {
        "benchmark": name, "method": "model",
        "protocol": ("query vs gallery" if gallery_path
                     else "leave-one-out (gallery = query set, self excluded)"),
        "queries": len(query), "gallery": len(gallery),
        "unreadable": {"query": int(query_bad), "gallery": int(gallery_bad)},
        "fusion": "flip-sum" if options.flip else "none", "distance": "cosine (FAISS inner product)",
        "normalisation": "L2", "index": options.index, **index_options, **metrics,
    }
    return [ResultRow(values, table=table, legend=LEGEND)]


def run_protocol(model: SupportsEmbed, protocol: Dict[str, Any], root: Path,
                 batch_size: int) -> List[ResultRow]:
    """:func:`run` on a suite entry (a dict; ``type`` may be left out)."""
    options = build_options({**protocol, "type": "retrieval"}, "retrieval protocol")
    return run(model, options, Path(root), batch_size)


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value * 100:.2f}"
