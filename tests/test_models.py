"""Backbone contract tests, driven by the registry (timm style), plus sizes, timm wrapper and ONNX parity."""
from __future__ import annotations

import copy
import re
from typing import Any, Dict

import pytest
import torch
from torch import nn

from mlearn.models import (
    ECAPA_TDNN,
    IResNet,
    MobileFaceNet,
    ResNetSpeaker,
    TimmBackbone,
    build_backbone,
    convert_insightface_iresnet,
    list_backbones,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Small settings per registered name so that every forward/backward takes well under a second.
FACE_TINY: Dict[str, Any] = {"input_size": 32, "embedding_size": 16}
TINY_KWARGS: Dict[str, Dict[str, Any]] = {
    "iresnet": {**FACE_TINY, "layers": [1, 1, 1, 1], "width": 8},
    **{f"iresnet{d}": {**FACE_TINY, "width": 8} for d in (18, 34, 50, 100, 200)},
    **{name: {**FACE_TINY, "base_width": 8}
       for name in ("mobilefacenet", "mbf", "mobilefacenet_large", "mbf_large")},
    "ecapa_tdnn": {"channels": 32, "mfa_channels": 48, "embedding_size": 16, "num_mel_bins": 16},
    **{name: {"mfa_channels": 48, "embedding_size": 16, "num_mel_bins": 16}
       for name in ("ecapa_tdnn_c512", "ecapa_tdnn_c1024")},
    "resnet_speaker": {"layers": [1, 1, 1, 1], "base_channels": 4, "embedding_size": 16, "num_mel_bins": 16},
    "resnet34_speaker": {"base_channels": 4, "embedding_size": 16, "num_mel_bins": 16},
    **{name: {"base_channels": 2, "embedding_size": 16, "num_mel_bins": 16}
       for name in ("resnet221_speaker", "resnet293_speaker")},
}
# Parameter counts of the reference implementations at their default sizes (insightface arcface_torch,
# WeSpeaker); ours must be within 3%.
REFERENCE_PARAMS: Dict[str, float] = {
    "iresnet18": 24.0e6, "iresnet34": 34.1e6, "iresnet50": 43.6e6, "iresnet100": 65.2e6,
    "mbf": 2.06e6, "mbf_large": 6.31e6,
    "ecapa_tdnn_c512": 6.19e6, "ecapa_tdnn_c1024": 14.65e6, "resnet34_speaker": 6.63e6,
    "resnet221_speaker": 23.79e6, "resnet293_speaker": 28.62e6,
}


def tiny(name: str) -> nn.Module:
    return build_backbone(name, **TINY_KWARGS[name])


def example_input(model: nn.Module, batch: int = 3, frames: int = 40) -> torch.Tensor:
    spec = model.input_spec
    if spec["modality"] == "audio":
        return torch.randn(batch, frames, spec["num_mel_bins"])
    height, width = spec["input_size"]
    return torch.randn(batch, 3, height, width)


def test_every_backbone_has_tiny_settings() -> None:
    assert sorted(TINY_KWARGS) == list_backbones()


@pytest.mark.parametrize("name", list_backbones())
def test_contract(name: str) -> None:
    model = tiny(name).train()
    x = example_input(model)
    out = model(x)
    assert model.embedding_size == TINY_KWARGS[name]["embedding_size"]
    assert out.shape == (3, model.embedding_size)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"

    model.eval()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    with torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name: str) -> None:
    if name not in list_backbones():
        pytest.skip(f"{name} not registered")
    with torch.device("meta"):
        model = build_backbone(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(REFERENCE_PARAMS[name], rel=0.03)


def test_iresnet_insightface_layout() -> None:
    with torch.device("meta"):
        model = build_backbone("iresnet50")
    assert model.embedding_size == 512 and model.neck[3].in_features == 512 * 7 * 7
    assert not model.features.weight.requires_grad and model.features.bias.requires_grad
    assert [len(stage) for stage in model.stages] == [3, 4, 14, 3]


def _to_insightface_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`convert_insightface_iresnet`, written independently from its name table."""
    body = ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3"]
    prefixes = {"stem.0.": "conv1.", "stem.1.": "bn1.", "stem.2.": "prelu.",
                "neck.0.": "bn2.", "neck.3.": "fc."}
    out = {}
    for name, value in state.items():
        match = re.match(r"stages\.(\d+)\.(\d+)\.(?:body\.(\d)|(downsample))\.(.+)", name)
        if match:
            part = body[int(match[3])] if match[3] is not None else "downsample"
            out[f"layer{int(match[1]) + 1}.{match[2]}.{part}.{match[5]}"] = value
        else:
            prefix = next((p for p in prefixes if name.startswith(p)), "")
            out[prefixes.get(prefix, "") + name[len(prefix):]] = value
    return out


def test_convert_insightface_iresnet_roundtrip() -> None:
    source = IResNet(layers=[2, 1], width=8, embedding_size=16, input_size=32).eval()
    insightface_state = _to_insightface_names(source.state_dict())
    assert "layer1.1.prelu.weight" in insightface_state and "fc.weight" in insightface_state
    target = IResNet(layers=[2, 1], width=8, embedding_size=16, input_size=32).eval()
    target.load_state_dict(convert_insightface_iresnet(insightface_state))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target(x), source(x))
    with pytest.raises(KeyError, match="head.weight"):
        convert_insightface_iresnet({"head.weight": torch.zeros(1)})


def test_mobilefacenet_uses_insightface_names() -> None:
    with torch.device("meta"):
        keys = set(build_backbone("mbf").state_dict())
    for key in ("layers.0.layers.0.weight", "layers.1.layers.2.weight",
                "layers.3.layers.0.layers.2.layers.1.bias",
                "conv_sep.layers.2.weight", "features.layers.0.layers.0.weight", "features.layers.2.weight",
                "features.layers.3.running_var"):
        assert key in keys


def test_gradient_checkpointing_is_exact() -> None:
    kwargs: Dict[str, Any] = {"layers": [1, 2], "width": 8, "embedding_size": 16, "input_size": 32}
    plain, checkpointed = IResNet(**kwargs), IResNet(**kwargs, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    outputs = []
    for model in (plain, checkpointed):
        out = model(x)
        out.sum().backward()
        outputs.append((out, model.stem[0].weight.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])


def test_quickstart_sized_iresnet() -> None:
    model = IResNet(layers=[1, 1, 1, 1], width=16, embedding_size=128)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 128)
    assert model.input_spec["input_size"] == [112, 112] and model.input_spec["mean"] == [127.5] * 3


def test_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match=r"unknown backbone 'resnet9000'.*iresnet50"):
        build_backbone("resnet9000")


def test_unknown_kwarg_is_type_error() -> None:
    with pytest.raises(TypeError, match="num_features"):
        build_backbone("iresnet50", num_features=512)
    with pytest.raises(TypeError, match="layers"):
        build_backbone("iresnet50", layers=[1, 1, 1, 1])
    with pytest.raises(TypeError, match="img_size"):
        build_backbone("timm/resnet18", img_size=64)


@pytest.mark.parametrize("name,input_size", [("timm/resnet18", 64), ("timm/vit_tiny_patch16_224", 112)])
def test_timm_backbone(name: str, input_size: int) -> None:
    model = build_backbone(name, embedding_size=32, input_size=input_size)
    assert isinstance(model, TimmBackbone) and model.input_spec["input_size"] == [input_size, input_size]
    out = model(torch.randn(2, 3, input_size, input_size))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_timm_unknown_model_and_missing_weights(tmp_path: Any) -> None:
    with pytest.raises(KeyError, match=r"unknown timm model 'resnet_18'.*resnet18.*list_models"):
        build_backbone("timm/resnet_18")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("timm/resnet18", pretrained_path=str(tmp_path / "missing.pth"))


def test_timm_loads_local_weights_without_classifier(tmp_path: Any) -> None:
    import timm

    source = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("timm/resnet18", embedding_size=8, input_size=32, pretrained_path=str(path))
    torch.testing.assert_close(model.trunk.conv1.weight, source.conv1.weight)


def _export_onnx(model: nn.Module, path: Any) -> Any:
    import onnxruntime as ort

    audio = model.input_spec["modality"] == "audio"
    axes = {0: "batch", 1: "frames"} if audio else {0: "batch"}
    torch.onnx.export(model.eval(), (example_input(model, 1),), str(path), input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": axes, "embedding": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("factory", [
    pytest.param(lambda: IResNet(layers=[1, 1, 1, 1], width=8, embedding_size=16, input_size=32),
                 id="iresnet"),
    pytest.param(lambda: MobileFaceNet(embedding_size=16, base_width=8, input_size=32), id="mobilefacenet"),
    pytest.param(lambda: ECAPA_TDNN(channels=32, mfa_channels=48, embedding_size=16, num_mel_bins=16),
                 id="ecapa"),
    pytest.param(lambda: ResNetSpeaker([1, 1, 1, 1], base_channels=4, embedding_size=16, num_mel_bins=16),
                 id="resnet_speaker"),
])
def test_onnx_parity_dynamic_batch(factory: Any, tmp_path: Any) -> None:
    """Batch 1 and 3 (and, for audio, another number of frames) through onnxruntime match PyTorch."""
    pytest.importorskip("onnxruntime")
    model = factory().eval()
    session = _export_onnx(model, tmp_path / "model.onnx")
    inputs = [example_input(model, 1), example_input(model, 3)]
    if model.input_spec["modality"] == "audio":
        inputs.append(example_input(model, 2, frames=57))
    for x in inputs:
        (exported,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-4, atol=1e-4)
