"""On-the-fly waveform augmentation for speaker training: additive noise and reverberation.

All functions take and return float32 [N] waveforms at one sample rate (16 kHz by default).

* :class:`NoiseSource`: a MUSAN-like folder ``root/<category>/**/*.wav`` (``noise``, ``music``,
  ``speech``); each call draws a category uniformly among those present, a file, a window of it
  and an SNR uniformly from the category's range (dB; defaults as WeSpeaker / Kaldi:
  noise [0, 15], speech (babble) [10, 30], music [5, 15]).
* :class:`RirSource`: room impulse responses ``root/**/*.wav``; each RIR is scaled to unit energy
  and convolved, the output truncated to the input length.
* :class:`ReverbOrNoise`: with probability ``prob``, one of the two (uniformly), else unchanged
  (WeSpeaker's ``aug_prob: 0.6``).
* speed perturbation: :func:`mlearn.data.audio.io.speed_perturb`.

A noise or RIR file that cannot be read is logged once and dropped from the pool; the utterance is
then returned unchanged rather than lost.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.signal import fftconvolve

from mlearn.data.audio.io import AUDIO_EXTENSIONS, SAMPLE_RATE, audio_frames, crop_or_pad, read_audio
from mlearn.data.corrupt import CorruptSampleError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
DEFAULT_SNR: Dict[str, Tuple[float, float]] = {"noise": (0.0, 15.0), "speech": (10.0, 30.0),
                                               "music": (5.0, 15.0)}


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wave + g * noise`` with ``g`` such that 10·log10(mean(wave²) / mean((g·noise)²)) = ``snr_db``.

    ``noise`` is cropped or repeat-padded to ``len(wave)``. A silent ``wave`` or ``noise`` is
    returned unchanged (no SNR is defined).
    """
    noise = crop_or_pad(np.asarray(noise, dtype=np.float32), len(wave))
    signal_power = float(np.mean(np.square(wave, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if signal_power <= 0.0 or noise_power <= 0.0:
        return wave.copy()
    gain = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (wave + gain * noise).astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with ``rir`` scaled to unit energy; the output keeps ``len(wave)`` samples (the tail is
    cut)."""
    rir = np.asarray(rir, dtype=np.float64)
    energy = float(np.sqrt(np.sum(rir * rir)))
    if energy <= 0.0:
        return wave.copy()
    return fftconvolve(wave.astype(np.float64), rir / energy)[: len(wave)].astype(np.float32)


def _scan_audio(root: Path) -> List[str]:
    found: List[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(AUDIO_EXTENSIONS)]
    return found


class _FilePool:
    """Audio files to draw from; unreadable ones are dropped (logged once)."""

    def __init__(self, files: List[str], sample_rate: int) -> None:
        self.files = files
        self.sample_rate = sample_rate

    def draw(self, rng: np.random.Generator, num_samples: Optional[int]) -> Optional[np.ndarray]:
        """A random window of ``num_samples`` (``None``: the whole file) of a random file, or None."""
        while self.files:
            index = int(rng.integers(len(self.files)))
            path = self.files[index]
            try:
                if num_samples is None:
                    return read_audio(path, self.sample_rate)
                total = audio_frames(path, self.sample_rate)
                start = int(rng.integers(0, max(total - num_samples, 0) + 1))
                wave = read_audio(path, self.sample_rate, start=start, frames=min(num_samples, total))
                if len(wave) == 0:
                    raise CorruptSampleError(f"{path}: empty")
                return wave
            except CorruptSampleError as exc:
                log.warning("augmentation file dropped: %s", exc)
                self.files.pop(index)
        return None


class NoiseSource:
    """Additive noise from a MUSAN-like folder: ``noise(wave [N], rng) -> [N]``.

    Args:
        root: folder with one sub-folder per category (``noise/``, ``music/``, ``speech/``), searched
            recursively for ``.wav``/``.flac``.
        snr: ``{category: [low, high]}`` SNR range in dB; the categories used are its keys (default
            :data:`DEFAULT_SNR`). Categories without files are skipped; none at all is an error.
        sample_rate: expected rate of the noise files.
    """

    def __init__(self, root: PathLike, snr: Optional[Mapping[str, Sequence[float]]] = None,
                 sample_rate: int = SAMPLE_RATE) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"noise folder not found: {self.root} (expected root/noise, root/music, "
                                    "root/speech with .wav files, as MUSAN)")
        self.snr: Dict[str, Tuple[float, float]] = {}
        for category, bounds in (DEFAULT_SNR if snr is None else snr).items():
            low, high = _snr_range(category, bounds)
            self.snr[str(category)] = (low, high)
        self.pools: Dict[str, _FilePool] = {}
        for category in self.snr:
            files = _scan_audio(self.root / category) if (self.root / category).is_dir() else []
            if files:
                self.pools[category] = _FilePool(files, sample_rate)
            else:
                log.warning("%s: no audio for noise category '%s'", self.root / category, category)
        if not self.pools:
            raise FileNotFoundError(f"{self.root}: no audio in any of the noise categories {list(self.snr)}")

    @property
    def categories(self) -> List[str]:
        return list(self.pools)

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        categories = [c for c, pool in self.pools.items() if pool.files]
        if not categories:
            return wave
        category = categories[int(rng.integers(len(categories)))]
        noise = self.pools[category].draw(rng, len(wave))
        if noise is None:
            return wave
        low, high = self.snr[category]
        return add_noise(wave, noise, float(rng.uniform(low, high)))

    def __repr__(self) -> str:
        counts = {c: len(p.files) for c, p in self.pools.items()}
        return f"NoiseSource({self.root}, files {counts}, snr {self.snr})"


def _snr_range(category: str, bounds: Sequence[float]) -> Tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"snr[{category!r}]={bounds!r}: expected [low_db, high_db]") from None
    if low > high:
        raise ValueError(f"snr[{category!r}]={list(bounds)}: low > high")
    return low, high


class RirSource:
    """Reverberation with room impulse responses from ``root/**/*.wav``: ``reverb(wave [N], rng) -> [N]``."""

    def __init__(self, root: PathLike, sample_rate: int = SAMPLE_RATE) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"RIR folder not found: {self.root}")
        files = _scan_audio(self.root)
        if not files:
            raise FileNotFoundError(f"{self.root}: no RIR audio files (.wav/.flac)")
        self.pool = _FilePool(files, sample_rate)

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rir = self.pool.draw(rng, None)
        return wave if rir is None else reverberate(wave, rir)

    def __repr__(self) -> str:
        return f"RirSource({self.root}, {len(self.pool.files)} files)"


class ReverbOrNoise:
    """With probability ``prob`` apply reverberation or additive noise (one of those given, chosen
    uniformly), else return the waveform unchanged: ``augment(wave [N], rng) -> [N]``."""

    def __init__(self, prob: float = 0.6, noise: Optional[NoiseSource] = None,
                 reverb: Optional[RirSource] = None) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob={prob}: expected a probability in [0, 1]")
        self.prob = float(prob)
        self.options = [a for a in (reverb, noise) if a is not None]

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.options or rng.random() >= self.prob:
            return wave
        return self.options[int(rng.integers(len(self.options)))](wave, rng)

    def __repr__(self) -> str:
        return f"ReverbOrNoise(prob={self.prob}, {self.options})"


def build_augmentation(prob: float = 0.6, noise_dir: Optional[PathLike] = None,
                       noise_snr: Optional[Mapping[str, Sequence[float]]] = None,
                       rir_dir: Optional[PathLike] = None,
                       sample_rate: int = SAMPLE_RATE) -> Optional[ReverbOrNoise]:
    """:class:`ReverbOrNoise` over the folders given, or ``None`` when neither is (or ``prob`` is 0)."""
    if (noise_dir is None and rir_dir is None) or prob == 0:
        return None
    noise = NoiseSource(noise_dir, noise_snr, sample_rate) if noise_dir is not None else None
    reverb = RirSource(rir_dir, sample_rate) if rir_dir is not None else None
    return ReverbOrNoise(prob, noise=noise, reverb=reverb)
