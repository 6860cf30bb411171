"""Lightning DDP (gloo, CPU, 2 processes launched like torchrun) gives the exact gradient of the global
loss: one SGD step equals one single-process step on the combined batch, for the backbone (DDP sums,
not averages) and for the sharded class centers (ignored by DDP, gathered in the checkpoint)."""
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES, DIM, SAMPLES, WORLD = 10, 6, 8, 2


class TinyNet(nn.Module):
    """No batch norm: per-rank BN statistics would legitimately differ from the global ones."""

    embedding_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def make_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(SAMPLES, DIM, generator=g),
                         torch.randint(0, NUM_CLASSES, (SAMPLES,), generator=g))


def make_module(initial_state=None):
    from mlearn.heads import ArcFace
    from mlearn.module import EmbeddingModule, HeadConfig
    from mlearn.schedules import LRSchedule

    torch.manual_seed(0)

    class Module(EmbeddingModule):
        def configure_model(self):
            super().configure_model()
            if initial_state is not None and not getattr(self, "_loaded", False):
                self.load_state_dict(initial_state)
                self._loaded = True

        def train_dataloader(self):
            per_rank = SAMPLES // max(self.trainer.world_size, 1)
            return DataLoader(make_data(), batch_size=per_rank, shuffle=False)

    return Module(TinyNet(), HeadConfig(margin=ArcFace(s=8.0, m=0.3)), num_classes=NUM_CLASSES,
                  optimizer=partial(torch.optim.SGD, lr=1.0, momentum=0.9),
                  schedule=LRSchedule("constant"))


def trainer(devices, strategy="auto"):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _worker(rank, world, initial_state, out_path):
    from pytorch_lightning.strategies import DDPStrategy

    module = make_module(initial_state)
    ddp_trainer = trainer(world, DDPStrategy(process_group_backend="gloo"))
    ddp_trainer.fit(module)
    ddp_trainer.save_checkpoint(out_path)  # collective: gathers the center shards and their momentum


@pytest.mark.distributed
def test_ddp_step_equals_single_process_step(tmp_path, ddp_run):
    reference = make_module()
    reference.configure_model()
    initial = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    single = trainer(1)
    single.fit(reference)
    single.save_checkpoint(tmp_path / "single.ckpt")
    expected_ckpt = torch.load(tmp_path / "single.ckpt", weights_only=False)
    expected = expected_ckpt["state_dict"]

    out = tmp_path / "ddp.ckpt"
    ddp_run(WORLD, _worker, initial, out, lightning=True)
    got_ckpt = torch.load(out, weights_only=False)
    got = got_ckpt["state_dict"]
    assert set(got) == set(expected)
    expected_momentum = expected_ckpt["optimizer_states"][0]["state"]
    got_momentum = got_ckpt["optimizer_states"][0]["state"]
    assert set(got_momentum) == set(expected_momentum)
    for index in expected_momentum:
        torch.testing.assert_close(got_momentum[index]["momentum_buffer"],
                                   expected_momentum[index]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6, msg=f"momentum of parameter {index}")
    for key in expected:
        if key.startswith(("backbone.", "head.weight")):
            assert not torch.equal(expected[key], initial[key]), f"{key} did not move"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
