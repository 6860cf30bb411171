"""The old dotted path of :class:`~mlearn.data.audio.datamodule.SpeakerDataModule`, kept because the
speaker configs (and users' run configs) name ``mlearn.data.speaker_datamodule.SpeakerDataModule``
as their ``data.class_path``. New code imports ``mlearn.data.SpeakerDataModule``."""
from mlearn.data.audio.datamodule import SpeakerDataModule

__all__ = ["SpeakerDataModule"]
