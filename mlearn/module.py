"""``EmbeddingModule``: backbone + (Partial FC) margin classifier, trained with softmax cross-entropy."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from mlearn import _compat
from mlearn.finetune import INIT_CENTERS, init_centers_from_class_means, load_initial_backbone
from mlearn.heads import Criterion, Margin, PartialFC
from mlearn.heads import distributed as D
from mlearn.heads.row_step import is_elementwise_state
from mlearn.quality import QualityConfig, QualityHead
from mlearn.resume import rng_state_to_restore, save_rng_states, set_rng_state
from mlearn.schedules import DEFAULT_SCHEDULE, LRSchedule, Schedule

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD as in arcface_torch: lr 0.1, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


@dataclass
class HeadConfig:
    """The classifier's settings; ``embedding_size`` and ``num_classes`` come from the backbone and data.

    Fields map 1:1 onto :class:`mlearn.heads.PartialFC` arguments (``--model.head.margin.m 0.4``).
    ``criterion``: a :mod:`mlearn.heads.criteria` loss (``class_path`` + ``init_args``, or a registered
    name such as ``sphereface2``; None: the margin softmax CE); ``sphereface2`` and ``uniface`` carry
    their own margins and take ``margin: null``.
    """

    margin: Optional[Margin] = None
    sample_rate: float = 1.0
    num_subcenters: int = 1
    straight_through: bool = False
    engine: str = "chunked"
    chunk_size: Optional[int] = None
    chunk_memory_mb: Optional[float] = None
    criterion: Union[Criterion, str, None] = None
    update_unsampled: bool = True

    def build(self, embedding_size: int, num_classes: int) -> PartialFC:
        """The classifier these settings describe, for ``embedding_size`` D and ``num_classes`` C."""
        return PartialFC(self.margin, embedding_size, num_classes, sample_rate=self.sample_rate,
                         num_subcenters=self.num_subcenters, straight_through=self.straight_through,
                         engine=self.engine, chunk_size=self.chunk_size, chunk_memory_mb=self.chunk_memory_mb,
                         criterion=self.criterion, update_unsampled=self.update_unsampled)


class EmbeddingModule(pl.LightningModule):
    """Train ``backbone`` so that its embeddings separate identities under a margin head.

    ``forward(x)`` returns raw (un-normalised) embeddings [B, D]: that is what gets exported.
    The head is built in :meth:`configure_model`, once the process group exists, so that Partial FC
    shards the class centers over the ranks.

    Distributed gradients: every rank back-propagates the same global loss, but only through its
    own samples, so the exact backbone gradient is the SUM of the per-rank gradients. DDP averages;
    :meth:`on_fit_start` installs a communication hook that sums instead (see ``_allreduce_sum``).
    The sharded class centers are excluded from DDP (each rank owns a different block). Only plain
    DDP is supported on more than one process: another wrapper (FSDP, DeepSpeed, ...) fails at fit
    start rather than silently averaging (1/W) the backbone gradients.

    Corrupt samples: the data module drops them from the batch and reports their count. A batch left
    with no sample on some rank is skipped on EVERY rank (the decision is all-reduced, so no rank
    waits in the head's collectives for one that skipped): the ranks back-propagate a zero loss
    that touches every parameter (DDP's gradient all-reduce completes) and then skip the optimizer
    step, as a single process skips a batch that returned None: weights, optimizer state (momentum)
    and the loss scaler stay as they were, the step counter and the learning-rate schedule advance.
    Under gradient accumulation only a window whose every batch was skipped skips its step.

    Mixed precision (``16-mixed``) on several ranks: the loss scaler skips steps with inf/NaN
    gradients, decided per rank; the class-center gradients are rank-local, so
    :meth:`on_after_backward` makes a non-finite center gradient on any rank non-finite on every
    rank, and every rank skips (and lowers its scale) together.

    Learning rate: the optimizer's lr times the per-step factor of ``schedule`` (warmup then decay; see
    :mod:`mlearn.schedules`), recomputed from the current config on resume.

    Resume: checkpoints also hold every rank's random-number state and (through the data module) the
    sample position (:mod:`mlearn.resume`), so ``--ckpt_path`` continues a run as if it had not stopped.

    Fine-tuning (docs/finetune.md): ``init_from`` starts the backbone from trained weights while the head
    is new; its centers start from the class-mean embeddings of the training set
    (:func:`mlearn.finetune.init_centers_from_class_means`, at fit start; not on resume). During the
    first ``freeze_backbone_steps`` optimizer steps the backbone is frozen: in eval mode (BatchNorm
    statistics and dropout fixed) and its gradients dropped before every optimizer step, so neither
    the update nor weight decay nor momentum moves it. Under DDP its gradients are still computed and
    all-reduced (DDP's reducer expects every parameter's gradient each step); on one process its
    forward runs without autograd. The backbone's learning rate is the schedule's times
    ``backbone_lr_scale``.

    Args:
        backbone: input [B, ...] -> embeddings [B, D]; must expose ``embedding_size``. Optional with
            ``init_from`` (then the backbone recorded there is rebuilt).
        head: margin and Partial FC settings (required).
        num_classes: C (linked from the data module by the CLI).
        optimizer: a callable ``params -> Optimizer`` (the config's ``class_path`` + ``init_args``).
        head_weight_decay: weight decay of the class centers (``None``: the optimizer's).
        norm_weight_decay: weight decay of the backbone's BatchNorm/LayerNorm/GroupNorm parameters
            (``None``: the optimizer's; AdaFace uses 0).
        schedule: the learning-rate schedule (``model.schedule: {decay: poly, warmup_epochs: 2}``).
        clip_backbone_grad_norm: before every optimizer step, clip the backbone's gradients to this
            global L2 norm (arcface_torch and ElasticFace: 5); the class centers are not clipped.
        init_from: a model directory (``mlearn import``), run dir, ``.ckpt`` or ``.safetensors`` export
            whose backbone weights start the run; with ``backbone`` given they must fit it exactly.
        init_centers: ``class_mean`` or ``random`` (default: ``class_mean`` with ``init_from``, else
            ``random``): how the class centers start.
        freeze_backbone_steps: optimizer steps with the backbone frozen (only the head trains).
        backbone_lr_scale: the backbone's learning rate relative to the head's (e.g. 0.1).
        quality: a quality head trained with the model (``model.quality: {method: cr_fiqa, weight:
            10}``; :mod:`mlearn.quality`): ``quality_head`` regresses each sample's certainty ratio
            from its raw embedding; the loss adds ``weight``·smooth-L1 (global-batch mean, so W ranks
            equal one process). Its parameters train with the backbone (its weight decay, in DDP) at
            ``lr_scale`` times the backbone's learning rate (its own optimizer group);
            the target is detached, so it never moves the class centers; with ``train_backbone:
            false`` it never moves the backbone either. None: no quality head.
    """

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        head: Optional[HeadConfig] = None,
        num_classes: int = 0,
        optimizer: OptimizerFactory = default_optimizer,
        head_weight_decay: Optional[float] = None,
        norm_weight_decay: Optional[float] = None,
        schedule: LRSchedule = DEFAULT_SCHEDULE,
        clip_backbone_grad_norm: Optional[float] = None,
        init_from: Optional[str] = None,
        init_centers: Optional[str] = None,
        freeze_backbone_steps: int = 0,
        backbone_lr_scale: float = 1.0,
        quality: Optional[QualityConfig] = None,
    ) -> None:
        super().__init__()
        # From LightningCLI the hparams are the config (class_path + init_args), which rebuilds the
        # backbone on load; from Python the backbone instance is saved in the state dict only.
        self.save_hyperparameters(ignore=None if _compat.built_by_cli() else ["backbone"])
        if head is None:
            raise ValueError("model.head: required (at least model.head.margin, e.g. mlearn.heads.ArcFace)")
        if backbone is None and init_from is None:
            raise ValueError("model.backbone: required unless model.init_from names trained weights "
                             "(a model directory, run dir or checkpoint) whose backbone is rebuilt")
        if init_centers is not None and init_centers not in INIT_CENTERS:
            raise ValueError(f"model.init_centers={init_centers!r}: expected one of "
                             f"{', '.join(INIT_CENTERS)}")
        if isinstance(freeze_backbone_steps, bool) or int(freeze_backbone_steps) != freeze_backbone_steps \
                or freeze_backbone_steps < 0:
            raise ValueError(f"model.freeze_backbone_steps={freeze_backbone_steps}: expected an integer >= 0")
        if not backbone_lr_scale >= 0:
            raise ValueError(f"model.backbone_lr_scale={backbone_lr_scale}: expected a number >= 0")
        if init_from is not None:
            backbone, spec, _ = load_initial_backbone(init_from, backbone)
            if not isinstance(self.hparams.get("backbone"), dict):
                # load_model / export / eval rebuild the backbone from this spec (inference._backbone_spec)
                self.hparams["backbone"] = spec
        if quality is not None and not isinstance(quality, QualityConfig):
            raise TypeError(f"model.quality={quality!r}: expected a QualityConfig, e.g. "
                            "{method: cr_fiqa, weight: 10} in a config")
        if not isinstance(schedule, LRSchedule):
            raise TypeError(f"schedule={schedule!r}: expected an LRSchedule, e.g. "
                            f"LRSchedule('poly', warmup_epochs=2) (model.schedule.decay in a config)")
        if clip_backbone_grad_norm is not None and clip_backbone_grad_norm <= 0:
            raise ValueError(f"clip_backbone_grad_norm={clip_backbone_grad_norm}: expected a positive norm")
        if num_classes != 0:  # 0: not linked yet (the CLI links it from the data)
            _check_num_classes(num_classes)
        self.backbone = backbone
        self.head_config = head
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.head_weight_decay = head_weight_decay
        self.norm_weight_decay = norm_weight_decay
        self.schedule = schedule
        self.clip_backbone_grad_norm = clip_backbone_grad_norm
        self.init_from = init_from
        self.init_centers = init_centers or ("class_mean" if init_from is not None else "random")
        self.freeze_backbone_steps = int(freeze_backbone_steps)
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.head: Optional[PartialFC] = None
        self.quality = quality
        self.quality_head = None
        if quality is not None:
            with torch.random.fork_rng(devices=[]):  # the recogniser initialises as it would without a head
                self.quality_head = QualityHead(self.embedding_size)
        self._corrupt_in_epoch = 0
        self._tic: Optional[float] = None
        self._rng_to_restore: Optional[Dict[str, Any]] = None
        self._samples_in_window = False  # a batch of the current accumulation window was used

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.embedding_size)

    def configure_model(self) -> None:
        if self.head is not None:
            return
        _check_num_classes(self.num_classes)
        self.head = self.head_config.build(self.embedding_size, self.num_classes)
        self.head.record_certainty = self.quality_head is not None
        sharded = self.head.sharded_parameter_names() + self.head.sharded_buffer_names()
        # the criterion's bias is all-reduced by the head itself
        sharded += self.head.replicated_parameter_names()
        # DDP must neither broadcast nor average the per-rank shards.
        _compat.ignore_in_ddp(self, [f"head.{name}" for name in sharded])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] (or the backbone's input) -> embeddings [B, D]."""
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        images, labels, num_corrupt = unpack_batch(batch)
        self._corrupt_in_epoch += num_corrupt
        if not D.all_ranks_true(labels.numel() > 0):  # collective: every rank takes the same decision
            return self._skip_batch(labels.numel() == 0, num_corrupt)
        self._samples_in_window = True
        assert self.head is not None
        if _compat.attached_trainer(self) is not None:
            # negative sampling keyed by the step (and micro-batch): the same draws after a resume
            accumulate = max(int(self.trainer.accumulate_grad_batches), 1)
            self.head.sample_step = self.global_step * accumulate + batch_idx % accumulate
        if self.backbone_frozen() and not self._wrapped_in_ddp():
            with torch.no_grad():  # one process: no backward through a frozen backbone
                embeddings = self.backbone(images)
        else:
            embeddings = self.backbone(images)
        loss = self.head(embeddings, labels)
        self.log("train/loss", loss, prog_bar=True)
        if self.quality_head is not None:
            loss = loss + self._quality_loss(embeddings)
        if _compat.attached_trainer(self) is not None and self.trainer.optimizers:
            groups = self.trainer.optimizers[0].param_groups
            self.log("train/lr", float(groups[-1]["lr"]))  # the head's (the last group)
            if self.backbone_lr_scale != 1.0 or self.freeze_backbone_steps:
                self.log("train/backbone_lr", 0.0 if self.backbone_frozen() else float(groups[0]["lr"]))
        self._log_throughput(images.shape[0])
        return loss

    def _quality_loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """This rank's share of the quality loss (sum over its rows / global batch; see ``quality``)."""
        assert self.head is not None and self.quality is not None and self.quality_head is not None
        if self.head.last_certainty is None:
            raise RuntimeError("model.quality: the head recorded no certainty (record_certainty is off)")
        ccs, nnccs = self.head.last_certainty
        features = embeddings if self.quality.train_backbone else embeddings.detach()
        term = self.quality.loss(self.quality_head(features), ccs, nnccs,
                                 global_batch=self.head.last_global_batch)
        # the global value for the log (the terms of the ranks add up to it)
        self.log("train/quality_loss", D.all_reduce_sum(term.detach()))
        return term

    def backbone_frozen(self) -> bool:
        """True during the first ``freeze_backbone_steps`` optimizer steps."""
        return _compat.attached_trainer(self) is not None and self.global_step < self.freeze_backbone_steps

    def _wrapped_in_ddp(self) -> bool:
        trainer = _compat.attached_trainer(self)
        return trainer is not None and isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole module in train mode at every epoch start and after validation
        if self.backbone_frozen():
            self.backbone.eval()  # BatchNorm running statistics and dropout fixed
        elif self.training and not self.backbone.training:
            self.backbone.train()

    def _skip_batch(self, empty_here: bool, num_corrupt: int) -> Optional[torch.Tensor]:
        """What ``training_step`` returns for a batch that some rank cannot use (see the class doc)."""
        if empty_here:
            log.warning("step %d: batch skipped, all %d samples corrupt", self.global_step, num_corrupt)
        else:
            log.warning("step %d: batch skipped on every rank: another rank's batch was entirely corrupt",
                        self.global_step)
        if not D.is_distributed():
            return None  # Lightning skips backward and step itself
        # a zero loss reaching every trainable parameter: DDP's reducer sees all its gradients
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Optional[Callable[[], Any]] = None) -> None:
        """Run the closure (forward and backward of the window's last batch), then step the optimizer
        unless every batch of the accumulation window was skipped (see the class doc)."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()
        used, self._samples_in_window = self._samples_in_window, False
        if used:
            assert self.head is not None
            # Partial FC v1 (update_unsampled=False): the step moves only the sampled centers
            with self.head.step_sampled_rows(getattr(optimizer, "optimizer", optimizer)):
                optimizer.step(closure=lambda: result)  # the closure already ran: hand over its result
        return None

    def on_after_backward(self) -> None:
        """fp16 on several ranks: share a non-finite center gradient (:func:`sync_nonfinite_grads`).

        Lightning's MixedPrecision runs the closure (backward, then this hook, after DDP's all-reduce)
        and only then ``scaler.unscale_``, which records the found-inf that ``scaler.step`` obeys.
        """
        if _compat.attached_trainer(self) is None or self.head is None or not D.is_distributed():
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:  # fp16 loss scaling
            sync_nonfinite_grads(self.head.parameters(), self.parameters())

    def _log_throughput(self, batch_size: int) -> None:
        now = time.perf_counter()
        if self._tic is not None:
            world = self.trainer.world_size if _compat.attached_trainer(self) is not None else 1
            self.log("train/images_per_sec", batch_size * world / max(now - self._tic, 1e-9), prog_bar=True)
        self._tic = now

    def on_train_epoch_end(self) -> None:
        corrupt = int(D.all_reduce_sum(torch.tensor([self._corrupt_in_epoch], dtype=torch.long)).item())
        if corrupt:
            log.warning("epoch %d: skipped %d corrupt or unreadable samples", self.current_epoch, corrupt)
        self.log("train/corrupt_samples", float(corrupt))
        dropped = self._records_dropped_at_open()
        if dropped:  # the same on every rank: each opens the whole set
            log.warning("epoch %d: %d records of the training set were dropped when it was opened (corrupt "
                        "or missing; see `mlearn data inspect`)", self.current_epoch, dropped)
            self.log("train/dropped_at_open", float(dropped))
        self._corrupt_in_epoch = 0

    def _records_dropped_at_open(self) -> int:
        datamodule = getattr(_compat.attached_trainer(self), "datamodule", None)
        return int(getattr(getattr(datamodule, "dataset", None), "num_dropped_at_open", 0) or 0)

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        wrapped = strategy.model
        if self.trainer.world_size > 1:
            if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
                raise ValueError(
                    f"trainer.strategy: {type(strategy).__name__} wraps the model in "
                    f"{type(wrapped).__name__} on {self.trainer.world_size} processes; EmbeddingModule "
                    "supports plain DDP only (strategy: ddp, ddp_spawn or DDPStrategy): it sums the backbone "
                    "gradients with its own DDP communication hook and keeps the sharded class centers out "
                    "of the wrapper")
            if _compat.ddp_comm_hook(strategy) is not None:
                raise ValueError("EmbeddingModule installs its own DDP communication hook (gradient sum); "
                                 "remove strategy.ddp_comm_hook")
            wrapped.register_comm_hook(state=None, hook=_allreduce_sum)
        if self.init_centers == "class_mean" and not self.trainer.ckpt_path:  # a resume has its centers
            init_centers_from_class_means(self)

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore, self.device)
            self._rng_to_restore = None
        self._tic = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # runs after AMP's unscale and after DDP's all-reduce: the clip sees the true global gradient
        if self.backbone_frozen():
            for p in self.backbone.parameters():
                p.grad = None  # the optimizer skips it: no update, weight decay or momentum
        if self.clip_backbone_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip_backbone_grad_norm)

    def _param_groups(self) -> List[Dict[str, Any]]:
        assert self.head is not None
        norm_ids = set()
        if self.norm_weight_decay is not None:
            norm_ids = {id(p) for m in self.backbone.modules() if isinstance(m, _compat.NORM_LAYERS)
                        for p in m.parameters(recurse=False)}
        backbone = [p for p in self.backbone.parameters() if id(p) not in norm_ids]
        groups: List[Dict[str, Any]] = [{"params": backbone}]
        if norm_ids:
            groups.append({"params": [p for p in self.backbone.parameters() if id(p) in norm_ids],
                           "weight_decay": self.norm_weight_decay})
        if self.quality_head is not None:  # lr scaled in configure_optimizers (QualityConfig.lr_scale)
            groups.append({"params": list(self.quality_head.parameters())})
        head_group: Dict[str, Any] = {"params": list(self.head.parameters())}
        if self.head_weight_decay is not None:
            head_group["weight_decay"] = self.head_weight_decay
        return groups + [head_group]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The centers are saved gathered (PartialFC's state_dict); so is their optimizer state
        # (momentum), so that a run resumes on any number of ranks with each rank's own rows.
        # Both are gathered block by block into rank 0's CPU memory; the other ranks, which do not
        # write, hold empty placeholders.
        self._map_sharded_optimizer_state(checkpoint, lambda head, rows: head.gather_rows(rows),
                                          gathered=False)
        save_rng_states(checkpoint, self.device)  # collective: every rank saves
        if self.head is not None:
            checkpoint["partial_fc_sample_seed"] = self.head.sample_seed

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._map_sharded_optimizer_state(checkpoint, lambda head, rows: head.local_rows(rows),
                                          gathered=True)
        if self.head is not None and "partial_fc_sample_seed" in checkpoint:
            self.head.sample_seed = int(checkpoint["partial_fc_sample_seed"])
        self._rng_to_restore = rng_state_to_restore(checkpoint)

    def _map_sharded_optimizer_state(self, checkpoint: Dict[str, Any],
                                     fn: Callable[[Any, torch.Tensor], Any], gathered: bool) -> None:
        """Apply ``fn`` to the per-row optimizer state of the sharded parameters (momentum, Adam's
        moments): the tensors shaped like the local shard, or like the full matrix when ``gathered``."""
        if self.head is None:
            return
        flat = [p for group in self._param_groups() for p in group["params"]]
        sharded = {id(getattr(self.head, name)) for name in self.head.sharded_parameter_names()}
        indices = [i for i, p in enumerate(flat) if id(p) in sharded]
        rows = self.head.num_classes * self.head.num_subcenters
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for index in indices:
                state = optimizer_state["state"].get(index)
                if state is None:
                    continue
                shape = tuple(flat[index].shape)
                if gathered:
                    shape = (rows,) + shape[1:]
                # a new dict: Optimizer.state_dict() shares the per-parameter dicts with the live optimizer
                optimizer_state["state"][index] = {
                    key: fn(self.head, value) if is_elementwise_state(value, shape) else value
                    for key, value in state.items()
                }

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the attached trainer (after its train dataloader is set up)."""
        trainer = self.trainer
        if trainer.num_training_batches == float("inf"):
            # with max_steps, estimated_stepping_batches does not load the data: load it (idempotent;
            # what estimated_stepping_batches does with max_epochs)
            _compat.setup_train_data(trainer)
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # an iterable without length
            return max(int(trainer.estimated_stepping_batches), 1)
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)

    def build_schedule(self, total_steps: int, steps_per_epoch: int) -> Schedule:
        """The per-step lr factor for a run of ``total_steps`` optimizer steps."""
        return self.schedule.per_step(total_steps, steps_per_epoch)

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = self.optimizer_factory(self._param_groups())
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        quality_ids = set() if self.quality_head is None else {id(p) for p in self.quality_head.parameters()}
        for group in optimizer.param_groups:  # the scheduler takes these as its base learning rates
            ids = {id(p) for p in group["params"]}
            if ids & (backbone_ids | quality_ids):  # the quality head trains with the backbone
                group["lr"] *= self.backbone_lr_scale
            if self.quality is not None and ids & quality_ids:
                group["lr"] *= self.quality.lr_scale
        total = max(int(self.trainer.estimated_stepping_batches), 1)  # also sets up the train dataloader
        schedule = self.build_schedule(total, self.steps_per_epoch())
        # a plain function, whose fields LambdaLR does not save: on resume the schedule is rebuilt from the
        # current config (same config, same schedule) and only the step count comes from the checkpoint
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"model.num_classes={num_classes}: a classifier needs at least 2 classes "
                         "(identities); it is linked from the data when training from the CLI")


def sync_nonfinite_grads(local: Iterable[nn.Parameter], params: Iterable[nn.Parameter]) -> bool:
    """If the rank-local ``local`` gradients hold inf/NaN on ANY rank, fill every gradient of
    ``params`` with inf on EVERY rank, so that every rank's loss scaler skips the step (a collective
    call). Returns True when it filled them.

    Gradients that DDP all-reduces agree across ranks already; the sharded class centers' do not,
    so without this one rank could skip an fp16 step alone and its backbone would diverge.
    """
    finite = all(bool(torch.isfinite(p.grad).all()) for p in local if p.grad is not None)
    if D.all_ranks_true(finite):
        return False
    for p in params:
        if p.grad is not None:
            p.grad.fill_(float("inf"))  # every parameter: a rank whose shard is empty skips too
    return True


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(inputs, labels, num_corrupt)`` of a training batch: an ``(inputs, labels, num_corrupt)``
    batch as the data modules give it after their device-side step (``on_after_batch_transfer``), or
    an ``(inputs, labels)`` pair (nothing corrupt)."""
    if len(batch) == 3:
        inputs, labels, num_corrupt = batch
        return inputs, labels, int(num_corrupt)
    if len(batch) != 2:
        raise ValueError(f"a training batch is (inputs, labels[, num_corrupt]); got {len(batch)} fields "
                         f"({type(batch).__name__}: image batches are mirrored and normalised by "
                         "FaceDataModule.on_after_batch_transfer)")
    inputs, labels = batch
    return inputs, labels, 0


def _allreduce_sum(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size).

    Unannotated on purpose: DDP rejects string annotations (``from __future__ import annotations``).
    """
    work = dist.all_reduce(bucket.buffer(), group=state, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
