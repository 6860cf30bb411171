"""Operating thresholds at target false-accept rates, with bootstrap 95% intervals (docs/protocols.md f.3).

Decision rule everywhere: **accept iff score >= threshold** (higher score = more likely the same
identity). The threshold for a target FAR f over N impostor scores is placed so that at most
``floor(f * N)`` impostors are accepted (ties are never split: a tied run is accepted or rejected as a
whole), halfway between the last accepted and the first rejected impostor score. A FAR is *supported*
only when at least :data:`MIN_FALSE_ACCEPTS` impostor pairs are accepted at it (f >= 10 / N): below
that the threshold rests on a handful of scores and is not reported.

Intervals: percentile bootstrap of the threshold (``rounds`` resamplings). With ``groups`` (the
identities of each impostor pair's two sides) identities are resampled, each pair weighted by the
product of its identities' multiplicities, which keeps the correlation of pairs sharing an identity;
without, pairs are resampled. Arrays in, dicts out; no I/O.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

MIN_FALSE_ACCEPTS = 10  # impostor pairs accepted at a FAR for it to be supported
DEFAULT_THRESHOLD_FARS = (1e-2, 1e-3, 1e-4)
BOOTSTRAP_ROUNDS = 200


def far_key(far: float) -> str:
    """The JSON key of a FAR: ``0.001`` -> ``"0.001"``, ``1e-05`` -> ``"1e-05"`` (Python's repr)."""
    return repr(float(far))


def min_supported_far(num_impostors: int, min_false_accepts: int = MIN_FALSE_ACCEPTS) -> float:
    """The smallest FAR that ``num_impostors`` impostor scores support (``min_false_accepts / N``)."""
    return float("inf") if num_impostors <= 0 else min_false_accepts / num_impostors


def split_supported(fars: Sequence[float], num_impostors: int,
                    min_false_accepts: int = MIN_FALSE_ACCEPTS) -> Tuple[List[float], List[float]]:
    """(supported, unsupported) FARs of ``fars`` for ``num_impostors`` impostor scores, each in the
    given order."""
    low = min_supported_far(num_impostors, min_false_accepts)
    supported = [float(f) for f in fars if f >= low * (1 - 1e-9)]
    return supported, [float(f) for f in fars if float(f) not in supported]


def unsupported_message(unsupported: Sequence[float], num_impostors: int,
                        min_false_accepts: int = MIN_FALSE_ACCEPTS) -> Optional[str]:
    """One line saying which FARs are not reported and why (``None`` when all are supported)."""
    if not unsupported:
        return None
    listed = ", ".join(f"{f:g}" for f in sorted(unsupported, reverse=True))
    return (f"FAR {listed} not reported: {num_impostors} impostor pairs support FARs >= "
            f"{min_supported_far(num_impostors, min_false_accepts):.2g} (at least {min_false_accepts} "
            "false accepts); add impostor pairs (max_impostors, more identities) to reach lower FARs")


class ImpostorSweep:
    """Impostor scores [N] sorted once (descending); thresholds at FARs for unit or bootstrap weights."""

    def __init__(self, impostor_scores: np.ndarray) -> None:
        scores = np.asarray(impostor_scores, np.float64).ravel()
        if scores.size == 0:
            raise ValueError("thresholds: no impostor scores")
        if not np.isfinite(scores).all():
            raise ValueError("thresholds: impostor scores contain NaN or inf")
        self.order = np.argsort(-scores, kind="stable")
        self.scores = scores[self.order]  # descending
        new_run = np.r_[True, self.scores[1:] != self.scores[:-1]]
        self.run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(scores)), 0))

    def __len__(self) -> int:
        return len(self.scores)

    def thresholds(self, fars: Sequence[float], weights: Optional[np.ndarray] = None) -> np.ndarray:
        """Thresholds [F] accepting the largest (weighted) impostor mass <= far · total, whole tie runs
        only. ``weights`` [N] in sorted order (``None``: every pair once)."""
        n = len(self.scores)
        rates = np.asarray(fars, np.float64)
        if weights is None:
            accepted = np.floor(rates * n * (1 + 1e-12)).astype(np.int64)
        else:
            cumulative = np.cumsum(weights)
            allowed = rates * cumulative[-1] * (1 + 1e-12)
            accepted = np.searchsorted(cumulative, allowed, side="right")
        accepted = np.minimum(accepted, n)
        inside = accepted < n
        accepted[inside] = self.run_start[accepted[inside]]  # do not split a tied run
        return np.array([self._between(int(k)) for k in accepted])

    def _between(self, k: int) -> float:
        """A threshold accepting exactly the first ``k`` sorted scores."""
        s = self.scores
        if k == 0:
            return float(np.nextafter(s[0], np.inf))
        if k == len(s):
            return float(s[-1])
        low, high = s[k], s[k - 1]
        mid = low + (high - low) / 2
        return float(high if mid <= low else mid)

    def far_at(self, threshold: float) -> float:
        """The fraction of impostor scores >= ``threshold``."""
        return float(np.count_nonzero(self.scores >= threshold) / len(self.scores))


def stored_threshold(record: Any, far: float) -> float:
    """The threshold for ``far`` in a thresholds record as stored with a model (``{"far": {far_key:
    {"threshold": t, ...}}, ...}``); ``ValueError`` saying how to get thresholds when there are none,
    and naming the FARs available when there is none for ``far``."""
    table = record.get("far") if isinstance(record, dict) else None
    if not table:
        raise ValueError("this model stores no verification thresholds; compute them on your data "
                         "(`mlearn eval --model M --folder DIR`) and store them with `mlearn export "
                         "--model M --thresholds EVAL_DIR`, or pass thresholds=read_thresholds("
                         "'results.json') (from mlearn.evaluation.protocols.own_data)")
    for key, entry in table.items():
        if np.isclose(float(key), float(far), rtol=1e-6, atol=0):
            return float(entry["threshold"])
    available = ", ".join(f"{float(k):g}" for k in sorted(table, key=float, reverse=True))
    raise ValueError(f"no threshold for FAR {far:g}; this model has thresholds for FAR {available} "
                     f"(a FAR is only calibrated when the evaluation had >= {MIN_FALSE_ACCEPTS} / FAR "
                     "impostor pairs)")


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The score threshold (accept iff score >= it) at which at most ``floor(far * N)`` of the N impostor
    scores are accepted, tied runs whole.

    >>> threshold_at_far(np.array([0.9, 0.8, 0.7, 0.1]), 0.25)
    0.8500000000000001
    """
    return float(ImpostorSweep(impostor_scores).thresholds([far])[0])


def bootstrap_weights(rng: np.random.Generator, size: int,
                      groups: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """One bootstrap resampling as weights [size]: pair multiplicities, or, with ``groups`` (two [size]
    arrays of identity indices 0..G-1), the product of the two identities' multiplicities."""
    if groups is None:
        return np.bincount(rng.integers(0, size, size), minlength=size).astype(np.float64)
    first, second = groups
    count = int(max(first.max(), second.max())) + 1
    multiplicity = np.bincount(rng.integers(0, count, count), minlength=count).astype(np.float64)
    return multiplicity[first] * multiplicity[second]


def far_thresholds(genuine_scores: np.ndarray, impostor_scores: np.ndarray,
                   fars: Sequence[float] = DEFAULT_THRESHOLD_FARS, rounds: int = BOOTSTRAP_ROUNDS,
                   seed: int = 0, groups: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                   min_false_accepts: int = MIN_FALSE_ACCEPTS) -> Dict[str, Any]:
    """Thresholds at the supported ``fars`` with percentile-bootstrap 95% intervals.

    ``genuine_scores`` [G], ``impostor_scores`` [N]; ``groups``: identity indices (two [N] int arrays)
    of each impostor pair's sides for the identity bootstrap (else pairs are resampled); ``rounds`` 0
    skips the intervals. Returns ``{"thresholds": {far_key: record}, "unsupported": [far, ...],
    "message": str | None, "bootstrap": {...}}``; a record has ``far``, ``threshold``,
    ``threshold_ci95`` [lo, hi], ``far_ci95`` (the impostor FARs at the interval's ends, i.e. the
    threshold's uncertainty in FAR units), ``realised_far`` and ``tar`` (genuine scores >= threshold)
    on these scores, ``false_accepts`` and ``impostor_pairs``.
    """
    genuine = np.asarray(genuine_scores, np.float64).ravel()
    sweep = ImpostorSweep(impostor_scores)
    n = len(sweep)
    supported, unsupported = split_supported(fars, n, min_false_accepts)
    out: Dict[str, Any] = {"thresholds": {}, "unsupported": unsupported,
                           "message": unsupported_message(unsupported, n, min_false_accepts),
                           "bootstrap": {"rounds": int(rounds), "seed": int(seed),
                                         "unit": "pair" if groups is None else "identity",
                                         "interval": "percentile 2.5-97.5"},
                           "decision": "accept iff score >= threshold"}
    if not supported:
        return out
    point = sweep.thresholds(supported)
    draws = np.empty((0, len(supported)))
    if rounds > 0:
        rng = np.random.default_rng(seed)
        sorted_groups = None if groups is None else (np.asarray(groups[0])[sweep.order],
                                                     np.asarray(groups[1])[sweep.order])
        draws = np.stack([sweep.thresholds(supported, bootstrap_weights(rng, n, sorted_groups))
                          for _ in range(rounds)])
    for j, far in enumerate(supported):
        t = float(point[j])
        record: Dict[str, Any] = {"far": far, "threshold": t}
        if rounds > 0:
            lo, hi = (float(v) for v in np.percentile(draws[:, j], [2.5, 97.5]))
            record["threshold_ci95"] = [lo, hi]
            record["far_ci95"] = [sweep.far_at(hi), sweep.far_at(lo)]
        realised = sweep.far_at(t)
        record.update({"realised_far": realised,
                       "tar": float(np.mean(genuine >= t)) if genuine.size else float("nan"),
                       "false_accepts": int(round(realised * n)), "impostor_pairs": n})
        out["thresholds"][far_key(far)] = record
    return out
