"""Quality-aware verification: FNMR at a fixed FMR as low-quality pairs are rejected (docs/protocols.md g).

Two conventions, which give different numbers on the same data, so every figure names its own:

- **EDC** (the default): the threshold is fixed **once** on all pairs, accept iff score > the (k+1)-th
  largest impostor score, k = floor(FMR x impostors); the lowest-quality pairs are discarded at the
  nominal fractions f = 0, 0.01, ..., 0.30, tied qualities together (every pair whose quality is <=
  that of the ceil(f x N)-th lowest goes, so the actual fraction is >= f); FNMR over the genuine
  pairs left; pAUC up to 0.20 and 0.30 by the step rule (:func:`step_pauc`).
- **ERC (CR-FIQA)**: as CR-FIQA's published code: at fractions 0, 0.05, ..., 0.95 exactly
  floor(f x N) lowest-quality pairs are removed (ties broken by pair order) and the threshold is
  re-chosen on the pairs left (the distinct score whose FMR is nearest the target); area by the
  trapezoid rule over the whole grid.

Inputs everywhere: ``scores`` [N] (higher = more likely the same identity), ``labels`` [N] (true /
1 = genuine), ``quality`` [N] pair quality (higher = better; :func:`pair_quality` = the min of the two
sides). Arrays in, dicts out, no file I/O: the curves are drawn by
:mod:`mlearn.evaluation.protocols.quality_eval`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mlearn.evaluation.metrics.thresholds import split_supported, unsupported_message
from mlearn.evaluation.report import ResultRow

EDC = "EDC"
ERC = "ERC (CR-FIQA)"
CONVENTIONS = {"edc": EDC, "erc": ERC}
EDC_STEP = 0.01
EDC_FRACTIONS = np.arange(31) * EDC_STEP  # 0 .. 0.30
EDC_PAUC_LIMITS = (0.20, 0.30)
ERC_FRACTIONS = np.arange(20) * 0.05  # 0 .. 0.95, as CR-FIQA's np.arange(0, 0.98, 0.05)
DEFAULT_QUALITY_FMRS = (1e-3, 1e-4)
RANDOM_DRAWS = 20
EDC_THRESHOLD_RULE = ("fixed once on all pairs: accept iff score > the (k+1)-th largest impostor score, "
                      "k = floor(FMR x impostors)")
ERC_THRESHOLD_RULE = ("re-chosen after every rejection step: the distinct remaining score whose FMR "
                      "(impostors >= it) is nearest the target, lowest on ties; accept iff score > it")
PAUC_RULE = "step: sum of FNMR(f) x 0.01 over the grid points f < limit (not normalised)"


def pair_quality(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Pair quality [N]: the element-wise min of the two sides' qualities ``q1``, ``q2`` [N]."""
    a, b = np.asarray(q1, np.float64).ravel(), np.asarray(q2, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pair_quality: q1 has {a.size} values, q2 {b.size}; expected one per pair each")
    return np.minimum(a, b)


def _check(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Scores [N] as float64 and labels [N] as bool, both classes present."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size != y.size:
        raise ValueError(f"quality metrics: lengths differ {{'scores': {s.size}, 'labels': {y.size}}}; "
                         "expected one value per pair")
    if not np.isfinite(s).all():
        raise ValueError("quality metrics: scores contain NaN or inf; expected finite values")
    if y.all() or not y.any():
        raise ValueError("quality metrics: labels need both genuine (1) and impostor (0) pairs")
    return s, y


def _check_quality(quality: np.ndarray, n: int, name: str = "quality") -> np.ndarray:
    """Pair quality [N] as float64, finite, one per pair."""
    q = np.asarray(quality, np.float64).ravel()
    if q.size != n:
        raise ValueError(f"quality metrics: {name} has {q.size} values for {n} pairs; expected one per pair")
    if not np.isfinite(q).all():
        raise ValueError(f"quality metrics: {name} contains NaN or inf; expected finite values")
    return q


def _counts(fractions: np.ndarray, n: int, ceil: bool = False) -> np.ndarray:
    """floor (or ceil) of f x n per fraction, immune to 0.29 x 100 = 28.999..."""
    x = np.asarray(fractions, np.float64) * n
    return (np.ceil(x * (1 - 1e-12)) if ceil else np.floor(x * (1 + 1e-12))).astype(np.int64)


def edc_threshold(impostor_scores: np.ndarray, fmr: float) -> float:
    """The EDC threshold: the (k+1)-th largest of the impostor scores [M], k = floor(fmr x M); accept
    iff score > it, so at most k impostors are accepted (a tied run is rejected whole). ``-inf`` when
    k >= M (everything accepted)."""
    imp = np.sort(np.asarray(impostor_scores, np.float64).ravel())[::-1]
    if imp.size == 0:
        raise ValueError("edc_threshold: no impostor scores")
    k = int(_counts(np.array([fmr]), imp.size)[0])
    return float("-inf") if k >= imp.size else float(imp[k])


def _edc_fnmr(errors: np.ndarray, genuine: np.ndarray, quality: np.ndarray,
              fractions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(FNMR [F], actual discarded fraction [F]) for per-pair genuine errors [N] and pair qualities."""
    n = quality.size
    order = np.argsort(quality, kind="stable")
    q = quality[order]
    err = np.r_[0, np.cumsum(errors[order])]
    gen = np.r_[0, np.cumsum(genuine[order])]
    cut = _counts(fractions, n, ceil=True)
    # Discard every pair whose quality is <= the quality of the ceil(f x N)-th lowest.
    discarded = np.where(cut > 0, np.searchsorted(q, q[np.maximum(cut, 1) - 1], side="right"), 0)
    left = gen[-1] - gen[discarded]
    with np.errstate(invalid="ignore", divide="ignore"):
        fnmr = np.where(left > 0, (err[-1] - err[discarded]) / np.maximum(left, 1), np.nan)
    return fnmr, discarded / n


def step_pauc(fractions: np.ndarray, fnmr: np.ndarray, limit: float, step: float = EDC_STEP) -> float:
    """pAUC by the step rule: sum of ``fnmr[i] * step`` over the grid points ``fractions[i] < limit``
    (the area of the step function holding FNMR(f_i) on [f_i, f_i + step)); NaN if any is NaN."""
    f = np.asarray(fractions, np.float64)
    inside = f < limit - 1e-9 * step
    return float(np.sum(np.asarray(fnmr, np.float64)[inside]) * step)


def edc_curve(scores: np.ndarray, labels: np.ndarray, quality: np.ndarray, fmr: float = 1e-3,
              fractions: np.ndarray = EDC_FRACTIONS,
              pauc_limits: Sequence[float] = EDC_PAUC_LIMITS) -> Dict[str, Any]:
    """The EDC curve at ``fmr``: ``fractions`` (nominal) [F], ``discarded`` (actual, tied qualities
    go together) [F], ``fnmr`` [F], ``threshold`` and ``pauc`` {"0.20": area, ...} (:func:`step_pauc`)."""
    s, y = _check(scores, labels)
    q = _check_quality(quality, s.size)
    threshold = edc_threshold(s[~y], fmr)
    f = np.asarray(fractions, np.float64)
    fnmr, discarded = _edc_fnmr(y & (s <= threshold), y, q, f)
    return {"convention": EDC, "fmr": float(fmr), "threshold": threshold, "fractions": f,
            "discarded": discarded, "fnmr": fnmr,
            "pauc": {f"{lim:.2f}": step_pauc(f, fnmr, lim) for lim in pauc_limits}}


class _ScoreSort:
    """Scores sorted ascending once, so each ERC step filters instead of sorting again."""

    def __init__(self, scores: np.ndarray, genuine: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(scores.size)
        self.scores = scores[self.order]
        self.genuine = genuine[self.order]

    def nearest(self, keep: np.ndarray, fmr: float) -> Tuple[float, float, float]:
        """(threshold, realised FMR, FNMR) on the pairs ``keep`` [N] (bool, original order)."""
        kept = keep[self.order]
        s, g = self.scores[kept], self.genuine[kept]
        n_gen, n_imp = int(g.sum()), int((~g).sum())
        if n_gen == 0 or n_imp == 0:
            return float("nan"), float("nan"), float("nan")
        values, first = np.unique(s, return_index=True)
        imp_below = np.r_[0, np.cumsum(~g)][first]  # impostors strictly below each distinct value
        rates = (n_imp - imp_below) / n_imp  # impostors >= value
        i = int(np.argmin(np.abs(rates - fmr)))  # first = lowest threshold on ties, as np.argmin there
        last = first[i + 1] if i + 1 < len(first) else s.size
        return float(values[i]), float(rates[i]), float(g[:last].sum() / n_gen)


def _erc_steps(sort: _ScoreSort, order: np.ndarray, fmr: float, fractions: np.ndarray) -> np.ndarray:
    """[F, 3] (threshold, FMR, FNMR) after removing the first floor(f x N) pairs of ``order``."""
    n = order.size
    out = np.empty((len(fractions), 3))
    for j, m in enumerate(_counts(fractions, n)):
        keep = np.zeros(n, bool)
        keep[order[m:]] = True
        out[j] = sort.nearest(keep, fmr)
    return out


def erc_curve(scores: np.ndarray, labels: np.ndarray, quality: np.ndarray, fmr: float = 1e-3,
              fractions: np.ndarray = ERC_FRACTIONS) -> Dict[str, Any]:
    """The ERC curve of CR-FIQA's code at ``fmr``: ``fractions`` [F], ``fnmr`` [F], per-step
    ``thresholds`` [F] and realised ``fmr_at`` [F], ``auc`` (trapezoid over the whole grid)."""
    s, y = _check(scores, labels)
    q = _check_quality(quality, s.size)
    f = np.asarray(fractions, np.float64)
    steps = _erc_steps(_ScoreSort(s, y), np.argsort(q, kind="stable"), fmr, f)
    return {"convention": ERC, "fmr": float(fmr), "fractions": f, "fnmr": steps[:, 2],
            "thresholds": steps[:, 0], "fmr_at": steps[:, 1], "auc": trapezoid_auc(f, steps[:, 2])}


def trapezoid_auc(fractions: np.ndarray, fnmr: np.ndarray) -> float:
    """Trapezoid area under FNMR [F] over ``fractions`` [F] (sklearn's ``auc``, as CR-FIQA reports)."""
    x, v = np.asarray(fractions, np.float64), np.asarray(fnmr, np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (v[1:] + v[:-1]) / 2))


def random_rejection(scores: np.ndarray, labels: np.ndarray, convention: str = "edc", fmr: float = 1e-3,
                     draws: int = RANDOM_DRAWS, seed: int = 0) -> Dict[str, Any]:
    """The random-rejection baseline: draw j gives every pair the quality of the j-th permutation of
    0..N-1 from ``np.random.default_rng(seed)`` (no ties), and the curve of ``convention`` ("edc" or
    "erc") follows. Returns ``fractions``, ``fnmr_mean`` / ``fnmr_std`` [F] and the areas' ``mean`` /
    ``std`` (``pauc`` per limit for EDC, ``auc`` for ERC); std over the draws with ddof 1."""
    if convention not in CONVENTIONS:
        raise ValueError(f"random_rejection: convention {convention!r}; expected one of {list(CONVENTIONS)}")
    if draws < 2:
        raise ValueError(f"random_rejection: draws={draws}; expected >= 2 for a standard deviation")
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    curves, areas = [], []
    if convention == "edc":
        errors = y & (s <= edc_threshold(s[~y], fmr))
        for _ in range(draws):
            fnmr, _discarded = _edc_fnmr(errors, y, rng.permutation(s.size).astype(np.float64),
                                         EDC_FRACTIONS)
            curves.append(fnmr)
            areas.append([step_pauc(EDC_FRACTIONS, fnmr, lim) for lim in EDC_PAUC_LIMITS])
        fractions = EDC_FRACTIONS
    else:
        sort = _ScoreSort(s, y)
        for _ in range(draws):
            fnmr = _erc_steps(sort, np.argsort(rng.permutation(s.size), kind="stable"), fmr,
                              ERC_FRACTIONS)[:, 2]
            curves.append(fnmr)
            areas.append([trapezoid_auc(ERC_FRACTIONS, fnmr)])
        fractions = ERC_FRACTIONS
    c, a = np.array(curves), np.array(areas)
    mean, std = a.mean(0), a.std(0, ddof=1)
    names = [f"{lim:.2f}" for lim in EDC_PAUC_LIMITS] if convention == "edc" else ["auc"]
    out: Dict[str, Any] = {"convention": CONVENTIONS[convention], "fmr": float(fmr), "draws": int(draws),
                           "seed": int(seed), "fractions": fractions, "fnmr_mean": c.mean(0),
                           "fnmr_std": c.std(0, ddof=1)}
    table = {k: {"mean": float(m), "std": float(d)} for k, m, d in zip(names, mean, std)}
    if convention == "edc":
        out["pauc"] = table
    else:
        out["auc"] = table["auc"]
    return out


def supported_fmrs(num_impostors: int, fmrs: Sequence[float] = DEFAULT_QUALITY_FMRS
                   ) -> Tuple[List[float], List[float], Optional[str]]:
    """(supported, unsupported, message): an FMR f needs >= 10 / f impostor pairs (1e-3: 10,000; 1e-4:
    100,000), the FAR support rule of thresholds.py; ``message`` is None when all are supported."""
    supported, unsupported = split_supported(fmrs, num_impostors)
    message = unsupported_message(unsupported, num_impostors)
    return supported, unsupported, None if message is None else message.replace("FAR", "FMR")


def quality_rows(scores: np.ndarray, labels: np.ndarray, qualities: Mapping[str, np.ndarray],
                 benchmark: str, method: str = "model", fmrs: Sequence[float] = DEFAULT_QUALITY_FMRS,
                 conventions: Sequence[str] = ("edc", "erc"), draws: int = RANDOM_DRAWS,
                 seed: int = 0) -> Tuple[List[ResultRow], Optional[str]]:
    """Result rows for ``results.json``: one per quality (``name -> pair quality [N]``, e.g. "cr_fiqa",
    "norm"), supported FMR and convention, each naming its ``convention`` and carrying its curve and
    the random-rejection baseline (same FMR and convention). Returns (rows, message on the FMRs not
    supported, else None)."""
    s, y = _check(scores, labels)
    checked = {name: _check_quality(q, s.size, f"quality {name!r}") for name, q in qualities.items()}
    unknown = [c for c in conventions if c not in CONVENTIONS]
    if unknown:
        raise ValueError(f"quality_rows: conventions {unknown}; expected some of {list(CONVENTIONS)}")
    supported, unsupported, message = supported_fmrs(int((~y).sum()), fmrs)
    rows: List[ResultRow] = []
    for fmr in supported:
        for convention in conventions:
            random = random_rejection(s, y, convention, fmr, draws, seed)
            for name, q in checked.items():
                rows.append(_row(s, y, q, name, benchmark, method, fmr, convention, random,
                                 unsupported, message))
    return rows, message


def _row(s: np.ndarray, y: np.ndarray, q: np.ndarray, name: str, benchmark: str, method: str, fmr: float,
         convention: str, random: Dict[str, Any], unsupported: List[float],
         message: Optional[str]) -> ResultRow:
    values: Dict[str, Any] = {
        "benchmark": benchmark, "method": method, "quality": name, "convention": CONVENTIONS[convention],
        "fmr": fmr, "pair_quality": "min of the two sides", "genuine_pairs": int(y.sum()),
        "impostor_pairs": int((~y).sum()), "fmr_not_reported": unsupported, "fmr_message": message,
        "random_draws": random["draws"], "random_seed": random["seed"],
        "random_fnmr_mean": random["fnmr_mean"].tolist(), "random_fnmr_std": random["fnmr_std"].tolist()}
    table = {"benchmark": benchmark, "method": method, "quality": name,
             "convention": CONVENTIONS[convention], "FMR": f"{fmr:g}"}
    if convention == "edc":
        curve = edc_curve(s, y, q, fmr)
        values.update({"threshold": curve["threshold"], "threshold_rule": EDC_THRESHOLD_RULE,
                       "reject_fractions": curve["fractions"].tolist(),
                       "discarded_fractions": curve["discarded"].tolist(), "fnmr": curve["fnmr"].tolist(),
                       "pauc_rule": PAUC_RULE})
        table["FNMR %"] = f"{curve['fnmr'][0] * 100:.2f}"
        for lim, area in curve["pauc"].items():
            rnd = random["pauc"][lim]
            values.update({f"edc_pauc_{lim}": area, f"random_edc_pauc_{lim}_mean": rnd["mean"],
                           f"random_edc_pauc_{lim}_std": rnd["std"],
                           f"edc_pauc_{lim}_below_random_std": _below(area, rnd)})
            table[f"pAUC{lim[2:]} %"] = f"{area * 100:.3f}"
            table[f"random pAUC{lim[2:]} %"] = f"{rnd['mean'] * 100:.3f}±{rnd['std'] * 100:.3f}"
    else:
        curve = erc_curve(s, y, q, fmr)
        rnd = random["auc"]
        values.update({"threshold_rule": ERC_THRESHOLD_RULE, "reject_fractions": curve["fractions"].tolist(),
                       "fnmr": curve["fnmr"].tolist(), "thresholds": curve["thresholds"].tolist(),
                       "fmr_at_threshold": curve["fmr_at"].tolist(), "erc_auc": curve["auc"],
                       "auc_rule": "trapezoid over reject fractions 0..0.95",
                       "random_erc_auc_mean": rnd["mean"], "random_erc_auc_std": rnd["std"],
                       "erc_auc_below_random_std": _below(curve["auc"], rnd)})
        table.update({"FNMR %": f"{curve['fnmr'][0] * 100:.2f}", "AUC %": f"{curve['auc'] * 100:.3f}",
                      "random AUC %": f"{rnd['mean'] * 100:.3f}±{rnd['std'] * 100:.3f}"})
    legend = (f"{CONVENTIONS[convention]}: FNMR at FMR {fmr:g} as the lowest-quality pairs are rejected; "
              + ("threshold fixed on all pairs, pAUC by the step rule to 20% / 30%" if convention == "edc"
                 else "threshold re-chosen per step (CR-FIQA), trapezoid AUC over 0-95%")
              + f"; random: mean±std of {random['draws']} seeded draws")
    if message:
        legend += f"\n{benchmark}: {message}"
    return ResultRow(values, table=table, legend=legend)


def _below(area: float, random: Dict[str, float]) -> float:
    """How many random-draw standard deviations ``area`` lies below the random mean."""
    return float((random["mean"] - area) / random["std"]) if random["std"] > 0 else float("nan")
