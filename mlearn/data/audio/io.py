"""Reading audio for speaker training: 16 kHz mono float32 in [-1, 1] (soundfile; several channels
are averaged), crops and wrap-pads, and speed perturbation. A file that cannot be used raises
:class:`UnusableAudio` (a :class:`~mlearn.data.corrupt.CorruptSampleError`) naming it and the reason.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from mlearn.data.corrupt import CorruptSampleError

PathLike = Union[str, Path]
AUDIO_EXTENSIONS = (".wav", ".flac")
SAMPLE_RATE = 16000


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
                raise UnusableAudio(path, "wrong sample rate",
                                    f"{f.samplerate} Hz, expected {sample_rate} Hz")
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


def speed_perturb(wave: np.ndarray, speed: float) -> np.ndarray:
    """Play ``wave`` ``speed`` times faster: resample to ``round(N / speed)`` samples (polyphase)."""
    if speed <= 0:
        raise ValueError(f"speed={speed}: expected a positive factor")
    if speed == 1.0:
        return wave
    ratio = Fraction(1.0 / speed).limit_denominator(1000)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)
