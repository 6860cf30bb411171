"""Retrieval metrics against a brute-force ranking written here, a hand-computed toy case, and the
protocol."""
import doctest

import cv2
import numpy as np
import pytest

from mlearn.evaluation.metrics import retrieval, search
from mlearn.evaluation.metrics.retrieval import drop_self, retrieval_metrics
from mlearn.evaluation.protocols.retrieval import run_protocol


def brute_force(q, ql, g, gl, ks, exclude_self, depth=None):
    """Full argsort of the float64 cosine matrix; metrics per query from their definitions."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    ql, gl = np.asarray(ql), np.asarray(gl)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    per_query = {f"recall@{k}": [] for k in ks}
    per_query.update({"map": [], "map@r": [], "r_precision": [], "map@depth": []})
    dropped = 0
    for i in range(len(q)):
        order = np.argsort(-sim[i], kind="stable")
        if exclude_self:
            order = order[order != i]
        relevant = gl[order] == ql[i]
        r = int(relevant.sum())
        if r == 0:
            dropped += 1
            continue
        ranks = np.flatnonzero(relevant) + 1
        precision = np.arange(1, r + 1) / ranks
        for k in ks:
            per_query[f"recall@{k}"].append(ranks[0] <= k)
        per_query["map"].append(precision.mean())
        per_query["map@r"].append(precision[ranks <= r].sum() / r)
        per_query["r_precision"].append((ranks <= r).sum() / r)
        if depth:  # PML mean_average_precision with k = depth: divided by the relevant items retrieved
            inside = ranks <= depth
            per_query["map@depth"].append(precision[inside].sum() / max(1, inside.sum()))
    out = {k: float(np.mean(v)) for k, v in per_query.items() if v}
    out.update(num_queries=len(per_query["map"]), num_dropped=dropped)
    return out


def min_relevant_gap(q, ql, g, gl, exclude_self):
    """Smallest |s(relevant) - s(irrelevant)| of any query: above ~1e-6 float32 rounding cannot reorder
    them."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    gap = np.inf
    for i in range(len(q)):
        same = np.asarray(gl) == np.asarray(ql)[i]
        if exclude_self:
            same[i] = False
        others = ~same
        if exclude_self:
            others[i] = False
        if same.any() and others.any():
            gap = min(gap, np.abs(sim[i, same][:, None] - sim[i, others][None, :]).min())
    return gap


def imbalanced(rng, n, classes, dim=16):
    """Random embeddings around class centres; class sizes fall off geometrically (some singletons)."""
    p = 0.8 ** np.arange(classes)
    labels = rng.choice(classes, n, p=p / p.sum())
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32), labels


def assert_matches(got, expected, keys):
    for key in keys:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


METRICS = ["recall@1", "recall@5", "recall@10", "map", "map@r", "r_precision", "num_queries", "num_dropped"]


def test_query_vs_gallery_matches_brute_force():
    rng = np.random.default_rng(0)
    g, gl = imbalanced(rng, 150, 14)
    q, ql = imbalanced(rng, 60, 18)  # labels 14..17 have no gallery item: dropped
    assert min_relevant_gap(q, ql, g, gl, False) > 1e-6
    got = retrieval_metrics(q, ql, g, gl)
    expected = brute_force(q, ql, g, gl, (1, 5, 10), False)
    assert_matches(got, expected, METRICS)
    assert got["num_dropped"] > 0 and 0.1 < got["map"] < 0.9


def test_exclude_self_matches_brute_force_and_drops_singletons():
    rng = np.random.default_rng(4)
    x, labels = imbalanced(rng, 120, 12)
    labels[7] = 99  # a singleton class: lone, dropped, but still an irrelevant gallery item for the others
    assert min_relevant_gap(x, labels, x, labels, True) > 1e-6
    got = retrieval_metrics(x, labels, x, labels, exclude_self=True)
    expected = brute_force(x, labels, x, labels, (1, 5, 10), True)
    assert_matches(got, expected, METRICS)
    singletons = sum(np.sum(labels == c) == 1 for c in np.unique(labels))
    assert got["num_dropped"] == singletons >= 1
    assert got["num_queries"] == 120 - singletons


def test_exact_duplicate_stays_a_match_when_self_is_excluded_by_index():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    labels = np.arange(30) // 3
    labels[29] = 0  # class 0 = items 0, 1, 2, 29, with 29 an exact copy of 0
    x[29] = x[0]
    x[1:3] = -x[0] + 0.1 * rng.normal(size=(2, 8))  # far from 0: only the duplicate can rank first
    got = retrieval_metrics(x, labels, x, labels, ks=(1,), exclude_self=True)
    expected = brute_force(x, labels, x, labels, (1,), True)
    assert_matches(got, expected, ["recall@1", "map", "map@r", "r_precision", "num_queries"])
    one = retrieval_metrics(x[[0]], [0], np.delete(x, 0, axis=0), np.delete(labels, 0), ks=(1,))
    assert one["recall@1"] == 1.0  # query 0 finds its duplicate first, as in the leave-one-out run


def test_drop_self_follows_pml_rule():
    ids = np.array([[4, 0, 7], [1, 5, 6], [9, 8, 2]])
    # row 0: self 0 at column 1; row 1: self 1 first; row 2: self 2 last;
    # row 3 (self 3) absent -> last dropped
    out = drop_self(np.vstack([ids, [[5, 6, 7]]]), np.array([0, 1, 2, 3]))
    assert out.tolist() == [[4, 7], [5, 6], [9, 8], [5, 6]]


def toy():
    """3 classes x 3 items + one singleton on the unit circle (angles in degrees, no tied distances)."""
    angles = np.radians([0, 23, 71, 42, 103, 117, 181, 209, 247, 298])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    return x, np.array(list("AAABBBCCCD"))


def test_toy_case_hand_computed():
    x, labels = toy()
    got = retrieval_metrics(x, labels, x, labels, ks=(1, 3), exclude_self=True)
    # ranks of the two relevant items per query (self excluded; D at 298 deg is lone and dropped):
    #   q0 A: 1, 4   q1 A: 2, 3   q2 A: 4, 5   q3 B: 4, 5   q4 B: 1, 3
    #   q5 B: 1, 4   q6 C: 1, 3   q7 C: 1, 2   q8 C: 1, 3
    # AP = (1/rank_1 + 2/rank_2) / 2: 3/4, 7/12, 13/40, 13/40, 5/6, 3/4, 5/6, 1, 5/6 -> sum 748/120
    # MAP@R (only ranks <= 2 count): 1/2, 1/4, 0, 0, 1/2, 1/2, 1/2, 1, 1/2 -> sum 15/4
    # R-precision: 1/2, 1/2, 0, 0, 1/2, 1/2, 1/2, 1, 1/2 -> sum 4
    assert got["num_queries"] == 9 and got["num_dropped"] == 1
    assert got["recall@1"] == pytest.approx(6 / 9)
    assert got["recall@3"] == pytest.approx(7 / 9)
    assert got["map"] == pytest.approx(748 / 120 / 9)
    assert got["map@r"] == pytest.approx(15 / 4 / 9)
    assert got["r_precision"] == pytest.approx(4 / 9)


@pytest.mark.parametrize("dense_fraction", [1, 10**9], ids=["sparse", "dense"])
def test_sharded_search_and_small_blocks_give_the_same_numbers(monkeypatch, dense_fraction):
    rng = np.random.default_rng(7)
    g, gl = imbalanced(rng, 200, 10)
    q, ql = imbalanced(rng, 50, 10)
    x, xl = g[:100], gl[:100]  # leave-one-out set
    assert min_relevant_gap(q, ql, g, gl, False) > 1e-6 and min_relevant_gap(x, xl, x, xl, True) > 1e-6
    expected = brute_force(q, ql, g, gl, (1, 5, 10), False)
    # shards of 30 gallery rows, 7-query super-blocks, full-ranking blocks of <= 150 relevant pairs, and
    # gallery chunks of 512 // 16 = 32 rows
    monkeypatch.setattr(search, "SHARD_ELEMENTS", 30 * 16)
    monkeypatch.setattr(retrieval, "KNN_ENTRIES", 7 * 11)
    monkeypatch.setattr(retrieval, "RELEVANT_ENTRIES", 150)
    monkeypatch.setattr(search, "BLOCK_ELEMENTS", 512)
    # full-ranking counting: 1 -> never the dense path (candidates only), 10**9 -> always dense
    monkeypatch.setattr(retrieval, "DENSE_FRACTION", dense_fraction)
    got = retrieval_metrics(q, ql, g, gl, batch_size=3)
    assert_matches(got, expected, METRICS)
    both = retrieval_metrics(x, xl, x, xl, batch_size=8, exclude_self=True)
    assert_matches(both, brute_force(x, xl, x, xl, (1, 5, 10), True), METRICS)


def test_truncated_metrics_at_depth():
    rng = np.random.default_rng(4)
    g, gl = imbalanced(rng, 150, 8)
    q, ql = imbalanced(rng, 40, 8)
    assert min_relevant_gap(q, ql, g, gl, False) > 1e-6
    with pytest.warns(UserWarning, match="below the largest R"):
        got = retrieval_metrics(q, ql, g, gl, ks=(1, 5), full_map=False, depth=12)
    assert "map" not in got and "map@12" in got
    expected = brute_force(q, ql, g, gl, (1, 5), False, depth=12)
    assert got["map@12"] == pytest.approx(expected["map@depth"], abs=1e-9)
    # relevant items beyond depth 12 count as missed in MAP@R and R-precision (R is up to ~40 here)
    assert got["map@r"] <= expected["map@r"] + 1e-12 and got["r_precision"] <= expected["r_precision"] + 1e-12
    full = retrieval_metrics(q, ql, g, gl, ks=(1, 5), full_map=False)  # default depth = max R: exact
    assert_matches(full, expected, ["recall@1", "recall@5", "map@r", "r_precision"])


def test_ties_count_against_the_relevant_item():
    x = np.ones((6, 4), np.float32)  # constant embeddings: every score ties
    labels = np.array([0, 0, 1, 1, 2, 2])
    got = retrieval_metrics(x, labels, x, labels, ks=(1,), exclude_self=True)
    assert got["map"] == pytest.approx(1 / 5)  # the single relevant item ranks last of 5
    assert got["map@r"] == 0.0 and got["r_precision"] == 0.0


def clustered(rng, classes=40, per_class=25, queries_per_class=4, dim=32):
    centres = rng.normal(size=(classes, dim))
    gl = np.repeat(np.arange(classes), per_class)
    ql = np.repeat(np.arange(classes), queries_per_class)
    g = centres[gl] + 1.2 * rng.normal(size=(len(gl), dim))
    q = centres[ql] + 1.2 * rng.normal(size=(len(ql), dim))
    return q.astype(np.float32), ql, g.astype(np.float32), gl


@pytest.mark.parametrize("index, options", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {"hnsw_m": 16})])
def test_approximate_indexes_are_close_to_exact(index, options):
    q, ql, g, gl = clustered(np.random.default_rng(5))
    exact = retrieval_metrics(q, ql, g, gl)
    approx = retrieval_metrics(q, ql, g, gl, index=index, **options)
    assert "map" not in approx and "map@25" in approx  # depth = max R = 25
    assert approx["recall@1"] == pytest.approx(exact["recall@1"], abs=0.03)
    assert approx["map@r"] == pytest.approx(exact["map@r"], abs=0.05)
    # full_map=True scores the whole gallery exactly whatever the index
    exact_map = retrieval_metrics(q, ql, g, gl, index=index, full_map=True, **options)
    assert exact_map["map"] == pytest.approx(exact["map"], abs=1e-9)


def test_bad_input_gives_clear_errors():
    x = np.zeros((5, 4), np.float32) + 1
    labels = np.arange(5) % 2
    with pytest.raises(ValueError, match="query: expected a 2-D array"):
        retrieval_metrics(x[0], labels[:1], x, labels)
    with pytest.raises(ValueError, match="query_labels: 4 labels for 5 embeddings"):
        retrieval_metrics(x, labels[:4], x, labels)
    with pytest.raises(ValueError, match="dimension 3 but gallery has 4"):
        retrieval_metrics(x[:, :3], labels, x, labels)
    with pytest.raises(ValueError, match="k=6 is larger than the gallery"):
        retrieval_metrics(x, labels, x, labels, ks=(1, 6))
    with pytest.raises(ValueError, match="k=5 is larger than the gallery .*minus the query itself"):
        retrieval_metrics(x, labels, x, labels, ks=(5,), exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=True needs the query set to be the gallery"):
        retrieval_metrics(x[:4], labels[:4], x, labels, ks=(1,), exclude_self=True)
    with pytest.raises(ValueError, match="not finite"):
        retrieval_metrics(np.full((2, 4), np.nan, np.float32), [0, 1], x, labels, ks=(1,))
    with pytest.raises(KeyError, match="unknown retrieval index 'annoy'"):
        retrieval_metrics(x, labels, x, labels, ks=(1,), index="annoy")
    if not search.gpu_available():
        with pytest.raises(ValueError, match="use_gpu=True but faiss has no GPU"):
            retrieval_metrics(x, labels, x, labels, ks=(1,), use_gpu=True)


def test_all_lone_queries_give_nan():
    x = np.eye(3, dtype=np.float32)
    with pytest.warns(UserWarning, match="every query is lone"):
        got = retrieval_metrics(x, [5, 6, 7], x, [0, 1, 2], ks=(1,))
    assert np.isnan(got["map"]) and got["num_queries"] == 0 and got["num_dropped"] == 3


@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not search.gpu_available():
        pytest.skip("needs faiss with GPU support and CUDA")
    q, ql, g, gl = clustered(np.random.default_rng(6))
    cpu = retrieval_metrics(q, ql, g, gl, use_gpu=False)
    gpu = retrieval_metrics(q, ql, g, gl, use_gpu=True)
    assert_matches(gpu, cpu, ["recall@1", "recall@5", "map", "map@r", "r_precision"])


def test_docstring_examples_run():
    result = doctest.testmod(retrieval)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------- protocol

# two pairs of close colours, so that the ranking is imperfect
COLOURS = {"amber": (230, 160, 20), "gold": (220, 170, 35), "blue": (20, 60, 220), "navy": (35, 50, 200)}


class MeanColourModel:
    """Stands in for an Embedder: embedding = mean RGB colour of the (resized) image."""

    spec = {"modality": "image", "input_size": [8, 8]}
    modality = "image"

    def embed(self, batch, normalize=False):
        assert batch.dtype == np.uint8 and batch.shape[1:] == (8, 8, 3) and not normalize
        return batch.reshape(len(batch), -1, 3).mean(1).astype(np.float32)


def write_folder(root, rng, per_class=4, size=8):
    """root/<colour>/<i>.png: noisy images of each colour (one larger, resized by the loader); one corrupt."""
    features, labels = [], []
    for name, colour in sorted(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = size * 2 if i == 0 else size
            image = np.clip(np.array(colour) + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{i}.png"), image[:, :, ::-1])  # cv2 writes BGR
            small = image if side == size else cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            features.append(small.reshape(-1, 3).mean(0))
            labels.append(name)
    (root / "navy" / "broken.jpg").write_bytes(b"not an image")
    return np.array(features, np.float32), np.array(labels)


def test_run_protocol_leave_one_out_on_an_image_folder(tmp_path):
    features, labels = write_folder(tmp_path / "faces", np.random.default_rng(7))
    protocol = {"type": "retrieval", "name": "tiny", "query": "faces", "ks": [1, 3]}
    rows = run_protocol(MeanColourModel(), protocol, tmp_path, batch_size=5)
    assert len(rows) == 1
    row = rows[0]
    assert row["unreadable"] == {"query": 1, "gallery": 0}
    assert row["queries"] == row["gallery"] == len(labels) == 16
    assert min_relevant_gap(features, labels, features, labels, True) > 1e-6
    expected = brute_force(features, labels, features, labels, (1, 3), True)
    assert expected["map"] < 1.0  # the close colours make the ranking imperfect
    assert_matches(row, expected, ["recall@1", "recall@3", "map", "map@r", "r_precision", "num_queries"])
    assert list(row.table) == ["benchmark", "method", "queries", "gallery", "R@1", "R@3", "mAP", "mAP@R"]
    assert row.table["mAP"] == f"{expected['map'] * 100:.2f}"
    assert row["fusion"] == "none" and row["protocol"].startswith("leave-one-out")


def test_run_protocol_list_queries_against_a_folder_gallery(tmp_path):
    features, labels = write_folder(tmp_path / "gallery", np.random.default_rng(8))
    rng = np.random.default_rng(9)
    lines, query_features = [], []
    for j, (name, colour) in enumerate(sorted(COLOURS.items())[:3]):  # queries of 3 of the 4 identities
        image = np.clip(np.array(colour) + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / f"q{j}.png"), image[:, :, ::-1])
        lines.append(f"q{j}.png {name}")
        query_features.append(image.reshape(-1, 3).mean(0))
    lines.append("q9.png purple")  # an identity absent from the gallery: lone query, dropped
    cv2.imwrite(str(tmp_path / "q9.png"), np.zeros((8, 8, 3), np.uint8) + 100)
    (tmp_path / "probe.txt").write_text("\n".join(lines) + "\n")
    protocol = {"type": "retrieval", "name": "probe", "query": "probe.txt", "gallery": "gallery",
                "ks": [1, 2], "flip": True}
    row = run_protocol(MeanColourModel(), protocol, tmp_path, batch_size=8)[0]
    query = np.vstack([query_features, [[100, 100, 100]]]).astype(np.float32)
    query_labels = np.array([line.split()[1] for line in lines])
    expected = brute_force(query, query_labels, features, labels, (1, 2), False)
    assert_matches(row, expected, ["recall@1", "recall@2", "map", "map@r", "r_precision", "num_queries"])
    assert row["num_dropped"] == 1 and row["fusion"] == "flip-sum" and row["unreadable"]["gallery"] == 1


def test_run_protocol_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['metric'\]"):
        run_protocol(MeanColourModel(), {"type": "retrieval", "query": "x", "metric": "l2"}, tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="missing_set not found"):
        run_protocol(MeanColourModel(), {"type": "retrieval", "name": "a", "query": "missing_set"},
                     tmp_path, 4)


def test_run_protocol_refuses_a_single_identity(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "one" / "amber").mkdir(parents=True)
    for i in range(12):  # every neighbour would be a match: 100% whatever the model
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "one" / "amber" / f"{i}.png"), image)
    with pytest.raises(ValueError, match=r"solo: .*one holds a single identity \('amber'\); retrieval needs"):
        run_protocol(MeanColourModel(), {"type": "retrieval", "name": "solo", "query": "one"}, tmp_path, 4)
