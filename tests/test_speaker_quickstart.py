"""Synthetic speaker corpus, the speaker recipes under configs/speaker/, and the quickstart end to end."""
import contextlib
import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mlearn.data.audio.fbank import INPUT_SCALE, kaldi_fbank
from mlearn.data.synthetic.speech import (
    make_speaker_dataset,
    sample_channel,
    sample_speaker,
    synthesize_utterance,
)
from mlearn.evaluation.protocols.trials import mfcc_mean, read_trials

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "speaker").glob("*.yaml"))
TINY = dict(num_speakers=3, utterances_per_speaker=2, videos_per_speaker=2, num_val_speakers=3,
            val_utterances_per_speaker=4, num_val_trials=8, min_seconds=0.3, max_seconds=0.5,
            augmentation_files=1, num_dev_speakers=2, num_dev_trials=8)


def test_synthetic_corpus_layout_disjoint_and_cached(tmp_path):
    root = make_speaker_dataset(tmp_path / "spk", **TINY)
    train = sorted(p.name for p in (root / "train").iterdir())
    val = sorted(p.name for p in (root / "val").iterdir())
    # val/: the 3 held-out speakers of val_trials.txt (3-5), then the 2 dev speakers of dev_trials.txt (6, 7)
    assert train == ["id00000", "id00001", "id00002"] and val == [f"id0000{k}" for k in range(3, 8)]
    dev = read_trials(root / "dev_trials.txt")
    assert len(dev) == 8 and {key.split("/")[0] for key in dev.enroll + dev.test} == {"id00006", "id00007"}
    without_dev = make_speaker_dataset(tmp_path / "no_dev", **{**TINY, "num_dev_speakers": 0})
    assert (without_dev / "val_trials.txt").read_text() == (root / "val_trials.txt").read_text()
    assert not (without_dev / "dev_trials.txt").exists()
    wavs = (root / "train" / "id00001").rglob("*.wav")
    assert sorted(str(p.relative_to(root / "train")) for p in wavs) == [
        "id00001/v000/00000.wav", "id00001/v001/00001.wav"]
    import soundfile as sf

    info = sf.info(str(root / "train" / "id00000" / "v000" / "00000.wav"))
    assert info.samplerate == 16000 and info.channels == 1 and 0.3 <= info.duration <= 0.52
    trials = read_trials(root / "val_trials.txt")
    assert trials.format == "official" and len(trials) == 8 and trials.labels.sum() == 4
    for label, enroll, test in zip(trials.labels, trials.enroll, trials.test):
        assert (root / "val" / enroll).is_file() and (root / "val" / test).is_file()
        assert (enroll.split("/")[0] == test.split("/")[0]) == bool(label)
        if label:
            assert enroll.split("/")[1] != test.split("/")[1]  # targets across videos (channels)
    for folder in ("musan/noise", "musan/music", "musan/speech", "rirs"):
        assert len(list((root / folder).glob("*.wav"))) == 1

    stamp = (root / "val_trials.txt").stat().st_mtime_ns
    make_speaker_dataset(tmp_path / "spk", **TINY)
    assert (root / "val_trials.txt").stat().st_mtime_ns == stamp  # cached
    make_speaker_dataset(tmp_path / "spk", **{**TINY, "num_speakers": 2, "augmentation_files": 0})
    assert sorted(p.name for p in (root / "train").iterdir()) == ["id00000", "id00001"]  # regenerated
    assert sorted(p.name for p in (root / "val").iterdir())[0] == "id00002" and not (root / "musan").exists()
    assert json.loads((root / "meta.json").read_text())["num_speakers"] == 2

    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a synthetic speaker corpus"):
        make_speaker_dataset(tmp_path / "mine", **TINY)


def test_synthetic_voices_carry_speaker_and_channel_structure():
    """MFCC means (the baseline's vectors): the same voice on the same channel is closer than other
    voices on that channel (voice identity is there) and than itself on another channel (channels
    matter, which the baseline cannot undo); across channels the same voice is still closer."""
    rng = np.random.default_rng(0)
    voices = [sample_speaker(rng) for _ in range(6)]
    channels = [sample_channel(rng) for _ in range(2)]
    vecs = {}
    for s, voice in enumerate(voices):
        for c, channel in enumerate(channels):
            for k in range(3):
                wave = synthesize_utterance(voice, channel, rng, 1.0)
                assert wave.shape == (16000,) and wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
                v = mfcc_mean(kaldi_fbank(torch.from_numpy(wave * INPUT_SCALE)).numpy())[1:]
                vecs[s, c, k] = v / np.linalg.norm(v)
    groups = {"same": [], "same_voice": [], "same_channel": [], "neither": []}
    keys = list(vecs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            kind = {(True, True): "same", (True, False): "same_voice", (False, True): "same_channel",
                    (False, False): "neither"}[(a[0] == b[0], a[1] == b[1])]
            groups[kind].append(vecs[a] @ vecs[b])
    sim = {k: float(np.mean(v)) for k, v in groups.items()}
    assert sim["same"] > sim["same_channel"] + 0.02, sim
    assert sim["same"] > sim["same_voice"] + 0.05, sim
    assert sim["same_voice"] > sim["neither"], sim


# ------------------------------------------------------------------------------------- configs


def print_config(*args):
    from mlearn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(["train", *map(str, args), "--print_config"])
        except SystemExit as exc:
            code = exc.code
    assert code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def build(spec):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_speaker_config_builds(path):
    config = print_config("--config", path)
    backbone = build(config["model"]["backbone"]).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 120, 80))
    assert out.shape == (2, backbone.embedding_size) and torch.isfinite(out).all()
    assert config["data"]["class_path"].endswith("SpeakerDataModule")
    margin = config["model"]["head"]["margin"]
    assert margin["class_path"].endswith("ArcFace") and margin["init_args"]["s"] == 32.0
    for callback in config["trainer"].get("callbacks") or []:
        build(callback)


def test_recipes_follow_wespeaker():
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS}
    ecapa, resnet, lm = (recipes[k] for k in ("voxceleb2_ecapa_aam", "voxceleb2_resnet34_aam",
                                               "voxceleb2_resnet34_lm"))
    assert ecapa["model"]["backbone"]["init_args"] == {"channels": 512, "embedding_size": 192}
    assert resnet["model"]["backbone"]["init_args"] == {"base_channels": 32, "embedding_size": 256}
    for recipe in (ecapa, resnet):
        callbacks = recipe["trainer"]["callbacks"]
        margins = next(c for c in callbacks if c["class_path"].endswith("MarginScheduler"))
        assert margins["init_args"] == {"initial_margin": 0.0, "final_margin": 0.2,
                                        "increase_start_epoch": 20, "fix_start_epoch": 40,
                                        "increase_type": "exp", "interval": "step"}
        assert recipe["trainer"]["max_epochs"] == 150 and recipe["model"]["schedule"]["warmup_epochs"] == 6
        assert recipe["data"]["init_args"]["speeds"] == [1.0, 0.9, 1.1]
        assert recipe["model"]["optimizer"]["init_args"] == {"lr": 0.4, "momentum": 0.9, "nesterov": True,
                                                            "weight_decay": 1.0e-4}
    assert lm["model"]["head"]["margin"]["init_args"]["m"] == 0.5 and lm["trainer"]["max_epochs"] == 5
    assert lm["data"]["init_args"]["crop_seconds"] == pytest.approx(6.015)


# -------------------------------------------------------------------------------- end to end


def test_quickstart_end_to_end_tiny(tmp_path, monkeypatch):
    from mlearn.cli import main
    from mlearn.evaluation.suite import run_suite
    from mlearn.inference import load_model

    config = yaml.safe_load((ROOT / "configs" / "speaker" / "quickstart.yaml").read_text())
    data_root = tmp_path / "speakers"
    config["trainer"].update(max_epochs=2, limit_train_batches=2, log_every_n_steps=1,
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"].update(increase_start_epoch=1, fix_start_epoch=2)
    config["data"]["init_args"].update(root=str(data_root), batch_size=4, num_workers=0, crop_seconds=0.5,
                                       noise_dir=str(data_root / "musan"), rir_dir=str(data_root / "rirs"),
                                       synthetic=TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(path), "--run_dir", str(run)]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(json.loads((run / "label_map.json").read_text())) == 3
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    margins = [float(r.split(",")[header.index("train/margin")]) for r in lines[1:]
               if r.split(",")[header.index("train/margin")]]
    assert margins[0] == 0.0 and margins[-1] == pytest.approx(0.2)  # ramped within the 4 steps

    suite = yaml.safe_load((ROOT / "evaluation" / "speaker_quickstart.yaml").read_text())
    protocol = suite["protocols"][0]
    protocol.update(trials=str(data_root / "val_trials.txt"), wav_root=str(data_root / "val"),
                    calibration={"dev_trials": str(data_root / "dev_trials.txt")})
    results = run_suite(load_model(run), suite, out_dir=tmp_path / "eval")
    rows = {r["method"]: r for r in results["results"]}
    assert set(rows) == {"model", "mfcc_mean", "model+calibrated"}
    assert all(rows[m]["trials"] == 8 and 0.0 <= rows[m]["eer"] <= 1.0 for m in rows)
    assert rows["model+calibrated"]["cllr"] >= rows["model+calibrated"]["min_cllr"] >= 0.0
