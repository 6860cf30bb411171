"""FAISS top-k inner-product search in bounded memory: the index registry (``flat``, ``ivf``,
``hnsw``) and :class:`Searcher`, used by :func:`mlearn.evaluation.metrics.retrieval.retrieval_metrics`.

The gallery is normalised block by block (never as a whole copy); exact CPU search runs over gallery
shards of at most ``SHARD_ELEMENTS`` floats merged in a FAISS result heap.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np

from mlearn.inference import l2_normalize
from mlearn.registry import Registry

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 22  # float32 elements of one working block (16 MB): bounds every temporary
SHARD_ELEMENTS = 1 << 26  # floats of one exact-search gallery shard on CPU (256 MB)
GPU_MAX_K = 2048  # FAISS GPU k-selection limit


@dataclass(frozen=True)
class IndexOptions:
    """Parameters of the approximate indexes (ignored by ``flat``).

    ``nlist``: IVF cells (default ``4·sqrt(N)``, at most N/39); ``nprobe``: IVF cells visited per query;
    ``hnsw_m``: HNSW links per node; ``ef_search``: HNSW search beam (default ``max(128, k)``, never below k).
    """

    nlist: Optional[int] = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: Optional[int] = None
    ef_construction: int = 80


@dataclass(frozen=True)
class IndexKind:
    """How to make one empty FAISS inner-product index: ``make(dim, size, k, options) -> (index, text)``."""

    exact: bool
    gpu: bool
    make: Callable[[int, int, int, IndexOptions], Tuple[Any, str]]


INDEXES: Registry[IndexKind] = Registry("retrieval index")


def _make_flat(dim: int, size: int, k: int, options: IndexOptions) -> Tuple[Any, str]:
    import faiss

    return faiss.IndexFlatIP(dim), "flat (exact)"


def default_nlist(size: int) -> int:
    """IVF cells for ``size`` vectors: ``4·sqrt(size)``, capped so every cell gets >= 39 training points."""
    return int(max(1, min(round(4 * math.sqrt(size)), size // 39)))


def _make_ivf(dim: int, size: int, k: int, options: IndexOptions) -> Tuple[Any, str]:
    import faiss

    nlist = int(options.nlist or default_nlist(size))
    if not 1 <= nlist <= size:
        raise ValueError(f"nlist={nlist}: expected 1 <= nlist <= gallery size ({size})")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(int(options.nprobe), nlist)
    return index, f"ivf (nlist={nlist}, nprobe={index.nprobe})"


def _make_hnsw(dim: int, size: int, k: int, options: IndexOptions) -> Tuple[Any, str]:
    import faiss

    index = faiss.IndexHNSWFlat(dim, int(options.hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(options.ef_construction)
    index.hnsw.efSearch = max(int(options.ef_search or 128), k)
    return index, f"hnsw (M={options.hnsw_m}, efSearch={index.hnsw.efSearch})"


INDEXES.register("flat")(functools.partial(IndexKind, exact=True, gpu=True, make=_make_flat))
INDEXES.register("ivf")(functools.partial(IndexKind, exact=False, gpu=True, make=_make_ivf))
INDEXES.register("hnsw")(functools.partial(IndexKind, exact=False, gpu=False, make=_make_hnsw))


def gpu_available() -> bool:
    """True when faiss was built with GPU support, sees a GPU, and torch sees CUDA."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return False
    import torch

    return bool(torch.cuda.is_available())


def unit_rows(x: Any) -> np.ndarray:
    """[N, D] -> C-contiguous float32 rows of unit L2 norm (FAISS's input; zero rows stay zero)."""
    return np.ascontiguousarray(l2_normalize(np.asarray(x, dtype=np.float32)))


def row_blocks(lo: int, hi: int, width: int) -> Iterator[Tuple[int, int]]:
    """[a, b) row ranges covering lo..hi with (b - a) * width <= BLOCK_ELEMENTS (at least one row)."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    for start in range(lo, hi, step):
        yield start, min(hi, start + step)


class Searcher:
    """Top-k inner-product search of normalised queries over the normalised gallery.

    One FAISS index for the whole gallery (GPU, or an approximate index), or, for exact search on CPU, a
    sequence of shard indexes of at most ``SHARD_ELEMENTS`` floats whose results a FAISS result heap
    merges: then only one shard's normalised copy is in memory besides the caller's gallery.
    """

    def __init__(self, gallery: np.ndarray, kind: IndexKind, options: IndexOptions, k: int,
                 gpu: bool) -> None:
        import faiss

        self.gallery, self.kind, self.options, self.k = gallery, kind, options, k
        self.size, self.dim = gallery.shape
        if gpu and kind.gpu and k > GPU_MAX_K:
            log.warning("searching on CPU: k=%d exceeds the FAISS GPU limit of %d", k, GPU_MAX_K)
        self.on_gpu = gpu and kind.gpu and k <= GPU_MAX_K
        self._resources = faiss.StandardGpuResources() if self.on_gpu else None
        self.sharded = kind.exact and not self.on_gpu
        self.shard_rows = max(1, SHARD_ELEMENTS // self.dim) if self.sharded else self.size
        self._index: Any = None
        self.description = ""
        if not self.sharded or self.size <= self.shard_rows:
            self._index, self.description = self._build(0, self.size)
        else:
            self.description = kind.make(self.dim, self.shard_rows, k, options)[1] + " sharded"
        self.description += ", gpu" if self.on_gpu else ", cpu"

    def _build(self, lo: int, hi: int) -> Tuple[Any, str]:
        import faiss

        index, text = self.kind.make(self.dim, hi - lo, self.k, self.options)
        if self._resources is not None:
            nprobe = getattr(index, "nprobe", None)
            gpu_index: Any = faiss.index_cpu_to_gpu(self._resources, 0, index)
            if nprobe is not None:
                gpu_index.nprobe = nprobe
            index = gpu_index
        if not index.is_trained:
            index.train(self._training_sample(lo, hi, getattr(index, "nlist", 1)))
        for a, b in row_blocks(lo, hi, self.dim):
            index.add(unit_rows(self.gallery[a:b]))
        return index, text

    def _training_sample(self, lo: int, hi: int, nlist: int) -> np.ndarray:
        size = hi - lo
        count = min(size, max(40 * nlist, 10_000))
        rows = np.sort(np.random.default_rng(0).choice(size, count, replace=False)) + lo
        return unit_rows(self.gallery[rows])

    def search(self, query: np.ndarray, rows: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k of ``query[rows]`` (normalised here, batch by batch): (scores, gallery indices)
        [len(rows), k], best first; index -1 where the index returned fewer than k results."""
        import faiss

        batches = [(a, min(len(rows), a + batch_size)) for a in range(0, len(rows), batch_size)]
        if self._index is not None:
            scores = np.empty((len(rows), self.k), np.float32)
            ids = np.empty((len(rows), self.k), np.int64)
            for a, b in batches:
                scores[a:b], ids[a:b] = self._index.search(unit_rows(query[rows[a:b]]), self.k)
            return scores, ids
        heap = faiss.ResultHeap(len(rows), self.k, keep_max=True)
        for lo in range(0, self.size, self.shard_rows):
            hi = min(self.size, lo + self.shard_rows)
            index, _ = self._build(lo, hi)
            for a, b in batches:
                scores, ids = index.search(unit_rows(query[rows[a:b]]), min(self.k, hi - lo))
                heap.add_result_subset(np.arange(a, b), scores, np.where(ids >= 0, ids + lo, -1))
            del index
        heap.finalize()
        return heap.D, heap.I
