"""The `mlearn` command end to end: errors are one clear line; train -> eval -> export on tiny data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "face" / "quickstart.yaml"


def mlearn(*args, cwd=None, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLEARN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlearn", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def tiny_config(tmp_path, **data_overrides):
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=3, log_every_n_steps=1,
                             enable_progress_bar=False)
    config["data"]["init_args"].update(root=str(tmp_path / "faces"), batch_size=8, num_workers=0,
                                       synthetic={"num_identities": 6, "images_per_identity": 4,
                                                  "num_val_identities": 6, "num_val_pairs": 40})
    config["data"]["init_args"].update(data_overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_help_lists_commands():
    result = mlearn("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "export"):
        assert command in result.stdout


def test_unknown_command():
    line = error_line(mlearn("fly"))
    assert "unknown command 'fly'" in line and "train" in line


def test_missing_config_file(tmp_path):
    line = error_line(mlearn("train", "--config", tmp_path / "nope.yaml"))
    assert "nope.yaml" in line


def test_unknown_config_key(tmp_path):
    line = error_line(mlearn("train", "--config", tiny_config(tmp_path), "--model.no_such_key", "1"))
    assert "no_such_key" in line


def test_unknown_schedule_key_names_the_valid_ones(tmp_path):
    line = error_line(mlearn("train", "--config", tiny_config(tmp_path), "--model.schedule.no_such_key", "1"))
    assert "model.schedule.no_such_key" in line and "warmup_epochs" in line and "decay" in line


def test_a_config_with_the_old_flat_schedule_keys_says_where_they_went(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"].update(schedule="poly", warmup_epochs=1.0)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    line = error_line(mlearn("train", "--config", old))
    assert "model.schedule is a group" in line and "model.schedule.decay" in line
    config["model"]["schedule"] = {"decay": "poly"}
    old.write_text(yaml.safe_dump(config))
    line = error_line(mlearn("train", "--config", old))
    assert "model.warmup_epochs moved to model.schedule.warmup_epochs" in line
    line = error_line(mlearn("train", "--config", tiny_config(tmp_path), "--model.schedule.decay", "step"))
    assert "needs lr_milestones" in line


def test_unknown_margin_names_choices(tmp_path):
    config = tiny_config(tmp_path)
    line = error_line(mlearn("train", "--config", config, "--model.head.margin", "NoSuchMargin"))
    assert "model.head.margin" in line and "NoSuchMargin" in line and "mlearn.heads.ArcFace" in line


def test_unknown_backbone_names_choices(tmp_path):
    config = tiny_config(tmp_path)
    line = error_line(mlearn("train", "--config", config, "--model.backbone", "mlearn.models.NoNet"))
    assert "NoNet" in line and "iresnet50" in line


def test_missing_data_path(tmp_path):
    config = tiny_config(tmp_path, root=str(tmp_path / "absent"), synthetic=None)
    line = error_line(mlearn("train", "--config", config, "--run_dir", tmp_path / "run"))
    assert "absent" in line


@pytest.mark.slow
def test_train_eval_export_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = mlearn("train", "--config", tiny_config(tmp_path), "--run_dir", run,
                    "--model.head.margin.m", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["head"]["margin"]["init_args"]["m"] == 0.2
    assert len(json.loads((run / "label_map.json").read_text())) == 6

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "protocols": [
        {"type": "bin", "name": "synthetic_val", "path": str(tmp_path / "faces" / "val.bin"), "flip": True,
         "baselines": ["raw_pixels"]}]}))
    result = mlearn("eval", "--model", run, "--suite", suite, "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synthetic_val" in result.stdout and "raw_pixels" in result.stdout
    assert (tmp_path / "eval" / "results.json").is_file()

    result = mlearn("export", "--model", run, "--format", "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity PASS" in result.stdout
    assert (run / "model.onnx").is_file()
