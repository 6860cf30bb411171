"""Embed a folder or list of images (wav files for speaker models) with any model ``mlearn.load_model``
reads: ``mlearn embed``.

Outputs, for ``--output OUT.npy``: ``OUT.npy`` (float32 [N, D], L2-normalised rows), ``OUT.ids.txt``
(one path per row, relative to the input folder / list folder, same order) and ``OUT.errors.txt``
(``path<TAB>reason`` per unreadable input; empty when none). Unreadable inputs (for audio: also a wrong
sample rate, several channels, shorter than one fbank frame) are skipped, not fatal, unless every
input is: then the files are written and it is an error. With ``--quality head|norm`` also
``OUT.quality.npy`` (float32 [N], same rows; see :meth:`mlearn.inference.Embedder.quality`).
Imports no training code: with an ``.onnx`` model only numpy, OpenCV, onnxruntime and tqdm are loaded.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, List, Optional, Tuple, Union

import numpy as np

from mlearn.inference import Embedder, embed_batches, l2_normalize, load_model, resize_image

PathLike = Union[str, Path]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
AUDIO_EXTENSIONS = (".wav", ".flac")


@dataclass
class EmbedResult:
    """Embeddings [N, D] of the readable inputs, their ``ids`` (same order) and ``errors`` (path, reason)."""

    embeddings: np.ndarray
    ids: List[str]
    errors: List[Tuple[str, str]] = field(default_factory=list)
    quality: Optional[np.ndarray] = None  # [N] float32 when asked for (``quality="head"`` / ``"norm"``)


def list_inputs(source: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Tuple[Path, List[str]]:
    """``source``: a folder (every file with one of ``extensions`` below it, sorted) or a text file of
    paths, one a line, relative to the file's folder (absolute paths allowed; blank lines, ``#``
    comments and anything after a tab, e.g. a label, are ignored). Returns ``(root, relative ids)``."""
    source = Path(source)
    if source.is_dir():
        ids = sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                     if p.suffix.lower() in extensions and p.is_file())
        if not ids:
            kind = "audio files" if extensions == AUDIO_EXTENSIONS else "images"
            raise ValueError(f"no {kind} ({', '.join(extensions)}) found under {source}")
        return source, ids
    if not source.is_file():
        raise FileNotFoundError(f"input not found: {source} (expected an image folder or a list file)")
    ids = []
    for line in source.read_text().splitlines():
        entry = line.split("\t")[0].strip()
        if entry and not entry.startswith("#"):
            ids.append(entry)
    if not ids:
        raise ValueError(f"list file {source} names no images")
    return source.parent, ids


def read_image(path: PathLike, size: Optional[Sequence[int]] = None) -> np.ndarray:
    """Decode ``path`` as uint8 RGB [H, W, 3] (resized to ``size`` = [height, width] when given).

    Raises ``ValueError`` for a missing, unreadable or corrupt file.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ValueError("file not found")
    data = np.fromfile(str(path), dtype=np.uint8)  # imdecode: works on non-ASCII paths too
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError("cannot decode image")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if size is not None:
        image = resize_image(image, int(size[0]), int(size[1]))
    return image


def embed_images(model: Union[Embedder, PathLike], root: PathLike, ids: Sequence[str], batch_size: int = 64,
                 workers: Optional[int] = None, progress: Optional[bool] = None,
                 quality: Optional[str] = None) -> EmbedResult:
    """Embed the images ``root / id`` in batches; unreadable ones go to ``errors``, not into the output.

    ``model``: an :class:`~mlearn.inference.Embedder` or anything :func:`mlearn.load_model` reads.
    ``workers``: decoding threads (default: up to 4). ``progress``: tqdm bar (default: on a terminal).
    ``quality``: ``"head"`` / ``"norm"`` also fills ``EmbedResult.quality`` (see ``Embedder.quality``).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    embedder = model if isinstance(model, Embedder) else load_model(model)
    if quality is not None:
        embedder.check_quality(quality)  # a model without a head fails before any decoding
    if embedder.modality == "audio":
        return embed_audio(embedder, root, ids, batch_size=batch_size, progress=progress, quality=quality)
    root = Path(root)
    size = embedder.spec["input_size"]
    workers = workers or min(4, os.cpu_count() or 1)

    def decode(rel: str) -> Tuple[str, Any]:
        try:
            return rel, read_image(root / rel, size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file error, never fatal
            return rel, exc

    ids_out: List[str] = []
    errors: List[Tuple[str, str]] = []
    bar = tqdm(total=len(ids), unit="img", desc="embed", disable=None if progress is None else not progress)

    def readable_batches() -> Iterator[np.ndarray]:
        id_batches = (list(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size))
        with ThreadPoolExecutor(workers) as pool:
            for batch in _prefetch(pool, decode, id_batches, depth=2):
                good = [(rel, image) for rel, image in batch if isinstance(image, np.ndarray)]
                errors.extend((rel, _reason(exc)) for rel, exc in batch if not isinstance(exc, np.ndarray))
                bar.update(len(batch))
                if good:
                    ids_out.extend(rel for rel, _ in good)
                    yield np.stack([image for _, image in good])

    if quality is None:
        raw, scores = embed_batches(embedder, readable_batches(), dim=embedder.embedding_size), None
    else:
        both = embed_batches(_QualityColumn(embedder, quality), readable_batches(), flip=False,
                             dim=embedder.embedding_size + 1)
        raw, scores = both[:, :-1], np.ascontiguousarray(both[:, -1])
    bar.close()
    return EmbedResult(embeddings=l2_normalize(raw), ids=ids_out, errors=errors, quality=scores)


class _QualityColumn:
    """An embedder whose ``embed(batch, normalize=False)`` returns [N, D + 1]: the raw embeddings and
    the quality by ``method`` as the last column (so batch-wise helpers carry the quality along)."""

    def __init__(self, model: Embedder, method: str) -> None:
        self.model, self.method, self.spec = model, method, model.spec

    def embed(self, batch: Any, normalize: bool = False) -> np.ndarray:
        raw, quality = self.model.embed(batch, normalize=False, with_quality=self.method)
        return np.concatenate([raw, np.asarray(quality, np.float32)[:, None]], axis=1)


def _reason(exc: BaseException) -> str:
    """``kind: detail`` of a failed input (``read_image``'s ValueErrors are already worded that way)."""
    return str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"


def embed_audio(model: Embedder, root: PathLike, ids: Sequence[str], batch_size: int = 64,
                progress: Optional[bool] = None, quality: Optional[str] = None) -> EmbedResult:
    """Whole utterances ``root / id`` (16 kHz mono wav/flac) -> the recorded Kaldi fbank front-end ->
    L2-normalised embeddings; unreadable files go to ``errors``. ``quality``: see :func:`embed_images`."""
    from mlearn.inference_audio import embed_wavs

    root = Path(root)
    source = model if quality is None else _QualityColumn(model, quality)
    vectors, ok, failures = embed_wavs(source, [root / rel for rel in ids], batch_size=batch_size,
                                       desc="embed", progress=progress is not False)
    width = model.embedding_size + (0 if quality is None else 1)
    raw = vectors["model"][ok] if ok.any() else np.zeros((0, width), np.float32)
    scores = None if quality is None else np.ascontiguousarray(raw[:, -1], dtype=np.float32)
    embeddings = l2_normalize(raw if quality is None else raw[:, :-1])
    errors = [(rel, failures[str(root / rel)]) for rel, good in zip(ids, ok) if not good]
    return EmbedResult(embeddings=embeddings.astype(np.float32),
                       ids=[rel for rel, good in zip(ids, ok) if good], errors=errors, quality=scores)


def embed_to_files(model: Union[Embedder, PathLike], source: PathLike, output: PathLike, batch_size: int = 64,
                   workers: Optional[int] = None, progress: Optional[bool] = None,
                   quality: Optional[str] = None) -> Tuple[EmbedResult, Path]:
    """:func:`list_inputs` + :func:`embed_images`, written as ``OUT.npy``, ``OUT.ids.txt`` and
    ``OUT.errors.txt`` (and ``OUT.quality.npy``, float32 [N], with ``quality="head"`` / ``"norm"``).

    Returns the result and the ``.npy`` path (``.npy`` is appended to ``output`` when missing). When
    no input at all can be read the three files are still written and ``ValueError`` names the input,
    the count and the reasons by kind (a total failure is not a result).
    """
    # fail on a bad model before listing thousands of files; an Embedder passes through (CLI trust flags)
    embedder = model if isinstance(model, Embedder) else load_model(model)
    if quality is not None:
        embedder.check_quality(quality)  # no quality head: one line, before listing the inputs
    root, ids = list_inputs(source, AUDIO_EXTENSIONS if embedder.modality == "audio" else IMAGE_EXTENSIONS)
    result = embed_images(embedder, root, ids, batch_size=batch_size, workers=workers, progress=progress,
                          quality=quality)
    bad = int((~np.isfinite(result.embeddings)).any(axis=1).sum())
    if bad:  # nothing is written: NaN rows would look like embeddings to whoever reads OUT.npy
        named = getattr(model, "path", None) if isinstance(model, Embedder) else model
        raise ValueError(f"{named or 'the model'}: its embeddings of {bad} of the {len(result.ids)} inputs "
                         "contain NaN or inf (NaN weights, e.g. from a diverged run?); nothing written")
    output = Path(output)
    if output.suffix != ".npy":
        output = output.with_name(output.name + ".npy")
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, result.embeddings)
    stem = output.with_suffix("")
    Path(f"{stem}.ids.txt").write_text("".join(f"{rel}\n" for rel in result.ids))
    Path(f"{stem}.errors.txt").write_text("".join(f"{rel}\t{reason}\n" for rel, reason in result.errors))
    if result.quality is not None:
        np.save(f"{stem}.quality.npy", result.quality.astype(np.float32))
    if not result.ids:
        from mlearn.data import summarize_failures

        kind = "audio files" if embedder.modality == "audio" else "images"
        raise ValueError(f"none of the {len(ids)} {kind} of {source} could be embedded: "
                         f"{summarize_failures(dict(result.errors))}; all listed in {stem}.errors.txt")
    return result, output


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[str], Any], batches: Iterator[List[str]],
              depth: int) -> Iterator[List[Any]]:
    """Decode ``depth`` batches ahead of the one being embedded (bounded memory, unlike ``pool.map``)."""
    queue: Deque[List[Future]] = deque()
    for batch in batches:
        queue.append([pool.submit(fn, item) for item in batch])
        if len(queue) > depth:
            yield [future.result() for future in queue.popleft()]
    while queue:
        yield [future.result() for future in queue.popleft()]
