"""IJB-B/C evaluation: readers, alignment, template pooling, 1:1 and 1:N against independent computations."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict

import cv2
import numpy as np
import pytest

from mlearn.data.images.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from mlearn.evaluation.metrics import ijb
from mlearn.evaluation.metrics.ijb import (
    identification_1n,
    open_set_identification,
    pair_scores,
    template_features,
)
from mlearn.evaluation.protocols.ijb import identification_row, run_protocol, score_ijb, verification_rows
from mlearn.evaluation.protocols.ijb_meta import (
    SUBSETS,
    load_ijb_meta,
    read_1n_csv,
    read_face_tid_mid,
    read_name_5pts_score,
    read_template_pairs,
)
from mlearn.evaluation.protocols.options import accepted_keys

# ------------------------------------------------------------------------------ synthetic IJB set


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty],
                     [0, 0, 1.0]])


def make_ijb(root: Path, seed: int = 0) -> Dict[str, np.ndarray]:
    """A tiny IJBC folder: 6 subjects x 3 templates, 1-3 medias per template, 1-3 frames per media
    (media ids reused across templates), 48x48 JPEG crops with landmarks, all template pairs, and
    1:N CSVs (G1: subjects 101-103, G2: 104-106, probes: the other templates, one row per image)."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    subjects = np.arange(101, 107)
    template_ids = rng.choice(np.arange(1, 500), size=18, replace=False)
    template_subject = np.repeat(subjects, 3)
    rows = []  # (template, media, subject)
    for t, s in zip(template_ids, template_subject):
        for m in rng.choice(np.arange(1, 12), size=rng.integers(1, 4), replace=False):
            rows += [(t, m, s)] * int(rng.integers(1, 4))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # templates interleaved in file order
    names, lines_tid, lines_5pts = [], [], []
    for k, (t, m, s) in enumerate(rows):
        name = f"{k + 1}.jpg"
        colour = np.array([(s * 37) % 256, (s * 91) % 256, (s * 53) % 256], np.float64)
        image = np.clip(colour + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "loose_crop" / name), image)
        matrix = _similarity(rng.uniform(2.5, 3.5), rng.uniform(-15, 15), *rng.uniform(-3, 3, 2))
        inverse = np.linalg.inv(matrix)
        points = ARCFACE_TEMPLATE @ inverse[:2, :2].T + inverse[:2, 2] + rng.normal(0, 0.3, (5, 2))
        score = rng.uniform(0.1, 1.0)
        names.append(name)
        lines_tid.append(f"{name} {t} {m}")
        lines_5pts.append(name + " " + " ".join(f"{v:.3f}" for v in points.ravel()) + f" {score:.3f}")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(lines_tid) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines_5pts) + "\n")
    i, j = np.triu_indices(len(template_ids), 1)
    order = rng.permutation(len(i))
    pairs = np.stack([template_ids[i[order]], template_ids[j[order]]], 1)
    labels = (template_subject[i[order]] == template_subject[j[order]]).astype(int)
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for (a, b), c in zip(pairs, labels)))
    gallery = {"G1": template_ids[[0, 3, 6]], "G2": template_ids[[9, 12, 15]]}
    in_gallery = set(gallery["G1"]) | set(gallery["G2"])
    for key, tids in [("gallery_G1", gallery["G1"]), ("gallery_G2", gallery["G2"]),
                      ("probe_mixed", [t for t in template_ids if t not in in_gallery])]:
        csv = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        for t in tids:
            csv += [f"{t},{s},img/{k}.jpg" for k, (tt, _, s) in enumerate(rows) if tt == t]
        (root / "meta" / f"ijbc_1N_{key}.csv").write_text("\n".join(csv) + "\n")
    rows_arr = np.array(rows)
    return {"names": np.array(names), "templates": rows_arr[:, 0], "medias": rows_arr[:, 1],
            "subjects": rows_arr[:, 2], "pairs": pairs, "labels": labels, "template_ids": template_ids,
            "template_subject": template_subject}


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "IJBC"
    return root, make_ijb(root)


class FakeModel:
    """Deterministic image model: 16x16 block means of the aligned crop, through a fixed projection."""

    modality = "image"

    def __init__(self) -> None:
        self.projection = np.random.default_rng(7).normal(size=(7 * 7 * 3, 16)).astype(np.float32)

    def embed(self, batch: np.ndarray, normalize: bool = True) -> np.ndarray:
        assert not normalize and batch.dtype == np.uint8 and batch.shape[1:] == (112, 112, 3)
        blocks = batch.reshape(len(batch), 7, 16, 7, 16, 3).mean((2, 4)).reshape(len(batch), -1)
        return ((blocks - 128.0) @ self.projection).astype(np.float32)


# ------------------------------------------------------------------------------ naive references


def naive_template_features(feats, templates, medias, weights):
    """insightface's per-template loop: mean per media, sum of medias, L2 (float64)."""
    out = {}
    for t in sorted(set(templates.tolist())):
        rows = [i for i in range(len(templates)) if templates[i] == t]
        media_vectors = []
        for m in sorted(set(medias[rows].tolist())):
            frames = [i for i in rows if medias[i] == m]
            media_vectors.append(np.mean([feats[i].astype(np.float64) * weights[i] for i in frames], axis=0))
        v = np.sum(media_vectors, axis=0)
        out[t] = v / np.linalg.norm(v)
    return out


def brute_roc(scores, labels):
    """ROC points over distinct thresholds, sklearn's drop_intermediate rule, (0, 0) prepended."""
    pos, neg = labels == 1, labels == 0
    thresholds = np.unique(scores)[::-1]
    tps = np.array([np.sum(pos & (scores >= t)) for t in thresholds])
    fps = np.array([np.sum(neg & (scores >= t)) for t in thresholds])
    if len(tps) > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[keep], fps[keep]
    return np.r_[0, fps] / neg.sum(), np.r_[0, tps] / pos.sum()


def brute_tar(scores, labels, far):
    fpr, tpr = brute_roc(scores, labels)
    distance = np.abs(fpr - far)
    nearest = float(tpr[distance == distance.min()].max())  # ties: larger FPR, then larger TPR
    # strict: every threshold (no dropped points), max TPR with FPR <= far
    pos, neg = labels == 1, labels == 0
    strict = max(np.mean(scores[pos] >= t) for t in np.r_[np.unique(scores), np.inf]
                 if np.mean(scores[neg] >= t) <= far)
    return nearest, float(strict)


# ---------------------------------------------------------------------------------------- readers


def test_readers_parse_the_synthetic_set(ijbc):
    root, truth = ijbc
    names, templates, medias = read_face_tid_mid(root / "meta" / "ijbc_face_tid_mid.txt")
    assert names.tolist() == truth["names"].tolist()
    np.testing.assert_array_equal(templates, truth["templates"])
    np.testing.assert_array_equal(medias, truth["medias"])
    names5, landmarks, scores = read_name_5pts_score(root / "meta" / "ijbc_name_5pts_score.txt")
    assert names5.tolist() == truth["names"].tolist() and landmarks.shape == (len(names), 5, 2)
    assert landmarks.dtype == np.float32 and ((0.1 <= scores) & (scores <= 1.0)).all()
    first = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().split("\n")[0].split()
    np.testing.assert_allclose(landmarks[0].ravel(), [float(v) for v in first[1:11]], rtol=1e-6)
    t1, t2, labels = read_template_pairs(root / "meta" / "ijbc_template_pair_label.txt")
    np.testing.assert_array_equal(np.stack([t1, t2], 1), truth["pairs"])
    np.testing.assert_array_equal(labels, truth["labels"])
    g1_t, g1_s = read_1n_csv(root / "meta" / "ijbc_1N_gallery_G1.csv")
    assert set(g1_t.tolist()) == set(truth["template_ids"][[0, 3, 6]].tolist())
    assert set(g1_s.tolist()) == {101, 102, 103}
    meta = load_ijb_meta(root, "IJBC", one_to_n=True)
    assert sorted(meta.galleries) == ["G1", "G2"] and len(np.unique(meta.probes[0])) == 12


def test_reader_handles_crlf_tabs_and_missing_final_newline(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"1 2 1\r\n3\t4 0\r\n 5 6 1")
    t1, t2, labels = read_template_pairs(path)
    assert t1.tolist() == [1, 3, 5] and t2.tolist() == [2, 4, 6] and labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("reader, text, where", [
    (read_template_pairs, "1 2 1\n5 x 1\n3 4 0\n", ":2: cannot parse"),
    (read_template_pairs, "1 2 1\n3 4 0\n5 6 0 7\n", ":3: expected 3"),
    (read_template_pairs, "1 2 1\n3 4 0\n\n5 6 1\n", ":3: expected 3"),
    (read_template_pairs, "1 2 1\n3 4 2\n", ":2: label must be 1"),
    (read_template_pairs, "1 2 1\n3 4 1.0\n", ":2: cannot parse"),
    (read_face_tid_mid, "a.jpg 1 2\nb.jpg 3\n", ":2: expected 3"),
    (read_face_tid_mid, "a.jpg 1 2\nb.jpg 3 4\nc.jpg 5 6q\n", ":3: cannot parse"),
    (read_name_5pts_score, "a.jpg " + "1 " * 11 + "\nb.jpg " + "1 " * 9 + "abc 1\n", ":2: cannot parse"),
    (read_name_5pts_score, "a.jpg " + "1 " * 10 + "\n", ":1: expected 12"),
    (read_1n_csv, "TEMPLATE_ID,SUBJECT_ID\n1,2\n3;4\n", ":3: expected"),
    (read_1n_csv, "1,2\n3,4\n", ":1: expected a header"),
])
def test_malformed_meta_names_the_file_and_line(tmp_path, reader, text, where):
    path = tmp_path / "meta_file.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match="meta_file.txt" + where):
        reader(path)


def test_inconsistent_meta_files_are_reported(ijbc, tmp_path):
    root, _ = ijbc
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    lines = (bad / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
    lines[2] = "other.jpg" + lines[2][lines[2].index(" "):]
    (bad / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="line 3: .*other.jpg"):
        load_ijb_meta(bad, "IJBC")
    shutil.copy(root / "meta" / "ijbc_name_5pts_score.txt", bad / "meta")
    with open(bad / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("99999 1 0\n")
    n_pairs = len((bad / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines())
    with pytest.raises(ValueError, match=f"ijbc_template_pair_label.txt:{n_pairs}: template 99999"):
        load_ijb_meta(bad, "IJBC")


def test_missing_meta_file_gives_a_clear_error(ijbc, tmp_path):
    root, _ = ijbc
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    (bad / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"IJBC: .*ijbc_template_pair_label.txt not found \(see datasets/ijbc.md"):
        load_ijb_meta(bad, "IJBC")
    shutil.copy(root / "meta" / "ijbc_template_pair_label.txt", bad / "meta")
    (bad / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    load_ijb_meta(bad, "IJBC")  # 1:1 does not need the 1:N CSVs
    with pytest.raises(FileNotFoundError, match="ijbc_1N_gallery_G2.csv not found"):
        run_protocol(FakeModel(), {"type": "ijb", "name": "IJBC", "one_to_n": True}, tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="IJBB: .*nowhere not found .*datasets/ijbb.md"):
        run_protocol(FakeModel(), {"type": "ijb", "name": "IJBB", "path": "nowhere"}, tmp_path, 8)


def test_protocol_options_are_checked(tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown key\(s\) \['flip_test'\] for type ijb; accepted: .*'detector_score'"):
        run_protocol(FakeModel(), {"type": "ijb", "name": "IJBC", "flip_test": True}, tmp_path, 8)
    with pytest.raises(ValueError, match="name='IJBX'; expected one of \\['IJBB', 'IJBC'\\]"):
        run_protocol(FakeModel(), {"type": "ijb", "name": "ijbx"}, tmp_path, 8)


# -------------------------------------------------------------------------------------- alignment


def test_alignment_recovers_a_known_similarity():
    known = _similarity(0.8, 23.0, 5.5, -3.25)
    inverse = np.linalg.inv(known)
    src = ARCFACE_TEMPLATE @ inverse[:2, :2].T + inverse[:2, 2]
    np.testing.assert_allclose(similarity_transform(src, ARCFACE_TEMPLATE), known, atol=1e-9)


@pytest.mark.parametrize("mirror", [False, True])
def test_alignment_is_the_least_squares_similarity(mirror):
    rng = np.random.default_rng(4)
    src = ARCFACE_TEMPLATE * 1.7 + 20 + rng.normal(0, 2.0, (5, 2))
    if mirror:  # a reflected face: the best proper similarity, never a reflection
        src[:, 0] = -src[:, 0]
    got = similarity_transform(src, ARCFACE_TEMPLATE)
    # independent: linear least squares in (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty
    x, y = src[:, 0], src[:, 1]
    design = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1),
                             np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
    a, b, tx, ty = np.linalg.lstsq(design, np.concatenate([ARCFACE_TEMPLATE[:, 0], ARCFACE_TEMPLATE[:, 1]]),
                                   rcond=None)[0]
    np.testing.assert_allclose(got, [[a, -b, tx], [b, a, ty], [0, 0, 1]], atol=1e-9)
    assert np.linalg.det(got[:2, :2]) > 0


def test_align_face_warps_landmarks_onto_the_template_and_returns_rgb():
    known = _similarity(0.6, -12.0, 4.0, 9.0)
    inverse = np.linalg.inv(known)
    src = ARCFACE_TEMPLATE @ inverse[:2, :2].T + inverse[:2, 2]
    image = np.zeros((200, 190, 3), np.uint8)
    x, y = np.round(src[0]).astype(int)  # left eye: a pure blue (BGR) blob
    image[y - 3:y + 4, x - 3:x + 4] = (255, 0, 0)
    out = align_face(image, src)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    target = np.round(ARCFACE_TEMPLATE[0] + known[:2, :2] @ (np.round(src[0]) - src[0])).astype(int)
    assert out[target[1], target[0], 2] > 200 and out[target[1], target[0], 0] == 0  # blue is RGB channel 2
    assert out[..., 0].max() == 0 and out[..., 1].max() == 0
    with pytest.raises(ValueError, match="degenerate"):
        align_face(image, np.ones((5, 2)))


# ---------------------------------------------------------------------------------------- pooling


def test_template_pooling_matches_a_naive_per_template_loop():
    rng = np.random.default_rng(5)
    n = 400
    templates = rng.choice([3, 17, 42, 8, 1000, 5, 77, 12], size=n)
    medias = rng.integers(1, 15, size=n)  # media ids shared across templates
    feats = rng.normal(size=(n, 6)).astype(np.float32) * rng.uniform(0.5, 3.0, (n, 1)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, n)
    naive = naive_template_features(feats, templates, medias, weights)
    for chunk_rows in (7, 1 << 16):  # several chunks, one chunk
        ids, got = template_features(feats, templates, medias, weights, chunk_rows=chunk_rows)
        assert ids.tolist() == sorted(naive)
        np.testing.assert_allclose(got, np.stack([naive[t] for t in ids]), atol=1e-12)
    _, unweighted = template_features(feats, templates, medias)
    naive_one = naive_template_features(feats, templates, medias, np.ones(n))
    np.testing.assert_allclose(unweighted, np.stack([naive_one[t] for t in sorted(naive_one)]), atol=1e-12)


# -------------------------------------------------------------------------------------------- 1:1


def test_pair_scores_and_tar_match_brute_force():
    rng = np.random.default_rng(6)
    n_templates, subjects = 90, 15
    template_ids = np.sort(rng.choice(np.arange(10000), n_templates, replace=False))
    subject = rng.integers(0, subjects, n_templates)
    centers = rng.normal(size=(subjects, 8))
    feats = centers[subject] + rng.normal(0, 1.2, (n_templates, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    i, j = np.triu_indices(n_templates, 1)
    keep = rng.random(len(i)) < 0.7
    t1, t2 = template_ids[i[keep]], template_ids[j[keep]]
    labels = (subject[i[keep]] == subject[j[keep]]).astype(int)
    row_of = {t: k for k, t in enumerate(template_ids)}
    naive = np.array([float(np.dot(feats[row_of[a]], feats[row_of[b]])) for a, b in zip(t1, t2)])
    for method in ("dense", "gather", "auto"):
        got = pair_scores(template_ids, feats, t1, t2, method=method, batch_size=97, block_elements=500)
        np.testing.assert_allclose(got, naive, atol=1e-12)
    rows = verification_rows("synthetic 1:1", naive, labels, n_templates)
    assert [r["tar_rule"].split()[0] for r in rows] == ["nearest", "max"]
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        nearest, strict = brute_tar(naive, labels, far)
        assert rows[0]["tar_at_far"][far] == pytest.approx(nearest, abs=1e-12)
        assert rows[1]["tar_at_far"][far] == pytest.approx(strict, abs=1e-12)
    assert 0.0 < rows[0]["tar_at_far"][1e-2] < rows[0]["tar_at_far"][1e-1] < 1.0
    assert rows[0]["pairs"] == len(labels) and rows[0]["genuine"] == labels.sum()
    with pytest.raises(KeyError, match="pair template 123456 is not among the 90 templates"):
        pair_scores(template_ids, feats, np.array([123456]), t2[:1])


@pytest.mark.parametrize("offset", [0, 10**12, -50])  # lookup table / searchsorted paths
def test_template_index_finds_rows_and_names_unknown_ids(offset):
    ids = np.array([3, 8, 20, 21, 400]) + offset
    np.testing.assert_array_equal(ijb.template_index(ids, ids[[4, 0, 0, 2]]), [4, 0, 0, 2])
    for unknown in (offset - 1, offset + 9, offset + 401):
        with pytest.raises(KeyError, match=f"template {unknown} is not among the 5 templates"):
            ijb.template_index(ids, np.array([ids[1], unknown]))


def test_tar_tie_breaking_on_a_roc_with_repeated_fprs():
    # sorted scores: P P N P P N N N P, then 6 N tied -> (fps, tps): (0,1) (0,2) (1,2) (1,3) (1,4) (2,4)
    # (3,4) (4,4) (4,5) (10,5); sklearn drops (1,3) (2,4) (3,4)
    # -> FPR 0 0 0 .1 .1 .4 .4 1, TPR 0 .2 .4 .4 .8 .8 1 1
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.44, 0.43, 0.42] + [0.3] * 6)
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0, 1] + [0] * 6)
    fars = (1e-3, 0.05, 0.1, 0.3)
    rows = verification_rows("tie", scores, labels, 4, fars=fars)
    # 1e-3: FPR 0, largest TPR there; 0.05: FPR 0 and .1 equidistant -> the larger FPR; 0.1: exact, larger
    # TPR; 0.3: (.3, .8) was dropped, so the nearest point is FPR .4 (TPR 1) although it exceeds the target
    assert [rows[0]["tar_at_far"][f] for f in fars] == [0.4, 0.8, 0.8, 1.0]
    assert [rows[1]["tar_at_far"][f] for f in fars] == [0.4, 0.4, 0.8, 0.8]
    assert list(rows[0].table) == ["benchmark", "method", "TAR rule", "templates", "pairs", "TAR@1e-3",
                                       "TAR@5e-2", "TAR@1e-1", "TAR@3e-1"]
    assert rows[0].table["TAR@5e-2"] == "80.00" and rows[1].table["TAR@5e-2"] == "40.00"
    assert rows[1].table["TAR rule"] == "strict" and rows[1].scores is None



def test_strict_tar_with_tied_genuine_and_impostor_scores():
    scores = np.array([4, 4, 3, 3, 2, 2, 1, 1.0])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    rows = verification_rows("tie", scores, labels, 2, fars=(0.5,))
    assert rows[1]["tar_at_far"][0.5] == 0.5  # threshold 3 accepts 2 of 4 genuine and 2 of 4 impostors


# -------------------------------------------------------------------------------------------- 1:N


def test_open_set_identification_hand_worked_example():
    # gallery G1 = templates 1, 2, 3 (subjects 10, 20, 30); G2 = templates 4, 5 (subjects 40, 50).
    # Gallery features are unit vectors, so a probe's feature row is its score row over [1 2 3 | 4 5].
    probe_scores = {11: (10, [0.9, 0.2, 0.1, 0.3, 0.2]), 12: (20, [0.5, 0.4, 0.3, 0.1, 0.0]),
                    13: (30, [0.6, 0.7, 0.2, 0.4, 0.1]), 14: (10, [0.75, 0.1, 0.3, 0.2, 0.6]),
                    15: (20, [0.4, 0.4, 0.1, 0.0, 0.2]),  # mate ties a non-mate: not rank 1
                    16: (40, [0.85, 0.3, 0.2, 0.9, 0.1]), 17: (40, [0.3, 0.75, 0.1, 0.5, 0.6]),
                    18: (50, [0.2, 0.6, 0.1, 0.3, 0.8]), 19: (50, [0.1, 0.3, 0.2, 0.7, 0.65])}
    template_ids = np.array([1, 2, 3, 4, 5] + list(probe_scores))
    feats = np.concatenate([np.eye(5), [v for _, v in probe_scores.values()]])
    galleries = {"G1": (np.array([3, 1, 2, 1]), np.array([30, 10, 20, 10])),
                 "G2": (np.array([5, 4]), np.array([50, 40]))}
    # CSV-like probe rows: unsorted, repeated; a template's subject is the one of its first row
    probe_rows = [(t, s) for t, (s, _) in reversed(probe_scores.items())] + [(11, 99), (16, 99)]
    probes = (np.array([t for t, _ in probe_rows]), np.array([s for _, s in probe_rows]))
    got = identification_1n(template_ids, feats, galleries, probes, fpirs=(0.25, 0.5, 1.0), ranks=(1, 2, 3))
    g1, g2 = got["galleries"]["G1"], got["galleries"]["G2"]
    # G1: mated 11..15 with ranks 1 2 3 1 2; non-mated maxima .85 .75 .6 .3 (thresholds at indices 0, 1, 3)
    assert (g1["mated"], g1["non_mated"], g1["hits"]) == (5, 4, {1: 2, 2: 4, 3: 5})
    assert g1["threshold"] == {0.25: 0.85, 0.5: 0.75, 1.0: 0.3}
    assert g1["tpir"] == pytest.approx({0.25: 1 / 5, 0.5: 1 / 5, 1.0: 2 / 5})  # 14's mate .75 is not > .75
    # G2: mated 16..19 with ranks 1 2 1 2; non-mated maxima .6 .4 .3 .2 .1 (indices 0, 1, 4)
    assert (g2["mated"], g2["non_mated"], g2["hits"]) == (4, 5, {1: 2, 2: 4, 3: 4})
    assert g2["threshold"] == {0.25: 0.6, 0.5: 0.4, 1.0: 0.1}
    assert g2["tpir"] == pytest.approx({0.25: 0.5, 0.5: 0.5, 1.0: 0.5})
    assert got["probes"] == 9
    assert got["tpir"] == pytest.approx({0.25: 0.35, 0.5: 0.35, 1.0: 0.45})
    assert got["cmc"] == pytest.approx({1: 4 / 9, 2: 8 / 9, 3: 1.0})
    row = identification_row("toy 1:N", got)
    assert row.table == {"benchmark": "toy 1:N", "method": "model", "galleries": "G1+G2",
                             "gallery templates": "3+2", "probes": "9", "TPIR@FPIR=0.25": "35.00",
                             "TPIR@FPIR=0.5": "35.00", "TPIR@FPIR=1": "45.00", "rank-1": "44.44",
                             "rank-2": "88.89", "rank-3": "100.00"}
    with pytest.raises(ValueError, match="subject 10 has several gallery templates"):
        open_set_identification(np.zeros((2, 2)), np.array([10, 99]), np.array([10, 10]))


def test_default_fpir_floor_rule():
    # 150 non-mated maxima 1.49 ... 0.00: FPIR 0.01 -> index floor(1.5) - 1 = 0, FPIR 0.1 -> index 14
    non_mated = np.arange(150)[::-1] / 100
    # (the ceil variant would pick index 1, i.e. 1.48)
    mated = [[1.45, 0.0], [1.30, 0.0], [0.5, 0.9]]
    similarity = np.concatenate([np.stack([non_mated, np.zeros(150)], 1), mated])
    subjects = np.r_[np.full(150, 99), [1, 1, 1]]
    got = open_set_identification(similarity, subjects, np.array([1, 2]))
    assert got["threshold"] == {0.01: 1.49, 0.1: 1.35}
    assert got["tpir"] == pytest.approx({0.01: 0.0, 0.1: 1 / 3})
    assert got["cmc"] == pytest.approx({1: 2 / 3, 5: 1.0, 10: 1.0})


# ------------------------------------------------------------------------------------- end to end


def test_run_protocol_end_to_end_matches_a_naive_pipeline(ijbc):
    root, truth = ijbc
    model = FakeModel()
    protocol = {"type": "ijb", "name": "IJBC", "path": "IJBC", "one_to_n": True, "workers": 2}
    rows = run_protocol(model, protocol, root.parent, batch_size=7)
    assert [r["benchmark"] for r in rows] == ["IJBC 1:1", "IJBC 1:1", "IJBC 1:N"]
    # naive: read + align + embed each image alone, flip sum, per-template loop, per-pair dot product
    _, landmarks, det = read_name_5pts_score(root / "meta" / "ijbc_name_5pts_score.txt")
    feats = []
    for name, points in zip(truth["names"], landmarks):
        crop = align_face(cv2.imread(str(root / "loose_crop" / name)), points)
        feats.append(model.embed(crop[None], False)[0] + model.embed(crop[None, :, ::-1].copy(), False)[0])
    feats = np.stack(feats)
    naive = naive_template_features(feats, truth["templates"], truth["medias"], det)
    scores = np.array([naive[a] @ naive[b] for a, b in truth["pairs"]])
    np.testing.assert_allclose(rows[0].scores, scores, atol=1e-6)
    np.testing.assert_array_equal(rows[0].labels, truth["labels"])
    assert rows[0]["templates"] == 18 and rows[0]["pairs"] == 153 and rows[0]["genuine"] == 18
    assert rows[0]["fusion"] == "flip-sum" and rows[0]["detector_score"] is True
    for far in (1e-2, 1e-1):
        nearest, strict = brute_tar(rows[0].scores, truth["labels"], far)
        assert rows[0]["tar_at_far"][far] == nearest and rows[1]["tar_at_far"][far] == strict
    one_n = rows[2]
    assert one_n["probes"] == 12 and one_n["gallery_templates"] == {"G1": 3, "G2": 3}
    assert set(one_n.table) == {"benchmark", "method", "galleries", "gallery templates", "probes",
                                    "TPIR@FPIR=0.01", "TPIR@FPIR=0.1", "rank-1", "rank-5", "rank-10"}
    # pure scoring from the same features gives the same rows
    again = score_ijb(load_ijb_meta(root, "IJBC", one_to_n=True), feats)
    assert again[0]["tar_at_far"] == rows[0]["tar_at_far"] and again[2]["cmc"] == one_n["cmc"]
    plain = score_ijb(load_ijb_meta(root, "IJBC"), feats, detector_score=False, one_to_n=False)
    assert len(plain) == 2 and plain[0]["detector_score"] is False


def test_suite_yamls_name_known_options():
    import yaml

    for name in ("ijbb", "ijbc"):
        config = yaml.safe_load((Path(__file__).parents[1] / "evaluation" / f"{name}.yaml").read_text())
        for protocol in config["protocols"]:
            assert set(protocol) <= set(accepted_keys("ijb")) and protocol["name"].upper() in SUBSETS


@pytest.mark.parametrize("label, kind", [(1, "genuine (label 1)"), (0, "impostor (label 0)")])
def test_one_sided_pair_file_names_the_file(ijbc, tmp_path, label, kind):
    root, _ = ijbc
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    pairs = bad / "meta" / "ijbc_template_pair_label.txt"
    lines = pairs.read_text().splitlines()
    pairs.write_text("".join(" ".join(line.split()[:2]) + f" {label}\n" for line in lines))
    with pytest.raises(ValueError, match=rf"ijbc_template_pair_label.txt: all {len(lines)} pairs are "
                                         rf"{re.escape(kind)}; 1:1 verification needs both"):
        load_ijb_meta(bad, "IJBC")


@pytest.mark.parametrize("meta_file, columns", [("ijbc_face_tid_mid.txt", 3),
                                                ("ijbc_name_5pts_score.txt", 12),
                                                ("ijbc_template_pair_label.txt", 3)])
def test_meta_file_with_a_missing_column_names_the_file_and_line(ijbc, tmp_path, meta_file, columns):
    root, _ = ijbc
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    path = bad / "meta" / meta_file
    path.write_text("".join(" ".join(line.split()[:-1]) + "\n" for line in path.read_text().splitlines()))
    with pytest.raises(ValueError, match=rf"{meta_file}:1: expected {columns} whitespace-separated fields"):
        load_ijb_meta(bad, "IJBC")
