"""Speaker verification on trial lists (VoxCeleb protocol, docs/protocols.md section c): suite type
``trials``.

Readers (trial lists in the official or Kaldi format, cohorts as a Kaldi dir or a VoxCeleb folder),
the MFCC baseline, and the suite adapter :func:`run`: embed each whole utterance
(:func:`mlearn.inference_audio.embed_wavs`), cosine-score the trials, (AS-)norm against a cohort
(:mod:`mlearn.evaluation.metrics.trials`), EER (NIST interpolation; sklearn and speechbrain variants
as cross-checks) and minDCF at P_target 0.01 and 0.05; with ``calibration``, Cllr / minCllr / actual
DCF of every row and a calibrated row (:mod:`mlearn.evaluation.metrics.calibration`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, MutableMapping, Optional, Tuple, Union

import numpy as np

from mlearn.data import summarize_failures
from mlearn.evaluation.metrics.calibration import (
    PRODUCT_PREFIX,
    Calibration,
    fit_calibration,
    llr_metrics,
    load_calibration,
    quality_features,
)
from mlearn.evaluation.metrics.trials import (
    P_TARGETS,
    apply_score_norm,
    cohort_score_stats,
    cosine_scores,
    speaker_mean_cohort,
    verification_metrics,
)
from mlearn.evaluation.protocols.options import TrialsOptions, build_options
from mlearn.evaluation.report import ResultRow
from mlearn.inference_audio import embed_wavs

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
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


def _limit_per_speaker(wavs: List[Path], speakers: List[str],
                       limit: Optional[int]) -> Tuple[List[Path], List[str]]:
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


def _resolve(root: Path, value: Any, name: str, what: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"{name}: {what} {path} not found (see {CARD} for where to get it)")
    return path


def _wav_path(wav_root: Path, key: str) -> Path:
    return wav_root / (key if key.endswith(".wav") else key + ".wav")


@dataclass
class _Cohort:
    """Per method: the mean cohort embedding (None unless subtracted) and the speaker-mean cohort."""

    means: Dict[str, Optional[np.ndarray]]
    vectors: Dict[str, np.ndarray]
    info: Dict[str, Any]


def run(model: Any, options: TrialsOptions, root: Path, batch_size: int = 64,
        cache: Optional[MutableMapping[Any, Any]] = None) -> List[ResultRow]:
    """One speaker-verification trial list (VoxCeleb style); paths relative to ``root``.

    ``trials`` (official or Kaldi trial list); ``wav_root`` (trial keys are wav paths below it;
    ``.wav`` is appended when missing); ``cohort`` (Kaldi dir or VoxCeleb-layout folder: its mean
    embedding is subtracted and its speaker means are the AS-norm cohort); ``as_norm_top_n`` (300);
    ``subtract_mean`` (default: true with a cohort); ``baselines`` (names in :data:`BASELINES`);
    ``cohort_utts_per_speaker`` (default all); ``max_trials`` (a seeded random subset, for quick
    checks); ``calibration`` ({dev_trials, prior}, {file} or {from_model}, see :func:`_calibrate`).
    Rows: model, model+AS-norm (with a cohort), one per baseline, and with ``calibration`` the last
    model row calibrated. ``cache``: kept by the suite run, so utterances shared by several lists are
    embedded once.

    Unusable trial wavs (unreadable, wrong sample rate, not mono, shorter than one fbank frame) do
    not stop the run: their trials are left out of the scores and reported loudly instead, as the
    retrieval protocol does with unreadable images: a warning per kind of failure, a ``skipped``
    column and a legend line naming the count and the first file in the printed table, and
    ``skipped_trials``, ``unreadable_wavs`` and ``unreadable`` ({path: reason}) in results.json. Only
    when no wav at all can be used (or the scorable trials lack targets or non-targets) is it an error.
    """
    if getattr(model, "modality", None) != "audio":
        raise ValueError(f"trials protocol needs an audio model (model.modality == 'audio'), "
                         f"got {getattr(model, 'modality', None)!r}")
    root = Path(root)
    name = options.benchmark
    trials_path = _resolve(root, options.trials, name, "trial list")
    wav_root = _resolve(root, options.wav_root, name, "wav root")
    if not wav_root.is_dir():
        raise ValueError(f"{name}: wav_root {wav_root} is not a folder (expected the folder the trial keys "
                         "are relative to)")
    for baseline in options.baselines:
        if baseline not in BASELINES:
            raise ValueError(f"{name}: baseline={baseline!r}; expected one of {sorted(BASELINES)}")
    has_cohort = options.cohort is not None
    subtract_mean = has_cohort if options.subtract_mean is None else options.subtract_mean
    if subtract_mean and not has_cohort:
        raise ValueError(f"{name}: subtract_mean needs a cohort (the mean embedding is taken over it)")
    extras = {b: BASELINES[b] for b in options.baselines}

    trials = read_trials(trials_path)
    subset = options.max_trials
    if subset is not None and subset < len(trials):
        pick = np.sort(np.random.default_rng(0).choice(len(trials), subset, replace=False))
        trials = Trials([trials.enroll[i] for i in pick], [trials.test[i] for i in pick], trials.labels[pick],
                        trials.format)
    keys = sorted(set(trials.enroll) | set(trials.test))
    index = {k: i for i, k in enumerate(keys)}
    emb, ok, failures = embed_wavs(model, [_wav_path(wav_root, k) for k in keys], batch_size,
                                   extra_features=extras, cache=cache, desc=f"{name}: trial wavs")
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
              "unreadable": dict(list(failures.items())[:MAX_LISTED]), "trial_list": str(options.trials),
              "trial_format": trials.format, "distance": "cosine", "eer_variant": EER_VARIANT,
              "p_target": list(P_TARGETS), "c_miss": 1.0, "c_fa": 1.0}
    if subset is not None:
        common["trials_subset_of"] = int(subset)
    legend = None
    if failures:
        legend = (f"{name}: {common['skipped_trials']} trials NOT scored, their {len(failures)} unusable "
                  f"wav(s): {summarize_failures(failures)} (all in results.json 'unreadable')")
    methods = ["model", *options.baselines]
    cohort = (_embed_cohort(model, options, root, batch_size, cache, methods, subtract_mean, keys)
              if has_cohort else _Cohort({m: None for m in methods}, {}, {}))
    pre = "mean-subtracted (cohort utterance mean), L2" if subtract_mean else "L2"

    def row(method: str, scores: np.ndarray, extra: Dict[str, Any]) -> ResultRow:
        return _row(common, method, scores, labels, extra, legend)

    scores = cosine_scores(emb["model"], e_idx, t_idx, cohort.means["model"])
    rows = [row("model", scores, {"normalisation": pre, **cohort.info})]
    final_scores, mu = scores, None  # the scores a calibration maps (after AS-norm when on)
    if has_cohort:
        top_n = options.as_norm_top_n
        size = len(cohort.vectors["model"])
        adaptive = top_n is not None and top_n < size
        mu, sd = cohort_score_stats(emb["model"], cohort.vectors["model"], top_n, cohort.means["model"])
        final_scores = apply_score_norm(scores, mu[e_idx], sd[e_idx], mu[t_idx], sd[t_idx], "s")
        label = (f"AS-norm (top-{top_n} per side" if adaptive else "S-norm (whole cohort")
        norm = f"{pre}; {label}, population std, cohort: {size} speaker-mean embeddings)"
        rows.append(row("model+as-norm" if adaptive else "model+s-norm", final_scores,
                        {"normalisation": norm, "as_norm_top_n": top_n if adaptive else size,
                         "cohort_type": "speaker means", **cohort.info}))
    for baseline in options.baselines:
        scores = cosine_scores(emb[baseline], e_idx, t_idx, cohort.means[baseline])
        rows.append(row(baseline, scores,
                        {"normalisation": pre, "features": BASELINE_DESCRIPTIONS[baseline]}))
    if options.calibration is not None:
        final = 1 if has_cohort else 0  # the row whose scores are calibrated (after AS-norm when on)
        seconds = _seconds([_wav_path(wav_root, k) for k in keys], ok)
        features, names = _calibration_features(final_scores, seconds, e_idx, t_idx, mu)
        cal, source = _calibrate(model, options, root, wav_root, batch_size, cache, cohort, names)
        columns = [names.index(feature) for feature in cal.feature_names]
        calibrated = row(f"{rows[final]['method']}+calibrated", cal.apply(features[:, columns]),
                         {"normalisation": rows[final]["normalisation"], "calibration": cal.to_dict(),
                          "calibration_source": source})
        rows.insert(final + 1, calibrated)
        rows = [_with_llr_metrics(r, "calibrated: " + source if r is calibrated else UNCALIBRATED)
                for r in rows]
    return rows


UNCALIBRATED = "uncalibrated: the raw score is taken as a natural-log LLR"


def _with_llr_metrics(row: ResultRow, how: str) -> ResultRow:
    """``row`` with Cllr, minCllr (bits) and actual DCF of its scores (taken as LLRs) in its values and
    table; ``how`` says whether they are calibrated."""
    metrics = llr_metrics(np.asarray(row.scores), np.asarray(row.labels), P_TARGETS)
    table = {**row.table, "Cllr": f"{metrics['cllr']:.4f}", "minCllr": f"{metrics['min_cllr']:.4f}",
             "actDCF0.01": f"{metrics['act_dcf']['0.01']:.4f}"}
    return ResultRow({**row.values, **metrics, "llr": how}, table=table, legend=row.legend,
                     scores=row.scores, labels=row.labels)


def _seconds(paths: List[Path], ok: np.ndarray) -> np.ndarray:
    """Durations in seconds [U] from the wav headers (NaN where the wav is unusable)."""
    import soundfile as sf

    seconds = np.full(len(paths), np.nan)
    for i in np.flatnonzero(ok):
        info = sf.info(str(paths[i]))
        seconds[i] = info.frames / info.samplerate
    return seconds


def _calibration_features(scores: np.ndarray, seconds: np.ndarray, e_idx: np.ndarray, t_idx: np.ndarray,
                          mu: Optional[np.ndarray]) -> Tuple[np.ndarray, List[str]]:
    """:func:`quality_features` [n, F] and names of trials (``scores`` [n], after AS-norm when on;
    ``seconds`` and the cohort top means ``mu`` (None without a cohort) per utterance)."""
    cohort_means = () if mu is None else (mu[e_idx], mu[t_idx])
    return quality_features(scores, seconds[e_idx], seconds[t_idx], *cohort_means)


def _trial_features(model_emb: np.ndarray, e_idx: np.ndarray, t_idx: np.ndarray, seconds: np.ndarray,
                    cohort: "_Cohort", top_n: Optional[int]) -> Tuple[np.ndarray, List[str]]:
    """:func:`_calibration_features` of trials scored as :func:`run` scores them (AS-norm with a cohort)."""
    scores = cosine_scores(model_emb, e_idx, t_idx, cohort.means["model"])
    if "model" not in cohort.vectors:
        return _calibration_features(scores, seconds, e_idx, t_idx, None)
    mu, sd = cohort_score_stats(model_emb, cohort.vectors["model"], top_n, cohort.means["model"])
    scores = apply_score_norm(scores, mu[e_idx], sd[e_idx], mu[t_idx], sd[t_idx], "s")
    return _calibration_features(scores, seconds, e_idx, t_idx, mu)


def _calibrate(model: Any, options: TrialsOptions, root: Path, wav_root: Path, batch_size: int,
               cache: Optional[MutableMapping[Any, Any]], cohort: "_Cohort",
               names: List[str]) -> Tuple[Calibration, str]:
    """The calibration of ``options.calibration`` and where it came from.

    ``{file: path}``: a stored :class:`Calibration`; ``{from_model: true}``: the one stored in the model
    (``mlearn export --calibration``, ``model.calibration``); both refused when fitted for another config
    hash or for features this protocol does not compute. ``{dev_trials: path, prior: p}``: a trial list
    with keys below the same ``wav_root``, embedded, scored and normalised exactly as the test trials,
    fitted by prior-weighted logistic regression at ``prior`` (default the first minDCF P_target, 0.01)."""
    name = options.benchmark
    spec = options.calibration or {}
    metadata = getattr(model, "metadata", None)
    config_hash = metadata.get("config_hash") if isinstance(metadata, dict) else None
    if "file" in spec or spec.get("from_model"):
        if "file" in spec:
            path = _resolve(root, spec["file"], name, "calibration file")
            cal, where = load_calibration(path), f"calibration {path}"
            source = f"stored calibration {spec['file']}"
        else:
            model_name = getattr(model, "source", "in memory")
            stored = metadata.get("calibration") if isinstance(metadata, dict) else None
            if not isinstance(stored, dict):
                raise ValueError(f"{name}: calibration: {{from_model: true}} but model {model_name} stores "
                                 "no calibration; export it with mlearn export --calibration RESULTS, or use "
                                 "{dev_trials: ...} / {file: ...}")
            where = f"the calibration stored in model {model_name}"
            cal, source = Calibration.from_dict(stored, where), f"calibration stored in model {model_name}"
        cal.check_model(config_hash, f"the model evaluated on {name}")
        before_products = [n for n in names if not n.startswith(PRODUCT_PREFIX)]  # as stored earlier
        if cal.feature_names not in (names, before_products):
            raise ValueError(f"{name}: {where} expects features {cal.feature_names}, this "
                             f"protocol computes {names} (a cohort adds the cohort columns)")
        return cal, source
    dev = read_trials(_resolve(root, spec["dev_trials"], name, "calibration dev trial list"))
    keys = sorted(set(dev.enroll) | set(dev.test))
    index = {k: i for i, k in enumerate(keys)}
    paths = [_wav_path(wav_root, k) for k in keys]
    emb, ok, failures = embed_wavs(model, paths, batch_size, cache=cache,
                                   desc=f"{name}: calibration dev wavs")
    e_idx = np.array([index[k] for k in dev.enroll])
    t_idx = np.array([index[k] for k in dev.test])
    scored = ok[e_idx] & ok[t_idx]
    labels = dev.labels[scored].astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        unusable = f" ({summarize_failures(failures)})" if failures else ""
        raise ValueError(f"{name}: the calibration dev trials {spec['dev_trials']} need scorable targets "
                         f"and non-targets; {len(labels)} of {len(dev)} are scorable{unusable}")
    features, _ = _trial_features(emb["model"], e_idx[scored], t_idx[scored], _seconds(paths, ok),
                                  cohort, options.as_norm_top_n)
    prior = float(spec.get("prior") or P_TARGETS[0])
    cal = fit_calibration(features, labels, prior, names)
    cal.config_hash = config_hash
    cal.info.update({"dev_trials": str(spec["dev_trials"]), "dev_skipped_trials": int((~scored).sum())})
    return cal, f"fitted on dev trials {spec['dev_trials']} (prior {prior})"


def run_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int = 64) -> List[ResultRow]:
    """:func:`run` on a suite entry (a dict; ``type`` may be left out)."""
    options = build_options({**protocol, "type": "trials"}, "trials protocol")
    return run(model, options, Path(root), batch_size)


def _embed_cohort(model: Any, options: TrialsOptions, root: Path, batch_size: int,
                  cache: Optional[MutableMapping[Any, Any]], methods: List[str], subtract_mean: bool,
                  trial_keys: List[str]) -> _Cohort:
    """Embed the cohort; per method its mean (when subtracted) and its speaker means."""
    name = options.benchmark
    cohort_path = _resolve(root, options.cohort, name, "cohort")
    wavs, speakers, layout = read_cohort(cohort_path, root)
    wavs, speakers = _limit_per_speaker(wavs, speakers, options.cohort_utts_per_speaker)
    extras = {b: BASELINES[b] for b in options.baselines}
    c_emb, c_ok, c_fail = embed_wavs(model, wavs, batch_size, extra_features=extras, cache=cache,
                                     desc=f"{name}: cohort wavs")
    if not c_ok.any():
        raise ValueError(f"{name}: none of the {len(wavs)} cohort wavs under {cohort_path} can be used: "
                         f"{summarize_failures(c_fail)}")
    c_speakers = [s for s, good in zip(speakers, c_ok) if good]
    means: Dict[str, Optional[np.ndarray]] = {}
    vectors: Dict[str, np.ndarray] = {}
    spk_ids: List[str] = []
    for method in methods:
        rows = c_emb[method][c_ok]
        means[method] = rows.mean(axis=0) if subtract_mean else None
        vectors[method], spk_ids = speaker_mean_cohort(rows, c_speakers)
    overlap = sorted(set(spk_ids) & {k.split("/")[0] for k in trial_keys})
    if overlap:
        log.warning("%s: %d cohort speakers also appear in the trials (e.g. %s); the cohort should be "
                    "disjoint from the test speakers", name, len(overlap), overlap[0])
    info = {"cohort": str(options.cohort), "cohort_layout": layout, "cohort_utterances": int(c_ok.sum()),
            "cohort_unreadable_wavs": int(len(c_fail)), "cohort_speakers": len(spk_ids),
            "cohort_overlap_speakers": len(overlap)}
    return _Cohort(means, vectors, info)


def _row(common: Dict[str, Any], method: str, scores: np.ndarray, labels: np.ndarray,
         extra: Dict[str, Any], legend: Optional[str]) -> ResultRow:
    metrics = verification_metrics(scores, labels)
    table = {"benchmark": common["benchmark"], "method": method, "trials": str(common["trials"]),
             "skipped": str(common["skipped_trials"]), "EER% (NIST)": f"{metrics['eer'] * 100:.3f}",
             "minDCF0.01": f"{metrics['min_dcf']['0.01']:.4f}",
             "minDCF0.05": f"{metrics['min_dcf']['0.05']:.4f}"}
    return ResultRow({**common, "method": method, **extra, **metrics}, table=table,
                     legend=legend if common["skipped_trials"] else None,
                     scores=np.asarray(scores, np.float64), labels=np.asarray(labels, np.int64))
