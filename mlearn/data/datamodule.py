"""``FaceDataModule``: an identity-labelled image set (RecordIO, image folder, list file) for training."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mlearn.data.corrupt import collate_skip_corrupt
from mlearn.data.folders import open_dataset, save_run_label_map
from mlearn.data.samplers import EpochPermutationSampler, EpochSeededDataset
from mlearn.data.synthetic import make_face_dataset
from mlearn.data.transforms import build_transform

log = logging.getLogger(__name__)



class FaceDataModule(pl.LightningDataModule):
    """Training data for face identity embeddings, in a seeded, resumable order.

    Epoch ``e`` visits the samples in the permutation drawn from ``(seed, e)``, cut into global
    batches shared out over the ranks, and augments sample ``i`` with a random state seeded from
    ``(seed, e, i)`` (:mod:`mlearn.data.samplers`): the stream of batches does not depend on the
    number of DataLoader workers, and the position in it is saved in every checkpoint
    (:meth:`state_dict`, which Lightning stores), so ``--ckpt_path last`` resumes mid-epoch exactly
    where the run stopped.

    Args:
        root: the training set: a folder with ``train.rec``/``train.idx`` (insightface RecordIO), an
            image folder ``root/<identity>/<image>``, or a list file of ``path label`` lines. With
            ``synthetic`` set, ``root`` is the synthetic corpus folder (training images in
            ``root/train``), generated there on first use.
        num_classes: expected class count; ``None`` infers it from the data (a mismatch is an error).
        batch_size: per-process batch size (global batch = batch_size x processes).
        num_workers: DataLoader worker processes.
        augmentation: a preset name (``standard``, ``low_quality``, ``eval``) or a list of
            albumentations transforms (``[{name: HorizontalFlip, p: 0.5}, ...]``).
        image_size: side of the square network input (px); other sizes are resized.
        strict: raise on a corrupt sample instead of skipping and counting it.
        synthetic: keyword arguments of :func:`mlearn.data.synthetic.make_face_dataset`.
        seed: seed of the sample order and of the augmentations.
        uint8_batches: ship the images as decoded, uint8 [B, S, S, 3] (4x less memory traffic, no
            per-image transpose on the CPU), normalised and made channels-first by the module on the
            training device (:func:`mlearn.data.transforms.normalize_images`); ``False``: float32
            [B, 3, S, S] normalised on the CPU.
        pin_memory: page-locked batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        root: str,
        num_classes: Optional[int] = None,
        batch_size: int = 128,
        num_workers: int = 2,
        augmentation: Union[str, List[Dict[str, Any]]] = "standard",
        image_size: int = 112,
        strict: bool = False,
        synthetic: Optional[Dict[str, int]] = None,
        seed: int = 0,
        uint8_batches: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.root = root
        self.expected_num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        self.image_size = image_size
        self.strict = strict
        self.synthetic = synthetic
        self.seed = seed
        self.uint8_batches = uint8_batches
        self.pin_memory = pin_memory
        self._dataset: Any = None
        self._sampler: Optional[EpochPermutationSampler] = None
        self._resume: Optional[Dict[str, int]] = None

    @property
    def train_path(self) -> Path:
        return Path(self.root) / "train" if self.synthetic is not None else Path(self.root)

    @property
    def dataset(self) -> Any:
        """The training set (augmentation attached as ``dataset.transform``)."""
        if self._dataset is None:
            if self.synthetic is not None:
                make_face_dataset(self.root, image_size=self.image_size, **self.synthetic)
            transform = build_transform(self.augmentation, image_size=self.image_size,
                                        output="uint8" if self.uint8_batches else "float")
            self._dataset = open_dataset(self.train_path, transform=transform, strict=self.strict,
                                         num_classes=self.expected_num_classes)
        return self._dataset

    @property
    def num_classes(self) -> int:
        """Number of identities in the training set (linked to ``model.num_classes``)."""
        return int(self.dataset.num_classes)

    def setup(self, stage: str) -> None:
        if save_run_label_map(self.trainer, self.dataset, stage):
            log.info("training set %s: %d images, %d identities", self.train_path, len(self.dataset),
                     self.num_classes)

    def _ranks(self) -> tuple:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def build_sampler(self) -> EpochPermutationSampler:
        """This process's sampler, positioned where a loaded checkpoint stopped (else epoch 0, start 0)."""
        world, rank = self._ranks()
        epoch, start = 0, 0
        if self._resume is not None:
            epoch, start = self._resume["epoch"], self._resume["samples"]
            self._resume = None  # a later reload of the dataloader starts from the loop's own epoch
        return EpochPermutationSampler(len(self.dataset), self.batch_size, seed=self.seed, num_replicas=world,
                                       rank=rank, epoch=epoch, start=start)

    def train_dataloader(self) -> DataLoader:
        self._sampler = self.build_sampler()
        return DataLoader(
            EpochSeededDataset(self.dataset, self.seed),
            batch_size=self.batch_size,
            sampler=self._sampler,
            num_workers=self.num_workers,
            collate_fn=collate_skip_corrupt,
            drop_last=True,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a private generator: creating an iterator must not draw from the global RNG, whose
            # state the module restores on resume (worker seeds do not matter: augmentation is seeded
            # per sample)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> Dict[str, Any]:
        """The sample-order position: ``{seed, epoch, samples, global_batch}`` (``samples``: global
        samples of ``epoch`` consumed). Lightning stores it in every checkpoint."""
        trainer = self.trainer
        if trainer is None or self._sampler is None:
            return {}
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        per_epoch = trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch <= 0:
            return {}
        epoch, within = divmod(batches, per_epoch)
        global_batch = self._sampler.global_batch
        return {"seed": self.seed, "epoch": epoch, "samples": within * global_batch,
                "global_batch": global_batch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Position the next :meth:`train_dataloader` where ``state_dict`` (of :meth:`state_dict`) stopped."""
        if not state_dict:
            return
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("resuming with data seed %d, the checkpoint used %s: the sample order changes",
                        self.seed, state_dict["seed"])
        self._resume = {"epoch": int(state_dict["epoch"]), "samples": int(state_dict["samples"])}
        # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader itself is stateful;
        # here the data module restores the position instead
        warnings.filterwarnings("ignore",
                                message="You're resuming from a checkpoint that ended before the epoch")
