"""Graded degradations (``mlearn.data.synthetic.degrade``) and ``tools/make_degraded_faces.py``."""
import csv
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.integrate import quad
from scipy.ndimage import laplace
from scipy.stats import norm

from mlearn.data.synthetic.degrade import (
    DEGRADATIONS,
    MAX_NOISE_STD,
    MAX_OCCLUDED_FRACTION,
    degradation_kinds,
    degrade,
)
from mlearn.data.synthetic.faces import render_face, sample_identity

STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    rng = np.random.default_rng(0)
    return render_face(sample_identity(rng), rng, 112)


def _tool():
    path = ROOT / "tools" / "make_degraded_faces.py"
    spec = importlib.util.spec_from_file_location("make_degraded_faces", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _gray(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64).mean(-1)


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_strength_zero_is_identity_and_shape_kept(face, kind):
    out = degrade(face, kind, 0.0, np.random.default_rng(1))
    assert out is not face and np.array_equal(out, face)
    strong = degrade(face, kind, 0.7, np.random.default_rng(1))
    assert strong.shape == face.shape and strong.dtype == np.uint8 and not np.array_equal(strong, face)
    # deterministic for a given rng state
    assert np.array_equal(strong, degrade(face, kind, 0.7, np.random.default_rng(1)))


def test_blur_lowers_laplacian_variance_monotonically(face):
    sharpness = [laplace(_gray(degrade(face, "blur", s, np.random.default_rng(0)))).var() for s in STRENGTHS]
    # falls with the strength until only uint8 rounding is left (< 0.1% of the clean variance)
    assert all(a > b or a < 1e-3 * sharpness[0] for a, b in zip(sharpness, sharpness[1:])), sharpness
    assert sharpness[-1] < 1e-3 * sharpness[0]


def _clipped_normal_std(sigma: float, low: float, high: float) -> float:
    """Std of clip(N(0, sigma^2), low, high), by integration."""
    moments = [quad(lambda x, k=k: x ** k * norm.pdf(x, scale=sigma), low, high)[0]
               + low ** k * norm.cdf(low, scale=sigma) + high ** k * norm.sf(high, scale=sigma)
               for k in (1, 2)]
    return float(np.sqrt(moments[1] - moments[0] ** 2))


def test_noise_raises_difference_std_as_stated():
    flat = np.full((64, 64, 3), 128, np.uint8)  # mid-grey: the most room before clipping
    stds = [(degrade(flat, "noise", s, np.random.default_rng(2)).astype(float) - 128).std()
            for s in STRENGTHS]
    assert all(a < b for a, b in zip(stds, stds[1:])), stds
    for s, std in zip(STRENGTHS[1:], stds[1:]):
        # the stated std, then clipped to [0, 255] (rounding adds 1/12 grey level^2)
        assert std == pytest.approx(_clipped_normal_std(s * MAX_NOISE_STD, -128.5, 127.5), rel=0.03)


def _high_frequency_share(image: np.ndarray) -> float:
    """Share of the spectral energy (mean removed, Hann window against the wrap-around edges) above a
    quarter of the Nyquist radius."""
    gray = _gray(image)
    h, w = gray.shape
    windowed = (gray - gray.mean()) * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fftshift(np.fft.fft2(windowed))) ** 2
    yy, xx = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    radius = np.hypot(yy / (h / 2), xx / (w / 2))
    return float(power[radius > 0.25].sum() / power.sum())


def test_lowres_loses_high_frequencies(face):
    shares = [_high_frequency_share(degrade(face, "lowres", s, np.random.default_rng(0))) for s in STRENGTHS]
    # falls with the strength until nothing above a quarter of Nyquist is left (< 0.1% of the clean share)
    assert all(a > b or a < 1e-3 * shares[0] for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] < 0.01 * shares[0]


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("size", [(112, 112), (60, 90)])
def test_occlusion_covers_the_stated_fraction(strength, size):
    rng = np.random.default_rng(3)
    for seed in range(5):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        out = degrade(image, "occlusion", strength, np.random.default_rng(seed))
        changed = (out != image).any(-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        box = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert (box == box[0, 0]).all()  # one solid box of one colour
        fraction = box.shape[0] * box.shape[1] / changed.size
        assert fraction == pytest.approx(strength * MAX_OCCLUDED_FRACTION, abs=0.015)
        # the box centre lies in the central half of the image or the box touches the border
        centre_y = (rows[0] + rows[-1] + 1) / 2 / size[0]
        assert 0.25 - 1e-9 <= centre_y <= 0.75 + 1e-9 or rows[0] == 0 or rows[-1] == size[0] - 1


@pytest.mark.parametrize("kind,strength,match", [
    ("smear", 0.5, r"unknown degradation kind 'smear'; known: \['blur', 'lowres', 'noise', 'occlusion'\]"),
    ("blur", 1.5, r"strength=1\.5: expected a number in \[0, 1\]"),
    ("noise", -0.1, r"strength=-0\.1: expected a number in \[0, 1\]"),
    ("noise", float("nan"), r"strength=nan"),
    ("blur", "0.5", r"strength='0\.5'"),
])
def test_bad_kind_or_strength_is_one_clear_error(face, kind, strength, match):
    with pytest.raises(ValueError, match=match) as info:
        degrade(face, kind, strength, np.random.default_rng(0))
    assert "\n" not in str(info.value)


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match=r"expected uint8 \[H, W, 3\]"):
        degrade(np.zeros((8, 8), np.uint8), "blur", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"float32"):
        degrade(np.zeros((8, 8, 3), np.float32), "blur", 0.5, np.random.default_rng(0))


def _read_csv(folder: Path):
    with open(folder / "degradations.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tool_writes_folder_and_csv_deterministically(tmp_path, capsys):
    tool = _tool()
    args = ["--identities", "3", "--images-per-identity", "4", "--seed", "5", "--size", "48", "--no-progress"]
    assert tool.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "wrote 12 images of 3 identities" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "a")
    assert list(rows[0]) == ["file", "identity", "kind", "strength"] and len(rows) == 12
    identities = sorted({r["identity"] for r in rows})
    assert identities == ["id00300", "id00301", "id00302"]  # past the quickstart's 300 identities
    for identity in identities:
        assert len(list((tmp_path / "a" / identity).glob("*.png"))) == 4
    for row in rows:
        assert row["file"].startswith(row["identity"] + "/") and row["kind"] in degradation_kinds()
        assert float(row["strength"]) in STRENGTHS
        with Image.open(tmp_path / "a" / row["file"]) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
    assert tool.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _read_csv(tmp_path / "b") == rows
    for row in rows:
        assert (tmp_path / "a" / row["file"]).read_bytes() == (tmp_path / "b" / row["file"]).read_bytes()
    other = [*args, "--seed", "6", "--out", str(tmp_path / "c")]  # the last --seed wins
    assert tool.main(other) == 0
    first = rows[0]["file"]
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()


def test_tool_balances_kinds_and_strengths(tmp_path):
    written = _tool().make_degraded_faces(tmp_path / "d", identities=4, images_per_identity=6, size=32,
                                          kinds=["blur", "noise"], strengths=[0.0, 0.5, 1.0], progress=False)
    assert written == 24
    combos = [(r["kind"], r["strength"]) for r in _read_csv(tmp_path / "d")]
    expected = {(k, s): 4 for k in ("blur", "noise") for s in ("0", "0.5", "1")}
    assert {c: combos.count(c) for c in combos} == expected


@pytest.mark.parametrize("extra,match", [
    (["--kinds", "smear"], "unknown degradation kind"),
    (["--strengths", "0,1.5"], r"expected one or more numbers in \[0, 1\]"),
])
def test_tool_bad_options_are_one_line_errors(tmp_path, capsys, extra, match):
    assert _tool().main(["--out", str(tmp_path / "x"), "--identities", "1", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("make_degraded_faces: error:")
    assert re.search(match, err)
    assert not (tmp_path / "x").exists()


def test_tool_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert _tool().main(["--out", str(tmp_path), "--identities", "1", "--no-progress"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
