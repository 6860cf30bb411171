"""`mlearn embed`: folders and lists, corrupt images reported not fatal, every model format, no
Lightning (nor torch) on the ONNX path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_utils import make_run

from mlearn import cli
from mlearn.embed import embed_to_files, list_inputs, read_image
from mlearn.export import export_model
from mlearn.inference import load_model
from mlearn.models import ECAPA_TDNN, IResNet

ROOT = Path(__file__).resolve().parents[1]
FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    run = make_run(tmp_path_factory.mktemp("face") / "run", IResNet, FACE_ARGS)
    formats = ("onnx", "torchscript", "safetensors")
    return {"run": run, **{fmt: export_model(run, fmt).path for fmt in formats}}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    import cv2

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (folder, size) in enumerate([("a", 112), ("a", 112), ("b", 140), ("b/c", 96)]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / folder / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


GOOD = ["a/0.png", "a/1.png", "b/2.png", "b/c/3.png"]


def mlearn(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLEARN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlearn", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_embed_folder_with_corrupt_image(models, image_dir, tmp_path):
    out = tmp_path / "emb.npy"
    result = mlearn("embed", "--model", models["onnx"], "--input", image_dir, "--output", out,
                    "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable inputs" in result.stdout
    embeddings = np.load(out)
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.ids.txt").read_text().splitlines() == GOOD
    errors = (tmp_path / "emb.errors.txt").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("a/corrupt.jpg\t")
    # row i is the embedding of ids[i]
    model = load_model(models["onnx"])
    expected = model.embed(read_image(image_dir / "b/c/3.png", [112, 112]))
    np.testing.assert_allclose(embeddings[3], expected[0], atol=1e-5)


def test_list_input_relative_to_list_folder(models, image_dir, tmp_path):
    listing = image_dir / "faces.lst"
    listing.write_text("# comment\nb/2.png\t7\n\na/0.png\nmissing.png\n")
    assert list_inputs(listing) == (image_dir, ["b/2.png", "a/0.png", "missing.png"])
    result, out = embed_to_files(models["onnx"], listing, tmp_path / "lst", batch_size=8, progress=False)
    assert out == tmp_path / "lst.npy" and np.load(out).shape == (2, 32)
    assert result.ids == ["b/2.png", "a/0.png"]
    assert [rel for rel, _ in result.errors] == ["missing.png"]


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "run"])
def test_every_format_embeds_like_onnx(models, image_dir, tmp_path, fmt):
    ref, _ = embed_to_files(models["onnx"], image_dir, tmp_path / "onnx.npy", progress=False)
    got, _ = embed_to_files(models[fmt], image_dir, tmp_path / f"{fmt}.npy", batch_size=3, progress=False)
    assert got.ids == ref.ids == GOOD
    np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-4)


def test_onnx_embed_imports_no_lightning(models, image_dir, tmp_path):
    code = (
        "import sys\n"
        "from mlearn.cli import main\n"
        f"assert main(['embed', '--model', {str(models['onnx'])!r}, '--input', {str(image_dir)!r},"
        f" '--output', {str(tmp_path / 'e.npy')!r}]) == 0\n"
        "import mlearn\n"
        "import numpy\n"
        f"model = mlearn.load_model({str(models['onnx'])!r})\n"
        "assert model.embed(numpy.zeros((112, 112, 3), 'uint8')).shape == (1, 32)\n"
        "heavy = ('pytorch_lightning', 'lightning', 'torch', 'mlearn.module', 'mlearn.models')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "e.npy").shape == (4, 32)


def test_audio_model_embeds_wav_folder_with_corrupt_file(tmp_path, capsys):
    import soundfile as sf

    from mlearn.data.audio.fbank import INPUT_SCALE, apply_cmn, kaldi_fbank

    run = make_run(tmp_path / "spk", ECAPA_TDNN, {"channels": 32, "mfa_channels": 48, "embedding_size": 16})
    rng = np.random.default_rng(0)
    wavs = tmp_path / "wavs"
    (wavs / "id1").mkdir(parents=True)
    lengths = {"id1/a.wav": 8000, "id1/b.wav": 12000}
    for rel, n in lengths.items():
        sf.write(wavs / rel, rng.uniform(-0.3, 0.3, n).astype(np.float32), 16000)
    (wavs / "id1" / "broken.wav").write_bytes(b"RIFF not a wav")
    code = cli.main(["embed", "--model", str(run), "--input", str(wavs), "--output", str(tmp_path / "e.npy")])
    assert code == 0, capsys.readouterr().err
    emb = np.load(tmp_path / "e.npy")
    ids = (tmp_path / "e.ids.txt").read_text().split()
    assert ids == sorted(lengths) and emb.shape == (2, 16)
    assert "id1/broken.wav" in (tmp_path / "e.errors.txt").read_text()
    model = load_model(run)
    for row, rel in zip(emb, ids):  # the recorded front-end: int16-range samples, fbank, CMN, embed
        wave, _ = sf.read(wavs / rel, dtype="float32")
        feats = apply_cmn(kaldi_fbank(torch.from_numpy(wave) * INPUT_SCALE))
        assert feats.shape == (1 + (lengths[rel] - 400) // 160, 80)
        np.testing.assert_allclose(row, model.embed(feats[None].numpy())[0], atol=1e-5)


def test_embed_bad_arguments(models, tmp_path, capsys):
    assert cli.main(["embed", "--model", str(models["onnx"]), "--input", str(tmp_path / "nowhere"),
                     "--output", str(tmp_path / "e.npy")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["embed", "--model", str(models["onnx"]), "--input", str(tmp_path / "empty"),
                     "--output", str(tmp_path / "e.npy")]) == 2
    assert "no images" in capsys.readouterr().err


def test_audio_embed_lists_empty_and_sub_frame_wavs_as_unreadable(tmp_path):
    """A wav of 0 or 100 samples (no full fbank frame) used to crash the whole speaker embed."""
    import soundfile as sf

    run = make_run(tmp_path / "spk", ECAPA_TDNN, {"channels": 32, "mfa_channels": 48, "embedding_size": 16})
    wavs = tmp_path / "wavs"
    (wavs / "id1").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in {"empty": 0, "short": 100, "one_frame": 400, "good": 8000}.items():
        sf.write(wavs / "id1" / f"{name}.wav", rng.uniform(-0.3, 0.3, n).astype(np.float32), 16000)
    result, out = embed_to_files(run, wavs, tmp_path / "e.npy", progress=False)
    assert result.ids == ["id1/good.wav", "id1/one_frame.wav"] and np.load(out).shape == (2, 16)
    assert dict(result.errors) == {
        "id1/empty.wav": "too short: 0 samples (0 ms), no full 25 ms fbank frame",
        "id1/short.wav": "too short: 100 samples (6.25 ms), no full 25 ms fbank frame"}
    listed = (tmp_path / "e.errors.txt").read_text().splitlines()
    assert listed == [f"{rel}\t{why}" for rel, why in result.errors]


def test_embed_where_no_input_is_readable_is_an_error(models, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError) as info:
        embed_to_files(models["onnx"], folder, tmp_path / "e.npy", progress=False)
    assert str(info.value) == (f"none of the 3 images of {folder} could be embedded: 3 cannot decode image "
                               f"(e.g. 0.jpg: cannot decode image); all listed in "
                               f"{tmp_path / 'e'}.errors.txt")
    # still written, for the user to read
    assert len((tmp_path / "e.errors.txt").read_text().splitlines()) == 3
    assert np.load(tmp_path / "e.npy").shape == (0, 32)
