"""Speaker audio data: readers, crops, corrupt files, augmentation, speed perturbation, data module."""
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from mlearn.data.audio.augment import NoiseSource, ReverbOrNoise, RirSource, add_noise, reverberate
from mlearn.data.audio.datamodule import SpeakerDataModule
from mlearn.data.audio.dataset import SpeakerAudioDataset, open_audio_dataset
from mlearn.data.audio.io import crop_or_pad, speed_perturb
from mlearn.data.audio.lists import read_kaldi_lists, scan_speaker_folder
from mlearn.data.corrupt import CorruptSampleError, collate_skip_corrupt

FS = 16000


def write_wav(path, wave, fs=FS):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wave, np.float32), fs, subtype="FLOAT")
    return path


def tone(freq, seconds, fs=FS, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * fs)) / fs)).astype(np.float32)


@pytest.fixture
def vox(tmp_path):
    """root/idXXXXX/<video>/<utt>.wav: 3 speakers, a ramp signal per file (its content tells which file)."""
    root = tmp_path / "vox"
    for s, n in [("id00002", 2), ("id00001", 3), ("id00003", 1)]:
        for u in range(n):
            write_wav(root / s / f"vid{u % 2}" / f"{u:05d}.wav", np.full(FS, 0.01 * (u + 1), np.float32))
    (root / "id00001" / "notes.txt").write_text("not audio")
    write_wav(root / "id00001" / ".hidden.wav", np.zeros(FS))
    return root


# ---------------------------------------------------------------------------------------- crops


def test_crop_or_pad_lengths_and_content():
    rng = np.random.default_rng(0)
    wave = np.arange(100, dtype=np.float32)
    crop = crop_or_pad(wave, 30, rng)
    assert crop.shape == (30,) and np.all(np.diff(crop) == 1)  # a contiguous window
    assert crop_or_pad(wave, 30).tolist() == list(range(35, 65))  # centred without rng
    starts = {int(crop_or_pad(wave, 30, rng)[0]) for _ in range(200)}
    assert min(starts) <= 5 and max(starts) >= 65  # random starts cover the range
    padded = crop_or_pad(wave[:40], 100, rng)
    assert padded.shape == (100,)
    assert padded.tolist() == (list(range(40)) * 3)[:100]  # repeated, not zero-padded
    assert crop_or_pad(wave, 100).tolist() == wave.tolist()
    with pytest.raises(ValueError, match="empty"):
        crop_or_pad(wave[:0], 10)


# -------------------------------------------------------------------------------------- readers


def test_voxceleb_folder_reader(vox):
    paths, speakers = scan_speaker_folder(vox)
    assert speakers == ["id00001"] * 3 + ["id00002"] * 2 + ["id00003"]
    assert paths[0] == "id00001/vid0/00000.wav" and all(p.endswith(".wav") for p in paths)
    ds = open_audio_dataset(vox, crop_seconds=0.5)
    assert (len(ds), ds.num_speakers, ds.num_classes) == (6, 3, 3)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    wave, label = ds[4]
    assert wave.shape == (8000,) and wave.dtype == torch.float32 and label == 1
    assert float(wave.mean()) == pytest.approx(0.02, abs=1e-6)  # id00002/vid1/00001.wav
    with pytest.raises(ValueError, match="3 speakers but num_speakers=5"):
        open_audio_dataset(vox, num_speakers=5)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_audio_dataset(vox / "nowhere")


def test_kaldi_lists_reader(tmp_path, vox):
    data = tmp_path / "data"
    data.mkdir()
    absolute = vox / "id00003" / "vid0" / "00000.wav"
    (data / "wav.scp").write_text(
        f"u1 ../vox/id00001/vid0/00000.wav\n\nu2 {absolute}\nu3 ../vox/id00002/vid1/00001.wav\n")
    (data / "utt2spk").write_text("u1 spkB\nu2 spkA\nu3 spkB\nu4 spkC\n")
    utts, paths, speakers = read_kaldi_lists(data / "wav.scp")
    assert utts == ["u1", "u2", "u3"] and speakers == ["spkB", "spkA", "spkB"]
    assert paths[1] == str(absolute)
    ds = open_audio_dataset(data, crop_seconds=0.25)
    assert ds.num_speakers == 2 and ds.labels.tolist() == [1, 0, 1]  # spkA < spkB
    assert ds.utterance_id(2) == "u3" and float(ds[2][0].mean()) == pytest.approx(0.02, abs=1e-6)

    (data / "utt2spk").write_text("u1 spkB\nu2 spkA\n")
    with pytest.raises(KeyError, match="'u3'"):
        read_kaldi_lists(data / "wav.scp")
    (data / "utt2spk").write_text("u1\n")
    with pytest.raises(ValueError, match=r"utt2spk:1: expected"):
        read_kaldi_lists(data / "wav.scp")
    (data / "wav.scp").write_text("u1 sox a.flac -t wav - |\n")
    (data / "utt2spk").write_text("u1 s\n")
    with pytest.raises(ValueError, match="piped"):
        read_kaldi_lists(data / "wav.scp")


def test_corrupt_short_and_wrong_rate_audio_counted_not_fatal(tmp_path):
    root = tmp_path / "vox"
    write_wav(root / "a" / "v" / "good.wav", tone(200, 1.0))
    (root / "a" / "v" / "garbage.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    write_wav(root / "b" / "v" / "short.wav", tone(200, 0.05))
    write_wav(root / "b" / "v" / "rate.wav", tone(200, 1.0, fs=8000), fs=8000)
    write_wav(root / "b" / "v" / "good.wav", tone(300, 1.0))
    ds = open_audio_dataset(root, crop_seconds=0.5, min_seconds=0.1)
    names = [ds.path(i).rsplit("/", 1)[-1] for i in range(len(ds))]
    bad = [i for i, name in enumerate(names) if name != "good.wav"]
    assert [ds[i] is None for i in range(len(ds))] == [i in bad for i in range(len(ds))]
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate_skip_corrupt))
    waves, labels, corrupt = batches[0]
    assert corrupt == 3 and waves.shape == (2, 8000) and sorted(labels.tolist()) == [0, 1]
    strict = open_audio_dataset(root, crop_seconds=0.5, strict=True)
    messages = []
    for i in bad:
        with pytest.raises(CorruptSampleError) as info:
            strict[i]
        messages.append(str(info.value))
    text = " ".join(messages)
    assert "garbage.wav: unreadable: cannot read" in text and "short.wav: too short" in text
    assert "rate.wav: wrong sample rate: 8000 Hz, expected 16000 Hz" in text


# --------------------------------------------------------------------------------- augmentation


def measured_snr(clean, noisy):
    clean = clean.astype(np.float64)
    return 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))


def test_add_noise_hits_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = tone(300, 0.5)
    noise = rng.standard_normal(3000).astype(np.float32)  # shorter: repeat-padded
    for snr in (0.0, 7.5, 30.0):
        noisy = add_noise(clean, noise, snr)
        assert noisy.shape == clean.shape and noisy.dtype == np.float32
        assert measured_snr(clean, noisy) == pytest.approx(snr, abs=0.01)
    assert np.array_equal(add_noise(clean, np.zeros(100), 5.0), clean)  # silent noise: unchanged


@pytest.fixture
def musan(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "musan"
    for k in range(2):
        write_wav(root / "noise" / f"n{k}.wav", 0.1 * rng.standard_normal(FS))
        write_wav(root / "speech" / "sub" / f"s{k}.wav", tone(150 + 50 * k, 0.3))  # shorter than the crop
    write_wav(tmp_path / "rirs" / "r.wav", np.r_[1.0, np.zeros(99), 0.5, np.zeros(400)])
    return root


def test_noise_source_snr_within_the_category_range(musan):
    rng = np.random.default_rng(0)
    source = NoiseSource(musan, snr={"noise": [0, 15], "speech": [10, 30], "music": [5, 15]})
    assert source.categories == ["noise", "speech"]  # music: no folder, skipped
    clean = tone(440, 0.5, amp=0.3)
    snrs = []
    for _ in range(60):
        noisy = source(clean, rng)
        assert noisy.shape == clean.shape and noisy.dtype == np.float32
        snrs.append(measured_snr(clean, noisy))
    snrs = np.array(snrs)
    assert snrs.min() >= 0 - 1e-3 and snrs.max() <= 30 + 1e-3
    assert (snrs < 10).sum() > 3 and (snrs > 15).sum() > 3  # both categories and their ranges drawn
    only_noise = NoiseSource(musan, snr={"noise": [0, 15]})
    drawn = [measured_snr(clean, only_noise(clean, rng)) for _ in range(30)]
    assert 0 - 1e-3 <= min(drawn) and max(drawn) <= 15 + 1e-3 and np.ptp(drawn) > 5
    with pytest.raises(FileNotFoundError, match="no audio in any"):
        NoiseSource(musan, snr={"music": [5, 15]})
    with pytest.raises(ValueError, match="low > high"):
        NoiseSource(musan, snr={"noise": [15, 0]})


def test_reverb_keeps_length_and_normalises_the_rir(musan):
    wave = tone(200, 0.25)
    out = reverberate(wave, np.r_[2.0, np.zeros(10)])
    assert out.shape == wave.shape and np.allclose(out, wave, atol=1e-6)  # unit-energy delta: identity
    rir = np.r_[3.0, 0.0, 4.0]  # energy 25 -> taps 0.6 and 0.8
    expected = 0.6 * wave + 0.8 * np.r_[0.0, 0.0, wave[:-2]]
    assert np.allclose(reverberate(wave, rir), expected, atol=1e-5)
    long_rir = np.random.default_rng(0).standard_normal(20000)
    assert reverberate(wave, long_rir).shape == wave.shape
    source = RirSource(musan.parent / "rirs")
    assert source(wave, np.random.default_rng(0)).shape == wave.shape


def test_reverb_or_noise_probability(musan):
    rng = np.random.default_rng(0)
    aug = ReverbOrNoise(0.6, noise=NoiseSource(musan), reverb=RirSource(musan.parent / "rirs"))
    wave = tone(300, 0.2)
    changed = np.mean([not np.array_equal(aug(wave, rng), wave) for _ in range(400)])
    assert 0.52 < changed < 0.68
    assert ReverbOrNoise(0.0, noise=NoiseSource(musan))(wave, rng) is wave


def test_speed_perturbation_changes_tempo_and_pitch():
    wave = tone(500, 1.0)
    for speed in (0.9, 1.1):
        out = speed_perturb(wave, speed)
        assert len(out) == pytest.approx(FS / speed, abs=2)
        peak = np.argmax(np.abs(np.fft.rfft(out))) * FS / len(out)
        assert peak == pytest.approx(500 * speed, rel=0.01)


def test_speed_perturbation_labels_are_new_classes(vox):
    ds = open_audio_dataset(vox, crop_seconds=0.5, speeds=[1.0, 0.9, 1.1])
    assert (ds.num_speakers, ds.num_classes) == (3, 9)
    seen = {}
    for _ in range(30):
        for i in range(len(ds)):
            wave, label = ds[i]
            assert wave.shape == (8000,)
            assert label % 3 == ds.labels[i]  # label = speaker + k * C
            seen.setdefault(int(ds.labels[i]), set()).add(label // 3)
    assert all(ks == {0, 1, 2} for ks in seen.values())
    assert ds.class_of(2, 1) == 5
    with pytest.raises(ValueError, match="starting with 1.0"):
        open_audio_dataset(vox, speeds=[0.9, 1.0])


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2 paths but 1 speakers"):
        SpeakerAudioDataset(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="crop_seconds"):
        SpeakerAudioDataset(["a"], ["x"], crop_seconds=0)


# ---------------------------------------------------------------------------------- data module


def test_datamodule_fbank_on_device_batched(vox, musan):
    dm = SpeakerDataModule(str(vox), batch_size=4, num_workers=0, crop_seconds=1.0, speeds=[1.0, 1.1],
                           noise_dir=str(musan), rir_dir=str(musan.parent / "rirs"), aug_prob=0.6)
    assert dm.num_classes == 6
    waves, labels, corrupt = next(iter(dm.train_dataloader()))
    assert waves.shape == (4, FS) and corrupt == 0
    feats, labels2, corrupt2 = dm.on_after_batch_transfer((waves, labels, corrupt), 0)
    assert feats.shape == (4, 98, 80) and labels2 is labels
    assert feats.mean(dim=1).abs().max() < 1e-4  # per-utterance mean normalisation
    assert torch.equal(dm.features(waves), dm.features(waves))  # no trainer: eval mode, no dither
    dm.trainer = SimpleNamespace(training=True)
    assert not torch.equal(dm.features(waves), dm.features(waves))  # dither while training
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long), 4)
    assert dm.on_after_batch_transfer(empty, 0) is empty


def test_m4a_only_folder_asks_for_conversion(tmp_path):
    (tmp_path / "id00001" / "v").mkdir(parents=True)
    (tmp_path / "id00001" / "v" / "00001.m4a").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="1 .m4a files.*convert"):
        scan_speaker_folder(tmp_path)


def test_datamodule_names_a_sample_rate_that_rejects_every_utterance(tmp_path, caplog):
    root = tmp_path / "vox8k"
    for spk in "ab":
        for u in range(2):
            write_wav(root / spk / "v" / f"{u}.wav", tone(200, 0.5, fs=8000), fs=8000)
    with pytest.raises(ValueError) as info:
        _ = SpeakerDataModule(str(root), num_workers=0).num_classes
    message = str(info.value)
    assert message == (f"{root}: none of the 4 utterances probed (of 4) can be used: 4 wrong sample rate "
                       f"(e.g. {root}/a/v/0.wav: wrong sample rate: 8000 Hz, expected 16000 Hz)")
    # at the data's own rate it opens
    assert SpeakerDataModule(str(root), num_workers=0, sample_rate=8000).num_classes == 2


def test_datamodule_logs_unusable_utterances_by_kind(tmp_path, caplog):
    root = tmp_path / "mixed"
    for spk in "ab":
        for u in range(3):
            write_wav(root / spk / "v" / f"{u}.wav", tone(200 + 100 * u, 0.5))
    write_wav(root / "b" / "v" / "r8k.wav", tone(200, 0.5, fs=8000), fs=8000)
    write_wav(root / "b" / "v" / "r8k_2.wav", tone(200, 0.5, fs=8000), fs=8000)
    write_wav(root / "b" / "v" / "tiny.wav", tone(200, 0.01))
    with caplog.at_level("WARNING", logger="mlearn.data.audio.datamodule"):
        module = SpeakerDataModule(str(root), num_workers=0)
        assert module.num_classes == 2
    assert (f"{root}: 3 of the 9 utterances probed (of 9) are unusable and will be skipped as corrupt: "
            f"2 wrong sample rate (e.g. {root}/b/v/r8k.wav: wrong sample rate: 8000 Hz, expected 16000 Hz); "
            f"1 too short (e.g. {root}/b/v/tiny.wav: too short: 160 samples < 1600 (min_seconds=0.1))"
            ) in caplog.text
    dataset = module.dataset
    with caplog.at_level("WARNING", logger="mlearn.data.audio.dataset"):
        skipped = [dataset[i] is None for i in range(len(dataset))]
    # logged once per kind
    assert sum(skipped) == 3 and caplog.text.count("skipping wrong sample rate utterances") == 1
    assert caplog.text.count("skipping too short utterances") == 1
    with pytest.raises(ValueError,
                       match=r"strict: 3 of the 9 utterances probed are unusable: 2 wrong sample rate"):
        _ = SpeakerDataModule(str(root), num_workers=0, strict=True).num_classes


def test_probe_spreads_over_the_set(tmp_path):
    root = tmp_path / "many"
    for spk in range(10):
        for u in range(10):
            write_wav(root / f"s{spk}" / "v" / f"{u}.wav", tone(200, 0.2))
    dataset = open_audio_dataset(root)
    probed, failures = dataset.probe(limit=7)
    assert probed == 7 and failures == {}
    for u in range(10):  # one speaker at another rate: the evenly spaced probe sees it
        write_wav(root / "s9" / "v" / f"{u}.wav", tone(200, 0.2, fs=8000), fs=8000)
    probed, failures = dataset.probe(limit=7)
    assert probed == 7 and list(failures) == [dataset.path(99)]
