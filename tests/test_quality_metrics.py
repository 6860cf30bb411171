"""Quality-aware verification metrics (EDC, CR-FIQA's ERC, random baseline) against plain loops."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlearn.evaluation.metrics import quality as qm
from mlearn.evaluation.protocols.quality_eval import plot_curves, plot_quality_rows
from mlearn.evaluation.report import write_results


def _tiny(seed: int, n: int = 60, ties: bool = True):
    """Scores and qualities rounded to a coarse grid, so both have ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.normal(0, 1, n) + 1.5 * labels
    quality = rng.random(n)
    if ties:
        scores, quality = np.round(scores, 1), np.round(quality * 5) / 5
    return scores, labels, quality


def _floor(x: float) -> int:
    return int(math.floor(x + 1e-9))


def brute_edc(scores, labels, quality, fmr, fractions):
    impostors = sorted((s for s, g in zip(scores, labels) if not g), reverse=True)
    k = _floor(fmr * len(impostors))
    threshold = impostors[k] if k < len(impostors) else -math.inf
    n = len(scores)
    fnmr, discarded = [], []
    for f in fractions:
        m = math.ceil(f * n - 1e-9)
        cut = sorted(quality)[m - 1] if m > 0 else -math.inf
        genuine = errors = gone = 0
        for s, g, q in zip(scores, labels, quality):
            if q <= cut:
                gone += 1
                continue
            if g:
                genuine += 1
                errors += s <= threshold
        fnmr.append(errors / genuine)
        discarded.append(gone / n)
    return threshold, fnmr, discarded


def brute_erc(scores, labels, quality, fmr, fractions):
    n = len(scores)
    by_quality = sorted(range(n), key=lambda i: quality[i])  # stable: ties by pair order
    fnmr = []
    for f in fractions:
        kept = by_quality[_floor(f * n):]
        imp = [scores[i] for i in kept if not labels[i]]
        gen = [scores[i] for i in kept if labels[i]]
        if not imp or not gen:
            fnmr.append(math.nan)
            continue
        best, best_gap = None, math.inf
        for t in sorted(set(scores[i] for i in kept)):
            gap = abs(sum(s >= t for s in imp) / len(imp) - fmr)
            if gap < best_gap:
                best, best_gap = t, gap
        fnmr.append(sum(s <= best for s in gen) / len(gen))
    return fnmr


def test_pair_quality_is_min_of_sides():
    np.testing.assert_array_equal(qm.pair_quality([0.2, 0.9, 0.5], [0.4, 0.1, 0.5]), [0.2, 0.1, 0.5])
    with pytest.raises(ValueError, match="q1 has 2 values, q2 1"):
        qm.pair_quality([1, 2], [1])


def test_edc_threshold_rejects_tied_runs_whole():
    imp = np.array([0.9, 0.8, 0.8, 0.1])
    assert qm.edc_threshold(imp, 0.25) == 0.8  # k=1: accept > 0.8, one impostor
    assert qm.edc_threshold(imp, 0.5) == 0.8  # k=2 lands in the tie: still only one accepted
    assert qm.edc_threshold(imp, 0.0) == 0.9
    assert qm.edc_threshold(imp, 1.0) == -math.inf


def test_edc_hand_example_with_quality_ties():
    # 10 pairs; threshold at FMR 0.2 over 5 impostors: k=1, accept > 0.7 (the 2nd largest impostor).
    scores = np.array([0.9, 0.6, 0.7, 0.95, 0.8, 0.2, 0.9, 0.7, 0.3, 0.1])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    quality = np.array([3, 1, 1, 4, 5, 2, 5, 2, 1, 4], float)
    curve = qm.edc_curve(scores, labels, quality, fmr=0.2, fractions=np.array([0, 0.1, 0.4, 0.5]))
    assert curve["threshold"] == 0.7
    # 0.1 -> cut at the 1st lowest (q=1) -> all three q=1 pairs go (actual 0.3): genuine 0.9 0.95 0.8
    # 0.4 -> cut at q=2 -> 5 pairs go; 0.5 -> the same cut
    np.testing.assert_allclose(curve["discarded"], [0, 0.3, 0.5, 0.5])
    np.testing.assert_allclose(curve["fnmr"], [2 / 5, 0, 0, 0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fmr", [0.1, 0.25])
def test_edc_matches_brute_force(seed, fmr):
    scores, labels, quality = _tiny(seed)
    curve = qm.edc_curve(scores, labels, quality, fmr=fmr)
    threshold, fnmr, discarded = brute_edc(scores, labels, quality, fmr, qm.EDC_FRACTIONS)
    assert curve["threshold"] == threshold
    np.testing.assert_allclose(curve["fnmr"], fnmr)
    np.testing.assert_allclose(curve["discarded"], discarded)
    assert (curve["discarded"] >= qm.EDC_FRACTIONS - 1e-12).all()
    for lim in (0.20, 0.30):
        area = sum(v * 0.01 for f, v in zip(qm.EDC_FRACTIONS, fnmr) if f < lim - 1e-12)
        assert curve["pauc"][f"{lim:.2f}"] == pytest.approx(area)


def test_step_pauc_counts_grid_points_below_the_limit():
    f = qm.EDC_FRACTIONS
    assert qm.step_pauc(f, np.full(31, 0.5), 0.20) == pytest.approx(0.5 * 0.20)  # 20 points: 0..0.19
    assert qm.step_pauc(f, np.full(31, 0.5), 0.30) == pytest.approx(0.5 * 0.30)
    fnmr = np.where(f < 0.1, 1.0, 0.0)
    assert qm.step_pauc(f, fnmr, 0.20) == pytest.approx(0.10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fmr", [0.05, 0.1, 0.3])
def test_erc_matches_brute_force(seed, fmr):
    scores, labels, quality = _tiny(seed, n=200)
    fractions = np.arange(0, 0.98, 0.05)  # CR-FIQA's grid
    curve = qm.erc_curve(scores, labels, quality, fmr=fmr)
    np.testing.assert_array_equal(curve["fractions"], fractions)
    fnmr = brute_erc(scores, labels, quality, fmr, fractions)
    np.testing.assert_allclose(curve["fnmr"], fnmr)
    area = sum((fractions[i + 1] - fractions[i]) * (fnmr[i] + fnmr[i + 1]) / 2 for i in range(19))
    assert curve["auc"] == pytest.approx(area, nan_ok=True)


def test_erc_hand_example_nearest_fmr_and_strict_genuine():
    # Impostors 0.1..0.4, genuine 0.25 and 0.6. Target 0.45: the distinct scores give FMR (impostors
    # >= t) 1, .75, .5 (0.25), .5 (0.3), .25, 0; 0.25 and 0.3 tie as nearest, the lowest wins, and the
    # genuine pair sitting at 0.25 is a miss (accept iff score > t), as in CR-FIQA's code.
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.25, 0.6])
    labels = np.array([0, 0, 0, 0, 1, 1], bool)
    curve = qm.erc_curve(scores, labels, np.arange(6.0), fmr=0.45, fractions=np.array([0.0]))
    assert curve["thresholds"][0] == 0.25
    assert curve["fmr_at"][0] == pytest.approx(0.5)
    assert curve["fnmr"][0] == pytest.approx(0.5)


def test_erc_and_edc_differ_and_name_their_convention():
    scores, labels, quality = _tiny(7, n=200, ties=False)
    edc = qm.edc_curve(scores, labels, quality, fmr=0.1)
    erc = qm.erc_curve(scores, labels, quality, fmr=0.1)
    assert (edc["convention"], erc["convention"]) == ("EDC", "ERC (CR-FIQA)")


@pytest.mark.parametrize("convention", ["edc", "erc"])
def test_random_rejection_reproducible_and_brute_force(convention):
    scores, labels, _ = _tiny(3, n=200)
    a = qm.random_rejection(scores, labels, convention, fmr=0.1, draws=4, seed=5)
    b = qm.random_rejection(scores, labels, convention, fmr=0.1, draws=4, seed=5)
    c = qm.random_rejection(scores, labels, convention, fmr=0.1, draws=4, seed=6)
    np.testing.assert_array_equal(a["fnmr_mean"], b["fnmr_mean"])
    assert not np.array_equal(a["fnmr_mean"], c["fnmr_mean"])
    rng = np.random.default_rng(5)
    curves = []
    for _ in range(4):
        quality = rng.permutation(len(scores))
        if convention == "edc":
            curves.append(brute_edc(scores, labels, quality, 0.1, qm.EDC_FRACTIONS)[1])
        else:
            curves.append(brute_erc(scores, labels, quality, 0.1, qm.ERC_FRACTIONS))
    curves = np.array(curves)
    np.testing.assert_allclose(a["fnmr_mean"], curves.mean(0))
    np.testing.assert_allclose(a["fnmr_std"], curves.std(0, ddof=1))
    if convention == "edc":
        areas = [qm.step_pauc(qm.EDC_FRACTIONS, c, 0.30) for c in curves]
        assert a["pauc"]["0.30"]["mean"] == pytest.approx(np.mean(areas))
        assert a["pauc"]["0.30"]["std"] == pytest.approx(np.std(areas, ddof=1))
    else:
        areas = [qm.trapezoid_auc(qm.ERC_FRACTIONS, c) for c in curves]
        assert a["auc"]["mean"] == pytest.approx(np.mean(areas), nan_ok=True)
        assert np.isfinite(a["auc"]["mean"])


def test_supported_fmrs_and_message():
    assert qm.supported_fmrs(100_000) == ([1e-3, 1e-4], [], None)
    supported, unsupported, message = qm.supported_fmrs(9_999)
    assert (supported, unsupported) == ([], [1e-3, 1e-4])
    assert message is not None and message.startswith("FMR 0.001, 0.0001 not reported: 9999 impostor")
    supported, unsupported, message = qm.supported_fmrs(10_000)
    assert (supported, unsupported) == ([1e-3], [1e-4]) and "FMR 0.0001" in str(message)


def test_quality_rows_name_the_convention_and_plot(tmp_path):
    scores, labels, quality = _tiny(1, n=250, ties=False)
    rng = np.random.default_rng(0)
    rows, message = qm.quality_rows(scores, labels, {"cr_fiqa": quality, "norm": rng.random(250)},
                                    benchmark="held_out", fmrs=(0.1, 1e-3), draws=3)
    assert message is not None and "FMR 0.001 not reported" in message
    assert len(rows) == 4  # 2 qualities x 1 supported FMR x 2 conventions
    edc = [r for r in rows if r["convention"] == "EDC"]
    erc = [r for r in rows if r["convention"] == "ERC (CR-FIQA)"]
    assert len(edc) == len(erc) == 2
    first = edc[0]
    assert first["quality"] == "cr_fiqa" and first["fmr"] == 0.1
    expected = qm.edc_curve(scores, labels, quality, 0.1)
    assert first["edc_pauc_0.20"] == pytest.approx(expected["pauc"]["0.20"])
    assert first["edc_pauc_0.30"] == pytest.approx(expected["pauc"]["0.30"])
    assert {"random_edc_pauc_0.30_mean", "random_edc_pauc_0.30_std", "threshold_rule"} <= set(first.values)
    assert erc[0]["erc_auc"] == pytest.approx(qm.erc_curve(scores, labels, quality, 0.1)["auc"])
    assert "random_erc_auc_std" in erc[0].values
    assert all("EDC" in r.legend or "ERC" in r.legend for r in rows)
    written = write_results("quality", rows, tmp_path)  # results.json takes the rows as they are
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["convention"] == "EDC"
    assert written["results"][2]["convention"] == "ERC (CR-FIQA)"
    files = plot_quality_rows(rows, tmp_path)
    assert sorted(p.name for p in files) == ["quality_edc_fmr0.1_held_out_model.png",
                                             "quality_erc_fmr0.1_held_out_model.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in files)


def test_plot_curves_writes_png(tmp_path):
    x = qm.EDC_FRACTIONS
    out = plot_curves(tmp_path / "c.png", {"q": (x, 0.1 - 0.2 * x),
                                              "random": (x, np.full(31, 0.1), np.full(31, 0.01))})
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_one_line_errors():
    scores, labels, quality = _tiny(0, n=20)
    with pytest.raises(ValueError, match="quality has 19 values for 20 pairs"):
        qm.edc_curve(scores, labels, quality[:-1])
    with pytest.raises(ValueError, match="lengths differ"):
        qm.edc_curve(scores[:-1], labels, quality)
    with pytest.raises(ValueError, match="quality contains NaN"):
        qm.erc_curve(scores, labels, np.r_[quality[:-1], np.nan])
    with pytest.raises(ValueError, match="both genuine"):
        qm.edc_curve(scores, np.ones(20, bool), quality)
    with pytest.raises(ValueError, match="convention 'x'"):
        qm.random_rejection(scores, labels, "x")
    with pytest.raises(ValueError, match="quality 'q' has 3 values for 20 pairs"):
        qm.quality_rows(scores, labels, {"q": np.ones(3)}, benchmark="b")
