"""Speaker verification on trial lists (VoxCeleb protocol, PROTOCOLS.md section c).

Pure functions over arrays (trial scoring, cohort statistics, AS-norm / S-norm / Z-norm / T-norm,
speaker-mean cohorts, MFCC baseline) and the suite adapter :func:`run_protocol` (suite type
``trials``): read wavs, Kaldi fbank (:mod:`mlearn.data.fbank`), embed each whole utterance, cosine
score the trials, EER (NIST interpolation; sklearn and speechbrain variants as cross-checks) and
minDCF at P_target 0.01 and 0.05.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.data.corrupt import failure_kinds, summarize_failures
from mlearn.evaluation.roc import eer_nist, eer_sklearn, eer_speechbrain, min_dcf

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
P_TARGETS = (0.01, 0.05)
EER_VARIANT = "NIST linear interpolation (Kaldi/WeSpeaker compute_eer)"
CARD = "datasets/voxceleb.md"
MAX_LISTED = 1000  # unusable wavs listed by name in a result row (all are counted)


# ------------------------------------------------------------------------------------- trial lists


@dataclass
class Trials:
    """A trial list: ``enroll[i]`` vs ``test[i]``, ``labels[i]`` 1 = target (same speaker), 0 = non-target."""

    enroll: List[str]
    test: List[str]
    labels: np.ndarray
    format: str  # "official" (label enroll test) or "kaldi" (enroll test target|nontarget)

    def __len__(self) -> int:
        return len(self.labels)


_OFFICIAL_LABELS = {"1": 1, "0": 0}
_KALDI_LABELS = {"target": 1, "nontarget": 0}


def _parse_official(fields: List[str]) -> Optional[Tuple[str, str, int]]:
    if len(fields) == 3 and fields[0] in _OFFICIAL_LABELS:
        return fields[1], fields[2], _OFFICIAL_LABELS[fields[0]]
    return None


def _parse_kaldi(fields: List[str]) -> Optional[Tuple[str, str, int]]:
    if len(fields) == 3 and fields[2] in _KALDI_LABELS:
        return fields[0], fields[1], _KALDI_LABELS[fields[2]]
    return None


TRIAL_FORMATS: Dict[str, Tuple[Callable[[List[str]], Optional[Tuple[str, str, int]]], str]] = {
    "official": (_parse_official, "'<1|0> <enroll> <test>'"),
    "kaldi": (_parse_kaldi, "'<enroll> <test> target|nontarget'"),
}


def read_trials(path: PathLike) -> Trials:
    """Read a trial list; the format (official VoxCeleb or WeSpeaker/Kaldi) is detected from the first
    non-empty line and every other line must follow it (``ValueError`` naming file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trial list not found: {path}")
    enroll: List[str] = []
    test: List[str] = []
    labels: List[int] = []
    kind: Optional[str] = None
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if kind is None:
                kind = next((k for k, (parse, _) in TRIAL_FORMATS.items() if parse(fields)), None)
                if kind is None:
                    expected = " or ".join(desc for _, desc in TRIAL_FORMATS.values())
                    raise ValueError(f"{path}:{lineno}: expected a trial {expected}; got {line.strip()!r}")
            parse, desc = TRIAL_FORMATS[kind]
            parsed = parse(fields)
            if parsed is None:
                raise ValueError(f"{path}:{lineno}: expected {desc} ({kind} format, as on the first line); "
                                 f"got {line.strip()!r}")
            enroll.append(parsed[0])
            test.append(parsed[1])
            labels.append(parsed[2])
    if kind is None:
        raise ValueError(f"{path}: empty trial list")
    return Trials(enroll, test, np.asarray(labels, np.int8), kind)


# ---------------------------------------------------------------------------------- scoring (arrays)


def unit_rows(x: np.ndarray, mean: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 rows of ``x`` [N, D] minus ``mean`` [D] (if given), scaled to unit L2 norm."""
    x = np.asarray(x, np.float64)
    if mean is not None:
        x = x - np.asarray(mean, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_scores(embeddings: np.ndarray, enroll_index: np.ndarray, test_index: np.ndarray,
                  mean: Optional[np.ndarray] = None) -> np.ndarray:
    """Trial scores [n]: cos(e_i - mean, t_i - mean) with e_i = embeddings[enroll_index[i]],
    t_i = embeddings[test_index[i]] (``embeddings`` [U, D]; ``mean`` [D] e.g. the training-set mean)."""
    unit = unit_rows(embeddings, mean)
    return np.einsum("nd,nd->n", unit[np.asarray(enroll_index)], unit[np.asarray(test_index)])


def top_n_stats(cohort_scores: np.ndarray, top_n: Optional[int] = 300) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and population std (ddof 0) of the ``top_n`` largest scores of each row of ``cohort_scores``
    [N, M]; all M when ``top_n`` is None or >= M (S-norm). Returns two float64 [N]."""
    scores = np.asarray(cohort_scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"cohort scores must be [N, M] with M >= 1, got shape {scores.shape}")
    m = scores.shape[1]
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n={top_n}; expected >= 1 (or None for the whole cohort)")
    if top_n is not None and top_n < m:
        scores = np.partition(scores, m - top_n, axis=1)[:, m - top_n:]
    return scores.mean(axis=1), scores.std(axis=1)


def cohort_score_stats(embeddings: np.ndarray, cohort: np.ndarray, top_n: Optional[int] = 300,
                       mean: Optional[np.ndarray] = None, chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`top_n_stats` of the cosines between each embedding [U, D] and every cohort vector [M, D]
    (both minus ``mean`` first), computed ``chunk`` rows at a time (never a full [U, M] matrix)."""
    unit_cohort = unit_rows(cohort, mean)
    means, stds = [], []
    for start in range(0, len(embeddings), chunk):
        block = unit_rows(embeddings[start:start + chunk], mean) @ unit_cohort.T
        mu, sd = top_n_stats(block, top_n)
        means.append(mu)
        stds.append(sd)
    if not means:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(means), np.concatenate(stds)


def _s_norm(s, mu_e, sd_e, mu_t, sd_t):
    return 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)


def _z_norm(s, mu_e, sd_e, mu_t, sd_t):
    return (s - mu_e) / sd_e


def _t_norm(s, mu_e, sd_e, mu_t, sd_t):
    return (s - mu_t) / sd_t


# Score normalisations by name: "s" (symmetric; adaptive when top_n < cohort size), "z" (enroll side),
# "t" (test side).
SCORE_NORMS: Dict[str, Callable[..., np.ndarray]] = {"s": _s_norm, "z": _z_norm, "t": _t_norm}


def apply_score_norm(scores: np.ndarray, enroll_mean: np.ndarray, enroll_std: np.ndarray,
                     test_mean: np.ndarray, test_std: np.ndarray, kind: str = "s") -> np.ndarray:
    """Normalise trial scores [n] with per-trial cohort statistics (all [n]); ``kind`` in
    :data:`SCORE_NORMS`: s = ½[(s - μ_e)/σ_e + (s - μ_t)/σ_t], z = (s - μ_e)/σ_e, t = (s - μ_t)/σ_t."""
    try:
        norm = SCORE_NORMS[kind]
    except KeyError:
        raise ValueError(f"score norm kind={kind!r}; expected one of {sorted(SCORE_NORMS)}") from None
    tiny = 1e-12  # a constant cohort row would divide by zero
    return norm(np.asarray(scores, np.float64), enroll_mean, np.maximum(enroll_std, tiny), test_mean,
                np.maximum(test_std, tiny))


def as_norm(scores: np.ndarray, enroll_cohort: np.ndarray, test_cohort: np.ndarray, top_n: Optional[int] = 300,
            kind: str = "s", enroll_index: Optional[np.ndarray] = None,
            test_index: Optional[np.ndarray] = None) -> np.ndarray:
    """Adaptive symmetric score normalisation (AS-norm; S-norm when top_n >= cohort size M).

    ``scores`` [n] raw trial scores; ``enroll_cohort`` / ``test_cohort``: cohort scores [n, M] of each
    trial's enrollment / test embedding, or, with ``enroll_index`` / ``test_index`` [n], [U, M] rows per
    unique embedding indexed by trial. Each side keeps its own top-N, mean and population std:
    s' = ½[(s - μ_e)/σ_e + (s - μ_t)/σ_t] (``kind`` "z" / "t": one term only). Returns float64 [n].

    >>> # enroll top-2 {0.3, 0.2}: (0.5 - 0.25) / 0.05 = 5; test top-2 {0.4, 0.2}: (0.5 - 0.3) / 0.1 = 2
    >>> as_norm(np.array([0.5]), np.array([[0.1, 0.3, 0.2]]), np.array([[0.0, 0.4, 0.2]]), top_n=2)
    array([3.5])
    """
    mu_e, sd_e = top_n_stats(enroll_cohort, top_n)
    mu_t, sd_t = top_n_stats(test_cohort, top_n)
    if enroll_index is not None:
        mu_e, sd_e = mu_e[enroll_index], sd_e[enroll_index]
    if test_index is not None:
        mu_t, sd_t = mu_t[test_index], sd_t[test_index]
    if len(mu_e) != len(scores) or len(mu_t) != len(scores):
        raise ValueError(f"as_norm: {len(scores)} scores but {len(mu_e)} enroll / {len(mu_t)} test cohort rows "
                         "(pass enroll_index / test_index for per-utterance rows)")
    return apply_score_norm(scores, mu_e, sd_e, mu_t, sd_t, kind)


def speaker_mean_cohort(embeddings: np.ndarray, speakers: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Speaker-level cohort (WeSpeaker): the mean of each speaker's utterance embeddings [N, D].
    Returns ([S, D] float64, the S speaker ids sorted)."""
    if len(speakers) != len(embeddings):
        raise ValueError(f"speaker_mean_cohort: {len(embeddings)} embeddings but {len(speakers)} speaker ids")
    ids, inverse = np.unique(np.asarray(speakers, dtype=str), return_inverse=True)
    sums = np.zeros((len(ids), embeddings.shape[1]))
    np.add.at(sums, inverse, np.asarray(embeddings, np.float64))
    return sums / np.bincount(inverse, minlength=len(ids))[:, None], [str(i) for i in ids]


def verification_metrics(scores: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
    """EER (NIST, fraction) with the sklearn / speechbrain variants, ROC AUC, and minDCF at each of
    :data:`P_TARGETS` (C_miss = C_fa = 1, normalised; keyed by the P_target as a string)."""
    from sklearn.metrics import roc_auc_score

    return {"eer": eer_nist(scores, labels), "eer_sklearn": eer_sklearn(scores, labels),
            "eer_speechbrain": eer_speechbrain(scores, labels), "auc": float(roc_auc_score(labels, scores)),
            "min_dcf": {str(p): min_dcf(scores, labels, p_target=p) for p in P_TARGETS}}


# ---------------------------------------------------------------------------------- MFCC baseline


def dct_matrix(num_ceps: int, num_bins: int) -> np.ndarray:
    """Orthonormal DCT-II [num_ceps, num_bins]: C[k, n] = sqrt(2/N) cos(π k (n + ½) / N), row 0 · sqrt(½)."""
    n = np.arange(num_bins)
    k = np.arange(num_ceps)[:, None]
    mat = np.sqrt(2.0 / num_bins) * np.cos(np.pi * k * (n + 0.5) / num_bins)
    mat[0] *= np.sqrt(0.5)
    return mat


def mfcc_mean(log_mel: np.ndarray, num_ceps: int = 30) -> np.ndarray:
    """Baseline utterance vector: the time mean of ``num_ceps`` MFCCs (DCT-II, ortho) of the log-mel
    fbank [T, F] (no CMN, which would zero the mean). Returns float64 [min(num_ceps, F)]."""
    log_mel = np.asarray(log_mel, np.float64)
    return dct_matrix(min(num_ceps, log_mel.shape[1]), log_mel.shape[1]) @ log_mel.mean(axis=0)


# Baselines by name: log-mel [T, F] (no CMN) -> one vector per utterance, scored by cosine.
BASELINES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {"mfcc_mean": mfcc_mean}
BASELINE_DESCRIPTIONS = {"mfcc_mean": "30 MFCCs (DCT-II ortho of the log-mel) mean over time"}


# ---------------------------------------------------------------------------------- audio embedding


class _EmbeddingCache:
    """Embeddings by (method, wav path) and failures by path, for one model and fbank spec: within one
    suite run (:func:`mlearn.evaluation.suite.run_cache`), Vox1-E and Vox1-H (the same utterances) and
    repeated cohorts are embedded once."""

    def __init__(self) -> None:
        self.vectors: Dict[Tuple[str, str], np.ndarray] = {}
        self.failures: Dict[str, str] = {}


def _cache_for(model: Any, spec_key: Tuple) -> _EmbeddingCache:
    from mlearn.evaluation.suite import run_cache

    shared = run_cache()
    if shared is None:  # outside a suite run nothing is kept: the model may change between calls
        return _EmbeddingCache()
    return shared.setdefault(("speaker-embeddings", id(model), spec_key), _EmbeddingCache())


class UnusableWav(ValueError):
    """A wav that cannot be embedded; ``kind`` (e.g. "wrong sample rate") groups the reasons in reports."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _read_wav(path: Path, sample_rate: int):
    """16 kHz mono wav -> float32 [N] in int16 range (the fbank's scale), or raise :class:`UnusableWav`."""
    import soundfile as sf

    from mlearn.data.fbank import INPUT_SCALE

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


def embed_wavs(model: Any, paths: Sequence[Path], baselines: Sequence[str] = (), batch_size: int = 64,
               desc: str = "embedding", progress: bool = True) -> Tuple[Dict[str, np.ndarray], np.ndarray,
                                                                         Dict[str, str]]:
    """Embed whole utterances: wav -> Kaldi fbank (``model.spec``, dither 0) -> CMN (if the spec says) ->
    ``model.embed(features [N, T, F], normalize=False)``; utterances of equal frame count share a batch.

    Returns (``{"model": [U, D], <baseline>: [U, d]}`` float32 with zero rows where a wav failed,
    ok mask [U] bool, ``{path: "kind: detail"}`` for the failed wavs). Failures (unreadable, wrong
    sample rate, not mono, shorter than one fbank frame) are logged, one line per kind with a count and
    the first example, not raised.
    """
    import torch
    from tqdm import tqdm

    from mlearn.data.fbank import apply_cmn, fbank_from_spec

    spec = dict(model.spec)
    fbank = fbank_from_spec(spec, dither=0.0, cmn=False).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fbank = fbank.to(device)
    cmn = bool(spec.get("cmn", True))
    rate = fbank.options["sample_rate"]
    cache = _cache_for(model, (tuple(sorted((k, str(v)) for k, v in spec.items())),))
    methods = ["model", *baselines]
    keys = [str(p) for p in paths]
    todo = [i for i, k in enumerate(keys)
            if k not in cache.failures and any((m, k) not in cache.vectors for m in methods)]
    lengths: Dict[int, int] = {}
    for i in todo:
        try:
            samples = _wav_frames(paths[i], rate)
            if fbank.num_frames(samples) == 0:
                raise _too_short(samples, fbank)
            lengths[i] = fbank.num_frames(samples)
        except UnusableWav as exc:
            cache.failures[keys[i]] = str(exc)
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
            cache.vectors[("model", keys[i])] = out[j]
            for name in baselines:
                cache.vectors[(name, keys[i])] = np.asarray(BASELINES[name](raw[j]), np.float32)

    batch: List[int] = []
    feats: List[torch.Tensor] = []
    for i in tqdm(order, desc=desc, unit="utt", disable=not progress):
        try:
            wav = torch.from_numpy(_read_wav(paths[i], rate)).to(device)
            if fbank.num_frames(len(wav)) == 0:  # the header promised more than the file holds
                raise _too_short(len(wav), fbank)
        except UnusableWav as exc:
            cache.failures[keys[i]] = str(exc)
            continue
        with torch.inference_mode():
            feat = fbank(wav)
        if batch and (feat.shape[0] != feats[0].shape[0] or len(batch) >= batch_size):
            flush(batch, feats)
            batch, feats = [], []
        batch.append(i)
        feats.append(feat)
    flush(batch, feats)

    ok = np.array([k not in cache.failures for k in keys], bool)
    failures = {k: cache.failures[k] for k in keys if k in cache.failures}
    for kind, (count, example) in failure_kinds(failures).items():
        log.warning("%s: skipped %d of %d wavs as %s, e.g. %s", desc, count, len(keys), kind, example)
    out: Dict[str, np.ndarray] = {}
    for name in methods:
        vectors = [cache.vectors.get((name, k)) for k in keys]
        dim = next((v.shape[0] for v in vectors if v is not None), 0)
        out[name] = np.stack([v if v is not None else np.zeros(dim, np.float32) for v in vectors]) \
            if keys else np.zeros((0, 0), np.float32)
    return out, ok, failures


# ---------------------------------------------------------------------------------------- cohorts


def read_cohort(path: Path, root: Path) -> Tuple[List[Path], List[str], str]:
    """Cohort utterances: a Kaldi-style dir (``wav.scp`` + ``utt2spk``; relative wav paths are taken
    relative to ``root``) or a VoxCeleb-layout folder ``<speaker>/<video>/<utt>.wav``.
    Returns (wav paths, speaker ids, layout name)."""
    scp, utt2spk = path / "wav.scp", path / "utt2spk"
    if scp.is_file():
        if not utt2spk.is_file():
            raise FileNotFoundError(f"cohort {path}: has wav.scp but no utt2spk")
        speakers = {utt: spk for utt, spk, _ in _two_columns(utt2spk)}
        wavs, spk = [], []
        for utt, location, lineno in _two_columns(scp):
            if location.rstrip().endswith("|"):
                raise ValueError(f"{scp}:{lineno}: piped commands are not supported; convert the audio to "
                                 f"16 kHz wav files (got {location!r})")
            if utt not in speakers:
                raise ValueError(f"{scp}:{lineno}: utterance {utt!r} is missing from {utt2spk}")
            wav = Path(location)
            wavs.append(wav if wav.is_absolute() else root / wav)
            spk.append(speakers[utt])
        return wavs, spk, "kaldi dir"
    wavs = sorted(path.glob("*/*/*.wav"))
    if not wavs:
        raise FileNotFoundError(f"cohort {path}: neither a Kaldi dir (wav.scp + utt2spk) nor a VoxCeleb "
                                f"layout (<speaker>/<video>/<utt>.wav) (see {CARD})")
    return wavs, [w.relative_to(path).parts[0] for w in wavs], "voxceleb folder"


def _two_columns(path: Path) -> Iterator[Tuple[str, str, int]]:
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.strip().split(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<key> <value>', got {line.strip()!r}")
            yield parts[0], parts[1], lineno


def _limit_per_speaker(wavs: List[Path], speakers: List[str], limit: Optional[int]):
    if limit is None:
        return wavs, speakers
    counts: Dict[str, int] = {}
    keep = []
    for i, s in enumerate(speakers):
        counts[s] = counts.get(s, 0) + 1
        if counts[s] <= limit:
            keep.append(i)
    return [wavs[i] for i in keep], [speakers[i] for i in keep]


# ------------------------------------------------------------------------------------ suite adapter

PROTOCOL_KEYS = ("type", "name", "trials", "wav_root", "cohort", "as_norm_top_n", "subtract_mean", "baselines",
                 "cohort_utts_per_speaker", "max_trials")
REQUIRED_KEYS = ("trials", "wav_root")


def _resolve(root: Path, value: Any, name: str, what: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"{name}: {what} {path} not found (see {CARD} for where to get it)")
    return path


def _wav_path(wav_root: Path, key: str) -> Path:
    return wav_root / (key if key.endswith(".wav") else key + ".wav")


def run_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int = 64) -> List[Dict[str, Any]]:
    """Suite type ``trials``: one speaker-verification trial list (VoxCeleb style).

    ``protocol`` keys (paths relative to ``root``): ``trials`` (official or Kaldi trial list),
    ``wav_root`` (trial keys are wav paths below it; ``.wav`` is appended when missing), ``name``,
    ``cohort`` (Kaldi dir or VoxCeleb-layout folder: its mean embedding is subtracted and its speaker
    means are the AS-norm cohort), ``as_norm_top_n`` (300), ``subtract_mean`` (default: true with a
    cohort), ``baselines`` (names in :data:`BASELINES`), ``cohort_utts_per_speaker`` (default all),
    ``max_trials`` (a seeded random subset, for quick checks). Rows: model, model+AS-norm (with a
    cohort), one per baseline.

    Unusable trial wavs (unreadable, wrong sample rate, not mono, shorter than one fbank frame) do
    not stop the run: their trials are left out of the scores and reported loudly instead, as the
    retrieval protocol does with unreadable images: a warning per kind of failure, a ``skipped``
    column and a legend line naming the count and the first file in the printed table, and
    ``skipped_trials``, ``unreadable_wavs`` and ``unreadable`` ({path: reason}) in results.json. Only
    when no wav at all can be used (or the scorable trials lack targets or non-targets) is it an error.
    """
    unknown = sorted(set(protocol) - set(PROTOCOL_KEYS))
    if unknown:
        raise ValueError(f"trials protocol: unknown key(s) {unknown}; accepted: {list(PROTOCOL_KEYS)}")
    for key in ("trials", "wav_root"):
        if key not in protocol:
            raise ValueError(f"trials protocol {protocol.get('name', '')!r}: missing required key {key!r}")
    if getattr(model, "modality", None) != "audio":
        raise ValueError(f"trials protocol needs an audio model (model.modality == 'audio'), "
                         f"got {getattr(model, 'modality', None)!r}")
    root = Path(root)
    name = str(protocol.get("name") or Path(protocol["trials"]).stem)
    trials_path = _resolve(root, protocol["trials"], name, "trial list")
    wav_root = _resolve(root, protocol["wav_root"], name, "wav root")
    if not wav_root.is_dir():
        raise ValueError(f"{name}: wav_root {wav_root} is not a folder (expected the folder the trial keys "
                         "are relative to)")
    baselines = list(protocol.get("baselines") or [])
    for baseline in baselines:
        if baseline not in BASELINES:
            raise ValueError(f"{name}: baseline={baseline!r}; expected one of {sorted(BASELINES)}")
    top_n = protocol.get("as_norm_top_n", 300)
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ValueError(f"{name}: as_norm_top_n={top_n!r}; expected a positive integer (or null: whole cohort)")
    for key in ("max_trials", "cohort_utts_per_speaker"):
        value = protocol.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {key}={value!r}; expected a positive integer")
    has_cohort = protocol.get("cohort") is not None
    subtract_mean = bool(protocol.get("subtract_mean", has_cohort))
    if subtract_mean and not has_cohort:
        raise ValueError(f"{name}: subtract_mean needs a cohort (the mean embedding is taken over it)")

    trials = read_trials(trials_path)
    subset = protocol.get("max_trials")
    if subset is not None and int(subset) < len(trials):
        pick = np.sort(np.random.default_rng(0).choice(len(trials), int(subset), replace=False))
        trials = Trials([trials.enroll[i] for i in pick], [trials.test[i] for i in pick], trials.labels[pick],
                        trials.format)
    keys = sorted(set(trials.enroll) | set(trials.test))
    index = {k: i for i, k in enumerate(keys)}
    emb, ok, failures = embed_wavs(model, [_wav_path(wav_root, k) for k in keys], baselines, batch_size,
                                   desc=f"{name}: trial wavs")
    if not ok.any():
        raise ValueError(f"{name}: none of the {len(keys)} trial wavs under {wav_root} can be used: "
                         f"{summarize_failures(failures)}")
    e_idx = np.array([index[k] for k in trials.enroll])
    t_idx = np.array([index[k] for k in trials.test])
    scored = ok[e_idx] & ok[t_idx]
    e_idx, t_idx, labels = e_idx[scored], t_idx[scored], trials.labels[scored].astype(int)
    if labels.min() == labels.max():
        skipped = (f" ({int((~scored).sum())} trials left out for {len(failures)} unusable wav(s): "
                   f"{summarize_failures(failures)})") if failures else ""
        raise ValueError(f"{name}: the {len(labels)} scorable trials of {trials_path} are all "
                         f"{'targets' if labels[0] else 'non-targets'}{skipped}; need both")

    common = {"benchmark": name, "trials": int(len(labels)), "targets": int(labels.sum()),
              "nontargets": int(len(labels) - labels.sum()), "skipped_trials": int((~scored).sum()),
              "unreadable_wavs": int(len(failures)),
              "unreadable": dict(list(failures.items())[:MAX_LISTED]),
              "_unusable": summarize_failures(failures), "trial_list": str(protocol["trials"]),
              "trial_format": trials.format, "distance": "cosine", "eer_variant": EER_VARIANT,
              "p_target": list(P_TARGETS), "c_miss": 1.0, "c_fa": 1.0}
    if subset is not None:
        common["trials_subset_of"] = int(subset)
    cohort_info: Dict[str, Any] = {}
    means: Dict[str, Optional[np.ndarray]] = {m: None for m in ["model", *baselines]}
    cohort_vectors: Dict[str, np.ndarray] = {}
    if has_cohort:
        cohort_path = _resolve(root, protocol["cohort"], name, "cohort")
        wavs, speakers, layout = read_cohort(cohort_path, root)
        wavs, speakers = _limit_per_speaker(wavs, speakers, protocol.get("cohort_utts_per_speaker"))
        c_emb, c_ok, c_fail = embed_wavs(model, wavs, baselines, batch_size, desc=f"{name}: cohort wavs")
        if not c_ok.any():
            raise ValueError(f"{name}: none of the {len(wavs)} cohort wavs under {cohort_path} can be used: "
                             f"{summarize_failures(c_fail)}")
        c_speakers = [s for s, good in zip(speakers, c_ok) if good]
        for method in means:
            vectors = c_emb[method][c_ok]
            means[method] = vectors.mean(axis=0) if subtract_mean else None
            cohort_vectors[method], spk_ids = speaker_mean_cohort(vectors, c_speakers)
        overlap = sorted(set(spk_ids) & {k.split("/")[0] for k in keys})
        if overlap:
            log.warning("%s: %d cohort speakers also appear in the trials (e.g. %s); the cohort should be "
                        "disjoint from the test speakers", name, len(overlap), overlap[0])
        cohort_info = {"cohort": str(protocol["cohort"]), "cohort_layout": layout,
                       "cohort_utterances": int(c_ok.sum()), "cohort_unreadable_wavs": int(len(c_fail)),
                       "cohort_speakers": len(spk_ids), "cohort_overlap_speakers": len(overlap)}
    pre = "mean-subtracted (cohort utterance mean), L2" if subtract_mean else "L2"

    rows = []
    scores = cosine_scores(emb["model"], e_idx, t_idx, means["model"])
    rows.append(_row(common, "model", scores, labels, {"normalisation": pre, **cohort_info}))
    if has_cohort:
        size = len(cohort_vectors["model"])
        adaptive = top_n is not None and top_n < size
        mu, sd = cohort_score_stats(emb["model"], cohort_vectors["model"], top_n, means["model"])
        normed = apply_score_norm(scores, mu[e_idx], sd[e_idx], mu[t_idx], sd[t_idx], "s")
        label = (f"AS-norm (top-{top_n} per side" if adaptive else "S-norm (whole cohort")
        norm = f"{pre}; {label}, population std, cohort: {size} speaker-mean embeddings)"
        rows.append(_row(common, "model+as-norm" if adaptive else "model+s-norm", normed, labels,
                         {"normalisation": norm, "as_norm_top_n": top_n if adaptive else size,
                          "cohort_type": "speaker means", **cohort_info}))
    for baseline in baselines:
        scores = cosine_scores(emb[baseline], e_idx, t_idx, means[baseline])
        rows.append(_row(common, baseline, scores, labels,
                         {"normalisation": pre, "features": BASELINE_DESCRIPTIONS[baseline]}))
    return rows


def _row(common: Dict[str, Any], method: str, scores: np.ndarray, labels: np.ndarray,
         extra: Dict[str, Any]) -> Dict[str, Any]:
    metrics = verification_metrics(scores, labels)
    table = {"benchmark": common["benchmark"], "method": method, "trials": str(common["trials"]),
             "skipped": str(common["skipped_trials"]), "EER% (NIST)": f"{metrics['eer'] * 100:.3f}",
             "minDCF0.01": f"{metrics['min_dcf']['0.01']:.4f}", "minDCF0.05": f"{metrics['min_dcf']['0.05']:.4f}"}
    legend = None
    if common["skipped_trials"]:
        legend = (f"{common['benchmark']}: {common['skipped_trials']} trials NOT scored, their "
                  f"{common['unreadable_wavs']} unusable wav(s): {common['_unusable']} "
                  "(all in results.json 'unreadable')")
    return {**common, "method": method, **extra, **metrics, "_table": table, "_legend": legend,
            "_scores": np.asarray(scores, np.float64), "_labels": np.asarray(labels, np.int64)}
