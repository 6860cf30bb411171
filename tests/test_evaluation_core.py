"""Verification metrics against independent computations."""
import re

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from mlearn.evaluation import kfold_verification, roc_metrics
from mlearn.evaluation.metrics.roc import eer_nist, min_dcf


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
    # ties are separate sweep points in the NIST sweep, so brute force over distinct thresholds is an
    # upper bound
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


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("fn", [roc_metrics, eer_nist, min_dcf])
@pytest.mark.parametrize("labels, missing", [([1, 1, 1, 1], "no non-target pairs among the 4 labels"),
                                             ([0, 0, 0, 0], "no target (same-identity) pairs")])
def test_metric_functions_name_the_missing_class(fn, labels, missing):
    with pytest.raises(ValueError, match=rf"{fn.__name__}: {re.escape(missing)}"):
        fn(np.array([0.1, 0.4, 0.35, 0.8]), np.array(labels))


def test_metric_functions_refuse_non_finite_scores_and_odd_labels():
    with pytest.raises(ValueError, match=r"roc_metrics: 1 of 4 scores are NaN or inf \(first at index 2\)"):
        roc_metrics(np.array([0.1, 0.4, np.nan, 0.8]), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        eer_nist(np.array([0.1, 0.4, 0.3]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"scores \(3,\) and labels \(2,\) differ"):
        min_dcf(np.array([0.1, 0.4, 0.3]), np.array([0, 1]))


def test_every_suite_file_passes_the_loader_checks():
    from pathlib import Path

    from mlearn.evaluation.suite import load_suite

    for path in sorted((Path(__file__).resolve().parents[1] / "evaluation").glob("*.yaml")):
        assert load_suite(path)["protocols"], path


BAD_SUITES = [  # (suite text, what the error line must name)
    ("name: x\nprotocols: [{type: bin, path: a.bin}\n", "invalid YAML at line 3"),
    ("- {type: bin, path: a.bin}\n", "expected a mapping with keys ['name', 'protocols'], got list"),
    ("nmae: x\nprotocols: [{type: bin, path: a.bin}]\n", "unknown key(s) ['nmae']"),
    ("protocols: {type: bin, path: a.bin}\n", "expected a non-empty 'protocols' list"),
    ("protocols: [bin]\n", "protocols[0]: expected a mapping"),
    ("protocols: [{type: bn, path: a.bin}]\n", "protocols[0]: type='bn'"),
    ("protocols: [{type: bin, name: lfw}]\n", "protocols[0] (lfw): missing required key 'path'"),
    ("protocols: [{type: trials, trials: t.txt}]\n", "missing required key 'wav_root'"),
    ("protocols: [{type: bin, path: a.bin, colour: red}]\n", "unknown key(s) ['colour'] for type bin"),
    ("protocols: [{type: bin, path: 3}]\n", "path=3; expected a path"),
    ("protocols: [{type: bin, path: a.bin, flip: maybe}]\n", "flip='maybe'; expected true or false"),
    ("protocols: [{type: bin, path: a.bin, baselines: raw_pixels}]\n",
     "baselines='raw_pixels'; expected a list"),
    ("protocols: [{type: retrieval, query: q, ks: 5}]\n",
     "ks=5; expected a non-empty list of positive integers"),
    ("protocols: [{type: retrieval, query: q, ks: [1, 0]}]\n", "ks=[1, 0]"),
    ("protocols: [{type: trials, trials: t, wav_root: w, max_trials: -3}]\n",
     "max_trials=-3; expected a positive"),
    ("protocols: [{type: ijb, name: IJBC, workers: true}]\n",
     "workers=True; expected a non-negative integer"),
]


@pytest.mark.parametrize("text, expected", BAD_SUITES)
def test_malformed_suite_names_the_file_and_key(tmp_path, text, expected):
    from mlearn.evaluation.suite import load_suite, run_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(ValueError) as info:
        run_suite(object(), suite, data_root=tmp_path, out_dir=tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{suite}: ") and expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_suite(suite)


class _ColourModel:
    modality = "image"

    def __init__(self, nan_row=None):
        self.nan_row = nan_row

    def embed(self, batch, normalize=False):
        emb = np.asarray(batch, np.float32).reshape(len(batch), -1)[:, :8].copy()
        if self.nan_row is not None and self.nan_row < len(emb):
            emb[self.nan_row, 3] = np.nan
        return emb


def _write_bin(path, issame):
    from mlearn.data.images.bins import write_bin

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2 * len(issame))]
    write_bin(path, images, issame)


@pytest.mark.parametrize("issame, missing", [([True] * 6, "different-identity"),
                                             ([False] * 6, "same-identity")])
def test_bin_without_both_pair_kinds_names_the_file(tmp_path, issame, missing):
    from mlearn.evaluation.protocols.bins import check_both_kinds
    from mlearn.evaluation.suite import run_suite

    _write_bin(tmp_path / "one_sided.bin", issame)
    with pytest.raises(ValueError) as info:
        run_suite(_ColourModel(), {"protocols": [{"type": "bin", "path": "one_sided.bin"}]}, tmp_path,
                  tmp_path / "out")
    assert str(tmp_path / "one_sided.bin") in str(info.value) and missing in str(info.value)
    with pytest.raises(ValueError, match=rf"lfw.bin: no \w+ \({missing}\) pairs among its 6 pairs"):
        check_both_kinds(np.array(issame), "lfw.bin")
    check_both_kinds(np.array([True, False]), "lfw.bin")


def test_nan_embeddings_stop_the_suite_naming_the_benchmark(tmp_path):
    from mlearn.evaluation.suite import NonFiniteEmbeddings, run_suite

    _write_bin(tmp_path / "pairs.bin", [True, False] * 5)
    suite = {"protocols": [{"type": "bin", "name": "lfw", "path": "pairs.bin", "flip": False}]}
    with pytest.raises(NonFiniteEmbeddings,
                       match=r"benchmark 'lfw': the model's embeddings contain NaN or inf "
                             r"\(1 of the 4 embeddings of a batch\)"):
        run_suite(_ColourModel(nan_row=1), suite, tmp_path, tmp_path / "out", batch_size=4)
    assert not (tmp_path / "out" / "results.json").exists()
    results = run_suite(_ColourModel(), suite, tmp_path, tmp_path / "out", batch_size=4)  # finite: scored
    assert results["results"][0]["pairs"] == 10


@pytest.mark.parametrize("batch_size", [0, -5, True])
def test_run_suite_refuses_a_bad_batch_size(tmp_path, batch_size):
    from mlearn.evaluation.suite import run_suite

    with pytest.raises(ValueError, match=rf"batch_size={batch_size!r}: expected a positive integer"):
        run_suite(_ColourModel(), {"protocols": [{"type": "bin", "path": "x.bin"}]}, tmp_path,
                  tmp_path / "out", batch_size=batch_size)
