"""What every checkpoint family shares (mlearn/models/importers/base.py), on a toy family: the model
directory stands on its own, every consumer accepts it, and a checkpoint that does not fit is refused
with one line naming the key and the arch it looks like, writing nothing."""
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from mlearn.cli import main
from mlearn.errors import UsageError
from mlearn.inference import load_backbone, load_model
from mlearn.models.face import IResNet
from mlearn.models.importers import IMPORTERS, Conversion, Importer, import_checkpoint, register_importer
from mlearn.models.importers.base import load_tensors

LAYERS = {"tiny2": [1, 1, 1, 1], "tiny3": [1, 2, 1, 1]}
SPEC = {"modality": "image", "input_size": [32, 32], "mean": [127.5] * 3, "std": [127.5] * 3,
        "channels": "RGB"}


def toy_backbone(arch: str) -> IResNet:
    return IResNet(layers=LAYERS[arch], width=4, embedding_size=8, input_size=32)


class ToyFamily(Importer):
    archs = tuple(LAYERS)

    def read_checkpoint(self, path: Path):
        return {k[len("net."):]: v for k, v in load_tensors(path).items() if k.startswith("net.")}

    def conversion(self, arch: str, config: Optional[Path]) -> Conversion:
        init = {"layers": LAYERS[arch], "width": 4, "embedding_size": 8, "input_size": 32}
        return Conversion({"class_path": "mlearn.models.face.IResNet", "init_args": init}, SPEC)


@pytest.fixture(autouse=True)
def toy_family():
    register_importer("toy")(ToyFamily)
    yield
    IMPORTERS.pop("toy")


def save_toy(path: Path, arch: str) -> IResNet:
    net = toy_backbone(arch).eval()
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "head.kernel": 1}, path)
    return net


def test_model_dir_stands_alone_and_every_consumer_accepts_it(tmp_path: Path) -> None:
    source = save_toy(tmp_path / "toy.ckpt", "tiny2")
    out = import_checkpoint("toy", tmp_path / "toy.ckpt", "tiny2", tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "model.json"]
    (tmp_path / "toy.ckpt").unlink()  # the model directory must not need the source any more
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        expected = torch.nn.functional.normalize(source(x), dim=1).numpy()
    np.testing.assert_allclose(load_model(out, device="cpu").embed(images), expected, atol=1e-5)
    backbone, spec, info = load_backbone(out)
    assert spec == SPEC and info["backbone"]["class_path"] == "mlearn.models.face.IResNet"
    assert main(["export", "--model", str(out), "--format", "onnx"]) == 0
    assert (out / "model.onnx").is_file()


def test_wrong_arch_names_key_and_guess_and_writes_nothing(tmp_path: Path, capsys) -> None:
    save_toy(tmp_path / "toy.ckpt", "tiny3")
    code = main(["import", "toy", str(tmp_path / "toy.ckpt"), "--arch", "tiny2",
                 "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "does not fit toy --arch tiny2: unexpected key 'stages.1.1." in err[0]
    assert err[0].endswith("it looks like --arch tiny3")
    assert not (tmp_path / "m").exists() and [p.name for p in tmp_path.iterdir()] == ["toy.ckpt"]


def test_bad_family_arch_and_config(tmp_path: Path) -> None:
    save_toy(tmp_path / "toy.ckpt", "tiny2")
    with pytest.raises(UsageError, match=r"unknown checkpoint family 'nope'; expected one of"):
        import_checkpoint("nope", tmp_path / "toy.ckpt", "tiny2", tmp_path / "m")
    with pytest.raises(UsageError, match=r"--arch r50: not a toy arch; expected one of \['tiny2', 'tiny3'\]"):
        import_checkpoint("toy", tmp_path / "toy.ckpt", "r50", tmp_path / "m")
    with pytest.raises(UsageError, match="--config is not used by toy checkpoints"):
        import_checkpoint("toy", tmp_path / "toy.ckpt", "tiny2", tmp_path / "m", config=tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        import_checkpoint("toy", tmp_path / "missing.pt", "tiny2", tmp_path / "m")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        import_checkpoint("toy", tmp_path / "toy.ckpt", "tiny2", tmp_path / "file")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "obj": ToyFamily}, tmp_path / "evil2.ckpt")
    with pytest.raises(ValueError, match="refused to unpickle"):
        import_checkpoint("toy", tmp_path / "evil2.ckpt", "tiny2", tmp_path / "m")
    assert not (tmp_path / "m").exists()
