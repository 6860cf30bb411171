"""Export (ONNX / TorchScript / safetensors, fp32 / fp16) -> load_model -> embed round trips, parity
failures, the insightface-style ONNX contract and audio exports with a dynamic frames axis."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mlearn
from mlearn import cli
from mlearn import export as export_mod
from mlearn.export import ParityError, export_model
from mlearn.inference import load_model, read_safetensors_metadata
from mlearn.models import ECAPA_TDNN, IResNet

FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 32}  # 112x112 input, like insightface
AUDIO_ARGS = {"channels": 32, "mfa_channels": 48, "embedding_size": 16}  # 80 mel bins
METADATA_KEYS = {"input_spec", "embedding_size", "backbone", "config_hash", "mlearn_version", "precision"}


def make_run(run: Path, cls, init_args) -> Path:
    """A run dir holding ``checkpoints/last.ckpt`` as ``mlearn train`` writes it (backbone part only)."""
    torch.manual_seed(0)
    backbone = cls(**init_args)
    for module in backbone.modules():  # non-trivial BN statistics, so parity is not vacuous
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"backbone": {"class_path": f"mlearn.models.{cls.__name__}",
                                                  "init_args": init_args}}},
               run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def face_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("face") / "run", IResNet, FACE_ARGS)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("audio") / "run", ECAPA_TDNN, AUDIO_ARGS)


def images(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def read_metadata(path: Path, fmt: str) -> dict:
    if fmt == "onnx":
        import onnx

        return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    if fmt == "safetensors":
        return read_safetensors_metadata(path)
    extra = {"mlearn.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["mlearn.json"])


@pytest.mark.parametrize("fmt, fp16", [("onnx", False), ("onnx", True), ("torchscript", False),
                                       ("torchscript", True), ("safetensors", False), ("safetensors", True)])
def test_export_load_embed_round_trip(face_run, tmp_path, fmt, fp16):
    result = export_model(face_run, fmt, tmp_path / f"m{export_mod.SUFFIXES[fmt]}", fp16=fp16)
    assert result.report.passed and result.report.max_abs_diff <= (1e-2 if fp16 else 1e-4)
    assert "parity PASS" in str(result)
    metadata = read_metadata(result.path, fmt)
    assert METADATA_KEYS <= set(metadata)
    spec = metadata["input_spec"]
    assert spec["mean"] == spec["std"] == [127.5] * 3 and spec["input_size"] == [112, 112]
    assert metadata["backbone"]["class_path"] == "mlearn.models.IResNet"
    assert metadata["precision"] == ("fp16" if fp16 else "fp32") and metadata["embedding_size"] == 32

    reference = load_model(face_run, device="cpu")
    model = mlearn.load_model(result.path)
    batch = images(3)
    ref = reference.embed(batch)
    chw_tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    for got in (model.embed(batch), model.embed(chw_tensor)):
        assert got.shape == (3, 32) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.abs(got - ref).max() <= (1e-2 if fp16 else 1e-4)
    single = model.embed(batch[1])  # one HWC image
    assert single.shape == (1, 32) and np.abs(single[0] - ref[1]).max() <= (1e-2 if fp16 else 1e-4)
    resized = model.embed(images(2, size=150))  # another size: resized to the recorded 112x112
    assert resized.shape == (2, 32)


def test_onnx_contract_is_insightface_style(face_run, tmp_path):
    """The contract the README states: float32 NCHW 'input' [batch, 3, 112, 112], (x - 127.5) / 127.5
    RGB, raw float32 'embedding' [batch, D]; insightface's own preprocessing gives the same vectors."""
    import cv2
    import onnxruntime as ort

    for fp16 in (False, True):
        path = export_model(face_run, "onnx", tmp_path / f"m{int(fp16)}.onnx", fp16=fp16).path
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.shape, inp.type) == ("input", ["batch", 3, 112, 112], "tensor(float)")
        assert (out.name, out.shape, out.type) == ("embedding", ["batch", 32], "tensor(float)")
    rgb = images(3)
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in rgb]
    # insightface ArcFaceONNX.get_feat: blobFromImages(BGR, 1/127.5, (112, 112), (127.5,)*3, swapRB=True)
    blob = cv2.dnn.blobFromImages(bgr, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    session = ort.InferenceSession(str(tmp_path / "m0.onnx"), providers=["CPUExecutionProvider"])
    raw = session.run(["embedding"], {"input": blob})[0]
    assert raw.shape == (3, 32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, load_model(tmp_path / "m0.onnx").embed(rgb), atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_dynamic_batch(face_run, tmp_path, fmt):
    model = load_model(export_model(face_run, fmt, tmp_path / f"m{export_mod.SUFFIXES[fmt]}").path)
    batch = images(3)
    one, three = model.embed(batch[:1]), model.embed(batch)
    assert one.shape == (1, 32) and three.shape == (3, 32)
    np.testing.assert_allclose(one[0], three[0], atol=1e-5)


def _tampering_writer(original):
    """A writer that exports a copy of the backbone with one weight changed: the file differs."""
    def write(backbone, *args, **kwargs):
        import copy

        bad = copy.deepcopy(backbone)
        with torch.no_grad():
            next(p for p in bad.parameters() if p.dim() > 1).mul_(-3.0)
        return original(bad, *args, **kwargs)
    return write


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_parity_failure_is_detected(face_run, tmp_path, monkeypatch, fmt):
    monkeypatch.setitem(export_mod._WRITERS, fmt, _tampering_writer(export_mod._WRITERS[fmt]))
    output = tmp_path / f"m{export_mod.SUFFIXES[fmt]}"
    with pytest.raises(ParityError, match="parity FAIL: max abs diff"):
        export_model(face_run, fmt, output)
    assert not output.exists() and output.with_name(output.name + ".failed").exists()


def test_cli_export_exits_nonzero_on_parity_failure(face_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export_mod._WRITERS, "onnx", _tampering_writer(export_mod._WRITERS["onnx"]))
    code = cli.main(["export", "--model", str(face_run), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("mlearn export: error: onnx export does not match the PyTorch model: "
                              "parity FAIL")


def test_cli_export_formats(face_run, tmp_path, capsys):
    for fmt in ("torchscript", "safetensors"):
        assert cli.main(["export", "--model", str(face_run), "--format", fmt]) == 0
        assert f"{fmt} parity PASS" in capsys.readouterr().out
    assert (face_run / "model.pt").is_file() and (face_run / "model.safetensors").is_file()
    assert cli.main(["export", "--model", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err


def test_audio_backbone_exports_with_dynamic_frames(audio_run, tmp_path):
    import onnxruntime as ort

    result = export_model(audio_run, "onnx", tmp_path / "spk.onnx")
    assert result.report.passed
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "frames", 80]
    spec = read_metadata(result.path, "onnx")["input_spec"]
    assert spec["modality"] == "audio" and spec["features"] == "kaldi_fbank"
    assert (spec["sample_rate"], spec["num_mel_bins"], spec["frame_length_ms"], spec["frame_shift_ms"],
            spec["cmn"]) == (16000, 80, 25.0, 10.0, True)
    assert (spec["window"], spec["preemphasis"], spec["dither"], spec["input_scale"]) == \
        ("hamming", 0.97, 0.0, 32768.0)
    from mlearn.data.audio.fbank import KaldiFbank, fbank_from_spec

    assert fbank_from_spec(spec).options == KaldiFbank().options  # the metadata rebuilds the front-end
    model, reference = load_model(result.path), load_model(audio_run, device="cpu")
    for frames, batch in ((60, 1), (333, 3)):
        feats = np.random.default_rng(frames).standard_normal((batch, frames, 80)).astype(np.float32)
        got = model.embed(feats)
        assert got.shape == (batch, 16)
        np.testing.assert_allclose(got, reference.embed(feats), atol=1e-4)
    ts = export_model(audio_run, "torchscript", tmp_path / "spk.pt")  # traced: frames stay dynamic too
    assert load_model(ts.path).embed(np.zeros((2, 77, 80), np.float32)).shape == (2, 16)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_model(tmp_path / "nope.onnx")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no backbone class_path"):
        load_model(tmp_path / "bare.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_model(tmp_path / "junk.pt")


def test_import_mlearn_is_light():
    code = "import sys, mlearn; assert 'torch' not in sys.modules; assert callable(mlearn.load_model)"
    subprocess.run([sys.executable, "-c", code], check=True)
