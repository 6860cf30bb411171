"""Checkpoint averaging (:mod:`mlearn.averaging`): the mean of the last N checkpoints, the
``tools/average_checkpoints.py`` command, and :class:`LoadWeights` (start from averaged weights)."""
from types import SimpleNamespace

import pytest
import torch

from mlearn.averaging import average_checkpoints, average_state_dicts, last_checkpoints


def _checkpoint(seed, epoch):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net[1].num_batches_tracked += epoch
    return {"state_dict": net.state_dict(), "epoch": epoch, "global_step": 10 * epoch,
            "hyper_parameters": {"tag": epoch}, "optimizer_states": [{"x": 1}]}


def test_checkpoint_averaging_is_the_mean(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    checkpoints = {epoch: _checkpoint(epoch, epoch) for epoch in (2, 10, 9, 1)}
    for epoch, ckpt in checkpoints.items():  # names sort differently from epochs: epoch=10 < epoch=2
        torch.save(ckpt, folder / f"epoch={epoch}.ckpt")
    torch.save(checkpoints[10], folder / "last.ckpt")
    chosen = last_checkpoints(folder, 3)
    assert [p.name for p in chosen] == ["epoch=2.ckpt", "epoch=9.ckpt", "epoch=10.ckpt"]
    out = average_checkpoints(chosen, tmp_path / "avg.ckpt")
    saved = torch.load(tmp_path / "avg.ckpt", weights_only=False)
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        mean = sum(checkpoints[e]["state_dict"][key] for e in (2, 9, 10)) / 3
        assert torch.allclose(saved["state_dict"][key], mean, atol=1e-7)
    assert saved["state_dict"]["1.num_batches_tracked"].item() == 10  # integers: from the newest
    assert saved["hyper_parameters"] == {"tag": 10} and "optimizer_states" not in saved
    assert saved["averaged_from"] == ["epoch=2.ckpt", "epoch=9.ckpt", "epoch=10.ckpt"]
    assert out["epoch"] == 10
    plain = average_state_dicts([checkpoints[1]["state_dict"], checkpoints[2]["state_dict"]])
    assert torch.allclose(plain["0.weight"], (checkpoints[1]["state_dict"]["0.weight"]
                                              + checkpoints[2]["state_dict"]["0.weight"]) / 2)
    with pytest.raises(ValueError, match="4 checkpoint"):
        last_checkpoints(folder, 5)
    bad = {"state_dict": {"other": torch.zeros(1)}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="different keys"):
        average_checkpoints([folder / "epoch=1.ckpt", tmp_path / "bad.ckpt"])


def test_average_checkpoints_tool(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "average_checkpoints_tool", Path(__file__).resolve().parents[1] / "tools" / "average_checkpoints.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for epoch in (1, 2):
        torch.save(_checkpoint(epoch, epoch), tmp_path / f"e{epoch}.ckpt")
    output = tmp_path / "out" / "avg.ckpt"
    assert tool.main(["--dir", str(tmp_path), "--num", "2", "--output", str(output)]) == 0
    assert (tmp_path / "out" / "avg.ckpt").is_file() and "averaged 2 checkpoints" in capsys.readouterr().out
    assert tool.main(["--ckpts", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_load_weights_callback_initialises_but_never_overrides_a_resume(tmp_path):
    from mlearn.averaging import LoadWeights

    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save({"state_dict": source.state_dict(), "epoch": 4}, tmp_path / "avg.ckpt")
    before = target.weight.detach().clone()
    LoadWeights(str(tmp_path / "avg.ckpt")).on_fit_start(SimpleNamespace(ckpt_path="last.ckpt"), target)
    assert torch.equal(target.weight, before)  # resuming: the resumed weights stay
    LoadWeights(str(tmp_path / "avg.ckpt")).on_fit_start(SimpleNamespace(ckpt_path=None), target)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        LoadWeights(str(tmp_path / "nope.ckpt")).on_fit_start(SimpleNamespace(ckpt_path=None), target)
