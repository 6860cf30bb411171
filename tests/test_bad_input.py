"""Bad input, end to end: every case a user can hit with a hostile, damaged or wrong file or argument.

Each case runs ``mlearn`` as a user would and asserts (``bad_input_utils.fails_cleanly``): a non-zero
exit, no traceback, one ``mlearn <cmd>: error:`` line naming the file/key/value and what was expected;
where it applies, that nothing was written outside the run/output dir (``tree``) and nothing was lost.

Sections:
- Trust: hostile or damaged model files and .bin sets (eval, embed, export)
- Data: RecordIO/list sets, data inspect/convert, data-module arguments
- Runs: run dirs, resume, non-finite loss, preemption, total failure, CLI arguments
- Heads: margin ranges and class counts
- Audio and evaluation: short wavs, sample rates, suites, metrics, NaN models
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from bad_input_utils import ROOT, fails_cleanly, mlearn, tree

from mlearn.data.images.bins import write_bin
from mlearn.models import IResNet

# -------- Trust: hostile or damaged model files and .bin sets (eval, embed, export)

_TRUST_ARGS = {"layers": [1, 1], "width": 4, "embedding_size": 8, "input_size": 32}
_TRUST_SPEC = {"class_path": "mlearn.models.IResNet", "init_args": _TRUST_ARGS}


class _TrustPayload:
    """Unpickling runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trust_state() -> dict:
    torch.manual_seed(0)
    return IResNet(**_TRUST_ARGS).state_dict()


def _trust_make_ckpt(path: Path, spec=_TRUST_SPEC, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in _trust_state().items()},
                "hyper_parameters": {"backbone": spec}, **extra}, path)
    return path


def _trust_make_safetensors(path: Path, spec) -> Path:
    from safetensors.torch import save_file

    metadata = {"backbone": json.dumps(spec), "input_spec": json.dumps(IResNet(**_TRUST_ARGS).input_spec)}
    save_file({k: v.contiguous() for k, v in _trust_state().items()}, str(path), metadata=metadata)
    return path


def _trust_images(folder: Path) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return folder


def _trust_suite(folder: Path, bin_path: Path) -> Path:
    suite = folder / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "protocols": [
        {"type": "bin", "name": "tiny", "path": str(bin_path), "flip": False}]}))
    return suite


@pytest.fixture
def trust_files(tmp_path: Path) -> dict:
    """Inputs (read-only for the commands) in ``in/``, every output under ``out/``."""
    src = tmp_path / "in"
    model = _trust_make_ckpt(src / "run" / "checkpoints" / "last.ckpt")
    images = _trust_images(src / "images")
    rng = np.random.default_rng(1)
    write_bin(src / "good.bin", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)],
              [True, False])
    return {"root": tmp_path, "src": src, "model": model, "images": images,
            "suite": _trust_suite(src, src / "good.bin"), "out": tmp_path / "out"}


def _trust_command(command: str, model: Path, files: dict) -> list:
    out = files["out"]
    return {"eval": ["eval", "--model", model, "--suite", files["suite"], "--out", out],
            "embed": ["embed", "--model", model, "--input", files["images"], "--output", out / "emb.npy"],
            "export": ["export", "--model", model, "--format", "onnx", "--output", out / "m.onnx"]}[command]


def _trust_damage(kind: str, folder: Path, good_ckpt: Path) -> Path:
    data = good_ckpt.read_bytes()
    name, content = {"truncated_ckpt": ("cut.ckpt", data[: len(data) // 2]),
                     "empty_ckpt": ("empty.ckpt", b""),
                     "garbage_onnx": ("model.onnx", b"not an onnx model" * 20),
                     "truncated_safetensors": ("model.safetensors", None)}[kind]
    path = folder / name
    if content is None:
        full = _trust_make_safetensors(folder / "full.safetensors", _TRUST_SPEC).read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("command, kind", [
    ("eval", "truncated_ckpt"), ("embed", "truncated_ckpt"), ("export", "truncated_ckpt"),
    ("export", "empty_ckpt"), ("embed", "garbage_onnx"), ("eval", "garbage_onnx"),
    ("embed", "truncated_safetensors"),
])
def test_damaged_model_file_is_one_line(trust_files, command, kind):
    model = _trust_damage(kind, trust_files["src"], trust_files["model"])
    before = tree(trust_files["src"])
    result = mlearn(*_trust_command(command, model, trust_files), cwd=trust_files["root"])
    fails_cleanly(result, str(model))
    assert tree(trust_files["src"]) == before
    assert not trust_files["out"].exists()


@pytest.mark.parametrize("command", ["eval", "embed", "export"])
def test_pickled_object_in_checkpoint_needs_unsafe_load(trust_files, command):
    marker = trust_files["root"] / "MARKER"
    model = _trust_make_ckpt(trust_files["src"] / "evil.ckpt", extra=_TrustPayload(marker))
    result = mlearn(*_trust_command(command, model, trust_files), cwd=trust_files["root"])
    fails_cleanly(result, str(model), "system", "--unsafe-load")
    assert not marker.exists() and not trust_files["out"].exists()


@pytest.mark.parametrize("command", ["embed", "export"])
def test_checkpoint_naming_os_system_is_refused(trust_files, command):
    marker = trust_files["root"] / "MARKER"
    model = _trust_make_ckpt(trust_files["src"] / "os.ckpt",
                             spec={"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    result = mlearn(*_trust_command(command, model, trust_files), cwd=trust_files["root"])
    fails_cleanly(result, str(model), "'os.system'", "--allow-any-class")
    assert not marker.exists() and not trust_files["out"].exists()


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_hostile_safetensors_is_refused(trust_files, command):
    marker = trust_files["root"] / "MARKER"
    model = _trust_make_safetensors(trust_files["src"] / "x.safetensors", {
        "class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}})
    result = mlearn(*_trust_command(command, model, trust_files), cwd=trust_files["root"])
    fails_cleanly(result, str(model), "'subprocess.run'", "--allow-any-class")
    assert not marker.exists() and not trust_files["out"].exists()


@pytest.mark.parametrize("kind", ["hostile", "truncated", "one_sided"])
def test_bad_bin_in_eval_is_one_line(trust_files, kind):
    marker = trust_files["root"] / "MARKER"
    good = pickle.loads((trust_files["src"] / "good.bin").read_bytes())
    data = {"hostile": lambda: pickle.dumps((good[0], _TrustPayload(marker))),
            "truncated": lambda: (trust_files["src"] / "good.bin").read_bytes()[:500],
            "one_sided": lambda: pickle.dumps((good[0], [True, True]))}[kind]()
    bad = trust_files["src"] / "bad.bin"
    bad.write_bytes(data)
    suite = _trust_suite(trust_files["src"], bad)
    expected = {"hostile": "refused to unpickle", "truncated": "truncated",
                "one_sided": "none different"}[kind]
    result = mlearn("eval", "--model", trust_files["model"], "--suite", suite, "--out", trust_files["out"],
                    cwd=trust_files["root"])
    fails_cleanly(result, str(bad), expected)
    assert not marker.exists()


def test_export_output_equal_to_input_is_refused(trust_files):
    model = trust_files["model"]
    before = tree(trust_files["root"])
    result = mlearn("export", "--model", model, "--output", model, "--format", "safetensors",
                    cwd=trust_files["root"])
    fails_cleanly(result, "--output", str(model))
    assert tree(trust_files["root"]) == before
    run_dir = model.parent.parent
    result = mlearn("export", "--model", run_dir, "--output", model, cwd=trust_files["root"])
    fails_cleanly(result, "the input checkpoint")
    assert tree(trust_files["root"]) == before


def test_unsafe_load_opt_in_loads_a_legacy_checkpoint(trust_files):
    """A harmless legacy pickle (a plain object in the checkpoint) loads once the user opts in."""
    model = _trust_make_ckpt(trust_files["src"] / "legacy.ckpt", extra=np.random.default_rng(0))
    command = _trust_command("embed", model, trust_files)
    fails_cleanly(mlearn(*command, cwd=trust_files["root"]), str(model), "--unsafe-load")
    result = mlearn(*command, "--unsafe-load", cwd=trust_files["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(trust_files["out"] / "emb.npy").shape == (2, 8)


# -------- Data: RecordIO/list sets, data inspect/convert, data-module arguments

def _data_list_file(tmp: Path, labels: List[str]) -> Path:
    image = cv2.resize(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), (16, 16))
    (tmp / "img").mkdir(exist_ok=True)
    for i in range(len(labels)):
        cv2.imwrite(str(tmp / "img" / f"{i}.png"), image + i)
    path = tmp / "list.txt"
    path.write_text("".join(f"img/{i}.png {label}\n" for i, label in enumerate(labels)))
    return path


def _data_non_integer_label(tmp: Path, tiny_recordio: Callable) -> Tuple[Path, Tuple[str, ...]]:
    return _data_list_file(tmp, ["1", "2", "x", "3"]), ("list.txt:3", "'x'", "not an integer")


def _data_zero_byte_idx(tmp: Path, tiny_recordio: Callable) -> Tuple[Path, Tuple[str, ...]]:
    tiny_recordio(tmp / "rec", classes=2, per_class=2, size=16)
    (tmp / "rec" / "train.idx").write_bytes(b"")
    return tmp / "rec", ("train.rec", "no readable image records", "0 entries in", "train.idx")


def _data_zero_byte_rec(tmp: Path, tiny_recordio: Callable) -> Tuple[Path, Tuple[str, ...]]:
    tiny_recordio(tmp / "rec", classes=2, per_class=2, size=16)
    (tmp / "rec" / "train.rec").write_bytes(b"")
    return tmp / "rec", ("train.rec", "no readable image records", "0 bytes")


def _data_malformed_idx(tmp: Path, tiny_recordio: Callable) -> Tuple[Path, Tuple[str, ...]]:
    tiny_recordio(tmp / "rec", classes=2, per_class=2, size=16)
    idx = tmp / "rec" / "train.idx"
    lines = idx.read_text().splitlines()
    lines[2] = lines[2].replace("\t", "\t0x")
    idx.write_text("\n".join(lines) + "\n")
    return tmp / "rec", ("train.idx:3", "expected 'key<TAB>offset'")


@pytest.mark.parametrize("make", [_data_non_integer_label, _data_zero_byte_idx, _data_zero_byte_rec,
                                  _data_malformed_idx], ids=lambda f: f.__name__[6:])
def test_data_inspect_bad_set(tmp_path: Path, tiny_recordio: Callable,
                              make: Callable[..., Tuple[Path, Tuple[str, ...]]]) -> None:
    path, expected = make(tmp_path, tiny_recordio)
    before = tree(tmp_path)
    fails_cleanly(mlearn("data", "inspect", path), *expected)
    assert tree(tmp_path) == before


def test_data_convert_into_non_empty_folder_overwrites_nothing(tmp_path: Path,
                                                               tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path / "rec", classes=2, per_class=2, size=16)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "label_map.json").write_text('{"mine": 0}')
    before = tree(tmp_path)
    fails_cleanly(mlearn("data", "convert", tmp_path / "rec", dst, "--to", "rec"), str(dst), "not empty")
    assert tree(tmp_path) == before


def test_data_convert_unsafe_identity_names_stay_inside_dst(tmp_path: Path) -> None:
    names = ["../up", "/abs/x", "a/b", "a_b", "..\\win"]
    (tmp_path / "src").mkdir()
    list_file = _data_list_file(tmp_path / "src", names)
    outside = tree(tmp_path)
    dst = tmp_path / "dst"
    result = mlearn("data", "convert", list_file, dst, "--to", "folder")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 images, 5 classes, 0 skipped" in result.stdout
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("dst/")} == outside
    mapping = json.loads((dst / "folder_names.json").read_text())
    assert set(mapping) == set(names) and len(set(mapping.values())) == 5 and mapping["a_b"] == "a_b"
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == sorted(mapping.values())


def _data_train_config(tmp: Path, root: Path, **data: object) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "face" / "quickstart.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, log_every_n_steps=1,
                             enable_progress_bar=False)
    config["data"]["init_args"].update({"root": str(root), "batch_size": 4, "num_workers": 0,
                                        "synthetic": None, **data})
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _data_truncate_at_record(root: Path, key: int) -> None:
    rec = root / "train.rec"
    rec.write_bytes(rec.read_bytes()[:_data_offsets(root)[key]])


def _data_offsets(root: Path) -> Dict[int, int]:
    """Record key -> byte offset, from ``root/train.idx``."""
    lines = (root / "train.idx").read_text().splitlines()
    return {int(k): int(v) for k, v in (line.split() for line in lines)}


@pytest.mark.slow
def test_data_image_size_zero_is_refused_before_the_run_dir_is_written(tmp_path: Path,
                                                                       tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path / "rec", classes=4, per_class=4, size=16)
    config = _data_train_config(tmp_path, tmp_path / "rec")
    before = tree(tmp_path)
    result = mlearn("train", "--config", config, "--run_dir", tmp_path / "run", "--data.image_size", "0")
    fails_cleanly(result, "data.image_size", "got 0")
    assert not (tmp_path / "run").exists() and tree(tmp_path) == before


@pytest.mark.slow
def test_data_strict_truncated_rec_is_refused_at_open(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path / "rec", classes=4, per_class=4, size=16)
    _data_truncate_at_record(tmp_path / "rec", 9)  # images 9..16 and the identity records are cut off
    config = _data_train_config(tmp_path, tmp_path / "rec", strict=True)
    before = tree(tmp_path)
    result = mlearn("train", "--config", config, "--run_dir", tmp_path / "run")
    fails_cleanly(result, "train.rec", "8 of 16 image records", "past the end", "strict")
    assert not (tmp_path / "run").exists() and tree(tmp_path) == before


@pytest.mark.slow
def test_data_truncated_rec_trains_and_reports_the_dropped_records(tmp_path: Path,
                                                                   tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path / "rec", classes=4, per_class=4, size=16)
    _data_truncate_at_record(tmp_path / "rec", 9)
    config = _data_train_config(tmp_path, tmp_path / "rec", batch_size=2)
    result = mlearn("train", "--config", config, "--run_dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "8 records of the training set were dropped when it was opened" in result.stderr
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("train/dropped_at_open")
    assert [float(r.split(",")[column]) for r in rows if r.split(",")[column]] == [8.0]


@pytest.mark.slow
def test_data_strict_corrupt_sample_names_the_record(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path / "rec", classes=4, per_class=4, size=16, corrupt=[2])  # record 3: no image
    # a DataLoader worker: torch re-raises its exception with the worker's traceback as the message
    config = _data_train_config(tmp_path, tmp_path / "rec", strict=True, batch_size=16, num_workers=1)
    outside = tree(tmp_path)
    result = mlearn("train", "--config", config, "--run_dir", tmp_path / "run")
    line = fails_cleanly(result, "record 3 of", "train.rec", "cannot decode", "DataLoader worker")
    assert "unexpected" not in line
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("run/")} == outside


# -------- Runs: run dirs, resume, non-finite loss, preemption, total failure, CLI arguments

_RUNS_QUICKSTART = ROOT / "configs" / "face" / "quickstart.yaml"


def _runs_config(folder: Path, faces: Path, **trainer: Any) -> Path:
    """A tiny quickstart config: 6 synthetic identities x 4 images at batch 8 (3 steps per epoch), CPU."""
    config = yaml.safe_load(_RUNS_QUICKSTART.read_text())
    config["trainer"].update({"max_epochs": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                              "enable_model_summary": False, "accelerator": "cpu", **trainer})
    config["data"]["init_args"].update(root=str(faces), batch_size=8, num_workers=0,
                                       synthetic={"num_identities": 6, "images_per_identity": 4,
                                                  "num_val_identities": 6, "num_val_pairs": 40})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def _runs_base(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """A config, and a finished 3-step run made with it (checkpoints epoch=0-step=3.ckpt + last.ckpt)."""
    base = tmp_path_factory.mktemp("runs_base")
    config = _runs_config(base, base / "faces")
    run = base / "run"
    result = mlearn("train", "--config", config, "--run_dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    return {"config": config, "run": run, "faces": base / "faces"}


def _runs_copy(base: Dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    return run


def test_runs_rerun_into_a_run_dir_is_refused(_runs_base: Dict[str, Path], tmp_path: Path) -> None:
    run = _runs_copy(_runs_base, tmp_path)
    before = tree(tmp_path)
    line = fails_cleanly(mlearn("train", "--config", _runs_base["config"], "--run_dir", run),
                         str(run), "--ckpt_path last", "--overwrite true")
    assert "checkpoints/last.ckpt" in line
    assert tree(tmp_path) == before


def _runs_loss_steps(run: Path) -> List[int]:
    header, *lines = (run / "metrics.csv").read_text().splitlines()
    names = header.split(",")
    loss, step = names.index("train/loss"), names.index("step")
    return [int(cells[step]) for cells in (line.split(",") for line in lines) if cells[loss]]


@pytest.mark.slow
def test_runs_resume_keeps_the_metrics_history(_runs_base: Dict[str, Path], tmp_path: Path) -> None:
    run = _runs_copy(_runs_base, tmp_path)
    assert _runs_loss_steps(run) == [0, 1, 2]
    result = mlearn("train", "--config", _runs_base["config"], "--run_dir", run, "--ckpt_path", "last",
                    "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _runs_loss_steps(run) == [0, 1, 2, 3, 4, 5]  # the first run's rows kept, no step twice


@pytest.mark.slow
def test_runs_the_final_steps_are_saved_with_periodic_checkpoints(_runs_base: Dict[str, Path],
                                                                  tmp_path: Path) -> None:
    config = _runs_config(tmp_path / "cfg", _runs_base["faces"], max_epochs=3, max_steps=8)
    run = tmp_path / "run"
    result = mlearn("train", "--config", config, "--run_dir", run, "--checkpoint.every_n_train_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert step == 8  # the periodic checkpoints stop at step 6


def _runs_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _RunsPayload:
    """Unpickling it would run ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _runs_add_payload(path: Path, marker: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["legacy"] = _RunsPayload(marker)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("case", ["embedding_size", "num_classes", "other_identities", "truncated",
                                  "legacy_pickle", "missing"])
def test_runs_failed_resume_leaves_the_run_dir_unchanged(case: str, _runs_base: Dict[str, Path],
                                                         tmp_path: Path, tiny_recordio: Callable) -> None:
    run = _runs_copy(_runs_base, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    args = ["train", "--config", _runs_base["config"], "--run_dir", run, "--ckpt_path", "last",
            "--trainer.max_epochs", "2"]
    expected = [str(last), "epoch=0-step=3.ckpt"]  # the intact older checkpoint is named
    if case == "embedding_size":
        args += ["--model.backbone.init_args.embedding_size", "64"]
        expected += ["embedding size 128", "64"]
    elif case == "num_classes":
        rec = tiny_recordio(tmp_path / "rec4", classes=4, per_class=4, size=112)
        args += ["--data.root", rec, "--data.synthetic", "null"]
        expected += ["6 classes", "the data has 4"]
    elif case == "other_identities":  # as many classes, other names: the label map recorded in the run dir
        rec = tiny_recordio(tmp_path / "rec6", classes=6, per_class=4, size=112)
        args += ["--data.root", rec, "--data.synthetic", "null"]
        expected += ["identities differ", str(run / "label_map.json")]
    elif case == "truncated":
        _runs_truncate(last)
        expected += ["truncated"]
    elif case == "legacy_pickle":
        _runs_add_payload(last, tmp_path / "MARKER")
        expected += ["--unsafe-load", "refused to unpickle"]
    else:
        last.unlink()
        expected = ["--ckpt_path last", str(last), "epoch=0-step=3.ckpt"]
    before = tree(tmp_path)
    fails_cleanly(mlearn(*args), *expected)
    assert tree(tmp_path) == before  # config.yaml, label_map.json, metrics.csv, checkpoints untouched
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
def test_runs_nonfinite_training_stops_and_keeps_the_last_good_checkpoint(_runs_base: Dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """lr 1e6: the weights blow up within three steps; the run stops with exit 1, no non-finite
    checkpoint is written, and last.ckpt holds the last finite state."""
    run = tmp_path / "run"
    result = mlearn("train", "--config", _runs_base["config"], "--run_dir", run,
                    "--model.optimizer.init_args.lr", "1e6", "--checkpoint.every_n_train_steps", "1")
    line = fails_cleanly(result, "step", "learning rate too high", str(run / "checkpoints" / "last.ckpt"))
    assert result.returncode == 1
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 1 <= checkpoint["global_step"] < 3, line
    weights = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert all(bool(torch.isfinite(v).all()) for v in weights)


@pytest.mark.slow
def test_runs_sigterm_saves_last_ckpt_and_exits_143(_runs_base: Dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLEARN_DEBUG", None)
    command = [sys.executable, "-m", "mlearn", "train", "--config", str(_runs_base["config"]), "--run_dir",
               str(run), "--trainer.max_epochs", "100", "--checkpoint.every_n_train_steps", "1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.is_file() and process.poll() is None, "training did not reach its first checkpoint"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    fails_cleanly(result, "SIGTERM", str(last), "--ckpt_path last")
    assert result.returncode == 143
    checkpoint = torch.load(last, weights_only=True)
    assert 1 <= checkpoint["global_step"] < 300  # saved where it stopped, long before the end


@pytest.mark.slow
def test_runs_data_with_no_usable_sample_fails(_runs_base: Dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "garbage"
    for identity in ("a", "b"):
        (data / identity).mkdir(parents=True)
        for i in range(8):
            (data / identity / f"{i}.jpg").write_bytes(os.urandom(300))
    result = mlearn("train", "--config", _runs_base["config"], "--run_dir", tmp_path / "run",
                    "--data.root", data, "--data.synthetic", "null")
    fails_cleanly(result, str(data), "all 16 samples", "corrupt or unreadable")
    assert result.returncode == 1
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_runs_unusable_run_dir_path(_runs_base: Dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    before = tree(tmp_path)
    run = tmp_path / "file.txt" / "run"
    fails_cleanly(mlearn("train", "--config", _runs_base["config"], "--run_dir", run), str(run),
                  "Not a directory")
    assert tree(tmp_path) == before


def test_runs_malformed_config_yaml(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("model: [\n  backbone: x\n")
    fails_cleanly(mlearn("train", "--config", config, "--run_dir", tmp_path / "run"), str(config), "line")
    assert tree(tmp_path) == {"broken.yaml": tree(tmp_path)["broken.yaml"]}


@pytest.mark.parametrize("args, option", [
    (["eval", "--model", "m.ckpt", "--suite", "s.yaml", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m.ckpt", "--suite", "s.yaml", "--batch-size", "-5"], "--batch-size"),
    (["embed", "--model", "m.onnx", "--input", "in", "--output", "o.npy", "--batch-size", "0"],
     "--batch-size"),
    (["embed", "--model", "m.onnx", "--input", "in", "--output", "o.npy", "--workers", "-1"], "--workers"),
    (["export", "--model", "m.ckpt", "--parity-batch", "0"], "--parity-batch"),
    (["data", "inspect", "d", "--sample", "x"], "--sample"),
])
def test_runs_counts_must_be_positive_integers(args: list, option: str, tmp_path: Path) -> None:
    fails_cleanly(mlearn(*args, cwd=tmp_path), option, "expected a positive integer", args[-1])
    assert tree(tmp_path) == {}


def test_runs_unexpected_errors_end_in_one_line(tmp_path: Path) -> None:
    """An exception type the CLI does not expect still ends in one line, pointing to MLEARN_DEBUG=1;
    with MLEARN_DEBUG=1 the traceback shows."""
    from mlearn.cli import describe_error

    line = describe_error(RuntimeError("first\nsecond"))
    assert line == "RuntimeError: first; second (unexpected error; set MLEARN_DEBUG=1 for the traceback)"
    assert describe_error(PermissionError(13, "Permission denied", "/x/y")) == "Permission denied: /x/y"
    assert describe_error(KeyError("key 'a': unknown")) == "key 'a': unknown"
    try:
        yaml.safe_load("a: [\n")
    except yaml.YAMLError as exc:
        line = describe_error(exc)
    assert "line 2" in line and "^" not in line and "MLEARN_DEBUG" not in line
    config = tmp_path / "broken.yaml"
    config.write_text("model: [\n")
    env = dict(os.environ, MLEARN_DEBUG="1")
    result = subprocess.run([sys.executable, "-m", "mlearn", "train", "--config", str(config)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr


# -------- Heads: margin ranges and class counts

_DDP_QUICKSTART = ROOT / "configs" / "face" / "quickstart.yaml"


def _ddp_tiny_config(folder: Path, **synthetic: Any) -> Path:
    """The quickstart config on a tiny synthetic face set generated under ``folder/faces``."""
    config = yaml.safe_load(_DDP_QUICKSTART.read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, log_every_n_steps=1,
                             enable_progress_bar=False)
    data: Dict[str, Any] = {"num_identities": 6, "images_per_identity": 4, "num_val_identities": 6,
                            "num_val_pairs": 40}
    data.update(synthetic)
    config["data"]["init_args"].update(root=str(folder / "faces"), batch_size=8, num_workers=0,
                                       synthetic=data)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ddp_only_data_written(before: Dict[str, str], after: Dict[str, str]) -> None:
    """Nothing but the (generated) data set changed: no run dir, no stray files."""
    changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
    assert all(path.startswith("faces/") for path in changed), sorted(changed)


@pytest.mark.parametrize("args,named", [
    (["--model.head.margin.m", "3.2"], ["m=3.2", "[0, 3.14159)"]),  # ArcFace: m >= pi collapses the loss
    (["--model.head.margin.s", "0"], ["s=0", "positive"]),
    (["--model.head.margin", "mlearn.heads.CosFace", "--model.head.margin.m", "2.5"], ["m=2.5", "[0, 2)"]),
], ids=["arcface-m-pi", "scale-0", "cosface-m"])
def test_margin_out_of_range(tmp_path: Path, args: list, named: list) -> None:
    config = _ddp_tiny_config(tmp_path)
    before = tree(tmp_path)
    fails_cleanly(mlearn("train", "--config", config, "--run_dir", tmp_path / "run", *args), *named)
    _ddp_only_data_written(before, tree(tmp_path))
    assert not (tmp_path / "run").exists()


def test_one_identity_is_refused(tmp_path: Path) -> None:
    config = _ddp_tiny_config(tmp_path, num_identities=1)
    before = tree(tmp_path)
    fails_cleanly(mlearn("train", "--config", config, "--run_dir", tmp_path / "run"),
                  "num_classes=1", "at least 2 classes")
    _ddp_only_data_written(before, tree(tmp_path))
    assert not (tmp_path / "run").exists()


# -------- Audio and evaluation: short wavs, sample rates, suites, metrics, NaN models

_EVAL_FACE_ARGS = {"layers": [1, 1, 1, 1], "width": 8, "embedding_size": 16}
_EVAL_SPEAKER_ARGS = {"channels": 16, "mfa_channels": 24, "embedding_size": 8, "se_bottleneck": 8,
                      "attention_bottleneck": 8}


def _eval_make_run(run: Path, kind: str, nan: bool = False) -> Path:
    """A run dir with ``checkpoints/last.ckpt`` of a tiny face (IResNet) or speaker (ECAPA) backbone;
    with ``nan`` its first weight tensor is NaN (a diverged run)."""
    from mlearn.models import ECAPA_TDNN, IResNet

    cls, args = (IResNet, _EVAL_FACE_ARGS) if kind == "face" else (ECAPA_TDNN, _EVAL_SPEAKER_ARGS)
    torch.manual_seed(0)
    state = cls(**args).state_dict()
    if nan:
        first = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
        state[first] = torch.full_like(state[first], float("nan"))
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()},
                "hyper_parameters": {"backbone": {"class_path": f"mlearn.models.{cls.__name__}",
                                                  "init_args": args}}},
               run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_runs")
    return {"face": _eval_make_run(root / "face", "face"),
            "speaker": _eval_make_run(root / "speaker", "speaker"),
            "nan": _eval_make_run(root / "nan", "face", nan=True)}


def _eval_wav(path: Path, samples: int, rate: int = 16000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).uniform(-0.3, 0.3, samples).astype(np.float32), rate)
    return path


def _eval_bin(path: Path, issame) -> None:
    from mlearn.data.images.bins import write_bin

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2 * len(issame))]
    write_bin(path, images, issame)


# ----------------------------------------------------------------------------------------- mlearn embed


def test_eval_embed_lists_empty_and_sub_frame_wavs_as_unreadable(eval_runs, tmp_path):
    wavs = tmp_path / "wavs"
    for name, samples in {"empty": 0, "short": 100, "good": 8000}.items():
        _eval_wav(wavs / "id1" / f"{name}.wav", samples)
    result = mlearn("embed", "--model", eval_runs["speaker"], "--input", wavs,
                    "--output", tmp_path / "out" / "e.npy")
    assert result.returncode == 0, result.stderr
    assert "2 unreadable inputs" in result.stdout and "Traceback" not in result.stderr
    assert np.load(tmp_path / "out" / "e.npy").shape == (1, 8)
    errors = dict(line.split("\t") for line in (tmp_path / "out" / "e.errors.txt").read_text().splitlines())
    assert errors == {"id1/empty.wav": "too short: 0 samples (0 ms), no full 25 ms fbank frame",
                      "id1/short.wav": "too short: 100 samples (6.25 ms), no full 25 ms fbank frame"}


def test_eval_embed_where_every_wav_is_unusable_fails_cleanly(eval_runs, tmp_path):
    wavs = tmp_path / "wavs8k"
    for i in range(3):
        _eval_wav(wavs / "id1" / f"{i}.wav", 8000, rate=8000)
    before = {"wavs": tree(wavs), "run": tree(eval_runs["speaker"])}
    result = mlearn("embed", "--model", eval_runs["speaker"], "--input", wavs,
                    "--output", tmp_path / "out" / "e.npy")
    fails_cleanly(result, f"none of the 3 audio files of {wavs}", "3 wrong sample rate",
                  "id1/0.wav: wrong sample rate: 8000 Hz, expected 16000 Hz", "e.errors.txt")
    assert before == {"wavs": tree(wavs), "run": tree(eval_runs["speaker"])}
    # the reasons, for the user
    assert sorted(tree(tmp_path / "out")) == ["e.errors.txt", "e.ids.txt", "e.npy"]
    assert len((tmp_path / "out" / "e.errors.txt").read_text().splitlines()) == 3


def test_eval_embed_with_a_nan_model_fails_cleanly_and_writes_nothing(eval_runs, tmp_path):
    import cv2

    images = tmp_path / "faces"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), np.full((112, 112, 3), 60 * i, np.uint8))
    result = mlearn("embed", "--model", eval_runs["nan"], "--input", images,
                    "--output", tmp_path / "out" / "e.npy")
    fails_cleanly(result, "embeddings of 2 of the 2 inputs contain NaN or inf", "nothing written")
    assert tree(tmp_path / "out") == {}


# ------------------------------------------------------------------------------------------ mlearn eval

# case name -> (model, write the data and return the suite text, substrings the error line must name)
_EvalCase = Tuple[str, Callable[[Path], str], Tuple[str, ...]]


def _eval_one_sided_bin(data: Path) -> str:
    _eval_bin(data / "lfw.bin", [True] * 6)
    return "protocols: [{type: bin, name: lfw, path: lfw.bin}]\n"


def _eval_nan_model(data: Path) -> str:
    _eval_bin(data / "lfw.bin", [True, False] * 3)
    return "protocols: [{type: bin, name: lfw, path: lfw.bin}]\n"


def _eval_trials(data: Path, rate: int = 16000, trials: str = "") -> None:
    for spk in range(2):
        for u in range(2):
            _eval_wav(data / "wav" / f"id{spk}" / f"{u}.wav", 8000 * rate // 16000, rate=rate,
                      seed=spk * 2 + u)
    (data / "trials.txt").write_text(trials or "1 id0/0.wav id0/1.wav\n0 id0/0.wav id1/0.wav\n")


def _eval_trials_wrong_rate(data: Path) -> str:
    _eval_trials(data, rate=8000)
    return "protocols: [{type: trials, name: vox, trials: trials.txt, wav_root: wav}]\n"


def _eval_empty_trial_list(data: Path) -> str:
    _eval_trials(data, trials="\n")
    return "protocols: [{type: trials, name: vox, trials: trials.txt, wav_root: wav}]\n"


def _eval_ijb_missing_column(data: Path) -> str:
    meta = data / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n2.jpg 2\n")  # the media id column is missing
    points = "".join(f"{i}.jpg" + " 50" * 10 + " 0.9\n" for i in (1, 2))
    (meta / "ijbc_name_5pts_score.txt").write_text(points)
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    return "protocols: [{type: ijb, name: IJBC, path: IJBC}]\n"


def _eval_retrieval_one_identity(data: Path) -> str:
    import cv2

    (data / "set" / "alice").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(data / "set" / "alice" / f"{i}.png"), np.full((16, 16, 3), 40 * i, np.uint8))
    return "protocols: [{type: retrieval, name: heldout, query: set, ks: [1]}]\n"


def _eval_suite_text(text: str) -> Callable[[Path], str]:
    return lambda data: text


EVAL_CASES: Dict[str, _EvalCase] = {
    "suite-yaml-syntax": ("face", _eval_suite_text("protocols: [{type: bin, path: a.bin}\n"),
                          ("suite.yaml", "invalid YAML at line 2")),
    "suite-wrong-type": ("face", _eval_suite_text("protocols: [{type: bin, path: a.bin, flip: maybe}]\n"),
                         ("suite.yaml", "flip='maybe'", "true or false")),
    "suite-unknown-key": ("face", _eval_suite_text("protocols: [{type: bin, path: a.bin, colour: red}]\n"),
                          ("suite.yaml", "unknown key(s) ['colour']")),
    "suite-missing-key": ("face", _eval_suite_text("protocols: [{type: bin, name: lfw}]\n"),
                          ("suite.yaml", "missing required key 'path'")),
    "suite-not-a-mapping": ("face", _eval_suite_text("- {type: bin, path: a.bin}\n"),
                            ("suite.yaml", "expected a mapping")),
    "bin-without-negative-pairs": ("face", _eval_one_sided_bin, ("lfw.bin", "different-identity")),
    "nan-embeddings": ("nan", _eval_nan_model, ("benchmark 'lfw'", "NaN or inf")),
    "trial-wavs-wrong-rate": ("speaker", _eval_trials_wrong_rate,
                              ("vox: none of the 3 trial wavs",
                               "wrong sample rate: 8000 Hz, expected 16000 Hz", "0.wav")),
    "empty-trial-list": ("speaker", _eval_empty_trial_list, ("trials.txt", "empty trial list")),
    "ijb-meta-missing-column": ("face", _eval_ijb_missing_column,
                                ("ijbc_face_tid_mid.txt:1", "expected 3 whitespace-separated fields")),
    "retrieval-one-identity": ("face", _eval_retrieval_one_identity,
                               ("heldout", "set holds a single identity ('alice')")),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_bad_suite_or_data_fails_cleanly(eval_runs, tmp_path, case):
    model, write, expected = EVAL_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    suite = tmp_path / "suite.yaml"
    suite.write_text(write(data))
    before = {"data": tree(data), "run": tree(eval_runs[model])}
    result = mlearn("eval", "--model", eval_runs[model], "--suite", suite, "--data-root", data,
                    "--out", tmp_path / "out")
    fails_cleanly(result, *expected)
    assert before == {"data": tree(data), "run": tree(eval_runs[model])}
    assert "results.json" not in tree(tmp_path / "out")


def test_eval_trials_with_an_empty_wav_scores_the_rest_and_says_so(eval_runs, tmp_path):
    import json

    data = tmp_path / "data"
    _eval_trials(data, trials="1 id0/0.wav id0/1.wav\n0 id0/0.wav id1/0.wav\n0 id0/1.wav id1/1.wav\n"
                              "1 id1/0.wav id1/1.wav\n1 id0/0.wav id0/9.wav\n")
    _eval_wav(data / "wav" / "id0" / "9.wav", 0)
    suite = tmp_path / "suite.yaml"
    suite.write_text("protocols: [{type: trials, name: vox, trials: trials.txt, wav_root: wav}]\n")
    result = mlearn("eval", "--model", eval_runs["speaker"], "--suite", suite, "--data-root", data,
                    "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "vox: 1 trials NOT scored" in result.stdout and "id0/9.wav: too short: 0 samples" in result.stdout
    row = json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]
    assert row["trials"] == 4 and row["skipped_trials"] == 1
    reason = "too short: 0 samples (0 ms), no full 25 ms fbank frame"
    assert row["unreadable"] == {str(data / "wav" / "id0" / "9.wav"): reason}


@pytest.mark.parametrize("batch_size", ["0", "-5"])
def test_eval_bad_batch_size_fails_cleanly(eval_runs, tmp_path, batch_size):
    suite = tmp_path / "suite.yaml"
    suite.write_text("protocols: [{type: bin, path: lfw.bin}]\n")
    result = mlearn("eval", "--model", eval_runs["face"], "--suite", suite, "--data-root", tmp_path,
                    "--out", tmp_path / "out", "--batch-size", batch_size)
    line = fails_cleanly(result, "positive integer", batch_size)
    assert "batch" in line  # argparse's --batch-size or run_suite's batch_size, whichever checks first
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- speaker training data


def test_eval_train_on_audio_at_another_rate_fails_cleanly_before_the_run_dir(tmp_path):
    data = tmp_path / "vox8k"
    for spk in ("a", "b"):
        _eval_wav(data / spk / "v" / "0.wav", 8000, rate=8000)
    config = tmp_path / "speaker.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, max_epochs: 1, enable_progress_bar: false}\n"
        "model:\n"
        "  backbone: {class_path: mlearn.models.ECAPA_TDNN, init_args: {channels: 16, embedding_size: 8,\n"
        "             mfa_channels: 24, se_bottleneck: 8, attention_bottleneck: 8}}\n"
        "  head: {margin: {class_path: mlearn.heads.ArcFace, init_args: {s: 32.0, m: 0.2}}}\n"
        "data:\n"
        "  class_path: mlearn.data.speaker_datamodule.SpeakerDataModule\n"
        f"  init_args: {{root: {data}, batch_size: 2, num_workers: 0, aug_prob: 0.0}}\n")
    before = tree(data)
    result = mlearn("train", "--config", config, "--run_dir", tmp_path / "run", cwd=tmp_path)
    fails_cleanly(result, "none of the 2 utterances probed", "wrong sample rate: 8000 Hz, expected 16000 Hz",
                  str(data / "a" / "v" / "0.wav"))
    assert not (tmp_path / "run").exists() and tree(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speaker.yaml", "vox8k"]
