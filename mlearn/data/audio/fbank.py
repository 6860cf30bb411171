"""Kaldi ``compute-fbank-feats`` log-mel filterbanks in plain PyTorch (batched, any device).

Same semantics as ``torchaudio.compliance.kaldi.fbank`` (which is not a dependency): frames of
``frame_length_ms`` every ``frame_shift_ms`` (``snip_edges``: only whole frames; otherwise frames
centred on ``shift * (t + 1/2)`` with the signal reflected at both ends), then per frame: dither
(``+ dither * N(0, 1)``), DC removal, pre-emphasis ``x[i] -= k * x[i-1]`` with ``x[-1] = x[0]``,
window, zero padding to the next power of two, power spectrum, triangular mel filters on Kaldi's
mel scale ``1127 ln(1 + f / 700)`` between ``low_freq`` and ``high_freq`` (``<= 0``: offset from
the Nyquist frequency), and ``log(max(energy, float32 eps))``.

Input scale: like Kaldi and WeSpeaker, pass samples in int16 range (WeSpeaker multiplies soundfile /
torchaudio's [-1, 1) floats by ``1 << 15`` before fbank); see :data:`INPUT_SCALE`. The scale only
shifts the log-mel by a constant (removed by CMN) except where the eps floor or dither act.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

INPUT_SCALE = float(1 << 15)  # waveform amplitude expected: int16 range (soundfile float * 32768)
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def _hamming(n: Tensor) -> Tensor:
    return 0.54 - 0.46 * torch.cos(2 * math.pi * n / (len(n) - 1))


def _hanning(n: Tensor) -> Tensor:
    return 0.5 - 0.5 * torch.cos(2 * math.pi * n / (len(n) - 1))


def _povey(n: Tensor) -> Tensor:
    return _hanning(n).pow(0.85)


def _blackman(n: Tensor) -> Tensor:
    a = 2 * math.pi * n / (len(n) - 1)
    return 0.42 - 0.5 * torch.cos(a) + 0.08 * torch.cos(2 * a)


def _rectangular(n: Tensor) -> Tensor:
    return torch.ones_like(n)


# Kaldi's window types; float64 [N] sample indices -> float64 [N] weights.
WINDOWS: Dict[str, Callable[[Tensor], Tensor]] = {
    "hamming": _hamming, "hanning": _hanning, "povey": _povey, "blackman": _blackman,
    "rectangular": _rectangular,
}

# The options (and their defaults) recorded by :func:`fbank_spec` and accepted by :class:`KaldiFbank`.
FBANK_DEFAULTS: Dict[str, Any] = {
    "sample_rate": 16000, "num_mel_bins": 80, "frame_length_ms": 25.0, "frame_shift_ms": 10.0,
    "dither": 0.0, "preemphasis": 0.97, "remove_dc_offset": True, "window": "hamming", "low_freq": 20.0,
    "high_freq": 0.0, "use_log": True, "energy_floor": 0.0, "snip_edges": True, "cmn": True,
}


def mel_scale(freq: Union[float, Tensor]) -> Union[float, Tensor]:
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)`` (f in Hz)."""
    if isinstance(freq, Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def frame_sizes(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> tuple:
    """``(window_size, window_shift, fft_size)`` in samples; fft_size = next power of 2 of the window."""
    window_size = int(sample_rate * frame_length_ms * 0.001)
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(f"fbank: frame_length_ms={frame_length_ms}, frame_shift_ms={frame_shift_ms} at "
                         f"sample_rate={sample_rate} give window {window_size} / shift {window_shift} "
                         "samples; "
                         "expected a window of >= 2 samples and a shift of >= 1")
    return window_size, window_shift, 1 << (window_size - 1).bit_length()


def num_frames(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0, snip_edges: bool = True) -> int:
    """Frames T of a waveform of ``num_samples`` (e.g. 1 + (N - 400) // 160 at 16 kHz with snip_edges)."""
    size, shift, _ = frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    if snip_edges:
        return 0 if num_samples < size else 1 + (num_samples - size) // shift
    return (num_samples + shift // 2) // shift


def mel_banks(num_mel_bins: int, fft_size: int, sample_rate: int, low_freq: float = 20.0,
              high_freq: float = 0.0) -> Tensor:
    """Triangular mel filters, float64 [num_mel_bins, fft_size // 2 + 1] (the Nyquist column is zero,
    as in Kaldi, whose filters span FFT bins 0 .. fft_size/2 - 1)."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if num_mel_bins < 1 or not 0.0 <= low_freq < high <= nyquist:
        raise ValueError(f"fbank: need num_mel_bins >= 1 and 0 <= low_freq < high_freq <= Nyquist "
                         f"({nyquist} Hz); "
                         f"got num_mel_bins={num_mel_bins}, low_freq={low_freq}, high_freq={high_freq} "
                         f"(-> {high} Hz)")
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    edges = mel_low + delta * torch.arange(num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = mel_scale(torch.arange(fft_size // 2, dtype=torch.float64) * (sample_rate / fft_size))[None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.where(mel <= center, up, down).clamp(min=0.0)
    weights = torch.where((mel > left) & (mel < right), weights, torch.zeros_like(weights))
    return torch.cat([weights, torch.zeros(num_mel_bins, 1, dtype=torch.float64)], dim=1)


def window_function(window: str, size: int) -> Tensor:
    """float64 [size] analysis window by Kaldi name (see :data:`WINDOWS`)."""
    try:
        fn = WINDOWS[window]
    except KeyError:
        raise ValueError(f"fbank: window={window!r}; expected one of {sorted(WINDOWS)}") from None
    return fn(torch.arange(size, dtype=torch.float64))


def _frames(waveform: Tensor, size: int, shift: int, snip_edges: bool) -> Tensor:
    """[B, N] -> [B, T, size] (a copy for snip_edges=False: Kaldi's reflection at both ends)."""
    n = waveform.shape[-1]
    if snip_edges:
        if n < size:
            return waveform.new_zeros(waveform.shape[0], 0, size)
        return waveform.unfold(-1, size, shift)
    count = (n + shift // 2) // shift
    if count == 0:
        return waveform.new_zeros(waveform.shape[0], 0, size)
    starts = torch.arange(count, device=waveform.device) * shift + shift // 2 - size // 2
    index = starts[:, None] + torch.arange(size, device=waveform.device)[None]
    while bool(((index < 0) | (index >= n)).any()):  # repeated reflection only for very short signals
        index = torch.where(index < 0, -index - 1, index)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
    return waveform[:, index]


def _fbank(waveform: Tensor, size: int, shift: int, fft_size: int, window: Tensor, banks: Tensor,
           dither: float, preemphasis: float, remove_dc_offset: bool, use_log: bool, snip_edges: bool,
           generator: Optional[torch.Generator]) -> Tensor:
    frames = _frames(waveform, size, shift, snip_edges)
    if frames.shape[1] == 0:  # shorter than one frame: no features (the FFT rejects empty input)
        return frames.new_zeros(frames.shape[0], 0, banks.shape[0])
    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, dtype=frames.dtype,
                            device="cpu" if generator is not None and generator.device.type == "cpu"
                            else frames.device)
        frames = frames + dither * noise.to(frames.device)
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if preemphasis != 0.0:
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * previous
    frames = frames * window
    spectrum = torch.fft.rfft(frames, n=fft_size, dim=-1)
    power = spectrum.real.square() + spectrum.imag.square()
    energies = power @ banks.T
    if use_log:
        energies = torch.log(energies.clamp(min=_LOG_FLOOR))
    return energies


def _check_waveform(waveform: Tensor) -> Tensor:
    if not isinstance(waveform, Tensor):
        raise TypeError(f"fbank: waveform must be a torch.Tensor [N] or [B, N], got "
                        f"{type(waveform).__name__}")
    if waveform.ndim not in (1, 2) or not waveform.is_floating_point():
        raise ValueError(f"fbank: waveform must be a float tensor [N] or [B, N] (int16-range samples), got "
                         f"{waveform.dtype} of shape {tuple(waveform.shape)}")
    return waveform


def _compute_dtype(waveform: Tensor) -> torch.dtype:
    return torch.float64 if waveform.dtype == torch.float64 else torch.float32


def kaldi_fbank(waveform: Tensor, sample_rate: int = 16000, num_mel_bins: int = 80,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, dither: float = 0.0,
                preemphasis: float = 0.97, remove_dc_offset: bool = True, window: str = "hamming",
                low_freq: float = 20.0, high_freq: float = 0.0, use_log: bool = True,
                energy_floor: float = 0.0, snip_edges: bool = True,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Kaldi log-mel filterbank features.

    ``waveform``: float [N] or [B, N] samples at ``sample_rate`` Hz, int16 range expected (multiply
    [-1, 1) audio by :data:`INPUT_SCALE`). Returns float32 [T, num_mel_bins] or [B, T, num_mel_bins],
    T = :func:`num_frames` (``1 + (N - 400) // 160`` at 16 kHz with 25/10 ms and ``snip_edges``).
    Computed in float32, as Kaldi does, on the waveform's device (so mel bins ~1e-6 below a frame's
    peak energy carry float32 rounding, ~1e-3 in log); a float64 waveform is computed in float64.
    ``dither`` adds ``dither * N(0, 1)`` per frame sample (drawn from ``generator`` when given).
    ``energy_floor`` only matters for Kaldi's optional energy coefficient, which this function does not
    produce; it is accepted for option parity.
    """
    waveform = _check_waveform(waveform)
    if energy_floor < 0:
        raise ValueError(f"fbank: energy_floor={energy_floor}; expected >= 0")
    size, shift, fft_size = frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    dtype = _compute_dtype(waveform)
    window_t = window_function(window, size).to(device=waveform.device, dtype=dtype)
    banks = mel_banks(num_mel_bins, fft_size, sample_rate, low_freq, high_freq).to(waveform.device, dtype)
    batch = waveform.to(dtype)
    batch = batch[None] if batch.ndim == 1 else batch
    out = _fbank(batch, size, shift, fft_size, window_t, banks, dither, preemphasis, remove_dc_offset,
                 use_log, snip_edges, generator).float()
    return out[0] if waveform.ndim == 1 else out


def apply_cmn(features: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Per-utterance cepstral mean normalisation: subtract the mean over time.

    ``features``: [T, F] or [B, T, F]; ``lengths``: optional [B] valid frame counts (padded frames
    are excluded from the mean and set to 0). Returns a tensor of the same shape and dtype.
    """
    if features.ndim not in (2, 3):
        raise ValueError(f"apply_cmn: features must be [T, F] or [B, T, F], got shape "
                         f"{tuple(features.shape)}")
    if lengths is None:
        if features.shape[-2] == 0:
            return features
        return features - features.mean(dim=-2, keepdim=True)
    if features.ndim != 3 or lengths.shape != (features.shape[0],):
        raise ValueError(f"apply_cmn: lengths must be [B] for features [B, T, F]; got lengths "
                         f"{tuple(lengths.shape)} for features {tuple(features.shape)}")
    steps = torch.arange(features.shape[1], device=features.device)
    mask = (steps[None] < lengths.to(features.device)[:, None]).unsqueeze(-1).to(features.dtype)
    counts = lengths.to(features.device, features.dtype).clamp(min=1)[:, None, None]
    mean = (features * mask).sum(1, keepdim=True) / counts
    return (features - mean) * mask


class KaldiFbank(nn.Module):
    """Batched Kaldi fbank (+ optional CMN) as a module: waveform [B, N] (or [N]) -> [B, T, F] (or [T, F]).

    Options as :func:`kaldi_fbank`. ``dither`` applies only in ``train()`` mode (evaluation is
    deterministic). Window and mel filters are non-persistent buffers: they follow ``.to(device)``
    and stay out of the state dict.
    """

    def __init__(self, sample_rate: int = 16000, num_mel_bins: int = 80, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, dither: float = 0.0, preemphasis: float = 0.97,
                 remove_dc_offset: bool = True, window: str = "hamming", low_freq: float = 20.0,
                 high_freq: float = 0.0, use_log: bool = True, energy_floor: float = 0.0,
                 snip_edges: bool = True, cmn: bool = True) -> None:
        super().__init__()
        self.options: Dict[str, Any] = {
            "sample_rate": int(sample_rate), "num_mel_bins": int(num_mel_bins),
            "frame_length_ms": float(frame_length_ms), "frame_shift_ms": float(frame_shift_ms),
            "dither": float(dither), "preemphasis": float(preemphasis),
            "remove_dc_offset": bool(remove_dc_offset),
            "window": str(window), "low_freq": float(low_freq), "high_freq": float(high_freq),
            "use_log": bool(use_log), "energy_floor": float(energy_floor), "snip_edges": bool(snip_edges),
            "cmn": bool(cmn),
        }
        if energy_floor < 0:
            raise ValueError(f"KaldiFbank: energy_floor={energy_floor}; expected >= 0")
        self.size, self.shift, self.fft_size = frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
        self.register_buffer("window", window_function(window, self.size).float(), persistent=False)
        self.register_buffer("banks", mel_banks(num_mel_bins, self.fft_size, sample_rate, low_freq,
                                                high_freq).float(), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples."""
        o = self.options
        return num_frames(num_samples, o["sample_rate"], o["frame_length_ms"], o["frame_shift_ms"],
                          o["snip_edges"])

    def forward(self, waveform: Tensor) -> Tensor:
        waveform = _check_waveform(waveform)
        o = self.options
        dtype = _compute_dtype(waveform)
        batch = waveform.to(dtype)
        batch = batch[None] if batch.ndim == 1 else batch
        dither = o["dither"] if self.training else 0.0
        feats = _fbank(batch, self.size, self.shift, self.fft_size, self.window.to(dtype),
                       self.banks.to(dtype), dither, o["preemphasis"], o["remove_dc_offset"], o["use_log"],
                       o["snip_edges"], None).float()
        if o["cmn"]:
            feats = apply_cmn(feats)
        return feats[0] if waveform.ndim == 1 else feats

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


def fbank_spec(module_or_kwargs: Union[KaldiFbank, Mapping[str, Any], None] = None) -> Dict[str, Any]:
    """The fbank settings as a JSON-able dict (every option of :data:`FBANK_DEFAULTS`, plus
    ``features: "kaldi_fbank"`` and ``input_scale``), from a :class:`KaldiFbank` or a dict of its
    keyword arguments (missing ones take the defaults; unknown keys -> ``KeyError``)."""
    if isinstance(module_or_kwargs, KaldiFbank):
        options = dict(module_or_kwargs.options)
    else:
        given = dict(module_or_kwargs or {})
        unknown = sorted(set(given) - set(FBANK_DEFAULTS))
        if unknown:
            raise KeyError(f"fbank_spec: unknown option(s) {unknown}; accepted: {sorted(FBANK_DEFAULTS)}")
        options = {k: type(v)(given.get(k, v)) for k, v in FBANK_DEFAULTS.items()}
    return {"features": "kaldi_fbank", **options, "input_scale": INPUT_SCALE}


def fbank_from_spec(spec: Mapping[str, Any], **overrides: Any) -> KaldiFbank:
    """A :class:`KaldiFbank` from a model input spec (e.g. ``AUDIO_INPUT_SPEC``): takes the fbank keys
    it has (others such as ``modality`` / ``layout`` are not fbank options and are skipped), defaults
    for the rest, then ``overrides`` (which must be fbank options)."""
    features = spec.get("features", "kaldi_fbank")
    if features != "kaldi_fbank":
        raise ValueError(f"input spec features={features!r}; only 'kaldi_fbank' is supported")
    unknown = sorted(set(overrides) - set(FBANK_DEFAULTS))
    if unknown:
        raise KeyError(f"fbank_from_spec: unknown option(s) {unknown}; accepted: {sorted(FBANK_DEFAULTS)}")
    kwargs = {k: spec[k] for k in FBANK_DEFAULTS if k in spec}
    kwargs.update(overrides)
    return KaldiFbank(**kwargs)
