"""A synthetic speaker corpus from a source-filter voice synthesiser (numpy), with real speaker structure.

Each speaker is a fixed voice: fundamental frequency and intonation range, vocal-tract length
(all formants scaled together), personal offsets of every vowel's formants, formant bandwidths,
glottal pulse shape (open/closing quotients: spectral tilt), breathiness, jitter and shimmer,
speaking rate, fricative colour and a fixed timbre (a smooth spectral envelope). An utterance is a
random phone sequence (vowels, nasals, fricatives, stops, pauses) spoken by that voice with
per-utterance nuisances: pitch shift, tempo, loudness. Utterances of one "video" share a recording
channel (a smooth random EQ, band limit and stationary coloured background noise at 8-40 dB SNR),
different videos have different channels, so the long-term spectrum mixes speaker and channel as in
VoxCeleb.

Synthesis: a Rosenberg glottal pulse train (+ aspiration noise) and a frication noise source are
filtered frame by frame in the STFT domain (8 ms hop) by the cascade of five formant resonators of
the current phone (with linear transitions between phone targets), a nasal anti-resonance, and the
fricative's band shape, then by the speaker timbre and the channel.

Layout written by :func:`make_speaker_dataset` (16 kHz mono 16-bit wav)::

    root/train/idXXXXX/vNNN/NNNNN.wav   training speakers (VoxCeleb layout)
    root/val/idXXXXX/vNNN/NNNNN.wav     held-out speakers, DISJOINT from training (ids continue on)
    root/val_trials.txt                 'label enroll test' trials (VoxCeleb format, paths relative
                                        to root/val; target trials pair different videos)
    root/musan/{noise,music,speech}/    augmentation noise (speech = babble of other synthetic speakers)
    root/rirs/                          synthetic room impulse responses
    root/meta.json                      generation parameters (a mismatch regenerates)
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import soundfile as sf
from scipy.signal import istft, stft
from tqdm import tqdm

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_VERSION = 3
_NFFT, _HOP = 512, 128

# Peterson & Barney (1952) adult male averages: F1, F2, F3 (Hz); F4, F5 added below.
_VOWELS = np.array([
    [270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410], [730, 1090, 2440],
    [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240], [640, 1190, 2390], [490, 1350, 1690],
], dtype=np.float64)
_NASALS = np.array([[250, 1100, 2300], [250, 1700, 2500]], dtype=np.float64)  # m, n
_NASAL_ZERO = np.array([1100.0, 1600.0])  # anti-resonance of m, n
_UPPER = np.array([3400.0, 4300.0])  # F4, F5 (male)
_BANDWIDTHS = np.array([60.0, 90.0, 120.0, 170.0, 250.0])
# fricatives: band centre (Hz), log-width, level, voiced   (s, sh, f, th, h, z, v)
_FRICATIVES = [(5500, 0.35, 0.35, False), (3000, 0.35, 0.35, False), (4500, 0.9, 0.12, False),
               (5000, 0.8, 0.08, False), (1500, 0.9, 0.10, False), (5500, 0.35, 0.22, True),
               (4000, 0.9, 0.08, True)]
_BURSTS = [800.0, 4000.0, 2000.0]  # p, t, k
_PHONE_KINDS = ("vowel", "nasal", "fricative", "stop", "pause")
_PHONE_PROBS = (0.48, 0.12, 0.2, 0.15, 0.05)


# ------------------------------------------------------------------------------------ parameters


def sample_speaker(rng: np.random.Generator) -> Dict[str, Any]:
    """Draw the fixed parameters of one voice."""
    female = bool(rng.random() < 0.5)
    return {
        "f0": float(np.exp(rng.normal(np.log(205.0 if female else 115.0), 0.2))),
        "intonation": float(rng.uniform(1.0, 3.0)),  # semitones
        "vtl": float(rng.uniform(1.05, 1.3) if female else rng.uniform(0.8, 1.02)),
        "vowel_offsets": rng.normal(0.0, 0.1, (len(_VOWELS), 5)),
        "nasal_offsets": rng.normal(0.0, 0.08, (len(_NASALS), 5)),
        "bandwidth": float(rng.uniform(0.7, 1.6)),
        "open_quotient": float(rng.uniform(0.3, 0.55)),
        "closing_quotient": float(rng.uniform(0.08, 0.3)),
        "breathiness": float(rng.uniform(0.0, 0.3)),
        "jitter": float(rng.uniform(0.003, 0.02)),
        "shimmer": float(rng.uniform(0.02, 0.15)),
        "phone_seconds": float(rng.uniform(0.07, 0.12)),
        "fricative_shift": float(rng.uniform(0.85, 1.15)),
        "timbre": _random_bumps(rng, 3, 5.0),
        "phone_weights": rng.dirichlet(np.full(len(_VOWELS), 3.0)),  # habitual vowel use
    }


def sample_channel(rng: np.random.Generator) -> Dict[str, Any]:
    """Draw a recording channel (shared by the utterances of one video)."""
    return {
        "eq": _random_bumps(rng, 3, 7.0),
        "tilt_db": float(rng.uniform(-6.0, 6.0)),  # dB per decade above 1 kHz
        "lowpass": float(rng.uniform(3400.0, 7800.0)),
        "highpass": float(rng.uniform(50.0, 300.0)),
        "snr_db": float(rng.uniform(8.0, 40.0)),
        "noise_slope": float(rng.uniform(-1.5, 0.0)),  # noise power spectrum ~ f^slope
    }


def _random_bumps(rng: np.random.Generator, count: int, max_db: float) -> np.ndarray:
    """[count, 3]: (centre Hz, log-width, gain dB) of smooth spectral bumps."""
    return np.stack([np.exp(rng.uniform(np.log(150.0), np.log(6000.0), count)),
                     rng.uniform(0.2, 0.8, count), rng.uniform(-max_db, max_db, count)], axis=1)


def _bumps_db(bumps: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    logf = np.log(np.maximum(freqs, 20.0))
    return sum(g * np.exp(-0.5 * ((logf - np.log(c)) / w) ** 2) for c, w, g in bumps)


# ------------------------------------------------------------------------------------- synthesis


def _phone_plan(speaker: Dict[str, Any], rng: np.random.Generator, seconds: float,
                tempo: float) -> List[Tuple[str, int, float]]:
    """Random phones until ``seconds``: (kind, index, duration s)."""
    plan: List[Tuple[str, int, float]] = [("pause", 0, float(rng.uniform(0.05, 0.15)))]
    total = plan[0][2]
    unit = speaker["phone_seconds"] * tempo
    while total < seconds:
        kind = _PHONE_KINDS[int(rng.choice(len(_PHONE_KINDS), p=_PHONE_PROBS))]
        if kind == "vowel":
            index = int(rng.choice(len(_VOWELS), p=speaker["phone_weights"]))
            dur = unit * rng.uniform(0.9, 1.8)
        elif kind == "nasal":
            index, dur = int(rng.integers(len(_NASALS))), unit * rng.uniform(0.6, 1.0)
        elif kind == "fricative":
            index, dur = int(rng.integers(len(_FRICATIVES))), unit * rng.uniform(0.7, 1.3)
        elif kind == "stop":
            index, dur = int(rng.integers(len(_BURSTS))), float(rng.uniform(0.05, 0.09))
        else:
            index, dur = 0, float(rng.uniform(0.08, 0.3))
        plan.append((kind, index, float(dur)))
        total += dur
    return plan


def _ramp(n: int, edge: int) -> np.ndarray:
    env = np.ones(n)
    edge = min(edge, n // 2)
    if edge > 0:
        up = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
        env[:edge], env[n - edge:] = up, up[::-1]
    return env


def _glottal_source(f0: np.ndarray, speaker: Dict[str, Any], rng: np.random.Generator, fs: int) -> np.ndarray:
    """Derivative of a Rosenberg glottal flow with jitter and shimmer: [N] for f0 [N] (Hz)."""
    n = len(f0)
    control = np.arange(0, n + 80, 80)  # jitter drawn every 5 ms
    jitter = np.interp(np.arange(n), control, rng.standard_normal(len(control)) * speaker["jitter"])
    phase = np.cumsum(f0 * (1.0 + jitter) / fs)
    period = np.floor(phase).astype(np.int64)
    frac = phase - period
    amp = 1.0 + speaker["shimmer"] * rng.standard_normal(int(period[-1]) + 2)
    tp, tn = speaker["open_quotient"], speaker["closing_quotient"]
    flow = np.where(frac < tp, 0.5 * (1.0 - np.cos(np.pi * frac / tp)),
                    np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    flow = flow * amp[period]
    breath = rng.standard_normal(n) * speaker["breathiness"] * (0.3 + flow) * 0.05
    return np.diff(flow, prepend=0.0) + breath


def _resonator_gain(freqs: np.ndarray, bands: np.ndarray, trig: np.ndarray, fs: int) -> np.ndarray:
    """Magnitude response of a cascade of unity-DC-gain two-pole resonators (Klatt): freqs/bands
    [T, K] Hz -> [T, F]. ``trig`` [4, F] holds cos w, sin w, cos 2w, sin 2w of the bin frequencies."""
    r = np.exp(-np.pi * bands / fs)[..., None]
    b = 2.0 * r * np.cos(2.0 * np.pi * freqs / fs)[..., None]
    c = -r * r
    cos1, sin1, cos2, sin2 = trig[:, None, None]
    power = (1.0 - b * cos1 - c * cos2) ** 2 + (b * sin1 + c * sin2) ** 2
    return np.prod(np.abs(1.0 - b - c) / np.sqrt(power), axis=1)


def synthesize_utterance(speaker: Dict[str, Any], channel: Dict[str, Any], rng: np.random.Generator,
                         seconds: float, sample_rate: int = 16000) -> np.ndarray:
    """One utterance of ``speaker`` through ``channel``: float32 [int(seconds * sample_rate)] in [-1, 1]."""
    fs = sample_rate
    tempo = float(rng.uniform(0.85, 1.15))
    plan = _phone_plan(speaker, rng, seconds, tempo)
    lengths = [max(int(d * fs), 1) for _, _, d in plan]
    n = int(sum(lengths))
    voicing, frication = np.zeros(n), np.zeros(n)
    fric_centre, fric_width = np.full(n, 3000.0), np.full(n, 0.5)
    targets: List[Tuple[int, int, np.ndarray, float]] = []  # (start, end, formants [5], nasal zero)
    vtl = speaker["vtl"]
    upper = _UPPER * vtl
    start = 0
    for (kind, index, _), length in zip(plan, lengths):
        end = start + length
        edge = int(0.012 * fs)
        if kind in ("vowel", "nasal"):
            base = _VOWELS[index] if kind == "vowel" else _NASALS[index]
            offsets = speaker["vowel_offsets" if kind == "vowel" else "nasal_offsets"][index]
            formants = np.concatenate([base * vtl, upper]) * (1.0 + offsets)
            level = rng.uniform(0.7, 1.0) if kind == "vowel" else 0.35
            voicing[start:end] = level * _ramp(length, edge)
            targets.append((start, end, formants, _NASAL_ZERO[index] * vtl if kind == "nasal" else 0.0))
        elif kind == "fricative":
            centre, width, level, voiced = _FRICATIVES[index]
            frication[start:end] = level * _ramp(length, edge)
            fric_centre[start:end] = centre * speaker["fricative_shift"]
            fric_width[start:end] = width
            if voiced:
                voicing[start:end] = 0.25 * _ramp(length, edge)
        elif kind == "stop":
            burst = int(0.012 * fs)
            frication[end - burst:end] = 0.3 * _ramp(burst, burst // 4)
            fric_centre[end - burst:end] = _BURSTS[index]
            fric_width[end - burst:end] = 1.2
        start = end
    # pitch: declination + slow random intonation + a per-utterance shift, in semitones
    shift = rng.normal(0.0, 0.5)
    control = np.linspace(0, n, max(int(n / (0.25 * fs)), 2))
    contour = np.interp(np.arange(n), control, rng.normal(0.0, speaker["intonation"] / 2, len(control)))
    semitones = shift + contour - 2.0 * np.arange(n) / n
    f0 = speaker["f0"] * 2.0 ** (semitones / 12.0)
    voiced = _glottal_source(f0, speaker, rng, fs) * voicing

    freqs, _, spec_v = stft(voiced.astype(np.float32), fs, nperseg=_NFFT, noverlap=_NFFT - _HOP)
    frames = spec_v.shape[1]
    positions = np.clip(np.arange(frames) * _HOP, 0, n - 1)
    omega = 2.0 * np.pi * freqs / fs
    trig = np.stack([np.cos(omega), np.sin(omega), np.cos(2 * omega), np.sin(2 * omega)]).astype(np.float32)
    # formant tracks: each voiced phone's target held over its middle, linear transitions between
    points, values, zeros = [], [], []
    for s, e, formants, zero in targets:
        for p in (s + 0.25 * (e - s), s + 0.75 * (e - s)):
            points.append(p)
            values.append(formants)
            zeros.append(zero)
    if not points:
        points, values, zeros = [0.0], [np.concatenate([_VOWELS[4] * vtl, upper])], [0.0]
    values_arr = np.asarray(values)
    track = np.stack([np.interp(positions, points, values_arr[:, k]) for k in range(5)], axis=1)
    track = np.minimum(track, 0.45 * fs)
    bands = np.broadcast_to(_BANDWIDTHS * speaker["bandwidth"], track.shape)
    h_voiced = _resonator_gain(track.astype(np.float32), bands.astype(np.float32), trig, fs)
    nasal = np.interp(positions, points, np.asarray(zeros) > 0)
    if nasal.any():  # the nasal anti-resonance, blended in by the nasal share of the frame
        zero_freq = np.interp(positions, points, np.where(np.asarray(zeros) > 0, zeros, 1200.0))
        anti = 1.0 / _resonator_gain(zero_freq[:, None].astype(np.float32),
                                     np.full((frames, 1), 150.0, np.float32), trig, fs)
        h_voiced = h_voiced * (nasal[:, None] * anti + (1.0 - nasal[:, None]))
    logf = np.log(np.maximum(freqs, 20.0))[None]
    fric_frames = frication[positions][:, None]
    h_noise = fric_frames * np.exp(-0.5 * ((logf - np.log(fric_centre[positions])[:, None])
                                           / fric_width[positions][:, None]) ** 2)
    gain = 10.0 ** ((_bumps_db(speaker["timbre"], freqs) + _channel_db(channel, freqs)) / 20.0)[:, None]
    # each path scaled to unit power per unit of its envelope, so the envelopes set the phone levels
    voiced_part = spec_v * h_voiced.T
    voiced_part *= np.sqrt(np.mean(voicing ** 2) / max(_power(voiced_part), 1e-30))
    noise_std = h_noise.T * np.sqrt(np.mean(frication ** 2) / max(float(np.mean(h_noise ** 2)), 1e-30)) * gain
    voiced_part *= gain
    # frication and the stationary background are Gaussian noise drawn in the STFT domain
    colour = np.maximum(freqs, 50.0) ** (channel["noise_slope"] / 2.0)
    signal_power = _power(voiced_part) + float(np.mean(noise_std ** 2))
    colour *= np.sqrt(signal_power / (10.0 ** (channel["snr_db"] / 10.0) * float(np.mean(colour ** 2))))
    std = np.sqrt(noise_std ** 2 + (colour ** 2)[:, None]) * np.sqrt(0.5)
    noise = np.empty(voiced_part.shape, np.complex64)
    noise.real = rng.standard_normal(voiced_part.shape, dtype=np.float32) * std
    noise.imag = rng.standard_normal(voiced_part.shape, dtype=np.float32) * std
    _, wave = istft(voiced_part + noise, fs, nperseg=_NFFT, noverlap=_NFFT - _HOP)
    keep = min(n, int(seconds * fs))  # the phone plan overshoots: cut, with a 10 ms fade-out
    wave = wave[:keep] * np.r_[np.ones(keep - keep // 2), _ramp(2 * (keep // 2), int(0.01 * fs))[keep // 2:]]
    level = 10.0 ** (rng.uniform(-18.0, -6.0) / 20.0)  # peak level, dBFS
    return (wave * level / max(float(np.max(np.abs(wave))), 1e-9)).astype(np.float32)


def _power(spec: np.ndarray) -> float:
    return float(np.mean(spec.real ** 2 + spec.imag ** 2))


def _channel_db(channel: Dict[str, Any], freqs: np.ndarray) -> np.ndarray:
    f = np.maximum(freqs, 1.0)
    tilt = channel["tilt_db"] * np.log10(np.maximum(f / 1000.0, 1.0))
    lowpass = -10.0 * np.log10(1.0 + (f / channel["lowpass"]) ** 8)
    highpass = -10.0 * np.log10(1.0 + (channel["highpass"] / f) ** 4)
    return _bumps_db(channel["eq"], freqs) + tilt + lowpass + highpass


def coloured_noise(rng: np.random.Generator, n: int, slope: float, fs: int = 16000) -> np.ndarray:
    """Gaussian noise [n] with power spectrum ~ f^slope (0 white, -1 pink, -2 brown) above 50 Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / fs), 50.0)
    return np.fft.irfft(spectrum * f ** (slope / 2.0), n)


# ------------------------------------------------------------------------ augmentation material


def synthetic_music(rng: np.random.Generator, seconds: float, fs: int = 16000) -> np.ndarray:
    """Notes (harmonic tones with decays) on a random pentatonic scale plus a light percussive noise."""
    n = int(seconds * fs)
    out = np.zeros(n)
    root = rng.uniform(110.0, 330.0)
    scale = root * 2.0 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12.0)
    t0 = 0
    while t0 < n:
        dur = int(rng.uniform(0.15, 0.6) * fs)
        t = np.arange(min(dur, n - t0)) / fs
        f = scale[int(rng.integers(len(scale)))]
        note = sum(np.sin(2 * np.pi * f * h * t) / h ** 1.5 for h in range(1, 7) if f * h < fs / 2)
        out[t0:t0 + len(t)] += note * np.exp(-t * rng.uniform(2.0, 8.0))
        if rng.random() < 0.3:
            hit = min(int(0.03 * fs), n - t0)
            out[t0:t0 + hit] += rng.standard_normal(hit) * np.exp(-np.arange(hit) / (0.005 * fs)) * 0.5
        t0 += dur
    return out


def synthetic_rir(rng: np.random.Generator, fs: int = 16000) -> np.ndarray:
    """Direct path + exponentially decaying diffuse tail (RT60 0.2-0.9 s), with a few early reflections."""
    rt60 = rng.uniform(0.2, 0.9)
    n = int(min(rt60, 0.8) * fs)
    t = np.arange(n) / fs
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * rng.uniform(0.05, 0.3)
    tail[: int(0.002 * fs)] = 0.0
    tail[0] = 1.0
    for _ in range(int(rng.integers(3, 8))):
        tail[int(rng.uniform(0.003, 0.05) * fs)] += rng.uniform(-0.5, 0.5)
    return tail


def _write(path: Path, wave: np.ndarray, fs: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wave, -1.0, 1.0).astype(np.float32), fs, subtype="PCM_16")


def _normalised(wave: np.ndarray, peak_db: float = -6.0) -> np.ndarray:
    return wave * (10.0 ** (peak_db / 20.0)) / max(float(np.max(np.abs(wave))), 1e-9)


def _augmentation_material(root: Path, rng: np.random.Generator, count: int, fs: int) -> None:
    babble_voices = [sample_speaker(rng) for _ in range(8)]
    for k in range(count):
        n = int(5.0 * fs)
        noise = coloured_noise(rng, n, float(rng.uniform(-2.0, 0.5)), fs)
        noise *= 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 2.0) * np.arange(n) / fs)
        _write(root / "musan" / "noise" / f"noise-{k:04d}.wav", _normalised(noise), fs)
        music = synthetic_music(rng, 5.0, fs)
        _write(root / "musan" / "music" / f"music-{k:04d}.wav", _normalised(music), fs)
        picked = rng.choice(len(babble_voices), int(rng.integers(3, 6)), replace=False)
        talkers = [babble_voices[int(i)] for i in picked]
        babble = np.zeros(n)
        for voice in talkers:
            speech = synthesize_utterance(voice, sample_channel(rng), rng, 5.2, fs)[:n]
            babble[: len(speech)] += speech / max(float(np.std(speech)), 1e-9)
        _write(root / "musan" / "speech" / f"speech-{k:04d}.wav", _normalised(babble), fs)
        _write(root / "rirs" / f"rir-{k:04d}.wav", _normalised(synthetic_rir(rng, fs), -1.0), fs)


# ------------------------------------------------------------------------------------- the corpus


def _write_speakers(folder: Path, speakers: List[Dict[str, Any]], first_id: int, utterances: int,
                    videos: int, seconds: Tuple[float, float], rng: np.random.Generator, fs: int,
                    desc: str) -> List[List[str]]:
    """Write ``utterances`` per speaker spread over ``videos`` channels; returns per speaker, per
    utterance the relative paths."""
    written: List[List[str]] = []
    for k, speaker in enumerate(tqdm(speakers, desc=desc, unit="spk")):
        channels = [sample_channel(rng) for _ in range(videos)]
        paths = []
        for u in range(utterances):
            video = u % videos
            rel = f"id{first_id + k:05d}/v{video:03d}/{u:05d}.wav"
            wave = synthesize_utterance(speaker, channels[video], rng, float(rng.uniform(*seconds)), fs)
            _write(folder / rel, wave, fs)
            paths.append(rel)
        written.append(paths)
    return written


def _trials(paths: List[List[str]], videos: int, count: int,
            rng: np.random.Generator) -> List[Tuple[int, str, str]]:
    """``count // 2`` target trials (two utterances of one speaker from different videos when there
    are several), then non-target trials (two speakers); no pair occurs twice."""
    seen: set = set()
    trials: List[Tuple[int, str, str]] = []
    for label, wanted in ((1, count // 2), (0, count - count // 2)):
        made, attempts = 0, 0
        while made < wanted and attempts < 50 * wanted:
            attempts += 1
            a = int(rng.integers(len(paths)))
            if label:
                i, j = (int(x) for x in rng.choice(len(paths[a]), 2, replace=False))
                if videos > 1 and i % videos == j % videos:
                    continue
                pair = (paths[a][i], paths[a][j])
            else:
                b = int((a + rng.integers(1, len(paths))) % len(paths))
                first = paths[a][int(rng.integers(len(paths[a])))]
                pair = (first, paths[b][int(rng.integers(len(paths[b])))])
            if pair in seen or pair[::-1] in seen:
                continue
            seen.add(pair)
            trials.append((label, *pair))
            made += 1
        if made < wanted:
            log.warning("only %d of %d %s trials possible; add validation utterances", made, wanted,
                        "target" if label else "non-target")
    return trials


def make_speaker_dataset(
    root: PathLike,
    num_speakers: int = 100,
    utterances_per_speaker: int = 16,
    videos_per_speaker: int = 4,
    num_val_speakers: int = 40,
    val_utterances_per_speaker: int = 12,
    num_val_trials: int = 3000,
    min_seconds: float = 1.5,
    max_seconds: float = 3.5,
    augmentation_files: int = 8,
    sample_rate: int = 16000,
    seed: int = 0,
    num_dev_speakers: int = 0,
    num_dev_trials: int = 3000,
) -> Path:
    """Write (or reuse, if ``root/meta.json`` matches) the synthetic speaker corpus; returns ``root``.

    Validation speakers never occur in ``train/``; ``val_trials.txt`` holds ``num_val_trials`` lines
    ``label enroll test`` (half targets). With ``num_dev_speakers`` > 0, that many further speakers
    (in neither list above) are written to ``val/`` too, with ``dev_trials.txt`` (``num_dev_trials``
    lines over them only): the development list a score calibration is fitted on (docs/quality.md).
    A parameter change regenerates the corpus, replacing the folders it wrote before; a ``root/train``
    that is not a synthetic corpus is an error.
    """
    if (num_speakers < 1 or num_val_speakers < 2 or utterances_per_speaker < 1
            or val_utterances_per_speaker < 2 or num_dev_speakers == 1 or num_dev_speakers < 0):
        raise ValueError("make_speaker_dataset: need num_speakers >= 1, num_val_speakers >= 2, "
                         "utterances_per_speaker >= 1, val_utterances_per_speaker >= 2, "
                         "num_dev_speakers 0 or >= 2")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"min_seconds={min_seconds}, max_seconds={max_seconds}: expected 0 < min <= max")
    root = Path(root)
    meta = {"version": _VERSION, "num_speakers": num_speakers,
            "utterances_per_speaker": utterances_per_speaker, "videos_per_speaker": videos_per_speaker,
            "num_val_speakers": num_val_speakers,
            "val_utterances_per_speaker": val_utterances_per_speaker, "num_val_trials": num_val_trials,
            "min_seconds": min_seconds, "max_seconds": max_seconds, "augmentation_files": augmentation_files,
            "sample_rate": sample_rate, "seed": seed, "num_dev_speakers": num_dev_speakers,
            "num_dev_trials": num_dev_trials}
    meta_path, marker = root / "meta.json", root / ".generating"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return root
    if (root / "train").exists() and not (meta_path.is_file() or marker.is_file()):
        raise ValueError(f"{root / 'train'} exists but {root} is not a synthetic speaker corpus (no "
                         "meta.json); choose another root")
    for name in ("train", "val", "musan", "rirs"):  # this generator's own output, from other parameters
        shutil.rmtree(root / name, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    (root / "dev_trials.txt").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()
    rng = np.random.default_rng(seed)
    voices = [sample_speaker(rng) for _ in range(num_speakers + num_val_speakers)]
    seconds = (min_seconds, max_seconds)
    _write_speakers(root / "train", voices[:num_speakers], 0, utterances_per_speaker, videos_per_speaker,
                    seconds, rng, sample_rate, "synthetic speech: train")
    val = _write_speakers(root / "val", voices[num_speakers:], num_speakers, val_utterances_per_speaker,
                          videos_per_speaker, seconds, rng, sample_rate, "synthetic speech: val")
    trials = _trials(val, videos_per_speaker, num_val_trials, rng)
    (root / "val_trials.txt").write_text("".join(f"{label} {e} {t}\n" for label, e, t in trials))
    if augmentation_files:
        _augmentation_material(root, rng, augmentation_files, sample_rate)
    if num_dev_speakers:  # drawn last: the corpus above is the same with or without them
        dev_voices = [sample_speaker(rng) for _ in range(num_dev_speakers)]
        dev = _write_speakers(root / "val", dev_voices, num_speakers + num_val_speakers,
                              val_utterances_per_speaker, videos_per_speaker, seconds, rng, sample_rate,
                              "synthetic speech: dev")
        dev_trials = _trials(dev, videos_per_speaker, num_dev_trials, rng)
        (root / "dev_trials.txt").write_text("".join(f"{label} {e} {t}\n" for label, e, t in dev_trials))
    meta_path.write_text(json.dumps(meta, indent=2))
    marker.unlink()
    log.info("synthetic speaker corpus written to %s", root)
    return root
