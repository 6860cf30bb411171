"""Speaker-labelled audio datasets: VoxCeleb-style folders and Kaldi ``wav.scp`` + ``utt2spk`` lists.

Two layouts are read:

* a speaker folder ``root/<speaker>/.../<utt>.wav`` (VoxCeleb: ``root/idXXXXX/<video>/<utt>.wav``);
  the speaker is the first path component under ``root``;
* Kaldi lists: ``wav.scp`` (``utt path`` lines) and ``utt2spk`` (``utt speaker`` lines) in one folder.

Audio is 16 kHz mono read with soundfile as float32 in [-1, 1] (several channels are averaged).
:class:`SpeakerAudioDataset` returns fixed-length random crops (shorter utterances are repeated,
WeSpeaker's ``wrap`` padding) and, with speed perturbation, WeSpeaker's label mapping: a copy at
``speeds[k]`` of speaker ``c`` is class ``c + k * num_speakers``. A file that is missing, unreadable,
at another sample rate, too short or not finite gives ``None`` (``strict=False``; counted by
:func:`mlearn.data.corrupt.collate_skip_corrupt` and reported by the training loop, the first of each
kind logged with its reason) or raises :class:`UnusableAudio`, a :class:`CorruptSampleError`
(``strict=True``). :meth:`SpeakerAudioDataset.probe` finds such files from their headers before training.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from mlearn.data.audio.io import (
    SAMPLE_RATE,
    PathLike,
    UnusableAudio,
    audio_frames,
    crop_or_pad,
    read_audio,
    speed_perturb,
)
from mlearn.data.audio.lists import read_kaldi_lists, scan_speaker_folder
from mlearn.data.corrupt import CorruptSampleError
from mlearn.data.labels import StringTable, remap_labels, save_label_map

log = logging.getLogger(__name__)

FORMATS_ACCEPTED = ("a speaker folder root/<speaker>/.../<utt>.wav (VoxCeleb layout), a folder holding "
                    "wav.scp + utt2spk (Kaldi), or a wav.scp file with utt2spk beside it")
#: waveform [N] float32, random generator -> waveform [N] float32
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check_speeds(speeds: Sequence[float]) -> Tuple[float, ...]:
    speeds = tuple(float(s) for s in speeds)
    if not speeds or speeds[0] != 1.0 or len(set(speeds)) != len(speeds) or min(speeds) <= 0:
        raise ValueError(f"speeds={list(speeds)}: expected distinct positive factors starting with 1.0 "
                         "(e.g. [1.0, 0.9, 1.1]); the original speakers keep labels 0..C-1")
    return speeds


class SpeakerAudioDataset(Dataset):
    """Speaker-labelled utterances: ``dataset[i] -> (waveform float32 [num_samples], label)`` or ``None``.

    Args:
        paths: audio file of each utterance, relative to ``base`` (or absolute).
        speakers: speaker name of each utterance; labels are ``0..C-1`` in sorted order of the names.
        base: folder the relative paths start at.
        crop_seconds: crop length (random start; shorter utterances repeat-padded); ``None``: whole
            utterances (variable length: batch size 1 or a custom collate).
        sample_rate: expected rate of every file (Hz); another rate counts as corrupt.
        speeds: speed-perturbation factors, the first 1.0; each sample draws one uniformly and a copy
            at ``speeds[k]`` is a new class ``label + k * C`` (WeSpeaker), so
            ``num_classes = C * len(speeds)``.
        augment: ``augment(waveform [N], rng) -> [N]`` applied to the crop (e.g.
            :class:`mlearn.data.audio.augment.ReverbOrNoise`).
        min_seconds: utterances shorter than this count as corrupt (too short to be worth padding).
        strict: raise :class:`CorruptSampleError` instead of returning ``None``.
        utterance_ids: names of the utterances (Kaldi keys); default the paths.
    """

    def __init__(
        self,
        paths: Sequence[str],
        speakers: Sequence[str],
        base: PathLike = "",
        crop_seconds: Optional[float] = 2.0,
        sample_rate: int = SAMPLE_RATE,
        speeds: Sequence[float] = (1.0,),
        augment: Optional[Augment] = None,
        min_seconds: float = 0.1,
        strict: bool = False,
        utterance_ids: Optional[Sequence[str]] = None,
    ) -> None:
        if len(paths) != len(speakers):
            raise ValueError(f"{len(paths)} paths but {len(speakers)} speakers")
        if not paths:
            raise ValueError("no utterances")
        if crop_seconds is not None and not crop_seconds > 0:
            raise ValueError(f"crop_seconds={crop_seconds}: expected a positive duration or None")
        self.base = str(base)
        self._files = StringTable.of(list(paths))
        self._ids = None if utterance_ids is None else StringTable.of(list(utterance_ids))
        self.speaker_labels, self.label_map = remap_labels(list(speakers))
        self.sample_rate = int(sample_rate)
        self.num_samples = None if crop_seconds is None else int(round(crop_seconds * sample_rate))
        self.speeds = _check_speeds(speeds)
        self.augment = augment
        self.min_samples = int(round(min_seconds * sample_rate))
        self.strict = strict
        self._warned: Set[str] = set()
        self._rng_key: Optional[Tuple[int, int]] = None
        self._generator: Optional[np.random.Generator] = None
        self.random_generator: Optional[np.random.Generator] = None  # of set_random_state

    # ---------------------------------------------------------------------------- bookkeeping

    @property
    def num_speakers(self) -> int:
        return len(self.label_map)

    @property
    def num_classes(self) -> int:
        """Classes of the training head: speakers x speed factors."""
        return self.num_speakers * len(self.speeds)

    @property
    def labels(self) -> np.ndarray:
        """int64 [N] speaker label of each utterance (speed 1.0)."""
        return self.speaker_labels

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> str:
        return os.path.join(self.base, self._files[int(index)])

    def utterance_id(self, index: int) -> str:
        return self._ids[int(index)] if self._ids is not None else self._files[int(index)]

    def class_of(self, speaker_label: int, speed_index: int) -> int:
        """Training class of ``speaker_label`` at ``speeds[speed_index]``: ``label + speed_index * C``."""
        return int(speaker_label) + int(speed_index) * self.num_speakers

    def save_label_map(self, path: PathLike) -> None:
        """Write ``{speaker: index}`` as JSON (speed copies are ``index + k * C``, see :meth:`class_of`)."""
        save_label_map(self.label_map, path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} utterances, {self.num_speakers} speakers, "
                f"speeds {list(self.speeds)})")

    # ---------------------------------------------------------------------------- loading

    @property
    def draws_randomly(self) -> bool:
        """Whether loading a sample draws random numbers (a crop, a speed factor, an augmentation)."""
        return self.num_samples is not None or len(self.speeds) > 1 or self.augment is not None

    def set_random_state(self, numpy_generator: np.random.Generator, python_random: Any = None) -> None:
        """Draw every crop, speed factor and augmentation from ``numpy_generator`` from now on (as
        :class:`mlearn.data.order.EpochSeededDataset` does, re-seeding it for every sample);
        ``python_random`` is not used."""
        self.random_generator = numpy_generator

    def rng(self) -> np.random.Generator:
        """The generator of :meth:`set_random_state`, else one per process, seeded from torch's
        (distinct per DataLoader worker and epoch)."""
        if self.random_generator is not None:
            return self.random_generator
        key = (os.getpid(), torch.initial_seed())
        if self._rng_key != key:
            self._generator = np.random.default_rng(key[1])
            self._rng_key = key
        assert self._generator is not None
        return self._generator

    def load(self, index: int, speed: float = 1.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """The (cropped, speed-changed) waveform of utterance ``index``: float32 [num_samples] (or
        the whole utterance). Raises :class:`CorruptSampleError`."""
        path = self.path(index)
        total = audio_frames(path, self.sample_rate)
        if total < max(self.min_samples, 1):
            raise UnusableAudio(path, "too short", f"{total} samples < {self.min_samples} "
                                                   f"(min_seconds={self.min_samples / self.sample_rate:g})")
        if self.num_samples is None:
            wave = read_audio(path, self.sample_rate)
            return speed_perturb(wave, speed) if speed != 1.0 else wave
        # read only the window the crop needs (a speed-changed crop needs speed x the samples)
        need = min(total, int(math.ceil(self.num_samples * speed)) + 2)
        start = int(rng.integers(0, total - need + 1)) if rng is not None else (total - need) // 2
        wave = read_audio(path, self.sample_rate, start=start, frames=need)
        if len(wave) < need:
            raise UnusableAudio(path, "truncated", f"{len(wave)} of {need} samples from {start} readable")
        if speed != 1.0:
            wave = speed_perturb(wave, speed)
        return crop_or_pad(wave, self.num_samples, rng)

    def probe(self, limit: int = 64) -> Tuple[int, Dict[str, str]]:
        """Read the headers of ``limit`` utterances spread evenly over the set (all when fewer): the
        problems every load would meet (unreadable, wrong sample rate, too short), found before
        training. Returns (utterances probed, ``{path: "kind: detail"}`` of the unusable ones)."""
        picks = np.unique(np.linspace(0, len(self) - 1, min(limit, len(self))).round().astype(np.int64))
        failures: Dict[str, str] = {}
        for index in picks.tolist():
            path = self.path(index)
            try:
                total = audio_frames(path, self.sample_rate)
                if total < max(self.min_samples, 1):
                    minimum = self.min_samples / self.sample_rate
                    raise UnusableAudio(path, "too short", f"{total} samples < {self.min_samples} "
                                                           f"(min_seconds={minimum:g})")
            except UnusableAudio as exc:
                failures[path] = f"{exc.kind}: {exc.detail}"
        return len(picks), failures

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        rng = self.rng()
        k = int(rng.integers(len(self.speeds))) if len(self.speeds) > 1 else 0
        try:
            wave = self.load(index, self.speeds[k], rng)
        except CorruptSampleError as exc:
            if self.strict:
                raise
            kind = getattr(exc, "kind", "corrupt")
            if kind not in self._warned:  # once per kind and process; the loop counts them all
                self._warned.add(kind)
                log.warning("skipping %s utterances (counted as corrupt), first: %s", kind, exc)
            return None
        if self.augment is not None:
            wave = self.augment(wave, rng)
        return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), self.class_of(
            self.speaker_labels[index], k)


def open_audio_dataset(path: PathLike, num_speakers: Optional[int] = None,
                       **kwargs: object) -> SpeakerAudioDataset:
    """Open a speaker training set, detecting its layout (see the module docstring).

    ``kwargs`` go to :class:`SpeakerAudioDataset`. Raises ``FileNotFoundError`` for a missing path
    and ``ValueError`` when ``num_speakers`` is given and differs from the data's speaker count.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio dataset not found: {path}; expected {FORMATS_ACCEPTED}")
    if path.is_dir() and (path / "wav.scp").is_file():
        path = path / "wav.scp"
    if path.is_file():
        utts, paths, speakers = read_kaldi_lists(path)
        dataset = SpeakerAudioDataset(paths, speakers, utterance_ids=utts, **kwargs)  # type: ignore[arg-type]
    else:
        paths, speakers = scan_speaker_folder(path)
        dataset = SpeakerAudioDataset(paths, speakers, base=path, **kwargs)  # type: ignore[arg-type]
    if num_speakers is not None and int(num_speakers) != dataset.num_speakers:
        raise ValueError(f"{path}: the data has {dataset.num_speakers} speakers but "
                         f"num_speakers={num_speakers} was given")
    return dataset
