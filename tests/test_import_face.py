"""``mlearn import insightface|adaface``: parity with the original networks, exact layouts, wrong-arch errors.

The reference networks below are written from the architecture descriptions of insightface's
arcface_torch ``backbones/`` (iresnet, mobilefacenet) and AdaFace's ``net.py``: their module names are
the published checkpoints' key layout and their forward applies the original preprocessing (AdaFace:
BGR). Weights and BatchNorm statistics are random, so nothing is trivially an identity. The smallest
archs run at full size; the bigger ones are checked for their key/shape layout on the meta device.
"""
import json
from itertools import accumulate
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from mlearn.cli import main
from mlearn.inference import instantiate, load_model
from mlearn.models.importers import IMPORTERS
from mlearn.models.importers.base import first_mismatch

DEPTHS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
          "r200": [6, 26, 60, 6]}
ADAFACE_DEPTHS = {"ir_18": DEPTHS["r18"], "ir_34": DEPTHS["r34"], "ir_50": DEPTHS["r50"],
                  "ir_101": DEPTHS["r100"]}
WIDTHS = [64, 128, 256, 512]


# ------------------------------------------------------------------ insightface arcface_torch iresnet


class RefIBlock(nn.Module):
    """bn1 - conv1 - bn2 - prelu - conv2(stride) - bn3, plus ``downsample`` (conv1x1 + BN) when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(cout), nn.PReLU(cout)
        self.conv2, self.bn3 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class RefIResNet(nn.Module):
    """arcface_torch IResNet: conv1/bn1/prelu, layer1..4, bn2 - flatten - dropout - fc - features."""

    def __init__(self, depths: Sequence[int]) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (count, width) in enumerate(zip(depths, WIDTHS)):
            blocks = [RefIBlock(cin if b == 0 else width, width, 2 if b == 0 else 1) for b in range(count)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.bn2, self.dropout = nn.BatchNorm2d(512), nn.Dropout(0.0)
        self.fc, self.features = nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        nn.init.constant_(self.features.weight, 1.0)  # frozen at 1 in training, a real layer otherwise

    def forward(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB [N, 112, 112, 3] -> raw embeddings [N, 512]."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


# ------------------------------------------------------------- insightface arcface_torch mobilefacenet


class RefConv(nn.Module):
    """``layers``: conv(k, stride, groups) - BN (- PReLU)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        parts: List[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*parts, *([nn.PReLU(cout)] if act else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefDepthWise(nn.Module):
    """1x1 to ``groups`` channels - depthwise 3x3(stride) - linear 1x1 to ``cout``, optional residual."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(RefConv(cin, groups), RefConv(groups, groups, 3, stride, 1, groups),
                                    RefConv(groups, cout, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class RefResidual(nn.Module):
    def __init__(self, channels: int, count: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[RefDepthWise(channels, channels, groups, 1, residual=True)
                                      for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefGDC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(RefConv(512, 512, 7, g=512, act=False), nn.Flatten(),
                                    nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefMobileFaceNet(nn.Module):
    """arcface_torch ``mbf`` (blocks 1, 4, 6, 2; scale 2): ``layers``, ``conv_sep``, ``features`` (GDC)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            RefConv(3, 128, 3, 2, 1), RefConv(128, 128, 3, 1, 1, g=64),
            RefDepthWise(128, 128, 128, 2), RefResidual(128, 4, 128),
            RefDepthWise(128, 256, 256, 2), RefResidual(256, 6, 256),
            RefDepthWise(256, 256, 512, 2), RefResidual(256, 2, 256),
        ])
        self.conv_sep, self.features = RefConv(256, 512), RefGDC()

    def forward(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


# ------------------------------------------------------------------------------------- AdaFace net.py


class RefIRBlock(nn.Module):
    """``res_layer`` BN-conv-BN-PReLU-conv(stride)-BN plus ``shortcut_layer``: MaxPool2d(1, stride) when
    the width is kept (parameter-free), else conv1x1 + BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.shortcut_layer: nn.Module = (
            nn.MaxPool2d(1, stride) if cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class RefAdaFaceIR(nn.Module):
    """AdaFace IR: ``input_layer``, ``body`` (blocks numbered across stages), ``output_layer`` ending in
    BatchNorm1d(affine=False); forward returns (embedding / norm, norm) of a BGR input."""

    def __init__(self, depths: Sequence[int]) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                         nn.PReLU(64))
        blocks, cin = [], 64
        for count, width in zip(depths, WIDTHS):
            blocks += [RefIRBlock(cin if b == 0 else width, width, 2 if b == 0 else 1) for b in range(count)]
            cin = width
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512, affine=False))

    def forward(self, images: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        bgr = images[..., ::-1] / 255.0  # AdaFace's to_input: RGB -> BGR, ((x / 255) - 0.5) / 0.5
        x = torch.from_numpy(((bgr - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()).float()
        x = self.output_layer(self.body(self.input_layer(x)))
        norm = torch.norm(x, 2, 1, True)
        return x / norm, norm


# -------------------------------------------------------------------------------------------- helpers


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics; eval mode. insightface's ``features`` scale stays 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(1000)
                if module.affine:
                    if name != "features":
                        module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return net.eval()


def images(count: int = 3) -> np.ndarray:
    """Non-symmetric uint8 RGB faces [N, 112, 112, 3] (distinct channels, so a BGR mix-up shows)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (count, 112, 112, 3)).astype(np.float64)
    base[..., 0] *= 0.3  # red darker than blue
    return base.astype(np.uint8)


def save_adaface(net: RefAdaFaceIR, path: Path) -> Path:
    """As AdaFace publishes it: a Lightning .ckpt with only ``state_dict`` (model.* + head.*)."""
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state.update({"head.kernel": torch.randn(512, 10), "head.t": torch.zeros(1),
                  "head.batch_mean": torch.ones(1) * 20, "head.batch_std": torch.ones(1) * 100})
    torch.save({"state_dict": state}, path)
    return path


def run_import(family: str, checkpoint: Path, arch: str, output: Path) -> int:
    return main(["import", family, str(checkpoint), "--arch", arch, "--output", str(output)])


def check_parity(checkpoint: Path, out: Path, expected: torch.Tensor) -> None:
    """The source may go; the model directory alone reproduces the reference's normalised embeddings."""
    moved = checkpoint.rename(checkpoint.with_name("moved_away"))
    batch = images()
    embeddings = load_model(out, device="cpu").embed(batch)
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-4)
    moved.unlink()


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch, make", [("r18", lambda: RefIResNet(DEPTHS["r18"])),
                                        ("mbf", RefMobileFaceNet)])
def test_insightface_import_matches_reference(tmp_path: Path, arch: str, make) -> None:
    reference = randomise(make(), seed=1)
    checkpoint = tmp_path / "model.pt"
    torch.save(reference.state_dict(), checkpoint)  # plain float32 state dict, no prefix
    assert run_import("insightface", checkpoint, arch, tmp_path / "out") == 0
    with torch.no_grad():
        expected = nn.functional.normalize(reference(images()), dim=1)
    check_parity(checkpoint, tmp_path / "out", expected)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["input_spec"]["channels"] == "RGB" and meta["input_spec"]["mean"] == [127.5] * 3
    assert meta["source"]["family"] == "insightface" and meta["source"]["arch"] == arch
    assert meta["embedding_size"] == 512


def test_adaface_import_matches_reference_rgb(tmp_path: Path) -> None:
    reference = randomise(RefAdaFaceIR(ADAFACE_DEPTHS["ir_18"]), seed=2)
    checkpoint = save_adaface(reference, tmp_path / "adaface_ir18_webface4m.ckpt")
    assert run_import("adaface", checkpoint, "ir_18", tmp_path / "out") == 0
    with torch.no_grad():
        expected, _ = reference(images())  # the first element of AdaFace's (embedding / norm, norm)
    check_parity(checkpoint, tmp_path / "out", expected)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["input_spec"]["channels"] == "RGB"  # the BGR flip is folded into the stem convolution
    init = meta["backbone"]["init_args"]
    assert init["identity_first_shortcut"] is True and init["affine_features"] is False
    # the flip matters: reading the images as BGR gives other embeddings
    with torch.no_grad():
        flipped, _ = reference(np.ascontiguousarray(images()[..., ::-1]))
    assert (flipped - expected).abs().max() > 1e-2


def reference_state(family: str, arch: str) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        if family == "adaface":
            return {f"model.{k}": v for k, v in RefAdaFaceIR(ADAFACE_DEPTHS[arch]).state_dict().items()}
        return (RefMobileFaceNet() if arch == "mbf" else RefIResNet(DEPTHS[arch])).state_dict()


@pytest.mark.parametrize("family, arch", [*[("insightface", a) for a in DEPTHS], ("insightface", "mbf"),
                                          *[("adaface", a) for a in ADAFACE_DEPTHS]])
def test_every_arch_layout_fits_exactly(family: str, arch: str) -> None:
    importer = IMPORTERS[family]
    source = {k[len("model."):] if family == "adaface" else k: v
              for k, v in reference_state(family, arch).items()}
    conversion = importer.conversion(arch, None)
    with torch.device("meta"):
        expected = instantiate(conversion.backbone).state_dict()
    assert first_mismatch(importer.convert_state(source, arch, conversion), expected) is None


def test_adaface_reader_keeps_model_keys_only(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {"model.input_layer.0.weight": torch.zeros(64, 3, 3, 3),
                               "model.body.0.res_layer.0.weight": torch.zeros(64),
                               "head.kernel": torch.zeros(512, 3), "head.t": torch.zeros(1)}}, path)
    assert sorted(IMPORTERS["adaface"].read_checkpoint(path)) == ["body.0.res_layer.0.weight",
                                                                  "input_layer.0.weight"]


@pytest.mark.parametrize("family, saved, arch, key, looks_like", [
    ("insightface", "mbf", "r18", "unexpected key 'layers.0.layers.0.weight'", "mbf"),
    ("insightface", "r18", "r34", "missing key 'stages.0.2.", "r18"),
    # body.2 opens stage 2 in ir_18 (projected shortcut) but is the third block of stage 1 in ir_50
    ("adaface", "ir_18", "ir_50", "unexpected key 'stages.0.2.downsample.0.weight'", "ir_18"),
    ("adaface", "ir_50", "ir_18",
     "key 'stages.1.0.body.1.weight' has shape [64, 64, 3, 3], the arch expects [128, 64, 3, 3]", "ir_50"),
])
def test_wrong_arch_names_key_and_arch_and_writes_nothing(tmp_path: Path, capsys, family: str, saved: str,
                                                          arch: str, key: str, looks_like: str) -> None:
    with torch.device("meta"):  # shapes only: the check never needs values
        state = reference_state(family, saved)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    checkpoint = tmp_path / "source.pt"
    torch.save({"state_dict": state} if family == "adaface" else state, checkpoint)
    code = run_import(family, checkpoint, arch, tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"does not fit {family} --arch {arch}: {key}" in err[0]
    assert err[0].endswith(f"it looks like --arch {looks_like}")
    assert [p.name for p in tmp_path.iterdir()] == ["source.pt"]


def test_not_a_face_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, checkpoint)
    for family, arch in (("insightface", "r18"), ("adaface", "ir_18")):
        assert run_import(family, checkpoint, arch, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert f"{checkpoint}: not an" in err and not (tmp_path / "out").exists()


def stage_starts(depths: List[int]) -> List[int]:
    return [0, *accumulate(depths)]


def test_adaface_blocks_renumbered_per_stage() -> None:
    conversion = IMPORTERS["adaface"].conversion("ir_50", None)
    source = {f"body.{i}.res_layer.0.weight": torch.zeros(1) for i in range(24)}
    renamed = IMPORTERS["adaface"].convert_state(source, "ir_50", conversion)
    starts = stage_starts(ADAFACE_DEPTHS["ir_50"])
    assert starts == [0, 3, 7, 21, 24]
    assert "stages.2.13.body.0.weight" in renamed and "stages.3.0.body.0.weight" in renamed
    assert "body.24.res_layer.0.weight" in IMPORTERS["adaface"].convert_state(
        {"body.24.res_layer.0.weight": torch.zeros(1)}, "ir_50", conversion)  # past the arch: kept


def test_iresnet_adaface_options() -> None:
    from mlearn.models.face import IResNet

    net = IResNet(layers=[1, 1], width=4, embedding_size=8, input_size=16, identity_first_shortcut=True,
                  affine_features=False)
    keys = set(net.state_dict())
    assert not any(k.startswith("stages.0.0.downsample") for k in keys)  # parameter-free strided identity
    assert any(k.startswith("stages.1.0.downsample.0") for k in keys)  # width changes: projected
    assert "features.weight" not in keys and "features.running_mean" in keys
    net(torch.randn(2, 3, 16, 16)).sum().backward()  # trains: nothing frozen that does not exist
    default = IResNet(layers=[1, 1], width=4, embedding_size=8, input_size=16)
    assert "stages.0.0.downsample.0.weight" in default.state_dict()
    assert not default.features.weight.requires_grad
