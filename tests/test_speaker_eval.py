"""Speaker verification evaluation: EER variants, minDCF, AS-norm, trial lists, the ``trials`` protocol."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mlearn.data.audio.fbank import apply_cmn, kaldi_fbank
from mlearn.evaluation.metrics.roc import EER_VARIANTS, eer_nist, eer_sklearn, eer_speechbrain, min_dcf
from mlearn.evaluation.metrics.trials import (
    apply_score_norm,
    as_norm,
    cohort_score_stats,
    cosine_scores,
    speaker_mean_cohort,
    top_n_stats,
)
from mlearn.evaluation.protocols.trials import read_trials, run_protocol
from mlearn.models.speaker import AUDIO_INPUT_SPEC

# --------------------------------------------------------------------------------- EER variants

# (targets, non-targets, NIST, sklearn, speechbrain), worked out by hand:
#  A (ties at 0.5): the robust sweep crosses at a split of the tied 0.5s (FNR = FPR = 1/2); sklearn's
#    nearest point is t=0.6 (FPR 1/4, FNR 1/2) -> 1/2; speechbrain's first min |FAR-FRR| = 1/4 at t=0.5
#    (FRR 1/2, FAR 1/4) -> 3/8.
#  B: the sweep steps vertically at FPR = 1/4 -> 1/4; sklearn's drop_intermediate removes t=0.6
#    (collinear), leaving t=0.4 (FPR 1/4, FNR 0) -> 1/4 (with t=0.6 it would be 1/3); speechbrain at
#    t=0.4: (1/3 + 1/4) / 2 = 7/24.
#  C: sweep crosses at FPR = 1/3 -> 1/3; sklearn nearest t=0.6 (FPR 1/3, FNR 1/2) -> 1/2; speechbrain
#    at t=0.5: (1/2 + 1/3) / 2 = 5/12.
EER_CASES = [
    ([0.9, 0.7, 0.5, 0.5], [0.6, 0.5, 0.3, 0.1], 1 / 2, 1 / 2, 3 / 8),
    ([0.8, 0.6, 0.4], [0.7, 0.3, 0.2, 0.1], 1 / 4, 1 / 4, 7 / 24),
    ([0.9, 0.5], [0.6, 0.4, 0.1], 1 / 3, 1 / 2, 5 / 12),
]


def _pack(targets, nontargets):
    scores = np.array(list(targets) + list(nontargets), float)
    labels = np.array([1] * len(targets) + [0] * len(nontargets))
    return scores, labels


@pytest.mark.parametrize("targets,nontargets,nist,skl,sb", EER_CASES)
def test_eer_variants_hand_computed(targets, nontargets, nist, skl, sb):
    scores, labels = _pack(targets, nontargets)
    assert eer_nist(scores, labels) == pytest.approx(nist, abs=1e-12)
    assert eer_sklearn(scores, labels) == pytest.approx(skl, abs=1e-12)
    assert eer_speechbrain(scores, labels) == pytest.approx(sb, abs=1e-12)
    assert set(EER_VARIANTS) == {"nist", "sklearn", "speechbrain"}


def test_eer_speechbrain_matches_brute_force_threshold_matrix():
    rng = np.random.default_rng(1)
    scores = np.round(np.concatenate([rng.normal(1, 1, 60), rng.normal(0, 1, 90)]), 1)  # many ties
    labels = np.array([1] * 60 + [0] * 90)
    unique = np.unique(scores)
    thresholds = np.sort(np.concatenate([unique, (unique[1:] + unique[:-1]) / 2]))
    frr = (scores[labels == 1][None] <= thresholds[:, None]).mean(1)
    far = (scores[labels == 0][None] > thresholds[:, None]).mean(1)
    i = np.argmin(np.abs(far - frr))
    assert eer_speechbrain(scores, labels) == pytest.approx((far[i] + frr[i]) / 2, abs=1e-12)
    # all variants agree to within a couple of trial steps on a larger list
    for fn in EER_VARIANTS.values():
        assert abs(fn(scores, labels) - eer_nist(scores, labels)) < 0.05


def test_eer_single_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both targets and non-targets"):
        eer_sklearn(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="both targets and non-targets"):
        eer_speechbrain(np.array([0.1, 0.2]), np.array([0, 0]))


@pytest.mark.parametrize("p_target", [0.01, 0.05])
def test_min_dcf_matches_brute_force_threshold_sweep(p_target):
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.normal(1.5, 1, 200), rng.normal(0, 1, 800)])
    labels = np.array([1] * 200 + [0] * 800)
    best = np.inf
    for t in np.concatenate([np.sort(scores), [np.inf]]):  # reject score < t
        p_miss = np.mean(scores[labels == 1] < t)
        p_fa = np.mean(scores[labels == 0] >= t)
        best = min(best, p_miss * p_target + p_fa * (1 - p_target))
    expected = best / min(p_target, 1 - p_target)
    assert min_dcf(scores, labels, p_target=p_target) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1


# ------------------------------------------------------------------------------------ AS-norm


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _direct_norm(s, e, t, cohort, top_n, kind):
    """One trial, straight from the formula: top-N cosines of each side, population std."""
    def stats(x):
        cos = sorted((float(x @ c / np.linalg.norm(x) / np.linalg.norm(c)) for c in cohort), reverse=True)
        top = cos[:top_n]
        mu = sum(top) / len(top)
        return mu, (sum((v - mu) ** 2 for v in top) / len(top)) ** 0.5
    mu_e, sd_e = stats(e)
    mu_t, sd_t = stats(t)
    z, tn = (s - mu_e) / sd_e, (s - mu_t) / sd_t
    return {"s": 0.5 * (z + tn), "z": z, "t": tn}[kind]


@pytest.mark.parametrize("top_n,kind", [(3, "s"), (7, "s"), (100, "s"), (4, "z"), (4, "t")])
def test_as_norm_matches_direct_formula(top_n, kind):
    rng = np.random.default_rng(3)
    cohort = rng.normal(size=(7, 5))
    enroll, test = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    raw = (_unit(enroll) * _unit(test)).sum(1)
    expected = [_direct_norm(raw[i], enroll[i], test[i], cohort, top_n, kind) for i in range(6)]
    got = as_norm(raw, _unit(enroll) @ _unit(cohort).T, _unit(test) @ _unit(cohort).T, top_n=top_n, kind=kind)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # the per-utterance route used by run_protocol: chunked cohort stats + trial indices
    table = np.concatenate([enroll, test])
    e_idx, t_idx = np.arange(6), np.arange(6, 12)
    mu, sd = cohort_score_stats(table, cohort, top_n, chunk=4)
    via_index = apply_score_norm(cosine_scores(table, e_idx, t_idx), mu[e_idx], sd[e_idx], mu[t_idx],
                                 sd[t_idx], kind)
    np.testing.assert_allclose(via_index, expected, atol=1e-12)
    cohort_scores = _unit(table) @ _unit(cohort).T
    np.testing.assert_allclose(as_norm(raw, cohort_scores, cohort_scores, top_n, kind, e_idx, t_idx),
                               expected, atol=1e-12)


def test_s_norm_when_top_n_covers_cohort_and_errors():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(5, 9))
    np.testing.assert_allclose(top_n_stats(scores, 9)[1], scores.std(1))
    np.testing.assert_allclose(top_n_stats(scores, 50)[0], top_n_stats(scores, None)[0])
    with pytest.raises(ValueError, match="kind='q'"):
        as_norm(np.zeros(5), scores, scores, kind="q")
    with pytest.raises(ValueError, match="5 scores but 4"):
        as_norm(np.zeros(5), scores[:4], scores)


def test_mean_subtraction_and_speaker_mean_cohort():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(7, 4)) + 3
    mean = emb.mean(0)
    scores = cosine_scores(emb, np.array([0, 1]), np.array([2, 3]), mean)
    for k, (a, b) in enumerate([(0, 2), (1, 3)]):
        x, y = emb[a] - mean, emb[b] - mean
        assert scores[k] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    speakers = ["b", "a", "b", "c", "a", "b", "c"]
    cohort, ids = speaker_mean_cohort(emb, speakers)
    assert ids == ["a", "b", "c"]
    for row, spk in zip(cohort, ids):
        np.testing.assert_allclose(row, np.mean([e for e, s in zip(emb, speakers) if s == spk], axis=0))


# -------------------------------------------------------------------------------- trial lists


def test_read_trials_both_formats(tmp_path):
    official = tmp_path / "veri_test2.txt"
    official.write_text("1 id1/a/1.wav id1/b/2.wav\n0 id1/a/1.wav id2/c/3.wav\n\n1 id2/c/3.wav id2/d/4.wav\n")
    trials = read_trials(official)
    assert trials.format == "official" and len(trials) == 3
    assert trials.enroll[1] == "id1/a/1.wav" and trials.test[1] == "id2/c/3.wav"
    assert trials.labels.tolist() == [1, 0, 1]
    kaldi = tmp_path / "vox1_O_cleaned.kaldi"
    kaldi.write_text("id1/a/1.wav id1/b/2.wav target\nid1/a/1.wav id2/c/3.wav nontarget\n")
    trials = read_trials(kaldi)
    assert trials.format == "kaldi" and trials.labels.tolist() == [1, 0] and trials.test[0] == "id1/b/2.wav"


@pytest.mark.parametrize("text,line", [
    ("1 a.wav b.wav\n2 a.wav c.wav\n", 2),                      # bad label
    ("a.wav b.wav target\n1 a.wav b.wav\n", 2),                 # mixed formats
    ("1 a.wav\n", 1),                                           # missing column
    ("a.wav b.wav same\n", 1),                                  # unknown label word
])
def test_read_trials_malformed_line_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}: expected"):
        read_trials(path)


def test_read_trials_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_trials(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty trial list"):
        read_trials(tmp_path / "empty.txt")


# ------------------------------------------------------------------------------ run_protocol

SR = 16000


class FakeAudioModel:
    """Std over time of each fbank bin (CMN'd input has zero mean) + a constant, as the embedding."""

    modality = "audio"

    def __init__(self) -> None:
        self.spec = dict(AUDIO_INPUT_SPEC)
        self.batches = []

    def embed(self, features, normalize=False):
        features = np.asarray(features)
        assert features.ndim == 3 and features.shape[2] == 80 and features.dtype == np.float32
        assert np.abs(features.mean(axis=1)).max() < 1e-3  # CMN applied
        self.batches.append(features.shape)
        return fake_embedding(features)


def fake_embedding(features):
    return np.concatenate([features.std(axis=1), np.ones((len(features), 1))], axis=1).astype(np.float32)


def _utterance(speaker: int, seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(1000 * speaker + seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 45 * speaker
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + speaker) * t + rng.uniform(0, 6))
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * envelope
    return (0.2 * voice / 3 + rng.normal(0, 0.01, len(t))).astype(np.float32)


def _write_corpus(root: Path):
    """3 test speakers x 3 utterances (+ one corrupt wav), 3 cohort speakers x 2 utterances."""
    keys = {}
    for spk in range(3):
        for u in range(3):
            key = f"id1000{spk}/vid{u % 2}/{u:05d}.wav"
            path = root / "wav" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _utterance(spk, u, [0.5, 0.5, 0.73][u]), SR, subtype="PCM_16")
            keys[key] = spk
    bad = root / "wav" / "id10000" / "vid9" / "00009.wav"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"RIFF\x00\x00not really a wav file")
    for spk in range(3, 6):
        for u in range(2):
            path = root / "cohort" / f"id2000{spk}" / "v" / f"{u:05d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _utterance(spk, u, 0.6), SR, subtype="PCM_16")
    names = sorted(keys)
    lines = [f"{int(keys[a] == keys[b])} {a} {b}" for i, a in enumerate(names) for b in names[i + 1:]]
    lines += ["1 id10000/vid0/00000.wav id10000/vid9/00009.wav",
              "0 id10000/vid9/00009.wav id10001/vid0/00000.wav"]
    (root / "trials.txt").write_text("\n".join(lines) + "\n")
    return names, keys


def _direct_embedding(path: Path, baseline: bool = False) -> np.ndarray:
    wav, rate = sf.read(path, dtype="float32")
    assert rate == SR
    logmel = kaldi_fbank(torch.from_numpy(wav * 32768.0))
    if baseline:
        from scipy.fft import dct
        return dct(logmel.numpy().astype(np.float64), type=2, norm="ortho", axis=1)[:, :30].mean(0)
    return fake_embedding(apply_cmn(logmel)[None].numpy())[0]


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_run_protocol_end_to_end(tmp_path):
    names, keys = _write_corpus(tmp_path)
    model = FakeAudioModel()
    protocol = {"type": "trials", "name": "tiny-O", "trials": "trials.txt", "wav_root": "wav",
                "cohort": "cohort", "as_norm_top_n": 2, "baselines": ["mfcc_mean"]}
    rows = run_protocol(model, protocol, tmp_path, batch_size=2)
    assert [r["method"] for r in rows] == ["model", "model+as-norm", "mfcc_mean"]
    n_trials = len(names) * (len(names) - 1) // 2
    model_row, norm_row, base_row = rows
    assert model_row["trials"] == n_trials and model_row["skipped_trials"] == 2
    assert model_row["unreadable_wavs"] == 1
    assert model_row["targets"] == 9 and model_row["nontargets"] == 27
    assert list(model_row.table) == ["benchmark", "method", "trials", "skipped", "EER% (NIST)", "minDCF0.01",
                                         "minDCF0.05"]
    # the trials of the unreadable wav are reported loudly: a column, a legend line naming the file,
    # results.json
    bad = str(tmp_path / "wav" / "id10000" / "vid9" / "00009.wav")
    assert model_row.table["skipped"] == "2" and list(model_row["unreadable"]) == [bad]
    assert model_row["unreadable"][bad].startswith("unreadable: ")
    assert "2 trials NOT scored" in model_row.legend and bad in model_row.legend
    assert model_row["p_target"] == [0.01, 0.05] and "NIST" in model_row["eer_variant"]
    assert norm_row["as_norm_top_n"] == 2 and norm_row["cohort_speakers"] == 3
    assert "AS-norm" in norm_row["normalisation"]
    # batches hold equal frame counts only and at most batch_size utterances
    assert all(shape[0] <= 2 for shape in model.batches) and any(shape[0] == 2 for shape in model.batches)
    json.dumps([r.values for r in rows])

    # direct recomputation: per-wav fbank + CMN + embedding, cohort mean, speaker means, AS-norm formula
    emb = {k: _direct_embedding(tmp_path / "wav" / k) for k in names}
    cohort_files = sorted((tmp_path / "cohort").glob("*/*/*.wav"))
    cohort_emb = np.stack([_direct_embedding(p) for p in cohort_files])
    mean = cohort_emb.mean(0)
    spk_means = np.stack([cohort_emb[i:i + 2].mean(0) for i in (0, 2, 4)]) - mean
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    labels = np.array([int(keys[a] == keys[b]) for a, b in pairs])
    raw = np.array([_cos(emb[a] - mean, emb[b] - mean) for a, b in pairs])
    np.testing.assert_allclose(model_row.scores, raw, atol=1e-5)
    np.testing.assert_array_equal(model_row.labels, labels)
    assert model_row["eer"] == pytest.approx(eer_nist(raw, labels), abs=1e-6)
    assert model_row["min_dcf"]["0.05"] == pytest.approx(min_dcf(raw, labels, 0.05), abs=1e-6)
    assert model_row["eer"] < 0.2  # the fake embedding does separate the synthetic speakers

    def stats(x):
        top = np.sort([_cos(x - mean, c) for c in spk_means])[::-1][:2]
        return top.mean(), top.std()
    normed = []
    for (a, b), s in zip(pairs, raw):
        (mu_e, sd_e), (mu_t, sd_t) = stats(emb[a]), stats(emb[b])
        normed.append(0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t))
    np.testing.assert_allclose(norm_row.scores, normed, atol=1e-4)

    base = {k: _direct_embedding(tmp_path / "wav" / k, baseline=True) for k in names}
    cohort_base = np.stack([_direct_embedding(p, baseline=True) for p in cohort_files]).mean(0)
    np.testing.assert_allclose(base_row.scores, [_cos(base[a] - cohort_base, base[b] - cohort_base)
                                                     for a, b in pairs], atol=1e-5)


def test_run_protocol_kaldi_cohort_dir_and_no_cohort(tmp_path):
    _write_corpus(tmp_path)
    kaldi = tmp_path / "cohort_kaldi"
    kaldi.mkdir()
    files = sorted((tmp_path / "cohort").glob("*/*/*.wav"))
    (kaldi / "wav.scp").write_text("".join(f"u{i} {p.relative_to(tmp_path)}\n" for i, p in enumerate(files)))
    (kaldi / "utt2spk").write_text("".join(f"u{i} {p.parts[-3]}\n" for i, p in enumerate(files)))
    base = {"trials": "trials.txt", "wav_root": "wav", "as_norm_top_n": 300}
    folder = run_protocol(FakeAudioModel(), {**base, "cohort": "cohort"}, tmp_path, 4)
    scp = run_protocol(FakeAudioModel(), {**base, "cohort": "cohort_kaldi"}, tmp_path, 4)
    assert scp[1]["method"] == "model+s-norm" and scp[1]["cohort_layout"] == "kaldi dir"  # 300 >= 3 speakers
    for a, b in zip(folder, scp):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    plain = run_protocol(FakeAudioModel(), {"trials": "trials.txt", "wav_root": "wav"}, tmp_path, 4)
    assert [r["method"] for r in plain] == ["model"] and plain[0]["benchmark"] == "trials"
    assert plain[0]["normalisation"] == "L2"
    subset = run_protocol(FakeAudioModel(), {"trials": "trials.txt", "wav_root": "wav", "max_trials": 20,
                                             "cohort": "cohort", "cohort_utts_per_speaker": 1}, tmp_path, 4)
    assert subset[0]["trials"] + subset[0]["skipped_trials"] == 20 and subset[0]["trials_subset_of"] == 20
    assert subset[0]["cohort_utterances"] == 3


def test_run_protocol_errors(tmp_path):
    _write_corpus(tmp_path)
    model = FakeAudioModel()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['top_n'\]"):
        run_protocol(model, {"trials": "trials.txt", "wav_root": "wav", "top_n": 3}, tmp_path, 4)
    with pytest.raises(FileNotFoundError,
                       match=r"vox1-O: trial list .*missing.txt not found .*datasets/voxceleb.md"):
        run_protocol(model, {"name": "vox1-O", "trials": "missing.txt", "wav_root": "wav"}, tmp_path, 4)
    with pytest.raises(ValueError, match="baseline='raw'"):
        run_protocol(model, {"trials": "trials.txt", "wav_root": "wav", "baselines": ["raw"]}, tmp_path, 4)
    with pytest.raises(ValueError, match="as_norm_top_n=0"):
        run_protocol(model, {"trials": "trials.txt", "wav_root": "wav", "as_norm_top_n": 0}, tmp_path, 4)
    with pytest.raises(ValueError, match="subtract_mean needs a cohort"):
        run_protocol(model, {"trials": "trials.txt", "wav_root": "wav", "subtract_mean": True}, tmp_path, 4)
    (tmp_path / "bad_scp").mkdir()
    (tmp_path / "bad_scp" / "wav.scp").write_text("u1 sox a.flac -t wav - |\n")
    (tmp_path / "bad_scp" / "utt2spk").write_text("u1 s1\n")
    with pytest.raises(ValueError, match=r"wav.scp:1: piped commands"):
        run_protocol(model, {"trials": "trials.txt", "wav_root": "wav", "cohort": "bad_scp"}, tmp_path, 4)
    image_model = FakeAudioModel()
    image_model.modality = "image"
    with pytest.raises(ValueError, match="audio model"):
        run_protocol(image_model, {"trials": "trials.txt", "wav_root": "wav"}, tmp_path, 4)


def test_suite_run_embeds_shared_utterances_once_and_keeps_nothing_after(tmp_path):
    """Two trial lists over the same wavs in one suite run: each utterance (cohort included) is embedded
    once. Nothing outlives the run: a later run of the same model object, changed, sees the change."""
    from mlearn.evaluation.suite import run_cache, run_suite

    names, _ = _write_corpus(tmp_path)
    model = FakeAudioModel()
    protocol = {"type": "trials", "trials": "trials.txt", "wav_root": "wav", "cohort": "cohort",
                "as_norm_top_n": 2}
    suite = {"name": "twice", "protocols": [{**protocol, "name": "E"}, {**protocol, "name": "H"}]}
    first = run_suite(model, suite, data_root=tmp_path, out_dir=tmp_path / "eval1", batch_size=4)
    readable = len(names) + 6  # the trial wavs but the corrupt one, and the cohort
    assert sum(shape[0] for shape in model.batches) == readable
    assert run_cache() is None
    rows = {(r["benchmark"], r["method"]): r for r in first["results"]}
    assert rows["E", "model"]["eer"] == rows["H", "model"]["eer"]

    embedded = []

    def changed(features, normalize=False):
        embedded.append(len(features))
        return fake_embedding(np.asarray(features)) * np.linspace(1, 2, 81, dtype=np.float32)

    model.embed = changed
    second = run_suite(model, suite, data_root=tmp_path, out_dir=tmp_path / "eval2", batch_size=4)
    assert sum(embedded) == readable  # embedded anew, once
    again = {(r["benchmark"], r["method"]): r for r in second["results"]}
    assert again["E", "model+as-norm"]["eer"] != rows["E", "model+as-norm"]["eer"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("samples", [0, 100, 399])
def test_wavs_shorter_than_one_frame_are_skipped_and_reported(tmp_path, samples):
    """An empty or sub-frame wav (it used to reach the model with 0 frames and crash the whole run) is
    one unusable wav: its trials are left out and reported, the others scored as without it."""
    _write_corpus(tmp_path)
    short = tmp_path / "wav" / "id10000" / "vid9" / "00009.wav"
    sf.write(short, np.zeros(samples, np.float32), SR, subtype="PCM_16")
    protocol = {"trials": "trials.txt", "wav_root": "wav"}
    model = FakeAudioModel()
    row = run_protocol(model, protocol, tmp_path, 4)[0]
    assert row["skipped_trials"] == 2 and row["unreadable_wavs"] == 1 and row["trials"] == 36
    reason = f"too short: {samples} samples ({samples / 16:g} ms), no full 25 ms fbank frame"
    assert row["unreadable"] == {str(short): reason}
    assert "2 trials NOT scored" in row.legend and "1 too short (e.g." in row.legend
    assert all(shape[1] > 0 for shape in model.batches)
    short.unlink()  # the same scores as when the wav is simply absent
    again = run_protocol(FakeAudioModel(), protocol, tmp_path, 4)[0]
    np.testing.assert_allclose(row.scores, again.scores)
    assert again["unreadable"][str(short)] == "unreadable: file not found"


def test_no_usable_trial_wav_names_the_rate_and_a_file(tmp_path):
    _write_corpus(tmp_path)
    for path in (tmp_path / "wav").rglob("*.wav"):
        sf.write(path, np.zeros(8000, np.float32), 8000)
    with pytest.raises(ValueError) as info:
        run_protocol(FakeAudioModel(), {"name": "vox", "trials": "trials.txt", "wav_root": "wav"},
                     tmp_path, 4)
    message = str(info.value)
    assert message.startswith(f"vox: none of the 10 trial wavs under {tmp_path / 'wav'} can be used: "
                              "10 wrong sample rate (e.g. ")
    assert "00000.wav: wrong sample rate: 8000 Hz, expected 16000 Hz)" in message and "\n" not in message


def test_one_sided_scorable_trials_name_the_skipped_wavs(tmp_path):
    _write_corpus(tmp_path)
    (tmp_path / "t.txt").write_text("1 id10000/vid0/00000.wav id10000/vid9/00009.wav\n"
                                    "0 id10000/vid0/00000.wav id10001/vid0/00000.wav\n")
    with pytest.raises(ValueError, match=r"trials of .*t.txt are all non-targets \(1 trials left out for 1 "
                                         r"unusable wav\(s\): 1 unreadable \(e.g. .*00009.wav: unreadable"):
        run_protocol(FakeAudioModel(), {"trials": "t.txt", "wav_root": "wav"}, tmp_path, 4)
    with pytest.raises(ValueError, match="wav_root .*t.txt is not a folder"):
        run_protocol(FakeAudioModel(), {"trials": "t.txt", "wav_root": "t.txt"}, tmp_path, 4)


def test_failure_summary_counts_by_kind():
    from mlearn.data.corrupt import failure_kinds, summarize_failures

    failures = {"a.wav": "too short: 3 samples", "b.wav": "wrong sample rate: 8000 Hz, expected 16000 Hz",
                "c.wav": "wrong sample rate: 44100 Hz, expected 16000 Hz"}
    assert failure_kinds(failures) == {
        "wrong sample rate": (2, "b.wav: wrong sample rate: 8000 Hz, expected 16000 Hz"),
        "too short": (1, "a.wav: too short: 3 samples")}
    assert summarize_failures(failures) == (
        "2 wrong sample rate (e.g. b.wav: wrong sample rate: 8000 Hz, expected 16000 Hz); "
        "1 too short (e.g. a.wav: too short: 3 samples)")


def test_non_finite_float_wav_is_unusable_not_a_nan_model(tmp_path):
    from mlearn.inference_audio import embed_wavs

    good = tmp_path / "good.wav"
    sf.write(good, _utterance(0, 0, 0.5), SR, subtype="FLOAT")
    wave = _utterance(1, 0, 0.5)
    wave[100] = np.nan
    nan = tmp_path / "nan.wav"
    sf.write(nan, wave, SR, subtype="FLOAT")
    vectors, ok, failures = embed_wavs(FakeAudioModel(), [good, nan], progress=False)
    assert ok.tolist() == [True, False] and failures == {str(nan): "non-finite: NaN or inf samples"}
    assert np.isfinite(vectors["model"]).all()
