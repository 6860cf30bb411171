"""Datasets (RecordIO, image folders, lists, .bin pairs, audio, synthetic), transforms, fbank and data modules.

Names are imported lazily so that ``import mlearn.data.bins`` stays light.
"""
from __future__ import annotations

from mlearn.lazy import lazy_exports

_EXPORTS = {
    "FaceDataModule": "mlearn.data.datamodule",
    "make_face_dataset": "mlearn.data.synthetic",
    "read_bin": "mlearn.data.bins",
    "write_bin": "mlearn.data.bins",
    "RecordIODataset": "mlearn.data.recordio",
    "RecordIOReader": "mlearn.data.recordio",
    "RecordIOWriter": "mlearn.data.recordio",
    "ImageFolderDataset": "mlearn.data.folders",
    "ImageListDataset": "mlearn.data.folders",
    "IdentityImageDataset": "mlearn.data.folders",
    "open_dataset": "mlearn.data.folders",
    "load_label_map": "mlearn.data.folders",
    "CorruptSampleError": "mlearn.data.corrupt",
    "collate_skip_corrupt": "mlearn.data.corrupt",
    "failure_kinds": "mlearn.data.corrupt",
    "summarize_failures": "mlearn.data.corrupt",
    "ImageBatch": "mlearn.data.batches",
    "UnmirroredBatch": "mlearn.data.batches",
    "build_transform": "mlearn.data.transforms",
    "normalize_images": "mlearn.data.transforms",
    "list_augmentations": "mlearn.data.transforms",
    "inspect_dataset": "mlearn.data.inspect",
    "convert_dataset": "mlearn.data.inspect",
    "kaldi_fbank": "mlearn.data.fbank",
    "apply_cmn": "mlearn.data.fbank",
    "KaldiFbank": "mlearn.data.fbank",
    "fbank_spec": "mlearn.data.fbank",
    "fbank_from_spec": "mlearn.data.fbank",
    "align_face": "mlearn.data.align",
    "similarity_transform": "mlearn.data.align",
    "ARCFACE_TEMPLATE": "mlearn.data.align",
    "SpeakerDataModule": "mlearn.data.speaker_datamodule",
    "SpeakerAudioDataset": "mlearn.data.audio",
    "open_audio_dataset": "mlearn.data.audio",
    "read_kaldi_lists": "mlearn.data.audio",
    "scan_speaker_folder": "mlearn.data.audio",
    "read_audio": "mlearn.data.audio",
    "crop_or_pad": "mlearn.data.audio",
    "NoiseSource": "mlearn.data.audio_augment",
    "RirSource": "mlearn.data.audio_augment",
    "ReverbOrNoise": "mlearn.data.audio_augment",
    "build_augmentation": "mlearn.data.audio_augment",
    "add_noise": "mlearn.data.audio_augment",
    "reverberate": "mlearn.data.audio_augment",
    "speed_perturb": "mlearn.data.audio_augment",
    "make_speaker_dataset": "mlearn.data.synthetic_speech",
    "EpochPermutationSampler": "mlearn.data.samplers",
    "EpochSeededDataset": "mlearn.data.samplers",
    "sample_generators": "mlearn.data.samplers",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
