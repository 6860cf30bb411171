"""Trust model (docs/security.md): files from strangers never run code.

Hostile safetensors metadata, checkpoint hyper-parameters, pickled checkpoint objects and ``.bin``
pickles are refused with one line and their payload (``touch MARKER``) never runs; legitimate files
(our checkpoints, Python 2 and 3 ``.bin`` pickles, registered backbones) still load. Also: newest
checkpoint by (epoch, step), the export parity cosine bound and ``embed`` input dtypes.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlearn.averaging import last_checkpoints
from mlearn.data.images.bins import read_bin, write_bin
from mlearn.export import MIN_COSINE, TOLERANCE, ParityReport, check_parity
from mlearn.inference import DEFAULT_IMAGE_SPEC, Embedder, load_model, resolve_checkpoint
from mlearn.models import IResNet
from mlearn.trust import load_checkpoint, resolve_backbone_spec, restricted_unpickle

FACE_ARGS = {"layers": [1, 1], "width": 4, "embedding_size": 8, "input_size": 32}
FACE_SPEC = {"class_path": "mlearn.models.IResNet", "init_args": FACE_ARGS}


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class LegacyConfig:
    """A plain object in hyper-parameters: harmless, but only a full pickle can rebuild it."""

    def __init__(self) -> None:
        self.m = 0.5


def backbone_state() -> dict:
    torch.manual_seed(0)
    return IResNet(**FACE_ARGS).state_dict()


def save_ckpt(path: Path, spec=FACE_SPEC, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v for k, v in backbone_state().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": spec}, **extra}, path)
    return path


def save_safetensors(path: Path, spec) -> Path:
    from safetensors.torch import save_file

    metadata = {"backbone": json.dumps(spec), "input_spec": json.dumps(IResNet(**FACE_ARGS).input_spec)}
    save_file({k: v.contiguous() for k, v in backbone_state().items()}, str(path), metadata=metadata)
    return path


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------- hostile files


def test_hostile_safetensors_metadata_is_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"
    path = save_safetensors(tmp_path / "x.safetensors",
                            {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}})
    with pytest.raises(ValueError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    assert str(path) in message and "subprocess.run" in message and "--allow-any-class" in message
    assert "\n" not in message
    assert not marker.exists()


def test_hostile_nested_spec_and_non_json_args_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    nested = {"class_path": "mlearn.models.IResNet",
              "init_args": {**FACE_ARGS,
                            "dropout": {"class_path": "os.system", "init_args": {"command": "x"}}}}
    with pytest.raises(ValueError, match=r"init_args\.dropout: class_path 'os.system' is not a registered"):
        resolve_backbone_spec(nested, source="f.safetensors")
    with pytest.raises(ValueError, match="plain JSON value"):
        resolve_backbone_spec({"class_path": "mlearn.models.IResNet",
                               "init_args": {**FACE_ARGS, "dropout": torch.tensor(0.0)}})
    assert not marker.exists()


def test_checkpoint_naming_os_system_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    save_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt",
              spec={"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    with pytest.raises(ValueError, match=r"last\.ckpt: backbone: class_path 'os.system' is not a registered"):
        load_model(tmp_path / "run", device="cpu")
    assert not marker.exists()


def test_pickled_object_in_checkpoint_needs_unsafe_load(tmp_path):
    marker = tmp_path / "MARKER"
    path = save_ckpt(tmp_path / "evil.ckpt", extra_state=Payload(marker))
    for load in (lambda: load_model(path, device="cpu"), lambda: load_checkpoint(path)):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "system" in message and "--unsafe-load" in message
        assert "\n" not in message
    assert not marker.exists()


def test_legacy_pickle_loads_only_with_unsafe(tmp_path):
    path = save_ckpt(tmp_path / "legacy.ckpt", legacy=LegacyConfig())
    with pytest.raises(ValueError, match=r"refused to unpickle .*LegacyConfig.*--unsafe-load"):
        load_model(path, device="cpu")
    reference = load_model(save_ckpt(tmp_path / "plain.ckpt"), device="cpu").embed(images(2))
    model = load_model(path, device="cpu", unsafe=True)
    np.testing.assert_allclose(model.embed(images(2)), reference, atol=1e-6)


def test_our_checkpoint_contents_load_weights_only(tmp_path):
    """Entries Lightning and our callbacks write (tensors, OrderedDicts, numbers, numpy scalars and
    arrays, paths) load without the unsafe opt-in."""
    path = save_ckpt(tmp_path / "ok.ckpt", epoch=3, global_step=40, loops={"fit_loop": OrderedDict(a=1)},
                     callbacks={"ModelCheckpoint": {"best_model_score": torch.tensor(0.9),
                                                    "dirpath": pathlib.PosixPath("/runs/x"),
                                                    "np_score": np.float64(0.5), "np_keys": np.arange(3)}})
    checkpoint = load_checkpoint(path)
    assert checkpoint["global_step"] == 40
    assert checkpoint["callbacks"]["ModelCheckpoint"]["np_score"] == 0.5
    np.testing.assert_array_equal(checkpoint["callbacks"]["ModelCheckpoint"]["np_keys"], [0, 1, 2])


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_checkpoint_is_one_line(tmp_path, damage):
    good = save_ckpt(tmp_path / "good.ckpt").read_bytes()
    path = tmp_path / "bad.ckpt"
    path.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello"}[damage])
    with pytest.raises(ValueError) as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".onnx", ".safetensors", ".pt"])
def test_damaged_exported_model_is_one_line(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError) as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ registered backbones


@pytest.mark.parametrize("class_path", ["mlearn.models.IResNet", "mlearn.models.face.IResNet", "iresnet"])
def test_registered_backbones_resolve(class_path):
    module = resolve_backbone_spec({"class_path": class_path, "init_args": FACE_ARGS})
    assert isinstance(module, IResNet) and module.embedding_size == 8


def test_variant_factories_resolve():
    spec = {"class_path": "mlearn.models.face.iresnet18", "init_args": {"width": 4, "embedding_size": 8}}
    assert [len(stage) for stage in resolve_backbone_spec(spec).stages] == [2, 2, 2, 2]


def test_allow_any_class_opt_in(tmp_path):
    spec = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 4, "out_features": 2}}
    with pytest.raises(ValueError, match="torch.nn.Linear' is not a registered mlearn backbone"):
        resolve_backbone_spec(spec)
    assert isinstance(resolve_backbone_spec(spec, allow_any_class=True), torch.nn.Linear)
    with pytest.raises(ValueError, match="built a OrderedDict, expected a torch.nn.Module"):
        resolve_backbone_spec({"class_path": "collections.OrderedDict"}, allow_any_class=True)


def test_bad_init_args_name_the_file():
    with pytest.raises(ValueError, match=r"^ckpt: backbone: cannot build 'mlearn.models.IResNet': .*colour"):
        resolve_backbone_spec({"class_path": "mlearn.models.IResNet", "init_args": {"colour": 1}},
                              source="ckpt")


# ----------------------------------------------------------------------------------------- .bin


def _py2_bin(images_bytes, flags) -> bytes:
    """A pickle as Python 2's cPickle.dump(..., protocol=2) writes (bins, issame): str is BINSTRING."""
    out = io.BytesIO()
    out.write(b"\x80\x02]q\x00(")
    for data in images_bytes:
        out.write(b"T" + struct.pack("<I", len(data)) + data)
    if isinstance(flags, np.ndarray):
        out.write(b"e" + _py2_numpy_bools(flags) + b"\x86q\x02.")
    else:
        out.write(b"e]q\x01(" + b"".join(b"\x88" if f else b"\x89" for f in flags) + b"e\x86q\x02.")
    return out.getvalue()


def _py2_numpy_bools(flags) -> bytes:
    """``numpy.array(flags)`` as Python 2 pickles it (protocol 2, str as SHORT_BINSTRING)."""
    def text(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
            + b"(K\x01" + struct.pack("<BB", ord("K"), len(flags)) + b"\x85cnumpy\ndtype\n" + text(b"b1")
            + b"K\x00K\x01\x87R(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            + text(bytes(bool(f) for f in flags)) + b"tb")


@pytest.fixture
def encoded(tmp_path):
    write_bin(tmp_path / "ref.bin", images(4), [True, False])
    bins, issame = pickle.loads((tmp_path / "ref.bin").read_bytes())
    return bins, issame, read_bin(tmp_path / "ref.bin", image_size=32)[0]


@pytest.mark.parametrize("writer", ["py2", "py2_numpy_flags", "py3_protocol2_numpy_flags", "py3_highest"])
def test_released_bin_layouts_load(tmp_path, encoded, writer):
    bins, issame, expected = encoded
    data = {"py2": lambda: _py2_bin(bins, issame),
            "py2_numpy_flags": lambda: _py2_bin(bins, np.array(issame)),
            "py3_protocol2_numpy_flags": lambda: pickle.dumps((bins, np.array(issame)), protocol=2),
            "py3_highest": lambda: pickle.dumps((bins, issame))}[writer]()
    path = tmp_path / "set.bin"
    path.write_bytes(data)
    got, flags = read_bin(path, image_size=32)
    np.testing.assert_array_equal(got, expected)
    assert flags.tolist() == [True, False]


def test_hostile_bin_is_refused_without_running(tmp_path, encoded):
    marker = tmp_path / "MARKER"
    bins = encoded[0]
    for payload in ((bins, Payload(marker)), (bins, np.array([1.5, 2.5]))):
        path = tmp_path / "evil.bin"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(ValueError, match=r"evil\.bin: refused to unpickle"):
            read_bin(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused to unpickle posix.system|refused to unpickle nt.system"):
        restricted_unpickle(pickle.dumps(Payload(marker)), source="x.bin")
    assert not marker.exists()


def test_truncated_and_one_sided_bins_are_one_line(tmp_path, encoded):
    bins, _, _ = encoded
    data = pickle.dumps((bins, [True, False]))
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin: truncated or not a pickle"):
        read_bin(path)
    path.write_bytes(pickle.dumps((bins, [True, True])))
    with pytest.raises(ValueError, match="2 pairs, none different-identity"):
        read_bin(path)


# ------------------------------------------------------------------------------ newest checkpoint


def test_newest_checkpoint_is_chosen_by_step_not_name(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    save_ckpt(folder / "epoch=10-step=110.ckpt", epoch=10, global_step=110)
    save_ckpt(folder / "epoch=9-step=99.ckpt", epoch=9, global_step=99)  # newer mtime, older step
    assert resolve_checkpoint(tmp_path / "run").name == "epoch=10-step=110.ckpt"
    names = [p.name for p in last_checkpoints(folder, 2)]
    assert names == ["epoch=9-step=99.ckpt", "epoch=10-step=110.ckpt"]


# ---------------------------------------------------------------------------------- export parity


class _Perturbed(Embedder):
    """The reference backbone's output with a fixed +-``delta`` added to each unit-vector element."""

    def __init__(self, backbone, delta: float) -> None:
        self.backbone, self.delta = backbone, delta
        self.spec, self.metadata, self.embedding_size = dict(DEFAULT_IMAGE_SPEC, input_size=[32, 32]), {}, 512

    def forward(self, inputs):
        with torch.no_grad():
            out = torch.nn.functional.normalize(self.backbone(torch.from_numpy(inputs)), dim=1).numpy()
        signs = np.where(np.arange(out.shape[1]) % 2, 1.0, -1.0)
        return out + self.delta * signs


def test_parity_requires_min_cosine():
    backbone = IResNet(**dict(FACE_ARGS, embedding_size=512)).eval()
    report = check_parity(backbone, _Perturbed(backbone, 0.005), fp16=True)
    # every element within the fp16 tolerance, yet the directions differ by more than cos 0.999
    assert report.max_abs_diff <= TOLERANCE[True] and report.min_cosine < MIN_COSINE[True]
    assert not report.passed and "required >= 0.999" in str(report)
    assert check_parity(backbone, _Perturbed(backbone, 0.0), fp16=False).passed
    assert not ParityReport(5e-5, 0.99998, TOLERANCE[False], 0.0, MIN_COSINE[False]).passed


# ---------------------------------------------------------------------------------- embed inputs


@pytest.fixture(scope="module")
def face_model(tmp_path_factory):
    return load_model(save_ckpt(tmp_path_factory.mktemp("m") / "m.ckpt"), device="cpu")


def test_embed_accepts_uint8_and_refuses_other_dtypes(face_model):
    batch = images(2)
    assert face_model.embed(batch).shape == (2, 8)
    assert face_model.embed(torch.from_numpy(batch).permute(0, 3, 1, 2)).shape == (2, 8)
    for bad, dtype in ((batch / 255.0, "float64"), (batch.astype(np.float32), "float32"),
                       (batch.astype(np.uint16), "uint16"), (batch > 127, "bool")):
        with pytest.raises(ValueError, match=f"expected dtype uint8 .*got {dtype}"):
            face_model.embed(bad)


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 4), (32,), (1, 0, 32, 3)])
def test_embed_refuses_wrong_shapes(face_model, shape):
    with pytest.raises(ValueError, match=r"expected uint8 RGB \[N, H, W, 3\]"):
        face_model.embed(np.zeros(shape, np.uint8))


def test_audio_features_must_be_finite_floats(tmp_path):
    from mlearn.inference import preprocess_features

    spec = {"modality": "audio", "num_mel_bins": 4}
    assert preprocess_features(np.zeros((5, 4), np.float64), spec).dtype == np.float32
    with pytest.raises(ValueError, match="NaN or infinite"):
        preprocess_features(np.full((1, 5, 4), np.nan, np.float32), spec)
    with pytest.raises(ValueError, match="expected float fbank features, got dtype int16"):
        preprocess_features(np.zeros((1, 5, 4), np.int16), spec)


def test_payload_is_real(tmp_path):
    """Plain pickle does run the payload, so the refusals above are meaningful."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
