"""Own-data evaluation (suite type ``own_data``): pairs from folders and lists, thresholds at target FARs
with bootstrap intervals (and their calibration on held-out identities), `mlearn eval --folder`,
`mlearn export --thresholds`, `mlearn verify`, `Embedder.verify`, audio models embedding raw waveforms."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from data_utils import make_run

from mlearn import cli
from mlearn.evaluation.metrics.thresholds import (
    ImpostorSweep,
    far_thresholds,
    split_supported,
    threshold_at_far,
    unsupported_message,
)
from mlearn.evaluation.protocols.options import build_options
from mlearn.evaluation.protocols.own_data import read_thresholds, run_protocol
from mlearn.evaluation.protocols.own_data_pairs import (
    all_pairs,
    pair_cosines,
    pair_count,
    pairs_of,
    read_pair_list,
    sample_pairs,
)
from mlearn.evaluation.suite import load_suite
from mlearn.inference import l2_normalize, load_model
from mlearn.models import ECAPA_TDNN, IResNet

FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 32}
AUDIO_ARGS = {"channels": 32, "mfa_channels": 48, "embedding_size": 16}


def identity_embeddings(identities: int, per_identity: int, dim: int = 32, spread: float = 0.9,
                        seed: int = 0):
    """Unit embeddings [identities * per_identity, dim] scattered around one random center per identity."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((identities, dim)))
    labels = np.repeat(np.arange(identities), per_identity)
    noise = rng.standard_normal((len(labels), dim)) * spread / np.sqrt(dim)
    return l2_normalize(centers[labels] + noise), labels


# --------------------------------------------------------------------------------------- thresholds


def test_threshold_rule_on_hand_cases():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert threshold_at_far(scores, 0.25) == pytest.approx(0.85)  # 1 of 4 accepted: halfway to the next
    assert threshold_at_far(scores, 0.5) == pytest.approx(0.75)
    assert threshold_at_far(scores, 0.2) > 0.9  # floor(0.8) = 0 impostors accepted
    tied = np.array([0.9, 0.8, 0.8, 0.1])
    assert threshold_at_far(tied, 0.5) == pytest.approx(0.85)  # the tied run is not split: 1 accepted
    sweep = ImpostorSweep(tied)
    for far in (0.25, 0.5, 0.75):
        assert sweep.far_at(float(sweep.thresholds([far])[0])) <= far


def test_far_support_rule_and_message():
    supported, unsupported = split_supported([1e-2, 1e-3, 1e-4], 5000)
    assert supported == [1e-2] and unsupported == [1e-3, 1e-4]  # 10 / 5000 = 2e-3
    message = unsupported_message(unsupported, 5000)
    assert "0.001, 0.0001 not reported" in message and "5000 impostor pairs" in message
    assert unsupported_message([], 5000) is None
    out = far_thresholds(np.ones(3), np.linspace(0, 1, 5000), [1e-2, 1e-3], rounds=20)
    assert list(out["thresholds"]) == ["0.01"] and out["unsupported"] == [1e-3]


def test_thresholds_calibrate_far_on_held_out_identities():
    """Calibrate on half of the identities, measure on the other half: the realised FAR at the stored
    threshold lies in its bootstrap interval or within ±30 % of the target."""
    emb, labels = identity_embeddings(240, 5, seed=1)
    results = {}
    for half, ids in (("cal", labels < 120), ("test", labels >= 120)):
        unit, lab = emb[ids], labels[ids] - labels[ids].min()
        rng = np.random.default_rng(0)
        (g1, g2), _ = pairs_of(lab, True, None, rng)
        (i1, i2), _ = pairs_of(lab, False, None, rng)
        results[half] = (pair_cosines(unit, g1, g2), pair_cosines(unit, i1, i2), (lab[i1], lab[i2]))
    genuine, impostor, groups = results["cal"]
    table = far_thresholds(genuine, impostor, [1e-2, 1e-3], rounds=100, groups=groups)
    assert table["bootstrap"]["unit"] == "identity"
    test_impostor = results["test"][1]
    for key, far in (("0.01", 1e-2), ("0.001", 1e-3)):
        record = table["thresholds"][key]
        lo, hi = record["threshold_ci95"]
        assert lo <= record["threshold"] <= hi and record["realised_far"] <= far
        realised = float(np.mean(test_impostor >= record["threshold"]))
        far_lo, far_hi = record["far_ci95"]
        assert far_lo <= realised <= far_hi or abs(realised - far) <= 0.3 * far, (key, realised, record)


# ------------------------------------------------------------------------------------------- pairs


def test_pairs_all_and_sampled():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    for same in (True, False):
        first, second = all_pairs(labels, same)
        assert len(first) == pair_count(labels, same) == len(set(zip(first, second)))
        assert np.all((labels[first] == labels[second]) == same)
    first, second = sample_pairs(labels, False, 20, np.random.default_rng(3))
    keys = set(zip(np.minimum(first, second), np.maximum(first, second)))
    assert len(keys) == 20 and np.all(labels[first] != labels[second])
    again = sample_pairs(labels, False, 20, np.random.default_rng(3))
    assert np.array_equal(again[0], first) and np.array_equal(again[1], second)
    (first, _), total = pairs_of(labels, False, 5, np.random.default_rng(0))
    assert len(first) == 5 and total == pair_count(labels, False)


def test_sampled_impostors_are_uniform():
    labels = np.repeat(np.arange(3), [1, 2, 5])  # 17 impostor pairs, very unequal identity sizes
    counts = {}
    for seed in range(300):
        first, second = sample_pairs(labels, False, 4, np.random.default_rng(seed))
        for pair in zip(np.minimum(first, second), np.maximum(first, second)):
            counts[pair] = counts.get(pair, 0) + 1
    assert len(counts) == 17
    expected = 300 * 4 / 17
    assert max(abs(c - expected) for c in counts.values()) < 0.45 * expected


def test_pair_list_reader_errors(tmp_path):
    good = tmp_path / "pairs.txt"
    good.write_text("# comment\na.jpg b.jpg 1\n\nc.jpg d.jpg 0\n")
    pairs = read_pair_list(good)
    assert pairs.first == ["a.jpg", "c.jpg"] and pairs.labels.tolist() == [1, 0]
    for text, line, what in (("a.jpg b.jpg 1\nc.jpg d.jpg same\n", 2, "label 1 (same identity) or 0"),
                             ("a.jpg b.jpg\n", 1, "'<path1> <path2> <label>'"),
                             ("a.jpg b.jpg 1 extra\n", 1, "expected")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"bad.txt:{line}: .*{re.escape(what)}"):
            read_pair_list(bad)
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("a.jpg b.jpg\nc.jpg d.jpg 1\n")
    with pytest.raises(ValueError, match="unlabelled.txt:2: expected no label"):
        read_pair_list(unlabelled, labels_required=False)
    with pytest.raises(FileNotFoundError, match="pair list not found"):
        read_pair_list(tmp_path / "missing.txt")


def test_suite_entry_is_checked():
    entry = {"type": "own_data", "folder": "mine", "fars": [0.01, 0.001], "max_impostors": 1000}
    options = build_options(entry)
    assert options.benchmark == "mine" and options.fars == [0.01, 0.001] and options.bootstrap == 200
    load_suite({"name": "x", "protocols": [entry]})
    with pytest.raises(ValueError, match="exactly one of folder, pairs, trials"):
        build_options({"type": "own_data", "folder": "a", "pairs": "b.txt"})
    with pytest.raises(ValueError, match="fars=.*rates in \\(0, 1\\)"):
        build_options({"type": "own_data", "folder": "a", "fars": [2]})


# ---------------------------------------------------------------------------- end to end: face model


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory):
    import cv2

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("own")
    run = make_run(root / "run", IResNet, FACE_ARGS)
    rng = np.random.default_rng(0)
    data = root / "faces"
    for ident in range(8):
        base = rng.integers(0, 256, (112, 112, 3))
        (data / f"id{ident}").mkdir(parents=True)
        for k in range(4):
            image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(data / f"id{ident}" / f"{k}.png"), image)
    (data / "id0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root, run, data


def test_eval_folder_export_thresholds_and_verify(face_setup, tmp_path, capsys):
    import cv2

    root, run, data = face_setup
    assert cli.main(["eval", "--model", str(run), "--folder", str(data), "--fars", "0.1,0.01",
                     "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "FAR 0.01 not reported: 448 impostor pairs" in out and "1 unreadable file(s)" in out
    results = json.loads((run / "eval" / "faces" / "results.json").read_text())
    row = results["results"][0]
    assert row["genuine_pairs"] == 8 * 6 and row["impostor_pairs"] == 448 and row["unreadable_files"] == 1
    assert list(row["thresholds"]) == ["0.1"] and row["far_not_reported"] == [0.01]
    assert {"rank_1", "rank_5", "eer", "min_dcf", "tar_at_far"} <= set(row)
    assert (run / "eval" / "faces" / "roc.png").is_file()
    threshold = row["thresholds"]["0.1"]["threshold"]

    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt"), ("safetensors", ".safetensors")):
        output = tmp_path / f"model{suffix}"
        assert cli.main(["export", "--model", str(run), "--format", fmt, "--output", str(output),
                         "--thresholds"]) == 0, capsys.readouterr().err
        model = load_model(output)
        assert model.metadata["thresholds"]["far"]["0.1"]["threshold"] == pytest.approx(threshold)
    a, b, c = (cv2.cvtColor(cv2.imread(str(data / rel)), cv2.COLOR_BGR2RGB)
               for rel in ("id0/0.png", "id0/1.png", "id1/0.png"))
    score, accepted = model.verify(a, b, far=0.1)
    assert isinstance(accepted, bool) and accepted == (score >= threshold)
    scores, decisions = model.verify(np.stack([a, a]), np.stack([b, c]), far=0.1)
    assert scores.shape == (2,) and scores[0] == pytest.approx(score, abs=1e-5)
    with pytest.raises(ValueError, match="no threshold for FAR 0.001; this model has thresholds for FAR 0.1"):
        model.verify(a, b, far=1e-3)
    with pytest.raises(ValueError, match="stores no verification thresholds"):
        load_model(run).verify(a, b)

    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{data}/id0/0.png {data}/id0/1.png 1\n{data}/id0/0.png {data}/id1/0.png 0\n"
                     f"{data}/id0/broken.jpg {data}/id1/0.png 0\n")
    assert cli.main(["verify", "--model", str(tmp_path / "model.onnx"), "--pairs", str(pairs),
                     "--output", str(tmp_path / "v.tsv"), "--far", "0.1"]) == 0
    lines = (tmp_path / "v.tsv").read_text().splitlines()
    assert lines[0] == "path1\tpath2\tscore\tdecision\tlabel" and len(lines) == 4
    first = lines[1].split("\t")
    assert float(first[2]) == pytest.approx(score, abs=1e-5)
    assert first[3] == ("accept" if accepted else "reject")
    assert lines[3].split("\t")[3].startswith("error: ") and "cannot decode image" in lines[3]
    assert "1 with unreadable files" in capsys.readouterr().out

    record = read_thresholds(run)  # the newest eval of the run
    other = make_run(tmp_path / "other", IResNet, {**FACE_ARGS, "width": 16})
    with pytest.raises(ValueError, match="computed with another model"):
        from mlearn.export import export_model

        export_model(other, "onnx", tmp_path / "other.onnx", thresholds=record["source"])
    assert not (tmp_path / "other.onnx").exists()


def test_eval_pair_list_counts_unreadable_files(face_setup):
    root, run, data = face_setup
    pairs = root / "list.txt"
    lines = [f"faces/id{i}/0.png faces/id{i}/1.png 1" for i in range(8)]
    lines += [f"faces/id{i}/2.png faces/id{(i + 1) % 8}/3.png 0" for i in range(8)]
    lines.append("faces/id0/broken.jpg faces/id1/1.png 0")
    pairs.write_text("\n".join(lines) + "\n")
    rows = run_protocol(load_model(run), {"pairs": "list.txt", "bootstrap": 0, "fars": [0.2]}, root, 16)
    row = rows[0].values
    assert row["mode"] == "pairs" and row["genuine_pairs"] == 8 and row["impostor_pairs"] == 8
    assert row["skipped_pairs"] == 1 and row["unreadable_files"] == 1 and "rank_1" not in row
    assert row["thresholds"] == {} and row["far_not_reported"] == [0.2]  # 8 impostors < 10 / 0.2


@pytest.mark.parametrize("setup, message", [
    ("missing", "nowhere not found (expected a folder"),
    ("one_identity", "needs at least 2 identity folders"),
])
def test_bad_folder_is_one_error_line(face_setup, tmp_path, capsys, setup, message):
    _, run, data = face_setup
    folder = tmp_path / "nowhere"
    if setup == "one_identity":
        import shutil

        shutil.copytree(data / "id1", tmp_path / "solo" / "only")
        folder = tmp_path / "solo"
    assert cli.main(["eval", "--model", str(run), "--folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_malformed_pair_list_is_one_error_line(face_setup, tmp_path, capsys):
    _, run, _ = face_setup
    pairs = tmp_path / "p.txt"
    pairs.write_text("a.png b.png 1\na.png b.png maybe\n")
    assert cli.main(["eval", "--model", str(run), "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{pairs}:2: expected" in err[0], err


# --------------------------------------------------------------------------------- audio waveforms


def test_audio_model_embeds_waveforms_like_wav_files(tmp_path):
    import soundfile as sf

    from mlearn.inference_audio import embed_wavs

    run = make_run(tmp_path / "spk", ECAPA_TDNN, AUDIO_ARGS)
    model = load_model(run, device="cpu")
    rng = np.random.default_rng(0)
    waves = [(rng.uniform(-0.5, 0.5, n) * 32767).astype(np.int16) for n in (8000, 8000, 12345)]
    paths = []
    for i, wave in enumerate(waves):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], wave, 16000, subtype="PCM_16")
    from_files, ok, _ = embed_wavs(model, paths, progress=False)
    assert ok.all()
    expected = l2_normalize(from_files["model"])
    as_int16 = model.embed(waves)
    as_float = model.embed([w.astype(np.float32) / 32768 for w in waves])
    np.testing.assert_allclose(as_int16, expected, atol=1e-5)
    np.testing.assert_allclose(as_float, expected, atol=1e-5)
    np.testing.assert_allclose(model.embed(waves[2]), expected[2:], atol=1e-5)
    np.testing.assert_allclose(model.embed_waveforms(torch.from_numpy(waves[1])), expected[1:2], atol=1e-5)
    with pytest.raises(ValueError, match="8000 Hz; this model's fbank expects 16000 Hz"):
        model.embed_waveforms(waves[0], sample_rate=8000)
    with pytest.raises(ValueError, match="expected float audio in \\[-1, 1\\]"):
        model.embed(waves[0].astype(np.float32))
    with pytest.raises(ValueError, match="too short"):
        model.embed(np.zeros(100, np.float32))

    trials = tmp_path / "trials.txt"
    trials.write_text("1 0.wav 1.wav\n0 0.wav 2.wav\n0 1.wav 2.wav\n1 2.wav 2.wav\n")
    row = run_protocol(model, {"trials": str(trials), "bootstrap": 0, "fars": [0.5]}, tmp_path, 8)[0].values
    assert row["mode"] == "trials" and row["trial_format"] == "official" and row["genuine_pairs"] == 2

    for speaker in ("spk1", "spk2", "spk3"):  # VoxCeleb layout <speaker>/<video>/<utt>.wav
        for i in range(3):
            (tmp_path / "voices" / speaker / "v").mkdir(parents=True, exist_ok=True)
            sf.write(tmp_path / "voices" / speaker / "v" / f"{i}.wav", rng.uniform(-0.3, 0.3, 6000), 16000)
    (tmp_path / "voices" / "spk1" / "v" / "empty.wav").write_bytes(b"")
    row = run_protocol(model, {"folder": "voices", "bootstrap": 0, "fars": [0.5]}, tmp_path, 8)[0].values
    assert row["identities"] == 3 and row["genuine_pairs"] == 9 and row["impostor_pairs"] == 27
    assert row["unreadable_files"] == 1 and "spk1/v/empty.wav" in row["unreadable"]
