"""A speaker score calibration stored with the exported model (``mlearn export --calibration``), read
back by ``load_model(path).calibration`` and applied by the trials protocol with
``calibration: {from_model: true}`` (issue 20, point 4)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import AUDIO_ARGS, make_run, read_metadata
from test_speaker_eval import _write_corpus

from mlearn import cli
from mlearn.evaluation.metrics.calibration import Calibration
from mlearn.evaluation.protocols.options import build_options
from mlearn.evaluation.protocols.trials import run_protocol
from mlearn.evaluation.suite import run_suite
from mlearn.export import export_model, read_calibration
from mlearn.inference import load_model
from mlearn.models import ECAPA_TDNN

TRIALS = {"type": "trials", "name": "tiny", "trials": "trials.txt", "wav_root": "wav"}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(data root, run dir, results.json) with a calibration fitted on the tiny trial list."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("spk")
    _write_corpus(root)
    run = make_run(root / "run", ECAPA_TDNN, AUDIO_ARGS)
    fit = {"dev_trials": "trials.txt", "prior": 0.5}
    suite = {"name": "spk", "protocols": [{**TRIALS, "calibration": fit}]}
    run_suite(load_model(run, device="cpu"), suite, data_root=root, out_dir=run / "eval" / "spk",
              batch_size=4)
    return root, run, run / "eval" / "spk" / "results.json"


def _fitted(results: Path) -> dict:
    return next(r["calibration"] for r in json.loads(results.read_text())["results"] if "calibration" in r)


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt"),
                                         ("safetensors", ".safetensors")])
def test_export_stores_the_calibration_as_metadata(calibrated, tmp_path, fmt, suffix, capsys):
    root, run, results = calibrated
    fitted = _fitted(results)
    output = tmp_path / f"model{suffix}"
    # --calibration alone: the newest evaluation of the run holding a calibrated row
    assert cli.main(["export", "--model", str(run), "--format", fmt, "--output", str(output),
                     "--calibration"]) == 0, capsys.readouterr().err
    assert f"calibration from {results} stored" in capsys.readouterr().out
    stored = read_metadata(output, fmt)["calibration"]
    assert {k: v for k, v in stored.items() if k != "info"} == {k: v for k, v in fitted.items()
                                                                  if k != "info"}
    assert stored["info"]["source"] == str(results) and stored["info"]["benchmark"] == "tiny"
    model = load_model(output, device="cpu")
    assert model.calibration == stored
    assert model.calibration["config_hash"] == model.metadata["config_hash"]
    assert load_model(run, device="cpu").calibration is None


def test_from_model_applies_it_like_the_file(calibrated, tmp_path):
    root, run, results = calibrated
    output = export_model(run, "safetensors", tmp_path / "model.safetensors", calibration=results).path
    exported = load_model(output, device="cpu")
    Calibration.from_dict(exported.calibration).save(root / "stored.json")
    from_model = run_protocol(exported, {**TRIALS, "calibration": {"from_model": True}}, root, batch_size=4)
    from_file = run_protocol(load_model(run, device="cpu"),
                             {**TRIALS, "calibration": {"file": "stored.json"}}, root, batch_size=4)
    assert [r["method"] for r in from_model] == ["model", "model+calibrated"]
    assert "calibration stored in model" in from_model[1]["calibration_source"]
    np.testing.assert_allclose(from_model[1].scores, from_file[1].scores, rtol=1e-6, atol=1e-9)
    assert from_model[1]["cllr"] == pytest.approx(from_file[1]["cllr"], rel=1e-6)
    # a map over other features than the protocol computes (a cohort adds two columns) is refused
    with pytest.raises(ValueError, match="expects features"):
        run_protocol(exported, {**TRIALS, "cohort": "cohort", "calibration": {"from_model": True}}, root,
                     batch_size=4)


def test_another_models_calibration_is_refused(calibrated, tmp_path, capsys):
    root, run, results = calibrated
    other = make_run(tmp_path / "other", ECAPA_TDNN, {**AUDIO_ARGS, "embedding_size": 8})
    with pytest.raises(ValueError, match="does not match model") as err:
        export_model(other, "onnx", tmp_path / "other.onnx", calibration=results)
    assert "\n" not in str(err.value) and not (tmp_path / "other.onnx").exists()
    assert cli.main(["export", "--model", str(other), "--output", str(tmp_path / "o.onnx"),
                     "--calibration", str(results)]) != 0
    err_text = capsys.readouterr().err.strip()
    assert "does not match model" in err_text and len(err_text.splitlines()) == 1


def test_missing_calibration_is_one_line(calibrated, tmp_path):
    root, run, results = calibrated
    with pytest.raises(ValueError, match=r"stores no calibration; export it with mlearn export "
                                         r"--calibration") as err:
        run_protocol(load_model(run, device="cpu"), {**TRIALS, "calibration": {"from_model": True}}, root,
                     batch_size=4)
    assert "\n" not in str(err.value)
    empty = tmp_path / "results.json"
    empty.write_text(json.dumps({"results": [{"benchmark": "x", "eer": 0.1}]}))
    with pytest.raises(ValueError, match="no rows with a calibration"):
        read_calibration(empty)
    (tmp_path / "run" / "eval" / "faces").mkdir(parents=True)
    (empty).replace(tmp_path / "run" / "eval" / "faces" / "results.json")
    with pytest.raises(FileNotFoundError, match="no evaluation with a calibration under"):
        read_calibration(tmp_path / "run")


def test_several_calibrated_rows_need_a_benchmark(calibrated, tmp_path):
    _, _, results = calibrated
    data = json.loads(results.read_text())
    row = next(r for r in data["results"] if "calibration" in r)
    data["results"].append({**row, "benchmark": "other"})
    several = tmp_path / "results.json"
    several.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"2 rows with a calibration; pick one with --calibration-benchmark "
                                         r"from \['tiny', 'other'\]"):
        read_calibration(several)
    assert read_calibration(several, "other").info["benchmark"] == "other"
    with pytest.raises(ValueError, match="no row of benchmark 'nope'"):
        read_calibration(several, "nope")
    plain = Calibration.from_dict(row["calibration"]).save(tmp_path / "cal.json")  # a calibration file
    assert read_calibration(plain).info["source"] == str(plain)


@pytest.mark.parametrize("spec, ok", [({"from_model": True}, True), ({"from_model": False}, False),
                                      ({"from_model": True, "prior": 0.1}, False),
                                      ({"from_model": True, "file": "c.json"}, False)])
def test_from_model_option_is_checked(spec, ok):
    entry = {"type": "trials", "trials": "t.txt", "wav_root": "w", "calibration": spec}
    if ok:
        assert build_options(entry).calibration == spec
    else:
        with pytest.raises(ValueError, match="calibration=.*from_model: true"):
            build_options(entry)
