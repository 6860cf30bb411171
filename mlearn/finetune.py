"""Fine-tuning helpers of :class:`mlearn.module.EmbeddingModule`: start from trained backbone weights,
initialise the new classifier from class-mean embeddings, measure training accuracy.

- :func:`load_initial_backbone`: the backbone weights of a model directory (``mlearn import``), a run
  dir, a ``.ckpt`` or a ``.safetensors`` export (``--model.init_from PATH``), rebuilt from the recorded
  registered spec, or copied into a given backbone whose weights must fit exactly;
- :func:`init_centers_from_class_means`: one pass over the training dataloader with the backbone in
  eval mode; each rank sums its samples' L2-normalised embeddings per class, the sums and counts are
  all-reduced and each rank writes its shard of the centers (:meth:`mlearn.heads.PartialFC.set_centers`);
- :class:`TrainAccuracy`: a callback logging ``train/accuracy`` (nearest class center, sharded-aware).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from mlearn import _compat
from mlearn.heads import distributed as D
from mlearn.inference import load_backbone
from mlearn.models.importers.base import first_mismatch

log = logging.getLogger(__name__)

INIT_CENTERS = ("class_mean", "random")
_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


# -------------------------------------------------------------------------------- initial weights


def load_initial_backbone(init_from: str, backbone: Optional[nn.Module] = None
                          ) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The backbone to fine-tune, with the weights of ``init_from`` (model directory, run dir, ``.ckpt``
    or ``.safetensors``; see :func:`mlearn.inference.load_backbone`).

    ``backbone=None``: the backbone recorded in ``init_from`` (a registered mlearn backbone) is rebuilt.
    Otherwise the weights are copied into ``backbone`` and must fit it exactly: ``ValueError`` naming
    the first missing, unexpected or mis-shaped key. Returns ``(backbone in train mode, backbone spec
    {class_path, init_args}, the input spec recorded with the weights)``.
    """
    loaded, input_spec, info = load_backbone(init_from)
    if backbone is None:
        return loaded.train(), dict(info["backbone"]), dict(input_spec)
    problem = first_mismatch(loaded.state_dict(), backbone.state_dict(), expected_by="model.backbone")
    if problem is not None:
        raise ValueError(f"model.init_from {init_from}: its weights do not fit model.backbone "
                         f"({type(backbone).__name__}): {problem}; the weights are a "
                         f"{info['backbone'].get('class_path')} (leave model.backbone out to rebuild it)")
    backbone.load_state_dict(loaded.state_dict())
    declared = getattr(backbone, "input_spec", None)
    if isinstance(declared, dict) and _preprocessing(declared) != _preprocessing(input_spec):
        log.warning("model.init_from %s was trained with input %s, model.backbone declares %s: the data "
                    "module's preprocessing must match the pretrained model's", init_from,
                    _preprocessing(input_spec), _preprocessing(declared))
    return backbone, dict(info["backbone"]), dict(input_spec)


def _preprocessing(spec: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("modality", "channels", "mean", "std", "num_mel_bins")
    return {k: spec[k] for k in keys if k in spec}


# ---------------------------------------------------------------------------- class-mean centers


@torch.no_grad()
def class_mean_sums(embed: Any, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                    embedding_size: int, device: Any = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of L2-normalised embeddings over ``batches`` of (inputs, labels).

    ``embed``: inputs -> [B, D]. Returns (sums float32 [C, D], counts int64 [C]) on ``device``; labels
    outside [0, C) are an error. Not a collective call.
    """
    sums = torch.zeros(num_classes, embedding_size, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    for inputs, labels in batches:
        if labels.numel() == 0:
            continue
        labels = labels.to(device).long()
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"class-mean init: label {int(labels.max())} out of range [0, {num_classes})")
        embeddings = F.normalize(embed(inputs).float(), dim=1).to(device)
        sums.index_add_(0, labels, embeddings)
        counts += torch.bincount(labels, minlength=num_classes)
    return sums, counts


def class_mean_centers(sums: torch.Tensor, counts: torch.Tensor, norm: float,
                       group: Optional[Any] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-reduce (sum over ranks; a collective call when distributed) the per-class ``sums`` [C, D] and
    ``counts`` [C]; returns (centers [C, D]: the mean directions scaled to ``norm``, global counts [C])."""
    sums = D.all_reduce_sum(sums, group)
    counts = D.all_reduce_sum(counts, group)
    return F.normalize(sums, dim=1) * norm, counts


def init_centers_from_class_means(module: Any) -> Dict[str, int]:
    """Set ``module.head``'s centers to the class-mean embeddings of the attached trainer's training
    data (a collective call: every rank runs it, at fit start).

    One pass over this rank's training dataloader (with the data module's device-side batch hooks,
    so images are normalised and audio turned into fbank as in training), backbone in eval mode.
    The centers are the unit-length mean directions (weight imprinting). Under the cosine head a row's
    norm only sets how fast the optimizer turns it (the step on its direction scales as 1 / norm^2):
    rows of the random initialisation's norm (``init_std * sqrt(D)``, ~0.1) would be spun ~100x faster
    and lose the class means within a few steps. Classes with no sample keep their random rows.
    Returns ``{"samples", "classes", "initialised"}`` (global counts).
    """
    trainer, head, backbone = module.trainer, module.head, module.backbone
    _compat.setup_train_data(trainer)
    dataloader = trainer.train_dataloader
    if dataloader is None:
        raise ValueError("class-mean init (model.init_centers: class_mean) needs a training dataloader")
    device = module.device
    was_training = backbone.training
    backbone.eval()
    try:
        with trainer.precision_plugin.forward_context():
            batches = (_inputs_and_labels(prepare_batch(module, batch, device)) for batch in dataloader)
            sums, counts = class_mean_sums(backbone, batches, head.num_classes, head.embedding_size, device)
    finally:
        backbone.train(was_training)
    centers, counts = class_mean_centers(sums, counts, 1.0, head.process_group)
    head.set_centers(centers, keep=counts == 0)
    stats = {"samples": int(counts.sum()), "classes": head.num_classes,
             "initialised": int((counts > 0).sum())}
    log.info("class-mean init: %(initialised)d of %(classes)d class centers from %(samples)d samples", stats)
    if stats["initialised"] < stats["classes"]:
        log.warning("class-mean init: %d classes had no sample in the pass and keep their random centers",
                    stats["classes"] - stats["initialised"])
    return stats


def prepare_batch(module: pl.LightningModule, batch: Any, device: torch.device) -> Any:
    """A dataloader batch as ``training_step`` receives it: Lightning's batch-transfer hooks in its
    order, each from the data module when it overrides the hook, else from the module."""
    trainer = _compat.attached_trainer(module)
    datamodule = getattr(trainer, "datamodule", None)
    for name in _BATCH_HOOKS:
        owner: Any = module
        if datamodule is not None and getattr(type(datamodule), name) is not getattr(pl.LightningDataModule,
                                                                                     name):
            owner = datamodule
        hook = getattr(owner, name)
        batch = hook(batch, device, 0) if name == "transfer_batch_to_device" else hook(batch, 0)
    return batch


def _inputs_and_labels(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1]
    raise ValueError(f"class-mean init: a training batch is (inputs, labels[, num_corrupt]); got "
                     f"{type(batch).__name__}")


# --------------------------------------------------------------------------------------- accuracy


class TrainAccuracy(pl.Callback):
    """Log ``train/accuracy``: the share of each training batch whose nearest class center (cosine; the
    best of a class's sub-centers) is its own class, with the centers the batch's loss saw (before the
    step's update); on several ranks over the global batch and all shards (collective, every rank logs
    the same value). Chance level is 1 / num_classes.

    Measured on the embeddings of the training forward pass (a forward hook on the backbone, read before
    the backward): no extra forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self._embeddings: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self._labels is not None:  # a training forward (not a validation callback's)
                self._embeddings = output.detach()

        self._handle = pl_module.backbone.register_forward_hook(keep)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._labels, self._embeddings = _inputs_and_labels(batch)[1], None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        embeddings, labels = self._embeddings, self._labels
        self._embeddings = self._labels = None
        if embeddings is None or labels is None or pl_module.head is None:
            return
        pl_module.log("train/accuracy", nearest_center_accuracy(pl_module.head, embeddings, labels),
                      prog_bar=True)


@torch.no_grad()
def nearest_center_accuracy(head: Any, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the GLOBAL batch (this rank's ``embeddings`` [B_r, D], ``labels`` [B_r], gathered)
    whose best-scoring class over all shards is its label (a collective call when distributed)."""
    group = head.process_group
    x = F.normalize(D.all_gather_variable(embeddings.float(), group), dim=1)
    y = D.all_gather_variable(labels.long().to(x.device), group)
    weight = F.normalize(head.weight.detach().float(), dim=1)
    cosine = (x @ weight.t()).view(x.shape[0], head.num_local, head.num_subcenters).amax(dim=2)
    local = y - head.class_start
    mine = (local >= 0) & (local < head.num_local)
    target = torch.full_like(y, -2.0, dtype=cosine.dtype)  # below any cosine: "not in my shard"
    target[mine] = cosine[mine, local[mine]]
    best = cosine.amax(dim=1) if head.num_local else torch.full_like(target, -2.0)
    best = D.all_reduce_max(best, group)
    target = D.all_reduce_max(target, group)
    return float((target >= best).float().mean())
