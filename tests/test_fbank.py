"""Kaldi fbank: parity with a plain per-frame float64 loop written from Kaldi's formulas."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mlearn.data.audio.fbank import (
    KaldiFbank,
    apply_cmn,
    fbank_from_spec,
    fbank_spec,
    kaldi_fbank,
    num_frames,
)


def reference_fbank(x, sample_rate=16000, num_mel_bins=80, frame_length_ms=25.0, frame_shift_ms=10.0,
                    preemphasis=0.97, remove_dc_offset=True, window="hamming", low_freq=20.0, high_freq=0.0,
                    use_log=True, snip_edges=True):
    """compute-fbank-feats (no dither), one frame at a time, float64."""
    x = np.asarray(x, np.float64)
    size = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    fft = 1
    while fft < size:
        fft *= 2
    n = len(x)
    if snip_edges:
        count = 0 if n < size else 1 + (n - size) // shift
        starts = [t * shift for t in range(count)]
    else:
        count = (n + shift // 2) // shift
        starts = [t * shift + shift // 2 - size // 2 for t in range(count)]
    win = []
    for i in range(size):
        hann = 0.5 - 0.5 * math.cos(2 * math.pi * i / (size - 1))
        win.append({"hamming": 0.54 - 0.46 * math.cos(2 * math.pi * i / (size - 1)), "hanning": hann,
                    "povey": hann ** 0.85, "rectangular": 1.0}[window])
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    m_lo, m_hi = mel(low_freq), mel(high)
    delta = (m_hi - m_lo) / (num_mel_bins + 1)
    banks = np.zeros((num_mel_bins, fft // 2))
    for b in range(num_mel_bins):
        left, center, right = m_lo + b * delta, m_lo + (b + 1) * delta, m_lo + (b + 2) * delta
        for k in range(fft // 2):
            m = mel(k * sample_rate / fft)
            if left < m < right:
                banks[b, k] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    out = np.zeros((count, num_mel_bins))
    for t, start in enumerate(starts):
        frame = np.zeros(size)
        for i in range(size):
            s = start + i
            while s < 0 or s >= n:
                s = -s - 1 if s < 0 else 2 * n - 1 - s
            frame[i] = x[s]
        if remove_dc_offset:
            frame = frame - frame.sum() / size
        emph = frame.copy()
        for i in range(size - 1, 0, -1):
            emph[i] = frame[i] - preemphasis * frame[i - 1]
        emph[0] = frame[0] - preemphasis * frame[0]
        padded = np.zeros(fft)
        padded[:size] = emph * np.asarray(win)
        spec = np.fft.rfft(padded)
        power = (spec.real ** 2 + spec.imag ** 2)[: fft // 2]
        energy = banks @ power
        out[t] = np.log(np.maximum(energy, np.finfo(np.float32).eps)) if use_log else energy
    return out


def _speech_like(n, seed=0, sample_rate=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    x = 3000 * np.sin(2 * np.pi * 220 * t) + 1500 * np.sin(2 * np.pi * 1250 * t + 1) + rng.normal(0, 400, n)
    return torch.tensor(np.clip(x, -32768, 32767), dtype=torch.float32)


def test_default_options_match_reference_loop():
    x = _speech_like(16000 + 123)
    got = kaldi_fbank(x).numpy()
    ref = reference_fbank(x.numpy())
    assert got.shape == (1 + (len(x) - 400) // 160, 80) and got.dtype == np.float32
    # float32 (Kaldi's precision): bins ~1e-7 below the frame's peak energy carry FFT rounding
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    strong = ref > ref.max(axis=1, keepdims=True) - 10.0
    np.testing.assert_allclose(got[strong], ref[strong], atol=1e-4, rtol=0)
    # float64 input is computed in float64: the algorithm itself matches to output precision
    np.testing.assert_allclose(kaldi_fbank(x.double()).numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [
    {"window": "povey", "snip_edges": False, "num_mel_bins": 40},
    {"preemphasis": 0.0, "remove_dc_offset": False, "window": "hanning", "high_freq": -400.0,
     "low_freq": 60.0},
    {"sample_rate": 8000, "num_mel_bins": 23, "window": "rectangular", "frame_length_ms": 20.0},
])
def test_other_options_match_reference_loop(options):
    x = _speech_like(7001, seed=1, sample_rate=options.get("sample_rate", 16000)).double()
    ref = reference_fbank(x.numpy(), **options)
    np.testing.assert_allclose(kaldi_fbank(x, **options).numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(kaldi_fbank(x.float(), **options).numpy(), ref, atol=2e-3, rtol=0)


def test_linear_energies_and_float64_input():
    x = _speech_like(4000, seed=2).double()
    got = kaldi_fbank(x, use_log=False).numpy()
    ref = reference_fbank(x.numpy(), use_log=False)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    np.testing.assert_allclose(kaldi_fbank(x).numpy(), reference_fbank(x.numpy()), atol=1e-5, rtol=0)


def test_silence_is_floored_at_float_epsilon():
    out = kaldi_fbank(torch.zeros(800))
    assert torch.allclose(out, torch.full_like(out, math.log(np.finfo(np.float32).eps)))


@pytest.mark.parametrize("n", [0, 399, 400, 401, 559, 560, 16000, 48123])
def test_frame_counts(n):
    x = torch.randn(n) * 100
    assert kaldi_fbank(x).shape == (max(0, 1 + (n - 400) // 160) if n >= 400 else 0, 80)
    assert num_frames(n) == kaldi_fbank(x).shape[0]
    assert kaldi_fbank(x, snip_edges=False).shape[0] == num_frames(n, snip_edges=False) == (n + 80) // 160


def test_very_short_signal_reflects_repeatedly_like_kaldi():
    x = _speech_like(150, seed=3).double()  # shorter than half a window: indices reflect more than once
    np.testing.assert_allclose(kaldi_fbank(x, snip_edges=False).numpy(),
                               reference_fbank(x.numpy(), snip_edges=False), atol=1e-5, rtol=0)


def test_batched_equals_per_utterance():
    batch = torch.stack([_speech_like(5000, seed=s) for s in range(3)])
    out = kaldi_fbank(batch)
    assert out.shape == (3, num_frames(5000), 80)
    for i in range(3):
        torch.testing.assert_close(out[i], kaldi_fbank(batch[i]), atol=1e-5, rtol=0)
    module = KaldiFbank().eval()
    torch.testing.assert_close(module(batch)[1], module(batch[1]), atol=1e-5, rtol=0)


def test_module_eval_is_deterministic_and_cmn_applied():
    x = torch.stack([_speech_like(6000, seed=s) for s in range(2)])
    module = KaldiFbank(dither=1.0).eval()
    out = module(x)
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(out, apply_cmn(kaldi_fbank(x)), atol=1e-5, rtol=0)
    assert out.mean(dim=1).abs().max() < 1e-4
    assert KaldiFbank(cmn=False).eval()(x).mean() > 5  # int16-range input: large log energies


def test_dither_only_in_train_mode_and_reproducible_with_generator():
    x = torch.zeros(2, 4000)
    module = KaldiFbank(dither=1.0, cmn=False).train()
    a, b = module(x), module(x)
    assert not torch.allclose(a, b)  # fresh noise each call
    floor = math.log(np.finfo(np.float32).eps)
    assert (a > floor + 1).all()  # dither lifts digital silence off the log floor
    assert torch.allclose(module.eval()(x), torch.full_like(a, floor))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(kaldi_fbank(x, dither=1.0, generator=g1),
                               kaldi_fbank(x, dither=1.0, generator=g2))
    # Dither of standard deviation d on silence: each frame's power spectrum is that of white noise,
    # so the mean mel energy matches the filter weights times the expected |DFT|^2 of windowed noise.
    noise_power = kaldi_fbank(torch.zeros(1, 16000), dither=1.0, use_log=False, preemphasis=0.0,
                              remove_dc_offset=False, generator=g1)
    win = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(400) / 399)
    from mlearn.data.audio.fbank import mel_banks
    expected = mel_banks(80, 512, 16000).numpy().sum(1) * (win ** 2).sum()
    ratio = noise_power.mean(dim=(0, 1)).numpy() / expected
    assert np.all(np.abs(ratio - 1) < 0.5) and abs(ratio.mean() - 1) < 0.05


def test_apply_cmn_with_lengths():
    feats = torch.randn(2, 7, 3) + 5
    lengths = torch.tensor([7, 4])
    out = apply_cmn(feats, lengths)
    torch.testing.assert_close(out[0], feats[0] - feats[0].mean(0))
    torch.testing.assert_close(out[1, :4], feats[1, :4] - feats[1, :4].mean(0))
    assert (out[1, 4:] == 0).all()
    torch.testing.assert_close(apply_cmn(feats[0]), feats[0] - feats[0].mean(0))
    with pytest.raises(ValueError, match="lengths"):
        apply_cmn(feats, torch.tensor([1, 2, 3]))


def test_spec_roundtrip_and_json():
    module = KaldiFbank(num_mel_bins=40, dither=0.5)
    spec = fbank_spec(module)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["num_mel_bins"] == 40 and spec["features"] == "kaldi_fbank" and spec["input_scale"] == 32768.0
    assert fbank_spec({"num_mel_bins": 40, "dither": 0.5}) == spec
    rebuilt = fbank_from_spec({**spec, "modality": "audio", "layout": "[B, T, F]"}, dither=0.0)
    assert rebuilt.options["num_mel_bins"] == 40 and rebuilt.options["dither"] == 0.0
    with pytest.raises(KeyError, match="nmels"):
        fbank_spec({"nmels": 40})
    from mlearn.models.speaker import AUDIO_INPUT_SPEC
    assert fbank_from_spec(AUDIO_INPUT_SPEC).options["num_mel_bins"] == AUDIO_INPUT_SPEC["num_mel_bins"]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="float tensor"):
        kaldi_fbank(torch.zeros(1000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        kaldi_fbank(torch.zeros(1, 2, 1000))
    with pytest.raises(ValueError, match="window='hann'"):
        kaldi_fbank(torch.zeros(1000), window="hann")
    with pytest.raises(ValueError, match="high_freq"):
        kaldi_fbank(torch.zeros(1000), high_freq=9000.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kaldi_fbank(np.zeros(1000))


def test_module_follows_device_buffers_not_in_state_dict():
    module = KaldiFbank()
    assert module.state_dict() == {}
    assert module.window.dtype == torch.float32 and module.banks.shape == (80, 257)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.stack([_speech_like(8000, seed=s) for s in range(4)])
    module = KaldiFbank().eval()
    cpu = module(x)
    gpu = module.cuda()(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
