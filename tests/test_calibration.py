"""Cllr / minCllr / actual DCF against plain-loop computations, and the prior-weighted logistic
calibration (mlearn.evaluation.metrics.calibration)."""
import itertools
import json
import math

import numpy as np
import pytest

from mlearn.evaluation.metrics.calibration import (
    Calibration,
    actual_dcf,
    cllr,
    fit_calibration,
    load_calibration,
    min_cllr,
    optimal_llr,
    pav,
    quality_features,
)
from mlearn.evaluation.metrics.roc import min_dcf


def _cllr_loop(llr, labels):
    tar = [math.log2(1 + math.exp(-s)) for s, y in zip(llr, labels) if y == 1]
    non = [math.log2(1 + math.exp(s)) for s, y in zip(llr, labels) if y == 0]
    return 0.5 * (sum(tar) / len(tar) + sum(non) / len(non))


def _min_cllr_brute(scores, labels):
    """Min Cllr over every monotone map of the distinct score levels: a partition of the sorted levels
    into runs, each run mapped to its best LLR ln((a/N_tar)/(b/N_non)), kept when non-decreasing."""
    levels = sorted(set(scores))
    n_tar = sum(labels)
    n_non = len(labels) - n_tar
    best = math.inf
    for cuts in itertools.product([0, 1], repeat=len(levels) - 1):
        runs, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                runs.append(levels[start:i])
                start = i
        runs.append(levels[start:])
        values, ok, previous = {}, True, -math.inf
        for run in runs:
            a = sum(1 for s, y in zip(scores, labels) if y == 1 and s in run)
            b = sum(1 for s, y in zip(scores, labels) if y == 0 and s in run)
            llr = math.inf if b == 0 else -math.inf if a == 0 else math.log((a / n_tar) / (b / n_non))
            ok &= llr >= previous
            previous = llr
            values.update({s: llr for s in run})
        if not ok:
            continue
        total = 0.0
        for s, y in zip(scores, labels):
            x = values[s] if y == 0 else -values[s]
            total += (0.0 if x == -math.inf else math.log2(1 + math.exp(x))) / (n_tar if y else n_non)
        best = min(best, total / 2)
    return best


def _act_dcf_loop(llr, labels, p, c_miss, c_fa):
    threshold = math.log(c_fa * (1 - p) / (c_miss * p))
    misses = sum(1 for s, y in zip(llr, labels) if y == 1 and s < threshold)
    fas = sum(1 for s, y in zip(llr, labels) if y == 0 and s >= threshold)
    n_tar = sum(labels)
    cost = c_miss * p * misses / n_tar + c_fa * (1 - p) * fas / (len(labels) - n_tar)
    return cost / min(c_miss * p, c_fa * (1 - p))


def _tiny_sets():
    rng = np.random.default_rng(3)
    for n in (4, 7, 10):
        labels = np.r_[[0, 1], rng.integers(0, 2, n - 2)]
        scores = np.round(rng.normal(labels * 1.0, 1.0), 0)  # few distinct levels: many ties
        yield scores, labels
    yield np.array([0.0, 0.0, 0.0, 1.0]), np.array([1, 0, 1, 0])  # inverted and tied
    yield np.array([2.0, 2.0, -1.0, 3.0, -1.0]), np.array([1, 0, 0, 1, 0])


@pytest.mark.parametrize("case", range(5))
def test_cllr_min_cllr_act_dcf_match_plain_loops(case):
    scores, labels = list(_tiny_sets())[case]
    assert cllr(scores, labels) == pytest.approx(_cllr_loop(scores, labels), abs=1e-12)
    assert min_cllr(scores, labels) == pytest.approx(_min_cllr_brute(list(scores), list(labels)), abs=1e-12)
    assert min_cllr(scores, labels) <= cllr(scores, labels) + 1e-12
    for p, c_miss, c_fa in ((0.01, 1, 1), (0.5, 1, 1), (0.2, 2, 0.5)):
        # LLRs on the threshold (ln 4 / 2 ... ) are accepted: put one exactly there
        llr = np.r_[scores[:-1], math.log(c_fa * (1 - p) / (c_miss * p))]
        assert actual_dcf(llr, labels, p, c_miss, c_fa) == pytest.approx(
            _act_dcf_loop(llr, labels, p, c_miss, c_fa), abs=1e-12)


def test_optimal_llr_ties_share_a_value_and_pav_is_monotone():
    scores = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 2.0])
    labels = np.array([0, 1, 0, 0, 1, 1])
    llr = optimal_llr(scores, labels)
    assert len(set(llr[:3])) == 1
    assert llr[3] == -math.inf and llr[4] == llr[5] == math.inf
    fitted = pav(np.array([3.0, 1.0, 2.0, 0.0, 5.0]))
    assert np.all(np.diff(fitted) >= 0)
    np.testing.assert_allclose(fitted, [1.5, 1.5, 1.5, 1.5, 5.0])


def test_perfectly_calibrated_gaussian_llrs_match_theory():
    # LLR ~ N(+d²/2, d²) for targets, N(-d²/2, d²) for non-targets is calibrated: Cllr ≈ its expectation
    d = 2.0
    rng = np.random.default_rng(0)
    n = 200_000
    llr = np.r_[rng.normal(d * d / 2, d, n), rng.normal(-d * d / 2, d, n)]
    labels = np.r_[np.ones(n, int), np.zeros(n, int)]
    grid = np.linspace(d * d / 2 - 10 * d, d * d / 2 + 10 * d, 200_001)
    density = np.exp(-((grid - d * d / 2) ** 2) / (2 * d * d)) / (d * math.sqrt(2 * math.pi))
    expected = float(np.sum(density * np.logaddexp(0, -grid)) * (grid[1] - grid[0]) / math.log(2))
    assert cllr(llr, labels) == pytest.approx(expected, abs=0.005)
    assert min_cllr(llr, labels) == pytest.approx(cllr(llr, labels), abs=0.01)  # nothing to gain
    assert actual_dcf(llr, labels, 0.01) >= min_dcf(llr, labels, 0.01) - 1e-12


def _miscalibrated(n_tar, n_non, seed=1):
    rng = np.random.default_rng(seed)
    d = 2.5
    true_llr = np.r_[rng.normal(d * d / 2, d, n_tar), rng.normal(-d * d / 2, d, n_non)]
    labels = np.r_[np.ones(n_tar, int), np.zeros(n_non, int)]
    return (true_llr - 1.5) / 4.0, true_llr, labels  # raw score = (llr - 1.5) / 4


def test_fit_recovers_a_known_affine_miscalibration():
    scores, _, labels = _miscalibrated(4000, 20000)
    assert cllr(scores, labels) - min_cllr(scores, labels) > 0.05
    cal = fit_calibration(scores[:, None], labels, prior=0.5, feature_names=["score"])
    assert cal.weights[0] == pytest.approx(4.0, rel=0.05)
    assert cal.bias == pytest.approx(1.5, abs=0.15)
    calibrated = cal.apply(scores[:, None])
    assert cllr(calibrated, labels) == pytest.approx(min_cllr(scores, labels), abs=0.01)
    # held-out split: calibration lowers Cllr, and an increasing map leaves minDCF unchanged
    test_scores, _, test_labels = _miscalibrated(2000, 10000, seed=7)
    test_llr = cal.apply(test_scores)
    assert cllr(test_llr, test_labels) < cllr(test_scores, test_labels) - 0.05
    assert min_dcf(test_llr, test_labels) == pytest.approx(min_dcf(test_scores, test_labels))


def test_prior_weighting_is_invariant_to_duplicating_non_targets():
    scores, _, labels = _miscalibrated(300, 900)
    features = np.c_[scores, np.random.default_rng(2).normal(size=len(scores))]
    once = fit_calibration(features, labels, prior=0.05)
    non = labels == 0
    twice = fit_calibration(np.r_[features, features[non]], np.r_[labels, labels[non]], prior=0.05)
    np.testing.assert_allclose(twice.weights, once.weights, rtol=1e-7, atol=1e-9)
    assert twice.bias == pytest.approx(once.bias, rel=1e-7, abs=1e-9)


def test_fit_minimises_the_weighted_objective():
    scores, _, labels = _miscalibrated(200, 600)
    x = scores[:, None]
    cal = fit_calibration(x, labels, prior=0.1)
    offset = math.log(0.1 / 0.9)

    def objective(w, b):
        s = x[:, 0] * w + b + offset
        tar = labels == 1
        return (0.1 * np.logaddexp(0, -s[tar]).mean() + 0.9 * np.logaddexp(0, s[~tar]).mean())

    best = objective(cal.weights[0], cal.bias)
    for dw, db in itertools.product((-1e-3, 0, 1e-3), repeat=2):
        assert objective(cal.weights[0] + dw, cal.bias + db) >= best - 1e-12


def test_separable_dev_data_is_flagged(caplog):
    cal = fit_calibration(np.array([[-2.0], [-1.0], [1.0], [2.0]]), np.array([0, 0, 1, 1]), prior=0.5)
    assert cal.info["separated"] and "separated" in caplog.text
    scores, _, labels = _miscalibrated(300, 900)
    assert not fit_calibration(scores[:, None], labels).info["separated"]


def _speaker_trials(n, seed):
    """Synthetic speaker trials: durations log-uniform over 1-8 s; the raw score of a trial is an affine
    map of its true LLR (the longer the clips, the more separated) plus an offset that grows as the clips
    shorten, as cosine scores of short clips do."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    seconds = np.exp(rng.uniform(0, math.log(8), (n, 2)))
    d = 1.0 + 0.8 * np.log(seconds).sum(axis=1)  # separation grows with the durations
    true_llr = np.where(labels == 1, rng.normal(d * d / 2, d), rng.normal(-d * d / 2, d))
    raw = 0.05 * true_llr + 0.3 - 0.1 * np.log(seconds).sum(axis=1)
    return raw, seconds, labels


def test_duration_features_calibrate_a_held_out_split_without_raising_min_dcf():
    raw, seconds, labels = _speaker_trials(20000, 0)
    features, names = quality_features(raw, seconds[:, 0], seconds[:, 1])
    cal = fit_calibration(features, labels, prior=0.01, feature_names=names)
    score_only = fit_calibration(raw[:, None], labels, prior=0.01)
    test_raw, test_seconds, test_labels = _speaker_trials(20000, 1)
    test_features, _ = quality_features(test_raw, test_seconds[:, 0], test_seconds[:, 1])
    llr = cal.apply(test_features)
    assert cllr(llr, test_labels) < cllr(test_raw, test_labels) - 0.2
    assert cllr(llr, test_labels) < cllr(score_only.apply(test_raw), test_labels)
    assert cllr(llr, test_labels) - min_cllr(llr, test_labels) < 0.05
    assert min_dcf(llr, test_labels, 0.01) <= min_dcf(test_raw, test_labels, 0.01) + 0.01
    assert actual_dcf(llr, test_labels, 0.01) < actual_dcf(test_raw, test_labels, 0.01)


def test_calibration_round_trip_and_hash_mismatch_refused(tmp_path):
    features, names = quality_features(np.array([0.1, 0.7, 0.3, 0.9]), np.array([1.0, 2.0, 4.0, 8.0]),
                                       np.array([8.0, 1.0, 2.0, 3.0]), np.zeros(4), np.ones(4))
    assert names == ["score", "log_seconds_enroll", "log_seconds_test", "score_x_log_seconds_enroll",
                     "score_x_log_seconds_test", "cohort_top_mean_enroll", "cohort_top_mean_test"]
    assert features[1, 1] == pytest.approx(math.log(2.0))
    assert features[1, 3] == pytest.approx(0.7 * math.log(2.0))
    assert features[2, 4] == pytest.approx(0.3 * math.log(2.0))
    plain, plain_names = quality_features(np.array([0.5]), np.array([2.0]), np.array([4.0]),
                                          interactions=False)
    assert plain_names == ["score", "log_seconds_enroll", "log_seconds_test"] and plain.shape == (1, 3)
    weights = np.array([3.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0])
    cal = Calibration(weights, -1.0, 0.01, names, config_hash="abc123")
    path = cal.save(tmp_path / "calibration.json")
    json.loads(path.read_text())
    back = load_calibration(path)
    np.testing.assert_allclose(back.apply(features), cal.apply(features))
    assert back.feature_names == names and back.config_hash == "abc123"
    back.check_model("abc123")
    back.check_model(None)  # unknown model hash: nothing to compare
    with pytest.raises(ValueError, match="does not match my-model") as err:
        back.check_model("fff999", "my-model")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expects 7"):
        back.apply(features[:, :3])


@pytest.mark.parametrize("change, match", [({"format": "x"}, "not an mlearn calibration"),
                                           ({"weights": [1.0]}, "weights="),
                                           ({"prior": 1.5}, "prior="),
                                           ({"bias": float("nan")}, "bias=")])
def test_from_dict_rejects_bad_files(change, match):
    good = Calibration(np.array([1.0, 2.0]), 0.0, 0.01, ["score", "x"]).to_dict()
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict({**good, **change}, "cal.json")


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match="cllr: no target"):
        cllr(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="p_target=0"):
        actual_dcf(np.zeros(2), np.array([0, 1]), p_target=0.0)
    with pytest.raises(ValueError, match="prior=1"):
        fit_calibration(np.zeros((2, 1)), np.array([0, 1]), prior=1.0)
    with pytest.raises(ValueError, match="2 feature rows but 3 labels"):
        fit_calibration(np.zeros((2, 1)), np.array([0, 1, 1]))


# ------------------------------------------------------------------------ trials protocol


def test_trials_protocol_fits_applies_and_refuses_another_models_calibration(tmp_path):
    from test_speaker_eval import FakeAudioModel, _write_corpus

    from mlearn.evaluation.protocols.trials import run_protocol

    _write_corpus(tmp_path)
    model = FakeAudioModel()
    model.metadata = {"config_hash": "a" * 64}
    # dev = test list here (the mechanics, not a benchmark): with prior 0.5 the fitted objective is Cllr
    # itself, and the identity on the score is one of the affine maps, so the calibrated Cllr cannot be higher
    protocol = {"type": "trials", "name": "tiny", "trials": "trials.txt", "wav_root": "wav",
                "cohort": "cohort", "as_norm_top_n": 2, "baselines": ["mfcc_mean"],
                "calibration": {"dev_trials": "trials.txt", "prior": 0.5}}
    rows = run_protocol(model, protocol, tmp_path, batch_size=4)
    assert [r["method"] for r in rows] == ["model", "model+as-norm", "model+as-norm+calibrated", "mfcc_mean"]
    normed, calibrated = rows[1], rows[2]
    assert normed["llr"].startswith("uncalibrated") and calibrated["llr"].startswith("calibrated: fitted")
    assert calibrated["cllr"] <= normed["cllr"] + 1e-9
    assert calibrated["min_cllr"] <= calibrated["cllr"] + 1e-12
    assert list(calibrated.table)[-3:] == ["Cllr", "minCllr", "actDCF0.01"]
    assert {tuple(r.table) for r in rows} == {tuple(calibrated.table)}  # one printed block
    stored = calibrated["calibration"]
    assert stored["config_hash"] == "a" * 64 and stored["info"]["dev_skipped_trials"] == 2
    assert stored["feature_names"][:3] == ["score", "log_seconds_enroll", "log_seconds_test"]
    json.dumps([r.values for r in rows])

    path = Calibration.from_dict(stored).save(tmp_path / "calibration.json")
    reuse = {**protocol, "calibration": {"file": "calibration.json"}, "baselines": []}
    again = run_protocol(model, reuse, tmp_path, batch_size=4)
    np.testing.assert_allclose(again[2].scores, calibrated.scores, rtol=1e-9, atol=1e-12)
    assert "stored calibration" in again[2]["calibration_source"]

    # the score column is the AS-norm row's score: an identity calibration reproduces that row
    identity = Calibration(np.eye(len(stored["feature_names"]))[0], 0.0, 0.5, stored["feature_names"])
    identity.save(tmp_path / "identity.json")
    same = run_protocol(model, {**reuse, "calibration": {"file": "identity.json"}}, tmp_path, batch_size=4)
    np.testing.assert_allclose(same[2].scores, normed.scores, rtol=1e-12)
    assert same[2]["cllr"] == pytest.approx(normed["cllr"])
    # a calibration stored before the score x duration products (without those columns) still applies
    legacy_names = [n for n in stored["feature_names"] if not n.startswith("score_x_")]
    Calibration(np.eye(len(legacy_names))[0], 0.0, 0.5, legacy_names).save(tmp_path / "legacy.json")
    legacy = run_protocol(model, {**reuse, "calibration": {"file": "legacy.json"}}, tmp_path, batch_size=4)
    np.testing.assert_allclose(legacy[2].scores, normed.scores, rtol=1e-12)

    model.metadata = {"config_hash": "b" * 64}
    with pytest.raises(ValueError, match="does not match the model") as err:
        run_protocol(model, reuse, tmp_path, batch_size=4)
    assert "\n" not in str(err.value)
    no_cohort = {**reuse, "cohort": None}
    model.metadata = {}
    with pytest.raises(ValueError, match="expects features"):
        run_protocol(model, no_cohort, tmp_path, batch_size=4)
    assert path.is_file()


@pytest.mark.parametrize("spec", [{"dev_trials": "d.txt", "file": "c.json"}, {"file": "c.json", "prior": 0.1},
                                  {"dev_trials": "d.txt", "prior": 2.0}, {"dev": "d.txt"}, {}])
def test_calibration_option_is_checked(spec):
    from mlearn.evaluation.protocols.options import build_options

    with pytest.raises(ValueError, match="calibration=.*expected a mapping"):
        build_options({"type": "trials", "trials": "t.txt", "wav_root": "w", "calibration": spec})
