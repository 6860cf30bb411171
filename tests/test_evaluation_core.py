"""Verification metrics against independent computations."""
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from mlearn.evaluation import kfold_verification, roc_metrics
from mlearn.evaluation.roc import eer_nist, min_dcf


def test_perfect_embeddings_give_one_plus_minus_zero():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    issame = np.tile([True] * 5 + [False] * 5, 10)
    ids = np.arange(len(issame)) % 32
    e1 = basis[ids]
    e2 = np.where(issame[:, None], basis[ids], basis[(ids + 1) % 64])
    result = kfold_verification(e1, e2, issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0


def test_kfold_matches_a_brute_force_loop():
    rng = np.random.default_rng(1)
    n = 200
    issame = rng.random(n) < 0.5
    e1 = rng.normal(size=(n, 8))
    e2 = np.where(issame[:, None], e1 + rng.normal(scale=1.0, size=(n, 8)), rng.normal(size=(n, 8)))
    got = kfold_verification(e1, e2, issame)
    u1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    u2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    d = ((u1 - u2) ** 2).sum(1)
    accs = []
    for k in range(10):
        test = np.arange(k * 20, (k + 1) * 20)
        train = np.array([i for i in range(n) if i not in set(test)])
        best_t, best_acc = None, -1
        for t in np.arange(0, 4, 0.01):
            acc = np.mean((d[train] < t) == issame[train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean((d[test] < best_t) == issame[test]))
    assert got["accuracy"] == pytest.approx(np.mean(accs))
    assert got["accuracy_std"] == pytest.approx(np.std(accs))
    assert 0.5 < got["accuracy"] < 1.0


def brute_sweep(scores, labels):
    """Reject everything <= each sorted score in turn (plus the accept-all point)."""
    thresholds = np.concatenate([[-np.inf], np.sort(scores)])
    fnr = np.array([np.mean(scores[labels == 1] <= t) for t in thresholds])
    fpr = np.array([np.mean(scores[labels == 0] > t) for t in thresholds])
    return fnr, fpr


def test_eer_and_min_dcf_against_brute_force():
    rng = np.random.default_rng(2)
    labels = (rng.random(400) < 0.2).astype(int)  # imbalanced
    scores = np.round(rng.normal(labels * 1.5, 1.0), 1)  # rounded: many ties
    fnr, fpr = brute_sweep(scores, labels)
    cost = (fnr * 0.01 + fpr * 0.99) / 0.01
    # ties are separate sweep points in the NIST sweep, so brute force over distinct thresholds is an upper bound
    assert min_dcf(scores, labels) <= cost.min() + 1e-12
    scores_unique = rng.normal(labels * 1.5, 1.0)
    fnr, fpr = brute_sweep(scores_unique, labels)
    assert min_dcf(scores_unique, labels) == pytest.approx(((fnr * 0.01 + fpr * 0.99) / 0.01).min())
    eer = eer_nist(scores_unique, labels)
    crossing = np.argmin(np.abs(fnr - fpr))
    assert min(fnr[crossing], fpr[crossing]) - 0.01 <= eer <= max(fnr[crossing], fpr[crossing]) + 0.01


def test_eer_hand_computed():
    # targets 0.9, 0.4; non-targets 0.6, 0.1: sweep crosses between FNR/FPR points -> EER 0.5
    assert eer_nist(np.array([0.9, 0.4, 0.6, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.5)
    assert eer_nist(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.0)


def test_tar_at_far_nearest_point_with_ties_to_larger_tpr():
    rng = np.random.default_rng(3)
    labels = (rng.random(3000) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 2.0, 1.0), 2)
    got = roc_metrics(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    full_fpr, full_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # every distinct threshold
    for far, tar in got["tar_at_far"].items():
        distance = np.abs(fpr - far)
        best = distance.min()
        assert tar == pytest.approx(tpr[distance == best].max())
        strict = full_tpr[full_fpr <= far].max() if (full_fpr <= far).any() else 0.0
        assert got["tar_at_far_strict"][far] == pytest.approx(strict)
    assert 0.5 < got["auc"] <= 1.0


def test_every_suite_file_parses_with_known_protocol_types():
    from pathlib import Path

    import yaml

    from mlearn.evaluation.suite import PROTOCOL_TYPES

    suites = sorted((Path(__file__).resolve().parents[1] / "evaluation").glob("*.yaml"))
    assert suites
    for path in suites:
        config = yaml.safe_load(path.read_text())
        assert config["protocols"], path
        for protocol in config["protocols"]:
            assert protocol["type"] in PROTOCOL_TYPES, (path, protocol)
