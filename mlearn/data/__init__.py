"""Training and evaluation data, by modality around a small shared core.

- core: :mod:`~mlearn.data.labels` (label maps), :mod:`~mlearn.data.corrupt` (corrupt-sample policy,
  collate), :mod:`~mlearn.data.order` (the resumable epoch sampler), :mod:`~mlearn.data.seeding`
  (per-sample random streams), :mod:`~mlearn.data.resumable` (the resumable data module base);
- :mod:`mlearn.data.images`: face datasets (RecordIO, folders, lists), transforms, batches, ``.bin``
  pairs, alignment, ``FaceDataModule``;
- :mod:`mlearn.data.audio`: audio reading, lists, dataset, augmentation, fbank, ``SpeakerDataModule``;
- :mod:`mlearn.data.synthetic`: generated face and speech corpora.

Names are imported lazily so that ``import mlearn.data.images.bins`` stays light.
"""
from __future__ import annotations

from mlearn.lazy import lazy_exports

_EXPORTS = {
    # shared core
    "CorruptSampleError": "mlearn.data.corrupt",
    "Batch": "mlearn.data.corrupt",
    "collate_skip_corrupt": "mlearn.data.corrupt",
    "failure_kinds": "mlearn.data.corrupt",
    "summarize_failures": "mlearn.data.corrupt",
    "load_label_map": "mlearn.data.labels",
    "save_label_map": "mlearn.data.labels",
    "remap_labels": "mlearn.data.labels",
    "EpochPermutationSampler": "mlearn.data.order",
    "EpochSeededDataset": "mlearn.data.order",
    "sample_generators": "mlearn.data.seeding",
    # images
    "FaceDataModule": "mlearn.data.images.datamodule",
    "IdentityImageDataset": "mlearn.data.images.base",
    "decode_image": "mlearn.data.images.base",
    "ImageFolderDataset": "mlearn.data.images.files",
    "ImageListDataset": "mlearn.data.images.files",
    "open_dataset": "mlearn.data.images.open",
    "RecordIODataset": "mlearn.data.images.recordio_dataset",
    "RecordIOReader": "mlearn.data.images.recordio",
    "RecordIOWriter": "mlearn.data.images.recordio",
    "ImageBatch": "mlearn.data.images.batches",
    "build_transform": "mlearn.data.images.transforms",
    "normalize_images": "mlearn.data.images.transforms",
    "list_augmentations": "mlearn.data.images.transforms",
    "read_bin": "mlearn.data.images.bins",
    "write_bin": "mlearn.data.images.bins",
    "align_face": "mlearn.data.images.align",
    "similarity_transform": "mlearn.data.images.align",
    "ARCFACE_TEMPLATE": "mlearn.data.images.align",
    "inspect_dataset": "mlearn.data.images.inspect",
    "convert_dataset": "mlearn.data.images.inspect",
    # audio
    "SpeakerDataModule": "mlearn.data.audio.datamodule",
    "SpeakerAudioDataset": "mlearn.data.audio.dataset",
    "open_audio_dataset": "mlearn.data.audio.dataset",
    "read_kaldi_lists": "mlearn.data.audio.lists",
    "scan_speaker_folder": "mlearn.data.audio.lists",
    "read_audio": "mlearn.data.audio.io",
    "crop_or_pad": "mlearn.data.audio.io",
    "speed_perturb": "mlearn.data.audio.io",
    "NoiseSource": "mlearn.data.audio.augment",
    "RirSource": "mlearn.data.audio.augment",
    "ReverbOrNoise": "mlearn.data.audio.augment",
    "build_augmentation": "mlearn.data.audio.augment",
    "add_noise": "mlearn.data.audio.augment",
    "reverberate": "mlearn.data.audio.augment",
    "kaldi_fbank": "mlearn.data.audio.fbank",
    "apply_cmn": "mlearn.data.audio.fbank",
    "KaldiFbank": "mlearn.data.audio.fbank",
    "fbank_spec": "mlearn.data.audio.fbank",
    "fbank_from_spec": "mlearn.data.audio.fbank",
    "INPUT_SCALE": "mlearn.data.audio.fbank",
    # synthetic corpora
    "make_face_dataset": "mlearn.data.synthetic.faces",
    "make_speaker_dataset": "mlearn.data.synthetic.speech",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
