"""Exact resume: n steps + kill + ``ckpt_path`` + n steps equals 2n steps straight (sampler position,
augmentation and Partial FC random streams, optimizer, schedule and margin state all restored); and the
seeded epoch-permutation sampler that makes it possible."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from mlearn.data.audio.datamodule import SpeakerDataModule
from mlearn.data.images.datamodule import FaceDataModule
from mlearn.data.images.transforms import build_transform
from mlearn.data.order import EpochPermutationSampler, EpochSeededDataset
from mlearn.data.seeding import reseed_transform, sample_generators
from mlearn.heads import AdaFace, ArcFace
from mlearn.models import ECAPA_TDNN, IResNet
from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.schedules import LRSchedule

CLASSES, PER_CLASS, SIZE, BATCH = 4, 8, 32, 8  # 32 images: 4 batches per epoch


@pytest.fixture(scope="module")
def rec(tiny_recordio: Callable) -> Path:
    return tiny_recordio(classes=CLASSES, per_class=PER_CLASS, size=SIZE)


class Kill(pl.Callback):
    """Simulates the job dying just before optimizer step ``step + 1`` (after step ``step``'s checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyError("killed")  # any exception: Lightning tears down and re-raises it


def make_module(update_unsampled: bool = True, classes: int = CLASSES) -> EmbeddingModule:
    torch.manual_seed(0)
    backbone = IResNet(layers=[1, 1], width=8, embedding_size=16, input_size=SIZE, stem_stride=2, dropout=0.2)
    head = HeadConfig(margin=AdaFace(s=16.0, m=0.3), sample_rate=0.5, update_unsampled=update_unsampled)
    return EmbeddingModule(backbone, head, num_classes=classes,
                           schedule=LRSchedule("poly", warmup_epochs=1.0), clip_backbone_grad_norm=2.0)


def train(rec: Path, run_dir: Path, max_steps: int, every: int, kill: Optional[int] = None,
          ckpt_path: Optional[str] = None, num_workers: int = 0, update_unsampled: bool = True,
          extra_callbacks: Optional[List[pl.Callback]] = None, classes: int = CLASSES) -> EmbeddingModule:
    module = make_module(update_unsampled, classes)
    data = FaceDataModule(str(rec), batch_size=BATCH, num_workers=num_workers, image_size=SIZE,
                          augmentation="low_quality", seed=3)
    checkpoints = ModelCheckpoint(dirpath=run_dir, every_n_train_steps=every, save_last=True, save_top_k=-1)
    callbacks: List[pl.Callback] = [checkpoints] + list(extra_callbacks or [])
    if kill is not None:
        callbacks.insert(0, Kill(kill))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold objects
    return module


def weights(module: EmbeddingModule) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("n", [3, 4])  # mid-epoch (then across the epoch boundary), and at the end of epoch 0
def test_kill_and_resume_equals_straight_run(rec: Path, tmp_path: Path, n: int) -> None:
    straight = weights(train(rec, tmp_path / "straight", max_steps=2 * n, every=n))
    with pytest.raises(KeyError, match="killed"):
        train(rec, tmp_path / "resumed", max_steps=2 * n, every=n, kill=n)
    last = tmp_path / "resumed" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == n
    after_n = checkpoint["state_dict"]
    resumed = weights(train(rec, tmp_path / "resumed", max_steps=2 * n, every=n, ckpt_path=str(last)))

    assert not torch.equal(after_n["head.weight"], straight["head.weight"])  # the second half did train
    assert not torch.equal(after_n["head.margin.batch_mean"], straight["head.margin.batch_mean"])
    assert_same(resumed, straight)


class OnlySampledCentersMove(pl.Callback):
    """Partial FC v1: after every optimizer step, the centers that were not sampled are as before it."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self.before = module.head.weight.detach().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        sampled = module.head.last_sample_index
        others = torch.ones(module.head.num_classes, dtype=torch.bool)
        others[sampled] = False
        assert int(others.sum()) > 0
        weight = module.head.weight.detach()
        assert torch.equal(weight[others], self.before[others])
        assert not torch.equal(weight[sampled], self.before[sampled])
        self.steps += 1


def test_partial_fc_v1_moves_only_sampled_centers_and_resumes_exactly(tiny_recordio: Callable,
                                                                      tmp_path: Path) -> None:
    classes = 16  # 2 images each: a batch of 8 holds at most 8 classes, sample_rate 0.5 keeps 8
    rec = tiny_recordio(classes=classes, per_class=2, size=SIZE)
    run = functools.partial(train, rec, max_steps=6, every=3, update_unsampled=False, classes=classes)
    check = OnlySampledCentersMove()
    straight = weights(run(tmp_path / "straight", extra_callbacks=[check]))
    assert check.steps == 6
    with pytest.raises(KeyError, match="killed"):
        run(tmp_path / "resumed", kill=3)
    last = tmp_path / "resumed" / "last.ckpt"
    momentum = torch.load(last, weights_only=False)["optimizer_states"][0]["state"]
    assert any(tuple(v["momentum_buffer"].shape) == (classes, 16) for v in momentum.values())  # full-size
    assert_same(weights(run(tmp_path / "resumed", ckpt_path=str(last))), straight)
    v2 = weights(run(tmp_path / "v2", update_unsampled=True))
    assert not torch.equal(v2["head.weight"], straight["head.weight"])


def test_resume_without_the_data_position_diverges(rec: Path, tmp_path: Path) -> None:
    """Negative control: the same resume with the sampler position dropped from the checkpoint differs."""
    straight = weights(train(rec, tmp_path / "straight", max_steps=6, every=3))
    with pytest.raises(KeyError):
        train(rec, tmp_path / "run", max_steps=6, every=3, kill=3)
    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    position = {"seed": 3, "epoch": 0, "samples": 3 * BATCH, "global_batch": BATCH}
    assert checkpoint["FaceDataModule"] == position
    del checkpoint["FaceDataModule"]
    torch.save(checkpoint, tmp_path / "no_position.ckpt")
    resumed = weights(train(rec, tmp_path / "run", max_steps=6, every=3,
                            ckpt_path=str(tmp_path / "no_position.ckpt")))
    differing = [k for k in straight if not torch.allclose(resumed[k], straight[k])]
    assert "head.weight" in differing


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_global_batches_are_shared_out_over_ranks() -> None:
    n, batch, world = 50, 4, 3  # global batch 12: 4 batches, 2 samples dropped
    samplers = [EpochPermutationSampler(n, batch, seed=5, num_replicas=world, rank=r, epoch=2)
                for r in range(world)]
    streams = [list(s) for s in samplers]
    assert all(len(s) == len(stream) == 16 for s, stream in zip(samplers, streams))
    assert all(epoch == 2 for stream in streams for _, epoch in stream)
    order = samplers[0].permutation(2)
    for b in range(4):  # global batch b = ranks' b-th batches side by side
        together = [i for r in range(world) for i, _ in streams[r][b * batch:(b + 1) * batch]]
        assert together == order[b * 12:(b + 1) * 12].tolist()
    # the same order as one process with the whole global batch
    single = [i for i, _ in EpochPermutationSampler(n, batch * world, seed=5, epoch=2)]
    assert single == order[:48].tolist()


def test_sampler_epochs_seeds_and_start_position() -> None:
    sampler = EpochPermutationSampler(40, 4, seed=1)
    first = [i for i, _ in sampler]
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert [i for i, _ in sampler] == first  # same epoch, same order
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != first
    assert [i for i, _ in EpochPermutationSampler(40, 4, seed=2)] != first

    resumed = EpochPermutationSampler(40, 4, seed=1, epoch=0, start=12)
    assert [i for i, _ in resumed] == first[12:]
    assert [i for i, _ in resumed] == first  # the skip applies once
    resumed = EpochPermutationSampler(40, 4, seed=1, epoch=0, start=12)
    resumed.set_epoch(1)  # a new epoch starts from its beginning
    assert len(list(resumed)) == 40


def test_sampler_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochPermutationSampler(10, 4, num_replicas=3)
    with pytest.raises(ValueError, match="rank=2"):
        EpochPermutationSampler(100, 4, num_replicas=2, rank=2)


def test_augmentation_is_seeded_per_sample_not_per_worker(rec: Path) -> None:
    data = FaceDataModule(str(rec), batch_size=BATCH, num_workers=0, image_size=SIZE,
                          augmentation="low_quality")
    seeded = EpochSeededDataset(data.dataset, seed=7)
    a, label = seeded[(5, 0)]
    b, _ = seeded[(5, 0)]
    c, _ = seeded[(5, 1)]
    torch.testing.assert_close(a, b)  # same sample, same epoch: same augmentation
    assert label == int(data.dataset.labels[5])
    assert sum(not torch.equal(seeded[(i, 0)][0], seeded[(i, 1)][0]) for i in range(8)) >= 2  # epochs differ
    reseed_transform(data.dataset.transform, sample_generators(7, 1, 5))  # the documented streams
    torch.testing.assert_close(data.dataset[5][0], c)

    one = [batch for _, batch in zip(range(3), data.train_dataloader())]
    data_workers = FaceDataModule(str(rec), batch_size=BATCH, num_workers=2, image_size=SIZE,
                                  augmentation="low_quality")
    two = [batch for _, batch in zip(range(3), data_workers.train_dataloader())]
    for a, b in zip(one, two):
        torch.testing.assert_close(a.images, b.images)
        torch.testing.assert_close(a.labels, b.labels)


def test_sample_generators_give_independent_transform_draws() -> None:
    """One shared generator per sample: a flip and a crop are not applied together (as they would be if
    each transform were seeded with the same number)."""
    transform = build_transform([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}],
                                image_size=4)
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    both_or_neither = 0
    for index in range(200):
        dataset = EpochSeededDataset(_OneImage(image, transform), seed=0)
        out = dataset[(index, 0)][0].numpy().transpose(1, 2, 0)
        plain = (image.astype(np.float32) - 127.5) / 127.5
        flips = [np.allclose(out, f(plain)) for f in (lambda x: x, lambda x: x[::-1, ::-1])]
        both_or_neither += any(flips)
    assert 0.35 < both_or_neither / 200 < 0.65
    g1, g2 = sample_generators(0, 0, 1), sample_generators(0, 1, 0)
    assert g1[0].random() != g2[0].random() and g1[1].random() != g2[1].random()


class _OneImage:
    def __init__(self, image: np.ndarray, transform: object) -> None:
        self.image, self.transform = image, transform

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple:
        return self.transform(self.image), 0


# ------------------------------------------------------------------------------------------ CLI


TINY_CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_steps: 4, precision: 32, enable_progress_bar: false,
          enable_model_summary: false, logger: false}
checkpoint: {every_n_train_steps: 2, save_top_k: -1}
model:
  backbone:
    class_path: mlearn.models.IResNet
    init_args: {layers: [1, 1], width: 8, embedding_size: 16, input_size: 32, stem_stride: 2, dropout: 0.2}
  head:
    margin: {class_path: mlearn.heads.ElasticArcFace, init_args: {s: 16.0, m: 0.3}}
    sample_rate: 0.5
  schedule: {warmup_epochs: 0.5}
data:
  class_path: mlearn.data.FaceDataModule
  init_args: {root: ROOT, batch_size: 8, num_workers: 0, image_size: 32, augmentation: low_quality}
"""


def test_cli_resume_from_a_mid_run_checkpoint(rec: Path, tmp_path: Path) -> None:
    """``mlearn train --ckpt_path last`` (checkpoints as the CLI writes them, loaded with
    ``weights_only=True``) continues a 4-step run from its step-2 checkpoint to the same weights."""
    from mlearn.train_cli import run_training

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.replace("ROOT", str(rec)))
    assert run_training(["--config", str(config), "--run_dir", str(tmp_path / "a")]) == 0
    straight = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    step2 = next((tmp_path / "a" / "checkpoints").glob("*step=2.ckpt"))
    # as a killed run leaves it
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_bytes(step2.read_bytes())
    resume = ["--config", str(config), "--run_dir", str(tmp_path / "b"), "--ckpt_path", "last"]
    assert run_training(resume) == 0
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 4
    assert_same(resumed["state_dict"], straight["state_dict"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_uint8_batches_train_like_float_batches(rec: Path) -> None:
    """``uint8_batches``: the loader ships uint8 and the data module normalises on the device: same
    loss."""
    losses = []
    for uint8 in (False, True):
        data = FaceDataModule(str(rec), batch_size=BATCH, num_workers=0, image_size=SIZE, uint8_batches=uint8)
        batch = next(iter(data.train_dataloader()))
        assert batch[0].dtype == (torch.uint8 if uint8 else torch.float32)
        module = make_module()
        module.configure_model()
        module.eval()  # no dropout, no head sampling: a deterministic loss
        with torch.no_grad():
            losses.append(module.training_step(data.on_after_batch_transfer(batch, 0), 0))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ speakers

SPEAKERS = dict(num_speakers=3, utterances_per_speaker=4, videos_per_speaker=2, num_val_speakers=2,
                val_utterances_per_speaker=2, num_val_trials=4, min_seconds=0.4, max_seconds=0.9,
                augmentation_files=1)  # 12 training utterances: 3 batches of 4 per epoch


def speaker_data(root: Path, num_workers: int = 0) -> SpeakerDataModule:
    return SpeakerDataModule(str(root), batch_size=4, num_workers=num_workers, crop_seconds=0.5,
                             speeds=[1.0, 1.1], aug_prob=0.8, noise_dir=str(root / "musan"),
                             rir_dir=str(root / "rirs"), synthetic=SPEAKERS, seed=5)


@pytest.fixture(scope="module")
def speakers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speakers")
    assert len(speaker_data(root).dataset) > 0  # generates the corpus
    return root


def test_speaker_crops_and_augmentation_are_seeded_per_sample(speakers: Path) -> None:
    """Crops, speed factors and reverb/noise come from each sample's stream: the batches of two epochs
    are the same with 0 and 2 workers, equal the per-sample reference, and differ between epochs."""
    def epochs(workers: int) -> list:
        data = speaker_data(speakers, num_workers=workers)
        loader = data.train_dataloader()
        batches = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches += list(loader)
        return batches

    in_process, with_workers = epochs(0), epochs(2)
    assert len(in_process) == len(with_workers) == 6
    for a, b in zip(in_process, with_workers):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert a[1].tolist() == b[1].tolist()
    data = speaker_data(speakers)
    loader = data.train_dataloader()
    keys = list(loader.sampler)[:4]
    reference = [EpochSeededDataset(data.dataset, seed=5)[key][0] for key in keys]
    torch.testing.assert_close(in_process[0][0], torch.stack(reference), rtol=0, atol=0)
    assert set(in_process[0][1].tolist()) <= set(range(6))  # 3 speakers x 2 speeds
    epoch0 = torch.cat([b[0] for b in in_process[:3]])
    epoch1 = torch.cat([b[0] for b in in_process[3:]])
    assert not torch.equal(epoch0, epoch1)


def train_speaker(root: Path, run_dir: Path, max_steps: int, every: int, kill: Optional[int] = None,
                  ckpt_path: Optional[str] = None) -> EmbeddingModule:
    torch.manual_seed(0)
    backbone = ECAPA_TDNN(channels=16, embedding_size=16, mfa_channels=48, se_bottleneck=8,
                          attention_bottleneck=8)
    module = EmbeddingModule(backbone, HeadConfig(margin=ArcFace(s=16.0, m=0.2), sample_rate=1.0),
                             num_classes=6, schedule=LRSchedule("cosine", warmup_epochs=1.0))
    checkpoints = ModelCheckpoint(dirpath=run_dir, every_n_train_steps=every, save_last=True, save_top_k=-1)
    callbacks: List[pl.Callback] = [checkpoints] if kill is None else [Kill(kill), checkpoints]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(module, datamodule=speaker_data(root), ckpt_path=ckpt_path, weights_only=False)
    return module


def test_speaker_kill_and_resume_equals_straight_run(speakers: Path, tmp_path: Path) -> None:
    """Mid-epoch (step 2 of 3) resume of a speaker run, across the epoch boundary, with fbank dither,
    speed perturbation, reverb and noise: the same weights as 4 steps straight."""
    straight = weights(train_speaker(speakers, tmp_path / "straight", max_steps=4, every=2))
    with pytest.raises(KeyError, match="killed"):
        train_speaker(speakers, tmp_path / "resumed", max_steps=4, every=2, kill=2)
    last = tmp_path / "resumed" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["SpeakerDataModule"] == {"seed": 5, "epoch": 0, "samples": 8, "global_batch": 4}
    resumed = weights(train_speaker(speakers, tmp_path / "resumed", max_steps=4, every=2,
                                    ckpt_path=str(last)))
    assert not torch.equal(checkpoint["state_dict"]["head.weight"], straight["head.weight"])
    assert_same(resumed, straight)


# ------------------------------------------------------------------------------------------ resume state


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import random

    from mlearn.resume import rng_state_to_restore, save_rng_states, set_rng_state

    checkpoint: Dict[str, object] = {}
    save_rng_states(checkpoint, torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(checkpoint, tmp_path / "rng.ckpt")
    state = rng_state_to_restore(torch.load(tmp_path / "rng.ckpt", weights_only=True))
    assert state is not None
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    two_ranks = {"rng_states": [state, state]}
    with caplog.at_level("WARNING", logger="mlearn.resume"):
        assert rng_state_to_restore(two_ranks) is None
    assert "saved on 2 ranks, resuming on 1" in caplog.text
    assert rng_state_to_restore({}) is None


def test_sample_position_and_its_resume_point(caplog: pytest.LogCaptureFixture) -> None:
    from mlearn.resume import position_to_resume, sample_position

    assert sample_position(None, seed=3, global_batch=8) == {}
    assert position_to_resume({}, seed=3) is None
    saved = {"seed": 3, "epoch": 2, "samples": 24, "global_batch": 8}
    assert position_to_resume(saved, seed=3) == {"epoch": 2, "samples": 24}
    with caplog.at_level("WARNING", logger="mlearn.resume"):
        assert position_to_resume(saved, seed=4) == {"epoch": 2, "samples": 24}
    assert "the sample order changes" in caplog.text
