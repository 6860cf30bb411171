"""Quality-aware evaluation as a suite option (issue 20, point 3; docs/protocols.md g.4): ``quality:
[head, norm]`` on the ``own_data`` (folder) and ``bin`` protocols and ``mlearn eval --quality``. The
rows are checked against the metrics module applied by hand to the same pairs and qualities."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from data_utils import add_quality_head, make_run

from mlearn import cli
from mlearn.embed import read_image
from mlearn.evaluation.metrics.quality import EDC, ERC, edc_curve, erc_curve, pair_quality
from mlearn.evaluation.protocols import bins, own_data
from mlearn.evaluation.protocols.options import build_options
from mlearn.evaluation.protocols.own_data_pairs import all_pairs, pair_cosines, scan_identity_folder
from mlearn.evaluation.protocols.quality_eval import OUT_DIR_KEY
from mlearn.evaluation.suite import run_suite
from mlearn.inference import l2_normalize, load_model
from mlearn.models import IResNet

FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 32}
IDENTITIES, PER_IDENTITY = 10, 15  # 10,125 impostor pairs: FMR 1e-3 supported, 1e-4 not


def write_folder(root: Path, identities: int, per_identity: int, seed: int = 0) -> Path:
    """``root/id<k>/<j>.png``: small noisy variants of one random image per identity (resized on read)."""
    rng = np.random.default_rng(seed)
    for ident in range(identities):
        base = rng.integers(0, 256, (24, 24, 3))
        (root / f"id{ident}").mkdir(parents=True)
        for k in range(per_identity):
            noise = rng.normal(0, 10 + 8 * k, base.shape)  # graded, so quality differs within identities
            cv2.imwrite(str(root / f"id{ident}" / f"{k}.png"), np.clip(base + noise, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quality_eval")
    quality_run = add_quality_head(make_run(root / "quality", IResNet, FACE_ARGS),
                                   FACE_ARGS["embedding_size"])
    plain_run = make_run(root / "plain", IResNet, FACE_ARGS)
    return quality_run, plain_run, write_folder(root / "faces", IDENTITIES, PER_IDENTITY)


def by_hand(model, folder: Path):
    """Scores, labels and pair qualities {head, norm} of every pair of ``folder``, as the protocol pairs
    them (all genuine, then all impostor pairs), from the metrics module and the model directly."""
    files, identities, _ = scan_identity_folder(folder, (".png",))
    images = np.stack([read_image(folder / f, model.spec["input_size"]) for f in files])
    raw = model.embed(images, normalize=False)  # float32, as the protocol scores (ties included)
    unit = l2_normalize(raw)
    labels = np.unique(identities, return_inverse=True)[1]
    (g1, g2), (i1, i2) = all_pairs(labels, True), all_pairs(labels, False)
    first, second = np.r_[g1, i1], np.r_[g2, i2]
    per_file = {"head": model.quality(images), "norm": np.linalg.norm(raw.astype(np.float64), axis=1)}
    quality = {k: pair_quality(q[first], q[second]) for k, q in per_file.items()}
    same = np.r_[np.ones(len(g1), bool), np.zeros(len(i1), bool)]
    return pair_cosines(unit, first, second), same, quality


def test_folder_quality_rows_match_the_metrics_module(setup, tmp_path):
    quality_run, _, folder = setup
    model = load_model(quality_run, device="cpu")
    suite = {"name": "q", "protocols": [{"type": "own_data", "folder": str(folder), "name": "faces",
                                         "max_impostors": None, "bootstrap": 0, "quality": ["head", "norm"]}]}
    results = run_suite(model, suite, out_dir=tmp_path)["results"]
    main, rows = results[0], results[1:]
    assert main["impostor_pairs"] == 10_125 and main["impostor_sampling"] == "all"
    assert main["quality"] == ["head", "norm"] and main["quality_rows"] == 4
    assert "FMR 0.0001 not reported: 10125 impostor pairs" in main["quality_fmr_message"]
    assert sorted((r["quality"], r["convention"]) for r in rows) == [
        ("head", EDC), ("head", ERC), ("norm", EDC), ("norm", ERC)]
    assert {r["fmr"] for r in rows} == {1e-3} and all(r["fmr_not_reported"] == [1e-4] for r in rows)
    sources = {r["quality"]: r["quality_source"] for r in rows}
    assert sources == {"head": "the model's trained quality head (cr_fiqa)",
                       "norm": "L2 norm of the raw embedding"}
    # the figures: one per convention at the supported FMR only, named in the rows
    pngs = sorted(p.name for p in tmp_path.glob("quality_*.png"))
    assert pngs == ["quality_edc_fmr0.001_faces_model.png", "quality_erc_fmr0.001_faces_model.png"]
    assert sorted(main["quality_figures"]) == pngs and {r["figure"] for r in rows} == set(pngs)
    assert json.loads((tmp_path / "results.json").read_text())["results"][1]["convention"] in (EDC, ERC)

    scores, same, quality = by_hand(model, folder)
    for row in rows:
        q = quality[row["quality"]]
        if row["convention"] == EDC:
            curve = edc_curve(scores, same, q, 1e-3)
            np.testing.assert_allclose(row["fnmr"], curve["fnmr"], atol=1e-9)
            for limit in ("0.20", "0.30"):
                assert np.isfinite(row[f"edc_pauc_{limit}"])
                assert row[f"edc_pauc_{limit}"] == pytest.approx(curve["pauc"][limit], abs=1e-9)
        else:
            curve = erc_curve(scores, same, q, 1e-3)
            assert row["erc_auc"] == pytest.approx(curve["auc"], abs=1e-9)


def test_cli_norm_only_on_a_model_without_head(setup, tmp_path, capsys):
    _, plain_run, _ = setup
    folder = write_folder(tmp_path / "small", 4, 5, seed=1)  # 150 impostor pairs: FMR 0.1 supported
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", str(plain_run), "--folder", str(folder), "--quality", "norm",
                     "--quality-fmrs", "0.1,0.001", "--all-pairs", "--bootstrap", "0",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FMR 0.001 not reported: 150 impostor pairs" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r.get("quality"), r.get("convention")) for r in results[1:]] == [("norm", EDC), ("norm", ERC)]
    assert results[0]["impostor_pairs"] == 150 and np.isfinite(results[1]["edc_pauc_0.30"])
    assert sorted(p.name for p in out.glob("quality_*.png")) == [
        "quality_edc_fmr0.1_small_model.png", "quality_erc_fmr0.1_small_model.png"]


def test_no_supported_fmr_gives_the_message_and_no_rows(setup, tmp_path):
    _, plain_run, _ = setup
    folder = write_folder(tmp_path / "tiny", 3, 3, seed=2)
    options = build_options({"type": "own_data", "folder": str(folder), "bootstrap": 0, "quality": ["norm"]})
    rows = own_data.run(load_model(plain_run, device="cpu"), options, tmp_path, cache={OUT_DIR_KEY: tmp_path})
    assert len(rows) == 1 and rows[0]["quality_rows"] == 0 and rows[0]["quality_figures"] == []
    assert "FMR 0.001, 0.0001 not reported: 27 impostor pairs" in rows[0]["quality_fmr_message"]
    assert "quality: FMR 0.001" in rows[0].legend and not list(tmp_path.glob("*.png"))


def test_head_on_a_model_without_head_is_one_clear_line(setup, tmp_path, capsys):
    _, plain_run, folder = setup
    code = cli.main(["eval", "--model", str(plain_run), "--folder", str(folder), "--quality", "head", "norm",
                     "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "own_data protocol faces: quality: model" in err and "has no quality head" in err
    assert "'norm'" in err and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("entry, message", [
    ({"quality": ["magface"]}, "quality=['magface']; expected a list of quality sources from [head, norm]"),
    ({"quality": "norm"}, "quality='norm'; expected a list"),
    ({"quality_fmrs": [0]}, "quality_fmrs=[0]; expected a non-empty list of rates in (0, 1)"),
])
def test_bad_quality_options_are_one_line(entry, message):
    for kind in ({"type": "bin", "path": "a.bin"}, {"type": "own_data", "folder": "x"}):
        with pytest.raises(ValueError) as info:
            build_options({**kind, **entry})
        assert message in str(info.value)


def test_bin_quality_rows_use_the_unflipped_image_quality(setup, tmp_path):
    from mlearn.data import read_bin
    from mlearn.data.images.bins import write_bin

    quality_run, _, _ = setup
    rng = np.random.default_rng(3)
    issame = [True, False] * 60  # 60 impostor pairs: FMR 0.2 supported, 0.001 not
    write_bin(tmp_path / "set.bin", [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
                                     for _ in range(2 * len(issame))], issame)
    model = load_model(quality_run, device="cpu")
    options = build_options({"type": "bin", "path": "set.bin", "name": "set", "quality": ["head"],
                             "quality_fmrs": [0.2, 0.001]})
    rows = bins.run(model, options, tmp_path, 64, cache={OUT_DIR_KEY: tmp_path})
    main, quality = rows[0], rows[1:]
    assert [(r["quality"], r["convention"], r["fmr"]) for r in quality] == [("head", EDC, 0.2),
                                                                           ("head", ERC, 0.2)]
    assert "FMR 0.001 not reported: 60 impostor pairs" in main["quality_fmr_message"]
    images, labels = read_bin(tmp_path / "set.bin")
    head = model.quality(images)
    q = pair_quality(head[0::2], head[1::2])
    curve = edc_curve(main.scores, labels, q, 0.2)
    np.testing.assert_allclose(quality[0]["fnmr"], curve["fnmr"], atol=1e-9)
    assert quality[0]["edc_pauc_0.30"] == pytest.approx(curve["pauc"]["0.30"], abs=1e-9)
    assert (tmp_path / quality[0]["figure"]).is_file() and not list(tmp_path.glob("*fmr0.001*"))
