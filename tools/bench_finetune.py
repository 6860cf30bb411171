"""Fine-tuning on the synthetic corpora: does starting from a pretrained backbone pay on a small set?

Per modality (faces: :mod:`mlearn.data.synthetic.faces`, speakers: :mod:`mlearn.data.synthetic.speech`):

1. pretrain a small backbone (IResNet / ECAPA-TDNN) from scratch on ``pretrain_ids`` identities;
2. on ``finetune_ids`` DISJOINT identities with 3-5 training samples each, compare on held-out samples
   of those identities (all pairs: genuine within an identity, impostor across):
   - ``untuned``: the pretrained backbone as it is;
   - ``finetune``: ``EmbeddingModule(init_from=<pretrained>)``, class-mean centers, backbone frozen for
     the first epoch, then lr 0.05 for head and backbone (cosine decay);
   - ``finetune_recipe``: the same at the recipes' settings, lr 0.01 and the backbone at 0.1x (made for
     large pretrained models: on the tiny face backbone it moves the backbone too little to gain much);
   - ``finetune_random_centers``: ``finetune`` with randomly initialised centers;
   - ``scratch``: the same backbone from random weights, the same step budget, the pretraining recipe.
   Reported: EER and TAR@FAR=1e-2 on the held-out pairs, and the mean training accuracy (nearest class
   center, :class:`mlearn.finetune.TrainAccuracy`) over the first epoch; chance is 1 / finetune_ids.

Speakers: the speaker quickstart's ECAPA-TDNN (c64, 128-d) on 1.5 s utterances. Every speaker records
in videos of its own (a recording channel each, as in the quickstart corpus): pretraining utterances
cycle over ``PRETRAIN_VIDEOS`` videos per speaker, fine-tuning samples over ``FINETUNE_VIDEOS``, and each
held-out utterance comes from a further video of its own, so no held-out pair shares a channel with
another sample of the pair or with the fine-tuning set. Pretraining and ``scratch`` use SGD at 0.01
(``PRETRAIN_LR``). (An earlier version drew every utterance from 16 channels shared by all speakers and
pretrained a tiny ResNetSpeaker at 0.1; nothing transferred, EER ~0.48 everywhere.)

Everything is generated in memory (no files but the pretrained checkpoint in a temporary folder), on CPU:
  python tools/bench_finetune.py      # both modalities: faces ~2 min, speakers ~2 min on 2 cores
  python tools/bench_finetune.py --modality face --out /tmp/bench_H4.md
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlearn.data.audio.fbank import INPUT_SCALE, apply_cmn, kaldi_fbank
from mlearn.data.synthetic.faces import render_face, sample_identity
from mlearn.data.synthetic.speech import sample_channel, sample_speaker, synthesize_utterance
from mlearn.evaluation.metrics.roc import roc_metrics
from mlearn.finetune import TrainAccuracy
from mlearn.heads import ArcFace
from mlearn.inference import instantiate, l2_normalize, load_backbone
from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.schedules import LRSchedule

Split = Tuple[torch.Tensor, torch.Tensor]  # inputs [N, ...], labels [N]
PRETRAIN_VIDEOS = 4  # speakers: recording videos (one channel each) per pretraining speaker
FINETUNE_VIDEOS = 2  # per fine-tuning speaker; each held-out utterance has a further video of its own

FACE_SPEC = {"class_path": "mlearn.models.IResNet",
             "init_args": {"layers": [1, 1, 1], "width": 16, "embedding_size": 64, "input_size": 48,
                           "stem_stride": 2}}
SPEAKER_SPEC = {"class_path": "mlearn.models.ECAPA_TDNN",  # configs/speaker/quickstart.yaml's
                "init_args": {"channels": 64, "embedding_size": 128, "mfa_channels": 192, "se_bottleneck": 32,
                              "attention_bottleneck": 32, "num_mel_bins": 80}}


@dataclass
class Sizes:
    """Corpus and training sizes of one run."""

    pretrain_ids: int = 150
    pretrain_per_id: int = 12
    finetune_ids: int = 100
    finetune_per_id: Tuple[int, int] = (3, 5)  # training samples per fine-tune identity, inclusive
    heldout_per_id: int = 4
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    batch_size: int = 32
    seconds: float = 1.0  # speakers: utterance length


# the slow test's sizes (tests/test_finetune.py): under a minute per modality on one core
SMALL = {"face": Sizes(pretrain_ids=80, pretrain_per_id=8, finetune_ids=40, heldout_per_id=3,
                       pretrain_epochs=8),
         "speaker": Sizes(pretrain_ids=60, pretrain_per_id=8, finetune_ids=40, heldout_per_id=3,
                          pretrain_epochs=8, seconds=0.8)}


# ------------------------------------------------------------------------------------------ data


def _split_counts(sizes: Sizes, rng: np.random.Generator) -> List[int]:
    low, high = sizes.finetune_per_id
    return [int(rng.integers(low, high + 1)) for _ in range(sizes.finetune_ids)]


def face_data(sizes: Sizes, seed: int = 0) -> Dict[str, Split]:
    """Normalised images [N, 3, 48, 48]: ``pretrain``, ``finetune`` (disjoint identities) and ``heldout``
    (other images of the fine-tune identities)."""
    rng = np.random.default_rng(seed)
    size = FACE_SPEC["init_args"]["input_size"]
    people = [sample_identity(rng) for _ in range(sizes.pretrain_ids + sizes.finetune_ids)]

    def images(identities: List[int], counts: List[int]) -> Split:
        x = [render_face(people[i], rng, size) for i, n in zip(identities, counts) for _ in range(n)]
        y = [label for label, n in enumerate(counts) for _ in range(n)]
        array = (np.stack(x).astype(np.float32) - 127.5) / 127.5
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), torch.tensor(y)

    tune = list(range(sizes.pretrain_ids, len(people)))
    return {"pretrain": images(list(range(sizes.pretrain_ids)), [sizes.pretrain_per_id] * sizes.pretrain_ids),
            "finetune": images(tune, _split_counts(sizes, rng)),
            "heldout": images(tune, [sizes.heldout_per_id] * len(tune))}


def speaker_data(sizes: Sizes, seed: int = 0) -> Dict[str, Split]:
    """Mean-normalised log-mel fbank [N, T, 80] of ``sizes.seconds`` utterances. Utterance k of a
    pretraining speaker is recorded in its video k mod PRETRAIN_VIDEOS, of a fine-tuning sample in video
    k mod FINETUNE_VIDEOS, and each held-out utterance in a video of its own (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bins = SPEAKER_SPEC["init_args"]["num_mel_bins"]
    voices = [sample_speaker(rng) for _ in range(sizes.pretrain_ids + sizes.finetune_ids)]
    videos_per_speaker = max(PRETRAIN_VIDEOS, FINETUNE_VIDEOS + sizes.heldout_per_id)
    videos = [[sample_channel(rng) for _ in range(videos_per_speaker)] for _ in voices]

    def utterances(speakers: List[int], counts: List[int], video_of: Callable[[int], int]) -> Split:
        length = int(sizes.seconds * 16000)  # the synthesiser may end a phone early: repeat-pad
        waves = [np.resize(synthesize_utterance(voices[s], videos[s][video_of(k)], rng, sizes.seconds),
                           length) for s, n in zip(speakers, counts) for k in range(n)]
        x = torch.from_numpy(np.stack(waves)) * INPUT_SCALE
        features = apply_cmn(kaldi_fbank(x, num_mel_bins=bins))
        return features, torch.tensor([label for label, n in enumerate(counts) for _ in range(n)])

    tune = list(range(sizes.pretrain_ids, len(voices)))
    pretrain = list(range(sizes.pretrain_ids))
    return {"pretrain": utterances(pretrain, [sizes.pretrain_per_id] * len(pretrain),
                                   lambda k: k % PRETRAIN_VIDEOS),
            "finetune": utterances(tune, _split_counts(sizes, rng), lambda k: k % FINETUNE_VIDEOS),
            "heldout": utterances(tune, [sizes.heldout_per_id] * len(tune), lambda k: FINETUNE_VIDEOS + k)}


# -------------------------------------------------------------------------------------- training


class FirstEpochAccuracy(TrainAccuracy):
    """:class:`TrainAccuracy` that also keeps the first epoch's per-batch values (the first one: with the
    initial centers, before any update)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_epoch: List[float] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if trainer.current_epoch == 0 and "train/accuracy" in trainer.callback_metrics:
            self.first_epoch.append(float(trainer.callback_metrics["train/accuracy"]))


def _flip_half(generator: torch.Generator, samples: List[Tuple[torch.Tensor, torch.Tensor]]) -> Split:
    """Collate images [3, H, W] mirroring each with probability 1/2 (the face recipes' augmentation)."""
    images = torch.stack([x for x, _ in samples])
    flip = torch.rand(len(samples), generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    return images, torch.stack([y for _, y in samples])


def train(module: EmbeddingModule, data: Split, epochs: int, batch_size: int, seed: int = 0,
          flip: bool = False) -> List[float]:
    """Fit ``module`` on ``data`` for ``epochs`` (CPU, one process; ``flip``: mirror half the images);
    returns the first epoch's per-batch training accuracies."""
    collate = partial(_flip_half, torch.Generator().manual_seed(seed + 1)) if flip else None
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=collate)
    accuracy = FirstEpochAccuracy()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[accuracy], num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers, small batches: Lightning's hints
        trainer.fit(module, train_dataloaders=loader)
    return accuracy.first_epoch


def make_module(num_classes: int, lr: float, backbone: Optional[torch.nn.Module] = None, **kw: Any
                ) -> EmbeddingModule:
    return EmbeddingModule(backbone, HeadConfig(margin=ArcFace(s=32.0, m=kw.pop("margin", 0.3))),
                           num_classes=num_classes,
                           optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
                           schedule=LRSchedule("cosine"), **kw)


def save_pretrained(module: EmbeddingModule, spec: Dict[str, Any], path: Path) -> Path:
    """A checkpoint as `mlearn train` writes it (the backbone spec in the hyper-parameters)."""
    state = {k: v for k, v in module.state_dict().items() if k.startswith("backbone.")}
    torch.save({"hyper_parameters": {"backbone": spec}, "state_dict": state, "epoch": 0, "global_step": 0},
               path)
    return path


@torch.no_grad()
def verification(backbone: torch.nn.Module, data: Split) -> Dict[str, float]:
    """EER and TAR@FAR=1e-2 over all pairs of ``data`` (genuine: same label)."""
    backbone.eval()
    x, y = data
    embeddings = l2_normalize(torch.cat([backbone(chunk) for chunk in x.split(256)]).numpy())
    i, j = np.triu_indices(len(y), k=1)
    scores = np.einsum("ij,ij->i", embeddings[i], embeddings[j])
    labels = (y.numpy()[i] == y.numpy()[j]).astype(np.int64)
    metrics = roc_metrics(scores, labels, fars=(1e-2,))
    return {"eer": float(metrics["eer"]), "tar_at_far_1e-2": float(metrics["tar_at_far_strict"][1e-2])}


MODELS = ("finetune", "finetune_recipe", "finetune_random_centers", "scratch")
# SGD learning rate of the pretraining and of ``scratch``: 0.1 overshoots on the small ECAPA-TDNN
# (evaluation/LOSSES.md, the speaker tables)
PRETRAIN_LR = {"face": 0.1, "speaker": 0.01}


def run_flow(modality: str, sizes: Sizes, seed: int = 0, workdir: Optional[Path] = None,
             data: Optional[Dict[str, Split]] = None, finetune_lr: float = 0.05,
             backbone_lr_scale: float = 1.0, pretrained_checkpoint: Optional[Path] = None,
             models: Tuple[str, ...] = MODELS) -> Dict[str, Any]:
    """The whole comparison for ``modality`` (``face`` / ``speaker``); returns the metrics per model.
    ``data``: the splits of :func:`face_data` / :func:`speaker_data` (default: generated here);
    ``pretrained_checkpoint``: skip the pretraining (a checkpoint of an earlier run on the same data)."""
    started = time.perf_counter()
    if data is None:
        data = face_data(sizes, seed) if modality == "face" else speaker_data(sizes, seed)
    spec = FACE_SPEC if modality == "face" else SPEAKER_SPEC
    margin = 0.3 if modality == "face" else 0.2
    generated = time.perf_counter() - started
    flip = modality == "face"
    if pretrained_checkpoint is None:
        torch.manual_seed(seed)
        pretrained = make_module(sizes.pretrain_ids, PRETRAIN_LR[modality], instantiate(spec), margin=margin)
        train(pretrained, data["pretrain"], sizes.pretrain_epochs, sizes.batch_size, seed, flip)
    classes = sizes.finetune_ids
    per_epoch = len(data["finetune"][1]) // sizes.batch_size
    results: Dict[str, Any] = {"modality": modality, "sizes": asdict(sizes), "chance": 1.0 / classes,
                               "finetune_samples": len(data["finetune"][1]),
                               "steps": per_epoch * sizes.finetune_epochs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp)
        checkpoint = pretrained_checkpoint or save_pretrained(pretrained, spec,
                                                              folder / f"{modality}_pretrained.ckpt")
        results["untuned"] = verification(load_backbone(checkpoint)[0], data["heldout"])
        runs = {
            "finetune": dict(lr=finetune_lr, init_from=str(checkpoint), freeze_backbone_steps=per_epoch,
                             backbone_lr_scale=backbone_lr_scale),
            "finetune_recipe": dict(lr=0.01, init_from=str(checkpoint), freeze_backbone_steps=per_epoch,
                                    backbone_lr_scale=0.1),
            "finetune_random_centers": dict(lr=finetune_lr, init_from=str(checkpoint), init_centers="random",
                                            freeze_backbone_steps=per_epoch,
                                            backbone_lr_scale=backbone_lr_scale),
            "scratch": dict(lr=PRETRAIN_LR[modality], backbone=instantiate(spec)),
        }
        for name, options in ((k, v) for k, v in runs.items() if k in models):
            torch.manual_seed(seed)
            module = make_module(classes, options.pop("lr"), margin=margin, **options)
            accuracy = train(module, data["finetune"], sizes.finetune_epochs, sizes.batch_size, seed, flip)
            results[name] = {**verification(module.backbone, data["heldout"]),
                             "first_batch_accuracy": accuracy[0] if accuracy else float("nan"),
                             "first_epoch_accuracy": float(np.mean(accuracy)) if accuracy else float("nan")}
    results["seconds"] = {"data": round(generated, 1), "total": round(time.perf_counter() - started, 1)}
    return results


# ---------------------------------------------------------------------------------------- report


def markdown(results: List[Dict[str, Any]]) -> str:
    lines = ["## Fine-tuning on a small set (tools/bench_finetune.py)", "",
             "Pretrain a tiny backbone on one set of synthetic identities; fine-tune on DISJOINT identities "
             "with 3-5 samples each; verify on held-out samples of those identities (all pairs). "
             "first-batch / first-epoch acc: nearest-center training accuracy of the first batch (the "
             "initial centers) / mean over the first epoch.", ""]
    for r in results:
        s = r["sizes"]
        lines += [f"### {r['modality']}: pretrain {s['pretrain_ids']} ids x {s['pretrain_per_id']}, "
                  f"{s['pretrain_epochs']} epochs; fine-tune {s['finetune_ids']} ids, "
                  f"{r['finetune_samples']} samples, {r['steps']} steps (batch {s['batch_size']}); "
                  f"held-out {s['heldout_per_id']} per id; chance {r['chance']:.3f}; "
                  f"{r['seconds']['total']} s", "",
                  "| model | EER | TAR@FAR=1e-2 | first-batch acc | first-epoch acc |",
                  "|---|---|---|---|---|"]
        for name in ("untuned",) + tuple(k for k in MODELS if k in r):
            m = r[name]
            acc = " | ".join(f"{m[k]:.3f}" if k in m else "-"
                             for k in ("first_batch_accuracy", "first_epoch_accuracy"))
            lines.append(f"| {name} | {m['eer']:.4f} | {m['tar_at_far_1e-2']:.4f} | {acc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["face", "speaker", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    modalities = ["face", "speaker"] if args.modality == "both" else [args.modality]
    results = []
    for modality in modalities:
        sizes = Sizes() if modality == "face" else Sizes(pretrain_ids=100, pretrain_per_id=10,
                                                          pretrain_epochs=15, seconds=1.5)
        results.append(run_flow(modality, sizes, args.seed))
        print(markdown(results[-1:]), flush=True)
    if args.out is not None:
        args.out.write_text(markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
