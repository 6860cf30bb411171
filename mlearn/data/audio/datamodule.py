"""``SpeakerDataModule``: speaker-labelled audio for training, fbank computed on the training device."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from mlearn.data.audio.augment import build_augmentation
from mlearn.data.audio.dataset import SpeakerAudioDataset, open_audio_dataset
from mlearn.data.audio.fbank import INPUT_SCALE, KaldiFbank
from mlearn.data.audio.io import SAMPLE_RATE
from mlearn.data.corrupt import summarize_failures
from mlearn.data.labels import save_run_label_map
from mlearn.data.resumable import ResumableDataModule
from mlearn.data.synthetic.speech import make_speaker_dataset

log = logging.getLogger(__name__)
PROBE_UTTERANCES = 64  # headers read before training (evenly spaced): a wrong rate shows at start-up


class SpeakerDataModule(ResumableDataModule):
    """Training data for speaker embeddings: waveform crops in the loader, fbank on the device, in a
    seeded, resumable order (:class:`~mlearn.data.resumable.ResumableDataModule`: every crop, speed
    factor and augmentation is drawn from the sample's own random stream, and ``--ckpt_path last``
    resumes mid-epoch exactly where the run stopped).

    The DataLoader yields ``(waveforms float32 [B, N] in [-1, 1], labels [B], num_corrupt)``;
    :meth:`on_after_batch_transfer` (run by Lightning on the training device) turns the waveforms
    into Kaldi log-mel fbank [B, T, num_mel_bins] with per-utterance mean normalisation, batched
    (waveforms scaled to int16 range first, as WeSpeaker; ``dither`` only while training).

    Args:
        root: the training set: a speaker folder ``root/<speaker>/.../<utt>.wav`` (VoxCeleb), a folder
            with ``wav.scp`` + ``utt2spk``, or a ``wav.scp`` file. With ``synthetic`` set, the
            synthetic corpus folder (training audio in ``root/train``), generated there on first use.
        num_speakers: expected speaker count (``None``: inferred; a mismatch is an error).
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes.
        crop_seconds: training crop length (s); shorter utterances are repeat-padded.
        sample_rate: audio sample rate (Hz); files at another rate count as corrupt. Before training,
            the headers of up to 64 utterances (evenly spaced) are probed: unusable ones are logged by
            kind with an example; when all of them are unusable (e.g. 8 kHz data) it is an error.
        speeds: speed-perturbation factors, first 1.0 (WeSpeaker: ``[1.0, 0.9, 1.1]``); each factor
            is a separate set of classes, so ``num_classes = speakers * len(speeds)``.
        aug_prob: probability of augmenting a crop with reverberation or noise (one of them).
        noise_dir: MUSAN-like folder (``noise/``, ``music/``, ``speech/``); ``None``: no additive noise.
        noise_snr: ``{category: [low_db, high_db]}``; default noise [0, 15], speech [10, 30], music [5, 15].
        rir_dir: folder of room impulse responses; ``None``: no reverberation.
        min_seconds: shorter utterances count as corrupt.
        num_mel_bins, frame_length_ms, frame_shift_ms, dither: fbank options (``dither`` in int16
            units, applied in training only).
        strict: raise on a corrupt utterance instead of skipping and counting it (and on any
            unusable utterance the start-up probe finds).
        synthetic: keyword arguments of :func:`mlearn.data.synthetic.speech.make_speaker_dataset`.
        seed: seed of the sample order and of the crops and augmentations.
    """

    def __init__(
        self,
        root: str,
        num_speakers: Optional[int] = None,
        batch_size: int = 128,
        num_workers: int = 2,
        crop_seconds: float = 2.0,
        sample_rate: int = SAMPLE_RATE,
        speeds: List[float] = [1.0],  # noqa: B006 (jsonargparse shows the default; never mutated)
        aug_prob: float = 0.6,
        noise_dir: Optional[str] = None,
        noise_snr: Optional[Dict[str, List[float]]] = None,
        rir_dir: Optional[str] = None,
        min_seconds: float = 0.1,
        num_mel_bins: int = 80,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        dither: float = 1.0,
        strict: bool = False,
        synthetic: Optional[Dict[str, Any]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.root = root
        self.expected_num_speakers = num_speakers
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_seconds = crop_seconds
        self.sample_rate = sample_rate
        self.speeds = list(speeds)
        self.aug_prob = aug_prob
        self.noise_dir = noise_dir
        self.noise_snr = noise_snr
        self.rir_dir = rir_dir
        self.min_seconds = min_seconds
        self.strict = strict
        self.synthetic = synthetic
        self.fbank = KaldiFbank(sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                                frame_length_ms=frame_length_ms, frame_shift_ms=frame_shift_ms, dither=dither,
                                cmn=True)
        self._dataset: Optional[SpeakerAudioDataset] = None

    @property
    def dataset(self) -> SpeakerAudioDataset:
        if self._dataset is None:
            if self.synthetic is not None:
                make_speaker_dataset(self.root, sample_rate=self.sample_rate, **self.synthetic)
            augment = build_augmentation(self.aug_prob, self.noise_dir, self.noise_snr, self.rir_dir,
                                         self.sample_rate)
            self._dataset = open_audio_dataset(
                self.train_path, num_speakers=self.expected_num_speakers, crop_seconds=self.crop_seconds,
                sample_rate=self.sample_rate, speeds=self.speeds, augment=augment,
                min_seconds=self.min_seconds, strict=self.strict)
            check_audio(self._dataset, self.train_path, self.strict)
        return self._dataset

    @property
    def num_classes(self) -> int:
        """Classes of the training head, speakers x speed factors (linked to ``model.num_classes``)."""
        return int(self.dataset.num_classes)

    def setup(self, stage: str) -> None:
        if save_run_label_map(self.trainer, self.dataset, stage):
            log.info("training set %s: %d utterances, %d speakers, %d classes (speeds %s), augmentation %s",
                     self.train_path, len(self.dataset), self.dataset.num_speakers, self.num_classes,
                     self.speeds, self.dataset.augment)

    def train_dataloader(self) -> DataLoader:
        return self.seeded_dataloader(self.dataset, self.batch_size, self.num_workers)

    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """waveforms float [B, N] in [-1, 1] -> mean-normalised log-mel fbank [B, T, num_mel_bins]."""
        fbank = self.fbank.to(waveforms.device)
        fbank.train(self.trainer is not None and self.trainer.training)
        with torch.no_grad():
            return fbank(waveforms * INPUT_SCALE)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        waveforms, labels, num_corrupt = batch
        if waveforms.ndim != 2:  # an all-corrupt batch (empty [0]): the module skips it
            return batch
        return self.features(waveforms), labels, num_corrupt


def check_audio(dataset: SpeakerAudioDataset, root: Path, strict: bool = False,
                limit: int = PROBE_UTTERANCES) -> None:
    """Probe ``limit`` utterance headers before training (:meth:`SpeakerAudioDataset.probe`).

    Unusable ones are logged, counted by kind with the first example (the loader skips them as
    corrupt); ``ValueError`` (one line: counts by kind, an example file, its rate and the expected one)
    when every probed utterance is unusable, or with ``strict`` when any is.
    """
    probed, failures = dataset.probe(limit)
    if not failures:
        return
    summary = summarize_failures(failures)
    if len(failures) == probed:
        raise ValueError(f"{root}: none of the {probed} utterances probed (of {len(dataset)}) can be used: "
                         f"{summary}")
    if strict:
        raise ValueError(f"{root}: strict: {len(failures)} of the {probed} utterances probed are unusable: "
                         f"{summary}")
    log.warning("%s: %d of the %d utterances probed (of %d) are unusable and will be skipped as corrupt: %s",
                root, len(failures), probed, len(dataset), summary)
