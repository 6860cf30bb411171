"""Speaker-labelled audio: VoxCeleb-style folders, Kaldi ``wav.scp`` + ``utt2spk`` lists, crops and pads.

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

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from mlearn.data.corrupt import CorruptSampleError
from mlearn.data.folders import StringTable, remap_labels

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
AUDIO_EXTENSIONS = (".wav", ".flac")
SAMPLE_RATE = 16000
FORMATS_ACCEPTED = ("a speaker folder root/<speaker>/.../<utt>.wav (VoxCeleb layout), a folder holding "
                    "wav.scp + utt2spk (Kaldi), or a wav.scp file with utt2spk beside it")
#: waveform [N] float32, random generator -> waveform [N] float32
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# ------------------------------------------------------------------------------------- reading audio


class UnusableAudio(CorruptSampleError):
    """An utterance that cannot be used; ``kind`` ("unreadable", "wrong sample rate", "too short",
    "non-finite", "truncated") groups the reasons in reports. The message is ``path: kind: detail``."""

    def __init__(self, path: PathLike, kind: str = "", detail: str = "") -> None:
        # one argument: a message as it is (DataLoader workers re-raise exceptions that way)
        super().__init__(f"{path}: {kind}: {detail}" if kind else str(path))
        self.path = str(path)
        self.kind = kind
        self.detail = detail


def read_audio(path: PathLike, sample_rate: int = SAMPLE_RATE, start: int = 0,
               frames: int = -1) -> np.ndarray:
    """Read ``frames`` samples from ``start`` (``-1``: to the end). Returns float32 [N] mono in [-1, 1].

    Raises :class:`UnusableAudio` (a :class:`CorruptSampleError`) naming the file when it cannot be
    read, has another sample rate, or holds non-finite samples.
    """
    try:
        with sf.SoundFile(str(path)) as f:
            if f.samplerate != sample_rate:
                raise UnusableAudio(path, "wrong sample rate", f"{f.samplerate} Hz, expected {sample_rate} Hz")
            if start:
                f.seek(start)
            data = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        if isinstance(exc, UnusableAudio):
            raise
        raise UnusableAudio(path, "unreadable", f"cannot read audio ({exc})") from None
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    if not np.isfinite(wave).all():
        raise UnusableAudio(path, "non-finite", "NaN or inf samples")
    return np.ascontiguousarray(wave, dtype=np.float32)


def audio_frames(path: PathLike, sample_rate: int = SAMPLE_RATE) -> int:
    """Length of the file in samples (header only); :class:`UnusableAudio` as :func:`read_audio`."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        raise UnusableAudio(path, "unreadable", f"cannot read audio ({exc})") from None
    if info.samplerate != sample_rate:
        raise UnusableAudio(path, "wrong sample rate", f"{info.samplerate} Hz, expected {sample_rate} Hz")
    return int(info.frames)


def crop_or_pad(wave: np.ndarray, num_samples: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """[N] -> [num_samples]: a crop (random start with ``rng``, else centred) or, when shorter, the
    utterance repeated until long enough (``np.pad(mode="wrap")``, as WeSpeaker)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples}: expected a positive length")
    if len(wave) == 0:
        raise ValueError("cannot crop or pad an empty waveform")
    if len(wave) < num_samples:
        return np.pad(wave, (0, num_samples - len(wave)), mode="wrap")
    excess = len(wave) - num_samples
    start = int(rng.integers(0, excess + 1)) if rng is not None else excess // 2
    return wave[start:start + num_samples]


# ------------------------------------------------------------------------------------- list readers


def scan_speaker_folder(root: PathLike) -> Tuple[List[str], List[str]]:
    """``root/<speaker>/.../<utt>.wav`` -> (paths relative to ``root``, speakers), sorted by path.

    ``.wav`` and ``.flac`` (any case) count; hidden entries and files directly under ``root`` are
    ignored. Raises ``FileNotFoundError`` / ``ValueError`` for a missing or empty folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"speaker folder not found: {root}")
    paths: List[str] = []
    speakers: List[str] = []
    other = 0
    for speaker in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        found = []
        for folder, dirs, files in os.walk(root / speaker):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, root)
            found += [os.path.join(rel, f) for f in files
                      if not f.startswith(".") and f.lower().endswith(AUDIO_EXTENSIONS)]
            other += sum(f.lower().endswith(".m4a") for f in files)
        if not found:
            log.warning("%s: no audio files, speaker skipped", root / speaker)
            continue
        found.sort()
        paths += found
        speakers += [speaker] * len(found)
    if not paths:
        hint = (f"; found {other} .m4a files: VoxCeleb2 ships AAC, convert it to 16 kHz mono wav first "
                "(datasets/voxceleb.md)") if other else ""
        raise ValueError(f"{root}: no audio found; expected root/<speaker>/.../<utt>.wav "
                         f"({', '.join(AUDIO_EXTENSIONS)}){hint}")
    return paths, speakers


def _read_table(path: Path, what: str) -> Dict[str, str]:
    """``key value...`` lines -> {key: rest of the line}; blank lines skipped, duplicates an error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    table: Dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(None, 1)
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<utt> <{what.split()[0]}>', got {line!r}")
            if fields[0] in table:
                raise ValueError(f"{path}:{lineno}: utterance {fields[0]!r} listed twice")
            table[fields[0]] = fields[1].strip()
    if not table:
        raise ValueError(f"{path}: empty {what}")
    return table


def read_kaldi_lists(wav_scp: PathLike, utt2spk: Optional[PathLike] = None,
                     audio_root: Optional[PathLike] = None) -> Tuple[List[str], List[str], List[str]]:
    """Read Kaldi ``wav.scp`` and ``utt2spk``. Returns (utterance ids, paths, speakers) in ``wav.scp`` order.

    ``utt2spk`` defaults to the file beside ``wav.scp``; relative paths start at ``audio_root``
    (default: the folder of ``wav.scp``). Piped entries (``cmd |``) and ``ark:`` offsets are not
    supported (``ValueError``); an utterance of ``wav.scp`` missing from ``utt2spk`` is a ``KeyError``.
    """
    wav_scp = Path(wav_scp)
    utt2spk = Path(utt2spk) if utt2spk is not None else wav_scp.parent / "utt2spk"
    wavs = _read_table(wav_scp, "path list (wav.scp)")
    spks = _read_table(utt2spk, "speaker list (utt2spk)")
    base = Path(audio_root) if audio_root is not None else wav_scp.parent
    utts, paths, speakers = [], [], []
    for utt, path in wavs.items():
        if path.endswith("|") or ".ark:" in path:
            raise ValueError(f"{wav_scp}: utterance {utt!r}: piped or archive entry {path!r} is not supported; "
                             "expected a plain audio file path")
        if utt not in spks:
            raise KeyError(f"{utt2spk}: no speaker for utterance {utt!r} of {wav_scp}")
        utts.append(utt)
        paths.append(os.path.join(base, path))  # absolute paths survive the join
        speakers.append(spks[utt])
    extra = len(set(spks) - set(wavs))
    if extra:
        log.warning("%s: %d utterance(s) not in %s, ignored", utt2spk, extra, wav_scp)
    return utts, paths, speakers


# -------------------------------------------------------------------------------------------- dataset


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
            at ``speeds[k]`` is a new class ``label + k * C`` (WeSpeaker), so ``num_classes = C * len(speeds)``.
        augment: ``augment(waveform [N], rng) -> [N]`` applied to the crop (e.g.
            :class:`mlearn.data.audio_augment.ReverbOrNoise`).
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            json.dump({str(k): int(v) for k, v in self.label_map.items()}, f, indent=0, ensure_ascii=False)

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
        :class:`mlearn.data.samplers.EpochSeededDataset` does, re-seeding it for every sample);
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
        from mlearn.data.audio_augment import speed_perturb

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
                    raise UnusableAudio(path, "too short", f"{total} samples < {self.min_samples} "
                                                           f"(min_seconds={self.min_samples / self.sample_rate:g})")
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
        raise ValueError(f"{path}: the data has {dataset.num_speakers} speakers but num_speakers={num_speakers} "
                         "was given")
    return dataset
