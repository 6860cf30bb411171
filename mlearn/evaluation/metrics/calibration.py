"""Speaker score calibration (docs/protocols.md, "Calibration: Cllr, minCllr, actual DCF").

Metrics of log-likelihood ratios (natural log in, bits out): :func:`cllr`, :func:`min_cllr` (Cllr after
the optimal monotone calibration found by pool-adjacent-violators, BOSARIS ``opt_loglr``) and
:func:`actual_dcf` (the Bayes decision at the LLR threshold, normalised like
:func:`~mlearn.evaluation.metrics.roc.min_dcf`). :func:`fit_calibration` fits an affine map from
quality features to LLRs by prior-weighted logistic regression (BOSARIS ``train_llr_fusion``: targets
weighted by prior / N_tar, non-targets by (1 - prior) / N_non, no regulariser, the logit(prior) offset
taken out so the output is an LLR, not posterior log-odds). Arrays in, numbers or arrays out; no file I/O
except :meth:`Calibration.save` / :func:`load_calibration`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.evaluation.metrics.roc import _check_binary

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
FORMAT = "mlearn-calibration/1"


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """Cllr in bits of natural-log LLRs [n] with 0/1 labels [n] (1 = target):
    ½ [mean_tar log2(1 + e^-llr) + mean_non log2(1 + e^llr)]. 1 bit = an uninformative system (llr = 0).

    >>> round(cllr(np.array([0.0, 0.0]), np.array([0, 1])), 6)
    1.0
    """
    llr, labels = _check_binary(llr, labels, "cllr")
    return _cllr(llr, labels)


def _cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    tar = labels == 1
    # logaddexp(0, x) = ln(1 + e^x), exact for large |x| and for the ±inf LLRs PAV can produce
    miss = np.logaddexp(0.0, -llr[tar]).mean()
    false_alarm = np.logaddexp(0.0, llr[~tar]).mean()
    return float((miss + false_alarm) / (2 * LN2))


def pav(values: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest (weighted least squares) to
    ``values`` [n] in the given order. Returns float64 [n]."""
    values = np.asarray(values, np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
    means: List[float] = []
    mass: List[float] = []
    counts: List[int] = []
    for v, w in zip(values, weights):
        means.append(float(v))
        mass.append(float(w))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m, w2, c = means.pop(), mass.pop(), counts.pop()
            total = mass[-1] + w2
            means[-1] = (means[-1] * mass[-1] + m * w2) / total
            mass[-1] = total
            counts[-1] += c
    return np.repeat(means, counts)


def optimal_llr(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The LLRs [n] of the optimal monotone (non-decreasing) calibration of ``scores`` on these labels
    (BOSARIS ``opt_loglr``): PAV of the labels sorted by score, then logit(posterior) − logit(N_tar / N).
    Tied scores get one value (targets are put first among ties, which PAV then pools). May be ±inf."""
    scores, labels = _check_binary(scores, labels, "optimal_llr")
    order = np.lexsort((1 - labels, scores))  # by score, targets first among ties
    posterior = np.empty(len(scores))
    posterior[order] = pav(labels[order].astype(np.float64))
    n_tar = labels.sum()
    with np.errstate(divide="ignore"):
        log_odds = np.log(posterior) - np.log1p(-posterior)
    return log_odds - math.log(n_tar / (len(labels) - n_tar))


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cllr (bits) of :func:`optimal_llr`: the discrimination loss, the Cllr left after the best
    monotone calibration of ``scores`` (any real scores, not necessarily LLRs). Always ≤ :func:`cllr`."""
    scores, labels = _check_binary(scores, labels, "min_cllr")
    return _cllr(optimal_llr(scores, labels), labels)


def bayes_threshold(p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The Bayes LLR threshold ln(C_fa (1 − p) / (C_miss p))."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target={p_target}; expected a probability in (0, 1)")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"c_miss={c_miss}, c_fa={c_fa}; expected positive costs")
    return math.log(c_fa * (1 - p_target) / (c_miss * p_target))


def actual_dcf(llr: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0,
               c_fa: float = 1.0) -> float:
    """Actual DCF: accept iff llr ≥ :func:`bayes_threshold`; C_miss·P_miss·p + C_fa·P_fa·(1−p)
    normalised by min(C_miss·p, C_fa·(1−p)) as minDCF is (so actDCF ≥ minDCF, 1 = always reject).

    >>> actual_dcf(np.array([-5.0, 5.0]), np.array([0, 1]), p_target=0.5)
    0.0
    """
    threshold = bayes_threshold(p_target, c_miss, c_fa)
    llr, labels = _check_binary(llr, labels, "actual_dcf")
    accept = llr >= threshold
    p_miss = float(np.mean(~accept[labels == 1]))
    p_fa = float(np.mean(accept[labels == 0]))
    cost = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    return cost / min(c_miss * p_target, c_fa * (1 - p_target))


def llr_metrics(llr: np.ndarray, labels: np.ndarray,
                p_targets: Sequence[float] = (0.01, 0.05)) -> Dict[str, Any]:
    """``cllr`` and ``min_cllr`` (bits) of LLRs [n], and ``act_dcf`` keyed by the P_target as a string
    (C_miss = C_fa = 1)."""
    return {"cllr": cllr(llr, labels), "min_cllr": min_cllr(llr, labels),
            "act_dcf": {str(p): actual_dcf(llr, labels, p) for p in p_targets}}


# ------------------------------------------------------------------------------------ calibration


@dataclass
class Calibration:
    """An affine map from quality features to natural-log LLRs: llr = features @ weights + bias.

    ``prior``: the effective P_target it was fitted for; ``feature_names``: the columns it expects, in
    order; ``config_hash``: the model's config hash (when known) the features were computed with;
    ``info``: free JSON-able notes (trial counts, the dev list)."""

    weights: np.ndarray
    bias: float
    prior: float
    feature_names: List[str]
    config_hash: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """LLRs [N] of ``features`` [N, F] (F = len(feature_names))."""
        features = _as_features(features, "Calibration.apply")
        if features.shape[1] != len(self.weights):
            raise ValueError(f"Calibration.apply: features have {features.shape[1]} columns; the calibration "
                             f"expects {len(self.weights)} ({self.feature_names})")
        return features @ np.asarray(self.weights, np.float64) + self.bias

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict (read back by :meth:`from_dict`)."""
        return {"format": FORMAT, "feature_names": list(self.feature_names),
                "weights": [float(w) for w in self.weights], "bias": float(self.bias),
                "prior": float(self.prior),
                "config_hash": self.config_hash, "output": "natural-log LLR = features @ weights + bias",
                "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        """Check and read a :meth:`to_dict` dict; ``ValueError`` naming ``source`` and the bad key."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not an mlearn calibration (expected a JSON object with "
                             f"format {FORMAT!r})")
        names, weights = data.get("feature_names"), data.get("weights")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{source}: feature_names={names!r:.80}; expected a list of strings")
        if (not isinstance(weights, list) or len(weights) != len(names)
                or not all(_finite_number(w) for w in weights)):
            raise ValueError(f"{source}: weights={weights!r:.80}; expected {len(names)} finite numbers "
                             "(one per feature name)")
        if not _finite_number(data.get("bias")):
            raise ValueError(f"{source}: bias={data.get('bias')!r}; expected a finite number")
        prior: Any = data.get("prior")
        if not _finite_number(prior) or not 0 < float(prior) < 1:
            raise ValueError(f"{source}: prior={prior!r}; expected a probability in (0, 1)")
        config_hash = data.get("config_hash")
        if config_hash is not None and not isinstance(config_hash, str):
            raise ValueError(f"{source}: config_hash={config_hash!r}; expected a string or null")
        return cls(np.asarray(weights, np.float64), float(data["bias"]), float(prior), list(names),
                   config_hash, dict(data.get("info") or {}))

    def save(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``; returns it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def check_model(self, config_hash: Optional[str], model_name: str = "the model") -> None:
        """``ValueError`` (one line) when both hashes are known and differ: the features (and so the
        scores) of another model would be mapped with weights fitted for this one."""
        if self.config_hash is not None and config_hash is not None and self.config_hash != config_hash:
            raise ValueError(f"calibration fitted for config hash {self.config_hash[:12]}… does not match "
                             f"{model_name} (config hash {config_hash[:12]}…); refit it on a dev trial list "
                             "with calibration: {dev_trials: ...}")


def load_calibration(path: Union[str, Path]) -> Calibration:
    """A :class:`Calibration` from a JSON file written by :meth:`Calibration.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return Calibration.from_dict(data, str(path))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_features(features: Any, what: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim == 1:
        features = features[:, None]
    if features.ndim != 2:
        raise ValueError(f"{what}: features must be [N, F], got shape {features.shape}")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} of {len(features)} feature rows hold NaN or inf")
    return features


def fit_calibration(features: np.ndarray, labels: np.ndarray, prior: float = 0.01,
                    feature_names: Optional[Sequence[str]] = None, max_iter: int = 100,
                    tol: float = 1e-10) -> Calibration:
    """Prior-weighted logistic regression (BOSARIS) of ``features`` [N, F] on 0/1 ``labels`` [N].

    Minimises  prior/N_tar Σ_tar softplus(−(s + logit prior))
             + (1−prior)/N_non Σ_non softplus(s + logit prior)
    over s = features @ w + b, by Newton's method with backtracking in float64 (the objective is convex;
    no regulariser). s is then an LLR whatever the proportion of targets in the dev list. Separable
    dev data has no finite optimum: the weights grow until the objective is ~0; that is logged as a
    warning and ``info["separated"]`` is true.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"fit_calibration: prior={prior}; expected a probability in (0, 1)")
    x = _as_features(features, "fit_calibration")
    _, labels = _check_binary(np.zeros(len(labels)), labels, "fit_calibration")
    if len(labels) != len(x):
        raise ValueError(f"fit_calibration: {len(x)} feature rows but {len(labels)} labels")
    names = [f"f{i}" for i in range(x.shape[1])] if feature_names is None else list(feature_names)
    if len(names) != x.shape[1]:
        raise ValueError(f"fit_calibration: {len(names)} feature names for {x.shape[1]} columns")
    tar = labels == 1
    weight = np.where(tar, prior / tar.sum(), (1 - prior) / (~tar).sum())
    sign = np.where(tar, 1.0, -1.0)  # loss = softplus(-sign * (s + offset))
    offset = math.log(prior / (1 - prior))
    design = np.hstack([x, np.ones((len(x), 1))])

    def loss(theta: np.ndarray) -> float:
        return float(weight @ np.logaddexp(0.0, -sign * (design @ theta + offset)))

    theta = np.zeros(design.shape[1])
    current = initial = loss(theta)  # the prior's entropy (nats): what an uninformative map scores
    converged = False
    for _ in range(max_iter):
        margin = sign * (design @ theta + offset)
        p_wrong = 0.5 * (1 - np.tanh(margin / 2))  # sigmoid(-margin), stable
        grad = design.T @ (weight * -sign * p_wrong)
        hess = (design * (weight * p_wrong * (1 - p_wrong))[:, None]).T @ design
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ step)
        if decrement / 2 <= tol:
            converged = True
            break
        t = 1.0
        while t > 1e-12:
            candidate = loss(theta - t * step)
            if candidate <= current - 0.25 * t * decrement:
                break
            t /= 2
        else:
            converged = True  # no decrease left at float64 precision
            break
        theta, current = theta - t * step, candidate
    separated = not converged or current < 1e-6 * initial
    if separated:
        log.warning("fit_calibration: the %d dev trials are (nearly) separated by the features %s: no "
                    "finite optimum, the LLRs come out overconfident; use a larger, harder dev list",
                    len(labels), names)
    return Calibration(theta[:-1].copy(), float(theta[-1]), float(prior), names,
                       info={"trials": int(len(labels)), "targets": int(tar.sum()), "objective": current,
                             "separated": separated})


PRODUCT_PREFIX = "score_x_"  # names of quality_features' score x log-duration columns


def quality_features(scores: np.ndarray, enroll_seconds: np.ndarray, test_seconds: np.ndarray,
                     enroll_cohort_mean: Optional[np.ndarray] = None,
                     test_cohort_mean: Optional[np.ndarray] = None,
                     interactions: bool = True) -> Tuple[np.ndarray, List[str]]:
    """Trial features for :func:`fit_calibration` (WeSpeaker QMF style), all [n]: the score (after
    AS-norm when on), the natural log of the enrolment and test durations (seconds), with
    ``interactions`` the score times each log duration, and, with a cohort, the mean of each side's
    top-N cohort cosines. Returns (float64 [n, F], the F column names).

    Why the products: durations alone only shift the LLR, but a longer utterance also spreads target
    and non-target scores further apart, so the score's slope must change with the duration. Without
    them, a fit on a trained model's scores over 1-8 s raised minDCF(0.01) on held-out speakers
    (evaluation/BENCHMARKS.md, speaker calibration)."""
    scores = np.asarray(scores, np.float64)
    log_enroll = np.log(np.asarray(enroll_seconds, np.float64))
    log_test = np.log(np.asarray(test_seconds, np.float64))
    columns = {"score": scores, "log_seconds_enroll": log_enroll, "log_seconds_test": log_test}
    if interactions:
        columns[PRODUCT_PREFIX + "log_seconds_enroll"] = scores * log_enroll
        columns[PRODUCT_PREFIX + "log_seconds_test"] = scores * log_test
    if (enroll_cohort_mean is None) != (test_cohort_mean is None):
        raise ValueError("quality_features: pass both enroll_cohort_mean and test_cohort_mean, or neither")
    if enroll_cohort_mean is not None and test_cohort_mean is not None:
        columns["cohort_top_mean_enroll"] = enroll_cohort_mean
        columns["cohort_top_mean_test"] = test_cohort_mean
    arrays = [np.asarray(v, np.float64).ravel() for v in columns.values()]
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"quality_features: columns differ in length: "
                         f"{ {k: len(a) for k, a in zip(columns, arrays)} }")
    return np.stack(arrays, axis=1), list(columns)
