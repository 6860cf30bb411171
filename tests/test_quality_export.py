"""Quality at inference and export (issue 20, point 2): ``Embedder.quality`` / ``embed(with_quality=)``,
the ``quality`` output of ONNX / TorchScript exports and the ``quality_head.*`` weights of safetensors
ones (parity <= 1e-4 in fp32), the embedding-norm baseline, the one-line error for a model without a
quality head and ``mlearn embed --quality``."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from data_utils import add_quality_head, make_run

from mlearn import cli
from mlearn.embed import read_image
from mlearn.export import SUFFIXES, export_model
from mlearn.inference import load_model, read_safetensors_metadata
from mlearn.models import ECAPA_TDNN, IResNet

FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 32}
QUALITY = {"method": "cr_fiqa", "output": "quality"}
FORMATS = ("onnx", "torchscript", "safetensors")


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = make_run(tmp_path_factory.mktemp("quality") / "run", IResNet, FACE_ARGS)
    return add_quality_head(run, FACE_ARGS["embedding_size"])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("plain") / "run", IResNet, FACE_ARGS)


@pytest.fixture(scope="module")
def quality_exports(quality_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    return {fmt: export_model(quality_run, fmt, out / f"m{SUFFIXES[fmt]}") for fmt in FORMATS}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def reference_quality(run: Path, batch: np.ndarray) -> np.ndarray:
    """quality_head(backbone(x)) computed directly from the checkpoint's tensors (float64)."""
    model = load_model(run, device="cpu")
    raw = model.embed(batch, normalize=False).astype(np.float64)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weight = state["quality_head.fc.weight"].double().numpy()
    norm_weight = float(state["quality_head.norm_weight"][0])
    bias = float(state["quality_head.fc.bias"][0])
    return raw @ weight[0] + bias + norm_weight * np.linalg.norm(raw, axis=1)


def test_checkpoint_quality_is_the_head_on_the_raw_embedding(quality_run):
    model = load_model(quality_run, device="cpu")
    batch = images(4)
    assert model.has_quality and model.metadata["quality"] == QUALITY
    quality = model.quality(batch)
    assert quality.dtype == np.float32 and quality.shape == (4,)
    np.testing.assert_allclose(quality, reference_quality(quality_run, batch), rtol=1e-5, atol=1e-5)
    embeddings, again = model.embed(batch, with_quality=True)
    np.testing.assert_allclose(embeddings, model.embed(batch), atol=1e-6)
    np.testing.assert_allclose(again, quality, atol=1e-6)
    assert np.ptp(quality) > 1e-3  # the check is not vacuous: the samples differ in quality


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_carries_quality_with_parity(quality_run, quality_exports, fmt):
    result = quality_exports[fmt]
    report = result.report
    assert report.passed and report.quality_max_abs_diff is not None and report.quality_max_abs_diff <= 1e-4
    assert "quality max abs diff" in str(result)
    assert result.metadata["quality"] == QUALITY
    exported = load_model(result.path, device="cpu")
    assert exported.has_quality and exported.metadata["quality"] == QUALITY
    batch = images(3, seed=5)
    # parity with the checkpoint on other inputs than the export's own check, and with a direct computation
    np.testing.assert_allclose(exported.quality(batch), load_model(quality_run, device="cpu").quality(batch),
                               atol=1e-4)
    np.testing.assert_allclose(exported.quality(batch), reference_quality(quality_run, batch), atol=1e-4)
    np.testing.assert_allclose(exported.embed(batch), load_model(quality_run, device="cpu").embed(batch),
                               atol=1e-4)


def test_export_files_hold_the_quality_output(quality_exports):
    import onnx

    proto = onnx.load(str(quality_exports["onnx"].path))
    assert [o.name for o in proto.graph.output] == ["embedding", "quality"]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["quality"]) == QUALITY
    from safetensors import safe_open

    path = quality_exports["safetensors"].path
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"quality_head.fc.weight", "quality_head.fc.bias"} <= keys
    assert read_safetensors_metadata(path)["quality"] == QUALITY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        module = torch.jit.load(str(quality_exports["torchscript"].path))
    embedding, quality = module(torch.zeros(2, 3, 112, 112))
    assert embedding.shape == (2, 32) and quality.shape == (2,)


def test_fp16_onnx_export_keeps_quality(quality_run, tmp_path):
    result = export_model(quality_run, "onnx", tmp_path / "m16.onnx", fp16=True)
    assert result.report.passed and result.report.quality_max_abs_diff <= 1e-2
    batch = images(2, seed=3)
    np.testing.assert_allclose(load_model(result.path).quality(batch), reference_quality(quality_run, batch),
                               atol=2e-2)


def test_model_without_head_exports_unchanged(plain_run, tmp_path):
    import onnx

    for fmt in FORMATS:
        result = export_model(plain_run, fmt, tmp_path / f"p{SUFFIXES[fmt]}")
        assert "quality" not in result.metadata and result.report.quality_max_abs_diff is None
        assert "quality" not in str(result)
        assert not load_model(result.path, device="cpu").has_quality
    assert [o.name for o in onnx.load(str(tmp_path / "p.onnx")).graph.output] == ["embedding"]
    assert "quality" not in read_safetensors_metadata(tmp_path / "p.safetensors")


def test_norm_baseline_is_the_raw_embedding_norm(plain_run, quality_exports):
    batch = images(3, seed=7)
    for model in (load_model(plain_run, device="cpu"), load_model(quality_exports["onnx"].path)):
        expected = np.linalg.norm(model.embed(batch, normalize=False), axis=1)
        norm = model.quality(batch, method="norm")
        assert norm.dtype == np.float32
        np.testing.assert_allclose(norm, expected, rtol=1e-5)
        embeddings, again = model.embed(batch, normalize=False, with_quality="norm")
        np.testing.assert_allclose(again, expected, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), expected, rtol=1e-5)


def test_quality_from_a_model_without_head_is_one_clear_line(plain_run, tmp_path):
    onnx_path = export_model(plain_run, "onnx", tmp_path / "p.onnx").path
    for source in (plain_run, onnx_path):
        model = load_model(source, device="cpu")
        for how in ("quality", "embed"):
            with pytest.raises(ValueError, match="has no quality head") as info:
                model.quality(images(1)) if how == "quality" else model.embed(images(1), with_quality=True)
            message = str(info.value)
            assert "\n" not in message and str(source) in message and "method='norm'" in message
    with pytest.raises(ValueError, match="expected one of head, norm"):
        load_model(plain_run, device="cpu").quality(images(1), method="magface")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, size in enumerate([112, 112, 100]):
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_embed_cli_writes_quality(quality_exports, plain_run, image_dir, tmp_path, capsys):
    model_path = quality_exports["onnx"].path
    assert cli.main(["embed", "--model", str(model_path), "--input", str(image_dir),
                     "--output", str(tmp_path / "q.npy"), "--quality"]) == 0
    ids = (tmp_path / "q.ids.txt").read_text().split()
    quality = np.load(tmp_path / "q.quality.npy")
    assert quality.dtype == np.float32 and quality.shape == (len(ids),) == (3,)
    model = load_model(model_path)
    batch = np.stack([read_image(image_dir / rel, (112, 112)) for rel in ids])
    np.testing.assert_allclose(quality, model.quality(batch), atol=1e-5)
    assert "q.quality.npy" in capsys.readouterr().out

    assert cli.main(["embed", "--model", str(plain_run), "--input", str(image_dir),
                     "--output", str(tmp_path / "n.npy"), "--quality", "norm"]) == 0
    norms = np.load(tmp_path / "n.quality.npy")
    raw = load_model(plain_run, device="cpu").embed(batch, normalize=False)
    np.testing.assert_allclose(norms, np.linalg.norm(raw, axis=1), rtol=1e-4)

    assert cli.main(["embed", "--model", str(plain_run), "--input", str(image_dir),
                     "--output", str(tmp_path / "h.npy")]) == 0
    assert not (tmp_path / "h.quality.npy").exists()  # without --quality nothing changes
    assert cli.main(["embed", "--model", str(plain_run), "--input", str(image_dir),
                     "--output", str(tmp_path / "x.npy"), "--quality"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no quality head" in err and "--quality norm" in err
    assert not (tmp_path / "x.npy").exists()


def test_audio_quality_from_features_and_waveforms(tmp_path):
    run = add_quality_head(make_run(tmp_path / "spk", ECAPA_TDNN,
                                    {"channels": 16, "mfa_channels": 24, "embedding_size": 16}), 16)
    model = load_model(run, device="cpu")
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.3, 0.3, n).astype(np.float32) for n in (8000, 9600)]
    embeddings, quality = model.embed(waves, with_quality=True)
    assert embeddings.shape == (2, 16) and quality.shape == (2,)
    np.testing.assert_allclose(embeddings, model.embed(waves), atol=1e-5)
    for wave, q in zip(waves, quality):  # one at a time: the same as in a batch of waveforms
        np.testing.assert_allclose(model.quality([wave]), [q], atol=1e-5)


def test_export_cli_reports_the_quality_output(quality_run, tmp_path, capsys):
    assert cli.main(["export", "--model", str(quality_run), "--format", "torchscript",
                     "--output", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "quality max abs diff" in out and "quality head (cr_fiqa) exported" in out


def test_checkpoint_of_the_training_module_loads_with_its_quality_head(tmp_path):
    """The key names load_model reads are the ones EmbeddingModule(quality=...) trains."""
    from mlearn.heads import ArcFace
    from mlearn.module import EmbeddingModule, HeadConfig
    from mlearn.quality import QualityConfig

    torch.manual_seed(0)
    module = EmbeddingModule(IResNet(**FACE_ARGS), HeadConfig(margin=ArcFace()), num_classes=3,
                             quality=QualityConfig())
    assert module.quality_head is not None
    torch.nn.init.normal_(module.quality_head.fc.weight, std=0.05)
    torch.nn.init.constant_(module.quality_head.norm_weight, -0.02)
    state = {k: v for k, v in module.state_dict().items() if k.startswith(("backbone.", "quality_head."))}
    (tmp_path / "checkpoints").mkdir()
    hparams = {"backbone": {"class_path": "mlearn.models.IResNet", "init_args": FACE_ARGS},
               "quality": {"method": "cr_fiqa", "weight": 10.0, "beta": 0.5}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "checkpoints" / "last.ckpt")
    model = load_model(tmp_path, device="cpu")
    batch = images(2)
    module.eval()
    with torch.no_grad():
        expected = module.quality_head(module.backbone(torch.from_numpy(model.preprocess(batch)))).numpy()
    np.testing.assert_allclose(model.quality(batch), expected, rtol=1e-5, atol=1e-5)


def test_a_head_saved_without_norm_weight_loads_as_the_plain_linear_head() -> None:
    from mlearn.inference import build_quality_head

    state = {"fc.weight": torch.tensor([[0.5, -1.0]]), "fc.bias": torch.tensor([0.25])}
    head = build_quality_head(state, "old.safetensors")
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert head(x).tolist() == [0.25, -2.75]
