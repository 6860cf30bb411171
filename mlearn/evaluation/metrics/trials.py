"""Trial scoring for speaker verification (docs/protocols.md section c): cosine trial scores,
cohort statistics, AS-norm / S-norm / Z-norm / T-norm, speaker-mean cohorts, and EER / minDCF of
scored trials. Arrays in, arrays or dicts out; no file I/O.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlearn.evaluation.metrics.roc import eer_nist, eer_sklearn, eer_speechbrain, min_dcf
from mlearn.inference import l2_normalize

P_TARGETS = (0.01, 0.05)


def _unit_rows(x: np.ndarray, mean: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 rows of ``x`` [N, D] minus ``mean`` [D] (if given), L2-normalised."""
    x = np.asarray(x, np.float64)
    return l2_normalize(x - np.asarray(mean, np.float64) if mean is not None else x)


def cosine_scores(embeddings: np.ndarray, enroll_index: np.ndarray, test_index: np.ndarray,
                  mean: Optional[np.ndarray] = None) -> np.ndarray:
    """Trial scores [n]: cos(e_i - mean, t_i - mean) with e_i = embeddings[enroll_index[i]],
    t_i = embeddings[test_index[i]] (``embeddings`` [U, D]; ``mean`` [D] e.g. the training-set mean)."""
    unit = _unit_rows(embeddings, mean)
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
    unit_cohort = _unit_rows(cohort, mean)
    means, stds = [], []
    for start in range(0, len(embeddings), chunk):
        block = _unit_rows(embeddings[start:start + chunk], mean) @ unit_cohort.T
        mu, sd = top_n_stats(block, top_n)
        means.append(mu)
        stds.append(sd)
    if not means:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(means), np.concatenate(stds)


def _s_norm(s: np.ndarray, mu_e: np.ndarray, sd_e: np.ndarray, mu_t: np.ndarray,
            sd_t: np.ndarray) -> np.ndarray:
    return 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)


def _z_norm(s: np.ndarray, mu_e: np.ndarray, sd_e: np.ndarray, mu_t: np.ndarray,
            sd_t: np.ndarray) -> np.ndarray:
    return (s - mu_e) / sd_e


def _t_norm(s: np.ndarray, mu_e: np.ndarray, sd_e: np.ndarray, mu_t: np.ndarray,
            sd_t: np.ndarray) -> np.ndarray:
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


def as_norm(scores: np.ndarray, enroll_cohort: np.ndarray, test_cohort: np.ndarray,
            top_n: Optional[int] = 300, kind: str = "s", enroll_index: Optional[np.ndarray] = None,
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
        raise ValueError(f"as_norm: {len(scores)} scores but {len(mu_e)} enroll / {len(mu_t)} test "
                         "cohort rows (pass enroll_index / test_index for per-utterance rows)")
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
