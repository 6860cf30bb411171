"""Quality on the IJB protocol (issue 20, point 3; docs/protocols.md g.5): EDC / ERC rows of the 1:1
pairs (template quality = mean of its images', pair quality = min of the two templates') and the
``pooling: quality`` rows, on the tiny IJB-C set of tests/test_ijb.py, checked against direct
computations."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_ijb import FakeModel, make_ijb, naive_template_features

from mlearn.data.images.align import align_face
from mlearn.evaluation.metrics.ijb import quality_pooling_weights
from mlearn.evaluation.metrics.quality import EDC, ERC, edc_curve, erc_curve, pair_quality
from mlearn.evaluation.protocols import ijb
from mlearn.evaluation.protocols.ijb_meta import load_ijb_meta, read_name_5pts_score
from mlearn.evaluation.protocols.options import build_options
from mlearn.evaluation.protocols.quality_eval import OUT_DIR_KEY


class QualityModel(FakeModel):
    """:class:`FakeModel` with a "quality head": the mean brightness of the crop's left half (so the
    mirrored crop would give another value)."""

    has_quality = True

    def embed(self, batch: np.ndarray, normalize: bool = True, with_quality=None):  # type: ignore[override]
        emb = super().embed(batch, normalize)
        if with_quality is None:
            return emb
        if with_quality == "norm":
            return emb, np.linalg.norm(emb.astype(np.float64), axis=1)
        return emb, self.head(batch)

    @staticmethod
    def head(batch: np.ndarray) -> np.ndarray:
        return batch[:, :, :56].reshape(len(batch), -1).mean(1) / 255.0


class NoHeadModel(QualityModel):
    has_quality = False


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "IJBC"
    return root, make_ijb(root)


def run_ijb(root, entry, out=None):
    options = build_options({"type": "ijb", "name": "IJBC", "path": "IJBC", "workers": 0, **entry})
    cache = None if out is None else {OUT_DIR_KEY: out}
    return ijb.run(QualityModel(), options, root.parent, 16, cache=cache)


def test_quality_rows_match_template_mean_and_pair_min(ijbc, tmp_path):
    root, truth = ijbc
    rows = run_ijb(root, {"quality": ["head", "norm"], "quality_fmrs": [0.1, 0.001]}, tmp_path)
    main, quality = rows[0], rows[2:]
    assert [r["benchmark"] for r in rows[:2]] == ["IJBC 1:1", "IJBC 1:1"]
    assert sorted((r["quality"], r["convention"]) for r in quality) == [
        ("head", EDC), ("head", ERC), ("norm", EDC), ("norm", ERC)]
    assert all(r["benchmark"] == "IJBC 1:1" and r["fmr"] == 0.1 for r in quality)
    assert "FMR 0.001 not reported: 135 impostor pairs" in main["quality_fmr_message"]
    assert main["quality"] == ["head", "norm"] and main["quality_rows"] == 4
    assert sorted(main["quality_figures"]) == sorted(p.name for p in tmp_path.glob("quality_*.png"))
    assert len(main["quality_figures"]) == 2 and all((tmp_path / r["figure"]).is_file() for r in quality)
    # by hand: quality of each unflipped aligned crop, mean per template, min per pair
    _, landmarks, _ = read_name_5pts_score(root / "meta" / "ijbc_name_5pts_score.txt")
    crops = np.stack([align_face(cv2.imread(str(root / "loose_crop" / n)), p)
                      for n, p in zip(truth["names"], landmarks)])
    model = QualityModel()
    raw = model.embed(crops, False)
    per_image = {"head": QualityModel.head(crops), "norm": np.linalg.norm(raw.astype(np.float64), axis=1)}
    for row in quality:
        q = per_image[row["quality"]]
        mean = {t: q[truth["templates"] == t].mean() for t in truth["template_ids"]}
        pq = pair_quality([mean[a] for a, _ in truth["pairs"]], [mean[b] for _, b in truth["pairs"]])
        if row["convention"] == EDC:
            np.testing.assert_allclose(row["fnmr"], edc_curve(main.scores, truth["labels"], pq, 0.1)["fnmr"],
                                       atol=1e-9)
        else:
            assert row["erc_auc"] == pytest.approx(erc_curve(main.scores, truth["labels"], pq, 0.1)["auc"])


def test_quality_pooling_is_its_own_row_and_matches_a_naive_loop(ijbc):
    root, truth = ijbc
    meta = load_ijb_meta(root, "IJBC")
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(len(meta.images), 8)).astype(np.float32)
    quality = rng.uniform(-0.2, 1.0, len(meta.images))  # some <= 0: those images get weight 0
    rows = ijb.score_ijb(meta, feats, one_to_n=False, qualities={"head": quality}, pooling="quality",
                         quality_fmrs=[0.1])
    assert [r.method for r in rows[:4]] == ["model", "model", "model, quality pooling (head)",
                                            "model, quality pooling (head)"]
    assert rows[2]["pooling_quality"] == "head" and rows[2]["pooling"] == ijb.QUALITY_POOLING
    assert rows[0]["pooling"] == ijb.POOLING and rows[3]["tar_rule"] == rows[1]["tar_rule"]
    assert not np.allclose(rows[2].scores, rows[0].scores)
    weights = meta.detector_scores * quality_pooling_weights(quality, meta.templates)
    naive = naive_template_features(feats, meta.templates, meta.medias, weights)
    expected = np.array([naive[a] @ naive[b] for a, b in meta.pairs])
    np.testing.assert_allclose(rows[2].scores, expected, atol=1e-9)


def test_equal_qualities_pool_like_the_standard_pooling(ijbc):
    root, _ = ijbc
    meta = load_ijb_meta(root, "IJBC")
    feats = np.random.default_rng(6).normal(size=(len(meta.images), 8))
    for value in (0.7, -1.0):  # all <= 0: equal weights as well
        rows = ijb.score_ijb(meta, feats, one_to_n=False, qualities={"norm": np.full(len(feats), value)},
                             pooling="quality", quality_fmrs=[0.1])
        np.testing.assert_allclose(rows[2].scores, rows[0].scores, atol=1e-12)
        assert rows[2]["tar_at_far"] == rows[0]["tar_at_far"]


def test_pooling_weights_sum_to_one_per_template():
    templates = np.array([3, 3, 1, 1, 1, 2])
    w = quality_pooling_weights(np.array([1.0, 3.0, -1.0, 0.0, 2.0, -5.0]), templates)
    np.testing.assert_allclose(w, [0.25, 0.75, 0.0, 0.0, 1.0, 1.0])


def test_head_on_a_model_without_head_is_one_clear_line(ijbc):
    root, _ = ijbc
    options = build_options({"type": "ijb", "name": "IJBC", "path": "IJBC", "quality": ["head"]})
    with pytest.raises(ValueError) as info:
        ijb.run(NoHeadModel(), options, root.parent, 16)
    message = str(info.value)
    assert "\n" not in message and message.startswith("ijb protocol IJBC: quality:")
    assert "no quality head" in message and "norm" in message


@pytest.mark.parametrize("entry, message", [
    ({"pooling": "quality"}, "ijb protocol IJBC: pooling: quality needs quality: [head] or [norm]"),
    ({"pooling": "max"}, "pooling='max'; expected one of ['standard', 'quality']"),
])
def test_bad_pooling_is_one_line(ijbc, entry, message):
    root, _ = ijbc
    with pytest.raises(ValueError) as info:
        run_ijb(root, entry)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_real_model_with_a_quality_head(ijbc, tmp_path):
    import torch
    from data_utils import add_quality_head, make_run

    from mlearn.inference import load_model
    from mlearn.models import IResNet

    root, _ = ijbc
    args = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 16}
    torch.set_num_threads(1)
    quality_run = add_quality_head(make_run(tmp_path / "q", IResNet, args), args["embedding_size"])
    options = build_options({"type": "ijb", "name": "IJBC", "path": "IJBC", "workers": 0, "quality": ["head"],
                             "pooling": "quality", "quality_fmrs": [0.1]})
    rows = ijb.run(load_model(quality_run, device="cpu"), options, root.parent, 32)
    assert [r.method for r in rows[:4]] == ["model"] * 2 + ["model, quality pooling (head)"] * 2
    assert [(r["quality"], r["convention"]) for r in rows[4:]] == [("head", EDC), ("head", ERC)]
    assert rows[4]["quality_source"] == "the model's trained quality head (cr_fiqa)"
    plain = load_model(make_run(tmp_path / "p", IResNet, args), device="cpu")
    with pytest.raises(ValueError, match="ijb protocol IJBC: quality: .*no quality head") as info:
        ijb.run(plain, options, root.parent, 32)
    assert "\n" not in str(info.value)
