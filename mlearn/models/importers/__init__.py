"""Importers of public checkpoints (``mlearn import FAMILY CHECKPOINT --arch ARCH --output OUT_DIR``).

Families: ``insightface`` (arcface_torch), ``adaface``, ``wespeaker``. Each turns its published weights
into a registered mlearn backbone plus the original preprocessing, written as a model directory that
:func:`mlearn.load_model`, ``mlearn eval/embed/export --model`` and fine-tuning accept
(see :mod:`mlearn.models.importers.base` and docs/pretrained.md).
"""
from mlearn.models.importers import adaface, insightface, wespeaker  # noqa: F401 - registers the families
from mlearn.models.importers.base import (
    IMPORTERS,
    Conversion,
    Importer,
    get_importer,
    import_checkpoint,
    register_importer,
)

__all__ = ["IMPORTERS", "Conversion", "Importer", "get_importer", "import_checkpoint", "register_importer"]
