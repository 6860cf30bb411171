"""Embed whole utterances with an audio model through the model's recorded Kaldi fbank front-end:
wav files (:func:`embed_wavs`, used by the ``trials`` / ``own_data`` protocols and ``mlearn embed``;
unusable wavs, i.e. unreadable, wrong sample rate, not mono, non-finite or shorter than one fbank
frame, are returned as per-file failures, never raised) and waveforms held in Python
(:func:`embed_waveforms`, behind ``Embedder.embed`` / ``embed_waveforms`` of an audio model).

Waveforms from Python: 1-D numpy arrays (or tensors) at the spec's sample rate (16 kHz), either
float in [-1, 1] (what soundfile / torchaudio return) or int16; both are brought to the int16 range
the fbank expects (``spec["input_scale"]``), exactly as a wav file of the same samples would be.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


class _EmbeddingCache:
    """Embeddings by (method, wav path) and failures by path, for one model and fbank spec."""

    def __init__(self) -> None:
        self.vectors: Dict[Tuple[str, str], np.ndarray] = {}
        self.failures: Dict[str, str] = {}


def _cache_for(shared: Optional[MutableMapping[Any, Any]], model: Any, spec_key: Tuple) -> _EmbeddingCache:
    if shared is None:  # nothing is kept between calls: the model may change
        return _EmbeddingCache()
    return shared.setdefault(("speaker-embeddings", id(model), spec_key), _EmbeddingCache())


class UnusableWav(ValueError):
    """A wav that cannot be embedded; ``kind`` (e.g. "wrong sample rate") groups the reasons in reports."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """16 kHz mono wav -> float32 [N] in int16 range (the fbank's scale), or raise :class:`UnusableWav`."""
    import soundfile as sf

    from mlearn.data import INPUT_SCALE

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile, OS and format errors alike
        raise UnusableWav("unreadable", _sound_error(exc, path)) from None
    if rate != sample_rate:
        raise UnusableWav("wrong sample rate", f"{rate} Hz, expected {sample_rate} Hz")
    if data.shape[1] != 1:
        raise UnusableWav("not mono", f"{data.shape[1]} channels")
    if not np.isfinite(data).all():  # a float wav may hold NaN; it would pass for a NaN-producing model
        raise UnusableWav("non-finite", "NaN or inf samples")
    return data[:, 0] * INPUT_SCALE


def _wav_frames(path: Path, sample_rate: int) -> int:
    """Samples in the file (header only); :class:`UnusableWav` when unreadable or at another rate."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UnusableWav("unreadable", _sound_error(exc, path)) from None
    if info.samplerate != sample_rate:
        raise UnusableWav("wrong sample rate", f"{info.samplerate} Hz, expected {sample_rate} Hz")
    return int(info.frames)


def _sound_error(exc: BaseException, path: Path) -> str:
    """libsndfile's message without the path it repeats ("Error opening 'x.wav': ...")."""
    text = str(exc).replace(f"'{path}'", "the file") or type(exc).__name__
    return "file not found" if not path.exists() else text


def _too_short(samples: int, fbank: Any) -> UnusableWav:
    o = fbank.options
    return UnusableWav("too short", f"{samples} samples ({samples * 1000 / o['sample_rate']:g} ms), no full "
                                    f"{o['frame_length_ms']:g} ms fbank frame")


def embed_wavs(model: Any, paths: Sequence[Path], batch_size: int = 64, *,
               extra_features: Optional[Mapping[str, Callable[[np.ndarray], np.ndarray]]] = None,
               cache: Optional[MutableMapping[Any, Any]] = None, desc: str = "embedding",
               progress: bool = True) -> Tuple[Dict[str, np.ndarray], np.ndarray, Dict[str, str]]:
    """Embed whole utterances: wav -> Kaldi fbank (``model.spec``, dither 0) -> CMN (if the spec says) ->
    ``model.embed(features [N, T, F], normalize=False)``; utterances of equal frame count share a batch.

    ``extra_features``: {name: fn(log-mel [T, F] without CMN) -> vector} computed beside the model
    (e.g. an MFCC baseline). ``cache``: a dict kept by the caller for as long as the model is fixed
    (a suite run): utterances already embedded there (Vox1-E and Vox1-H share them) are not embedded
    again; without one nothing is kept.

    Returns (``{"model": [U, D], <extra>: [U, d]}`` float32 with zero rows where a wav failed,
    ok mask [U] bool, ``{path: "kind: detail"}`` for the failed wavs). Failures (unreadable, wrong
    sample rate, not mono, shorter than one fbank frame) are logged, one line per kind with a count and
    the first example, not raised.
    """
    import torch
    from tqdm import tqdm

    from mlearn.data import apply_cmn, failure_kinds, fbank_from_spec

    spec = dict(model.spec)
    fbank = fbank_from_spec(spec, dither=0.0, cmn=False).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fbank = fbank.to(device)
    cmn = bool(spec.get("cmn", True))
    rate = fbank.options["sample_rate"]
    extras = dict(extra_features or {})
    store = _cache_for(cache, model, (tuple(sorted((k, str(v)) for k, v in spec.items())),))
    methods = ["model", *extras]
    keys = [str(p) for p in paths]
    todo = [i for i, k in enumerate(keys)
            if k not in store.failures and any((m, k) not in store.vectors for m in methods)]
    lengths: Dict[int, int] = {}
    for i in todo:
        try:
            samples = _wav_frames(paths[i], rate)
            if fbank.num_frames(samples) == 0:
                raise _too_short(samples, fbank)
            lengths[i] = fbank.num_frames(samples)
        except UnusableWav as exc:
            store.failures[keys[i]] = str(exc)
    order = sorted(lengths, key=lambda i: (lengths[i], keys[i]))

    def flush(batch: List[int], feats: List[torch.Tensor]) -> None:
        if not batch:
            return
        stacked = torch.stack(feats)
        model_in = apply_cmn(stacked) if cmn else stacked
        out = np.asarray(model.embed(model_in.cpu().numpy(), normalize=False), np.float32)
        if out.shape[0] != len(batch):
            raise ValueError(f"model.embed returned {out.shape[0]} embeddings for {len(batch)} utterances")
        raw = stacked.cpu().numpy()
        for j, i in enumerate(batch):
            store.vectors[("model", keys[i])] = out[j]
            for name, fn in extras.items():
                store.vectors[(name, keys[i])] = np.asarray(fn(raw[j]), np.float32)

    batch: List[int] = []
    feats: List[torch.Tensor] = []
    for i in tqdm(order, desc=desc, unit="utt", disable=not progress):
        try:
            wav = torch.from_numpy(_read_wav(paths[i], rate)).to(device)
            if fbank.num_frames(len(wav)) == 0:  # the header promised more than the file holds
                raise _too_short(len(wav), fbank)
        except UnusableWav as exc:
            store.failures[keys[i]] = str(exc)
            continue
        with torch.inference_mode():
            feat = fbank(wav)
        if batch and (feat.shape[0] != feats[0].shape[0] or len(batch) >= batch_size):
            flush(batch, feats)
            batch, feats = [], []
        batch.append(i)
        feats.append(feat)
    flush(batch, feats)

    ok = np.array([k not in store.failures for k in keys], bool)
    failures = {k: store.failures[k] for k in keys if k in store.failures}
    for kind, (count, example) in failure_kinds(failures).items():
        log.warning("%s: skipped %d of %d wavs as %s, e.g. %s", desc, count, len(keys), kind, example)
    out: Dict[str, np.ndarray] = {}
    for name in methods:
        vectors = [store.vectors.get((name, k)) for k in keys]
        dim = next((v.shape[0] for v in vectors if v is not None), 0)
        out[name] = np.stack([v if v is not None else np.zeros(dim, np.float32) for v in vectors]) \
            if keys else np.zeros((0, 0), np.float32)
    return out, ok, failures


WAVEFORM_MAX_FLOAT = 2.0  # float waveforms beyond this are int16-range samples passed as float: refused


def is_waveform_input(batch: Any) -> bool:
    """True for what :func:`embed_waveforms` takes: one 1-D array / tensor, or a list / tuple of them."""
    items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    return bool(items) and all(getattr(x, "ndim", None) == 1 for x in items)


def waveform_features(waveforms: Any, spec: Mapping[str, Any], sample_rate: int = 16000) -> List[np.ndarray]:
    """1-D waveforms (one, or a list) -> fbank features [T, F] float32 each, as :func:`embed_wavs`
    computes them from a wav file (dither 0, CMN when the spec says). ``ValueError`` for a sample
    rate other than the spec's, a dtype other than float / int16, float samples beyond [-2, 2] (int16-
    range values passed as float), non-finite samples, or fewer samples than one fbank frame."""
    import torch

    from mlearn.data import INPUT_SCALE, apply_cmn, fbank_from_spec

    fbank = fbank_from_spec(spec, dither=0.0, cmn=False).eval()
    rate = fbank.options["sample_rate"]
    if int(sample_rate) != rate:
        raise ValueError(f"waveforms at {sample_rate} Hz; this model's fbank expects {rate} Hz "
                         "(resample first)")
    waves = list(waveforms) if isinstance(waveforms, (list, tuple)) else [waveforms]
    scale = float(spec.get("input_scale", INPUT_SCALE))
    out = []
    for i, wave in enumerate(waves):
        array = wave.detach().cpu().numpy() if hasattr(wave, "detach") else np.asarray(wave)
        if array.ndim != 1:
            raise ValueError(f"waveform {i}: expected a 1-D array of samples, got shape {array.shape}")
        if array.dtype == np.int16:
            samples = array.astype(np.float32)
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError(f"waveform {i}: contains NaN or infinite samples")
            peak = float(np.abs(array).max()) if array.size else 0.0
            if peak > WAVEFORM_MAX_FLOAT:
                raise ValueError(f"waveform {i}: float samples up to {peak:g}; expected float audio in "
                                 "[-1, 1] (pass int16-range samples as an int16 array)")
            samples = array.astype(np.float32) * scale
        else:
            raise ValueError(f"waveform {i}: dtype {array.dtype}; expected float in [-1, 1] or int16")
        if fbank.num_frames(len(samples)) == 0:
            raise ValueError(f"waveform {i}: {_too_short(len(samples), fbank)}")
        with torch.inference_mode():
            feats = fbank(torch.from_numpy(samples))
        out.append((apply_cmn(feats) if spec.get("cmn", True) else feats).numpy())
    return out


def embed_waveforms(forward: Callable[[np.ndarray], np.ndarray], waveforms: Any, spec: Mapping[str, Any],
                    sample_rate: int = 16000, batch_size: int = 64) -> np.ndarray:
    """Raw embeddings [N, D] (float32, input order) of 1-D waveforms (see :func:`waveform_features`):
    utterances of equal frame count share a batch of ``forward(features [n, T, F]) -> [n, D]``."""
    feats = waveform_features(waveforms, spec, sample_rate)
    rows: Dict[int, np.ndarray] = {}
    by_length: Dict[int, List[int]] = {}
    for i, f in enumerate(feats):
        by_length.setdefault(f.shape[0], []).append(i)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            out = np.asarray(forward(np.stack([feats[i] for i in chunk])), np.float32)
            rows.update(zip(chunk, out))
    return np.stack([rows[i] for i in range(len(feats))])
