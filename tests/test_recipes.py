"""Face recipes: every config under configs/face parses and builds (model, data, trainer) through the CLI;
the recipes hold the official hyperparameters they cite; and one recipe trains end to end on a generated
RecordIO set (slow). The schedules they use are tested in test_schedules.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from mlearn.data.images.bins import write_bin
from mlearn.train_cli import build_cli, describe_run, run_training

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "configs" / "face"
# finetune.yaml needs trained weights (model.init_from): built in test_finetune.py
RECIPES = sorted(p.stem for p in FACE.glob("*.yaml") if p.stem not in ("quickstart", "finetune"))
SOURCES = ("deepinsight/insightface", "mk-minchul/AdaFace", "fdbtrs/ElasticFace")

# The values each recipe must hold, from the files its header cites (see the YAML comments):
# margin, backbone layers, embedding, sample rate, lr, weight decay, per-GPU batch x GPUs, epochs, warmup,
# schedule (+ milestones), precision, backbone grad-norm clip.
R50, R100 = [3, 4, 14, 3], [3, 13, 30, 3]
ARC, COS = ("ArcFace", {"s": 64.0, "m": 0.5}), ("CosFace", {"s": 64.0, "m": 0.4})


ELASTIC = ("ElasticArcFace", {"s": 64.0, "m": 0.5, "std": 0.05})
ADAFACE = ("AdaFace", {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01})


def official(margin: tuple, layers: List[int], lr: float, batch: int, epochs: int,
             **kw: Any) -> Dict[str, Any]:
    defaults = dict(sample_rate=1.0, wd=5e-4, gpus=8, warmup=0, schedule="poly", precision="16-mixed",
                    clip=5.0)
    return dict(defaults, margin=margin, layers=layers, lr=lr, batch=batch, epochs=epochs, **kw)


OFFICIAL: Dict[str, Dict[str, Any]] = {
    "ms1mv3_r50_arcface": official(ARC, R50, lr=0.2, batch=128, epochs=25, warmup=2),
    "ms1mv3_r100_arcface": official(ARC, R100, lr=0.2, batch=128, epochs=25),
    "glint360k_r100_pfc0.1": official(COS, R100, lr=0.1, batch=128, epochs=20, sample_rate=0.1, wd=1e-4),
    "ms1mv2_r100_cosface": official(COS, R100, lr=0.1, batch=128, epochs=20),
    "ms1mv2_r100_elasticface_arc": official(ELASTIC, R100, lr=0.1, batch=128, epochs=26, gpus=4,
                                            schedule="step", milestones=[7, 13, 19, 24], precision=32),
    "webface4m_r50_adaface": official(ADAFACE, R50, lr=0.1, batch=64, epochs=26, gpus=4, schedule="step",
                                      milestones=[12, 20, 24], clip=None),
    "casia_r50_arcface": official(ARC, R50, lr=0.1, batch=64, epochs=34, schedule="step",
                                  milestones=[19, 27, 31], precision=32),
}


@pytest.fixture(scope="module")
def rec(tiny_recordio: Callable) -> Path:
    return tiny_recordio(classes=4, per_class=5, size=112)


def test_every_official_recipe_is_listed() -> None:
    assert set(RECIPES) == set(OFFICIAL)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_holds_the_cited_official_values(name: str) -> None:
    text = (FACE / f"{name}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"Sources?: (" + "|".join(map(re.escape, SOURCES)) + r"), \S+\.(py|sh|md)", header), \
        f"{name}: the header must cite its source (repository, file)"
    config, want = yaml.safe_load(text), OFFICIAL[name]
    model, trainer, data = config["model"], config["trainer"], config["data"]["init_args"]
    margin = model["head"]["margin"]
    assert (margin["class_path"].rsplit(".", 1)[1], margin["init_args"]) == want["margin"]
    assert model["backbone"]["init_args"]["layers"] == want["layers"]
    assert model["backbone"]["init_args"]["embedding_size"] == 512
    assert model["head"]["sample_rate"] == want["sample_rate"]
    sgd = {"lr": want["lr"], "momentum": 0.9, "weight_decay": want["wd"]}
    assert model["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": sgd}
    assert (data["batch_size"], trainer["devices"]) == (want["batch"], want["gpus"])
    schedule = model["schedule"]
    assert trainer["max_epochs"] == want["epochs"] and schedule["warmup_epochs"] == want["warmup"]
    assert schedule["decay"] == want["schedule"] and schedule.get("lr_milestones") == want.get("milestones")
    assert trainer["precision"] == want["precision"]
    assert model.get("clip_backbone_grad_norm") == want["clip"]


@pytest.mark.parametrize("name", RECIPES + ["quickstart"])
def test_recipe_builds_through_the_cli(name: str, rec: Path, tmp_path: Path) -> None:
    args = ["--config", str(FACE / f"{name}.yaml"), "--data.root", str(rec),
            "--run_dir", str(tmp_path / "run")]
    if name == "quickstart":
        args += ["--data.synthetic", "null", "--data.image_size", "112"]
    cli = build_cli(args)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert model.num_classes == 4  # linked from the data
    assert cli.config["checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")
    checkpoints = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].save_last
    summary = describe_run(model, data, trainer)
    if name in OFFICIAL:
        want = OFFICIAL[name]
        params = {(3, 4, 14, 3): 43.59, (3, 13, 30, 3): 65.16}[tuple(want["layers"])]  # as insightface's
        assert f"{params:.2f} M parameters" in summary
        assert f"{want['batch'] * want['gpus']} global" in summary
        assert any(isinstance(c, pl.Callback) and type(c).__name__ == "VerificationCallback"
                   for c in trainer.callbacks)
        model.configure_model()
        groups = model._param_groups()
        if name == "webface4m_r50_adaface":  # no weight decay on BatchNorm parameters, as AdaFace
            assert [g.get("weight_decay") for g in groups] == [None, 0.0, None]
            assert sum(p.numel() for p in groups[1]["params"]) > 0
        else:
            assert len(groups) == 2


def test_dry_run_prints_the_plan_without_training(rec: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    code = run_training(["--config", str(FACE / "ms1mv3_r50_arcface.yaml"), "--data.root", str(rec),
                         "--run_dir", str(tmp_path / "run"), "--dry_run", "true"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run" / "checkpoints").exists()
    assert "IResNet: 43.59 M parameters, embedding 512" in out and "ArcFace(s=64.0, m=0.5)" in out
    assert "batch 128 per process, 1024 global" in out and "8 device(s)" in out
    assert "fewer images than one global batch" in out  # 20 images
    assert "SGD(lr=0.2, momentum=0.9, weight_decay=0.0005" in out and "clipped at 5.0" in out


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_recipe_trains_on_a_generated_recordio_set(rec: Path, tmp_path: Path) -> None:
    """`mlearn train --config configs/face/ms1mv3_r50_arcface.yaml --data.root <rec>` with small overrides:
    2 steps at batch 8 on one CPU process, validation on a tiny CFP-FP .bin at step 2 (the monitored
    metric: best + last checkpoints)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(20)]
    write_bin(tmp_path / "data" / "ms1mv3" / "cfp_fp.bin", images, [True, False] * 5)  # relative to the cwd
    config = yaml.safe_load((FACE / "ms1mv3_r50_arcface.yaml").read_text())
    validation = config["trainer"]["callbacks"][0]["init_args"]
    assert "data/ms1mv3/cfp_fp.bin" in validation["bins"]
    validation.update(bins=["data/ms1mv3/cfp_fp.bin"], every_n_train_steps=2, flip=False, batch_size=20)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "mlearn", "train", "--config", str(path), "--data.root", str(rec),
         "--run_dir", str(run), "--trainer.max_steps", "2", "--data.batch_size", "8",
         "--data.num_workers", "0", "--data.pin_memory", "false",
         "--trainer.devices", "1", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert "val/cfp_fp/accuracy" in metrics[0] and "train/loss" in metrics[0]
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt"], names
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # loadable as --ckpt_path
    assert checkpoint["global_step"] == 2
    assert checkpoint["state_dict"]["head.weight"].shape == (4, 512)
    assert checkpoint["FaceDataModule"] == {"seed": 0, "epoch": 1, "samples": 0, "global_batch": 8}


CRITERIA = sorted((ROOT / "configs").glob("*/criteria/*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", CRITERIA, ids=lambda p: f"{p.parent.parent.name}-{p.stem}")
def test_criterion_override_builds_on_the_quickstart(path: Path, rec: Path, tmp_path: Path) -> None:
    from mlearn.heads import build_criterion, build_margin, list_criteria

    modality = path.parent.parent.name
    assert {p.stem for p in path.parent.glob("*.yaml")} == set(list_criteria())
    args = ["--config", str(ROOT / "configs" / modality / "quickstart.yaml"), "--config", str(path),
            "--run_dir", str(tmp_path / "run")]
    if modality == "speaker":  # parsed, then the head built (the corpus is tested in test_speaker_quickstart)
        import contextlib
        import io

        from mlearn.cli import main
        from mlearn.heads import PartialFC

        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main(["train", *args, "--print_config"])
        assert done.value.code in (0, None)
        head = yaml.safe_load(out.getvalue())["model"]["head"]
        spec = head["criterion"]
        criterion = build_criterion(path.stem, **spec.get("init_args", {}))
        margin = None if head["margin"] is None else build_margin("arcface", **head["margin"]["init_args"])
        assert PartialFC(margin, 16, 10, criterion=criterion).criterion is criterion
        return
    cli = build_cli(args + ["--data.root", str(rec), "--data.synthetic", "null", "--data.image_size", "112"])
    model = cli.model
    model.configure_model()
    assert type(model.head.criterion) is type(build_criterion(path.stem))
    assert (model.head.margin is None) == model.head.criterion.own_margin
