"""``ResumableDataModule``: training data in the seeded, resumable order of :mod:`mlearn.data.order`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mlearn.data.corrupt import collate_skip_corrupt
from mlearn.data.order import EpochPermutationSampler, EpochSeededDataset
from mlearn.resume import position_to_resume, sample_position


class ResumableDataModule(pl.LightningDataModule):
    """The resumable half of a training data module.

    Epoch ``e`` visits the samples in the permutation drawn from ``(seed, e)``, cut into global batches
    shared out over the ranks, and sample ``i`` draws its augmentation from a random state seeded by
    ``(seed, e, i)``: the stream of batches does not depend on the number of DataLoader workers, and
    the position in it is saved in every checkpoint (:meth:`state_dict`, which Lightning stores), so
    ``--ckpt_path last`` resumes mid-epoch exactly where the run stopped. Subclasses build
    ``train_dataloader`` with :meth:`seeded_dataloader`, and set ``root`` and ``synthetic`` (their
    arguments), from which :attr:`train_path` follows.
    """

    root: str
    synthetic: Optional[Dict[str, Any]]

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._sampler: Optional[EpochPermutationSampler] = None
        self._resume: Optional[Dict[str, int]] = None

    @property
    def train_path(self) -> Path:
        """The training set: ``root``, or ``root/train`` when ``root`` is a synthetic corpus."""
        return Path(self.root) / "train" if self.synthetic is not None else Path(self.root)

    def _ranks(self) -> Tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def build_sampler(self, num_samples: int, batch_size: int) -> EpochPermutationSampler:
        """This process's sampler, positioned where a loaded checkpoint stopped (else epoch 0, start 0)."""
        world, rank = self._ranks()
        epoch, start = 0, 0
        if self._resume is not None:
            epoch, start = self._resume["epoch"], self._resume["samples"]
            self._resume = None  # a later reload of the dataloader starts from the loop's own epoch
        return EpochPermutationSampler(num_samples, batch_size, seed=self.seed, num_replicas=world, rank=rank,
                                       epoch=epoch, start=start)

    def seeded_dataloader(self, dataset: Any, batch_size: int, num_workers: int,
                          pin_memory: bool = False) -> DataLoader:
        """The training DataLoader over ``dataset`` in the resumable order (incomplete last batch dropped;
        corrupt samples dropped and counted by :func:`~mlearn.data.corrupt.collate_skip_corrupt`)."""
        self._sampler = self.build_sampler(len(dataset), batch_size)
        return DataLoader(
            EpochSeededDataset(dataset, self.seed),
            batch_size=batch_size,
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=collate_skip_corrupt,
            drop_last=True,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # a private generator: creating an iterator must not draw from the global RNG, whose
            # state the module restores on resume (worker seeds do not matter: augmentation is seeded
            # per sample)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> Dict[str, Any]:
        """The sample-order position (:func:`mlearn.resume.sample_position`); Lightning stores it in every
        checkpoint."""
        if self._sampler is None:
            return {}
        return sample_position(self.trainer, self.seed, self._sampler.global_batch)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Position the next training DataLoader where ``state_dict`` (of :meth:`state_dict`) stopped."""
        self._resume = position_to_resume(state_dict, self.seed)
