import json

import numpy as np

from mlearn.data.images.bins import read_bin, write_bin
from mlearn.data.synthetic.faces import make_face_dataset, render_face, sample_identity


def test_bin_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    write_bin(tmp_path / "x.bin", images, [True, False])
    back, issame = read_bin(tmp_path / "x.bin")
    np.testing.assert_array_equal(back, images)  # PNG is lossless
    assert issame.tolist() == [True, False]


def test_render_is_rgb_112_and_varies_per_image():
    rng = np.random.default_rng(0)
    ident = sample_identity(rng)
    a, b = render_face(ident, rng), render_face(ident, rng)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # nuisances change the pixels


def test_identity_structure_beats_chance_for_pixels_but_not_trivially():
    """Same-identity renders are closer than different-identity ones on average (there IS identity
    signal), yet raw pixels do not separate them cleanly (nuisance dominates)."""
    rng = np.random.default_rng(0)
    ids = [sample_identity(rng) for _ in range(12)]
    feats = np.stack([[render_face(i, rng).astype(np.float32).ravel() for _ in range(4)] for i in ids])
    feats -= feats.mean(axis=(0, 1), keepdims=True)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    flat = feats.reshape(-1, feats.shape[-1])
    sim = flat @ flat.T
    label = np.repeat(np.arange(len(ids)), 4)
    same = (label[:, None] == label[None]) & ~np.eye(len(label), dtype=bool)
    diff = label[:, None] != label[None]
    assert sim[same].mean() > sim[diff].mean() + 0.05
    assert np.mean(sim[same] < np.median(sim[diff])) > 0.1  # many same pairs look unlike each other


def test_make_face_dataset_layout_disjoint_and_cached(tmp_path):
    root = make_face_dataset(tmp_path / "faces", num_identities=3, images_per_identity=2,
                             num_val_identities=4, num_val_pairs=20, seed=3)
    folders = sorted(p.name for p in (root / "train").iterdir())
    assert folders == ["id00000", "id00001", "id00002"]
    assert all(len(list((root / "train" / f).glob("*.jpg"))) == 2 for f in folders)
    images, issame = read_bin(root / "val.bin")
    assert images.shape == (40, 112, 112, 3)
    # 10 contiguous folds, each half positive then half negative (as LFW's pairs.txt)
    assert issame.reshape(10, 2).tolist() == [[True, False]] * 10
    stamp = (root / "val.bin").stat().st_mtime_ns
    make_face_dataset(tmp_path / "faces", num_identities=3, images_per_identity=2,
                      num_val_identities=4, num_val_pairs=20, seed=3)
    assert (root / "val.bin").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert json.loads((root / "meta.json").read_text())["seed"] == 3


def test_detail_zero_keeps_the_default_identity_stream():
    plain, zero = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):
        a, b = sample_identity(plain), sample_identity(zero, detail=0.0)
        assert "detail" not in b and a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_detail_pattern_is_painted_on_the_skin_and_erased_by_blur():
    """Same identity, same nuisance draws: the only difference is the identity's skin pattern, which must
    have roughly the requested strength on the face and vanish under a strong blur."""
    from mlearn.data.synthetic.degrade import degrade

    ident = sample_identity(np.random.default_rng(2), detail=30.0)
    plain = {k: v for k, v in ident.items() if k != "detail"}
    with_detail = render_face(ident, np.random.default_rng(9)).astype(np.float32)
    without = render_face(plain, np.random.default_rng(9)).astype(np.float32)
    diff = (with_detail - without).mean(-1)
    face = np.abs(diff) > 1
    assert 0.15 < face.mean() < 0.6  # the skin area of a 112-px crop, not the background
    assert 10 < diff[face].std() < 45  # std 30 grey levels, smoothed by interpolation and resampling
    blurred = [degrade(x.astype(np.uint8), "blur", 1.0, np.random.default_rng(0)).astype(np.float32)
               for x in (with_detail, without)]
    assert (blurred[0] - blurred[1]).mean(-1)[face].std() < 0.6 * diff[face].std()
