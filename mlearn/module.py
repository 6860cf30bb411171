"""``EmbeddingModule``: backbone + (Partial FC) margin classifier, trained with softmax cross-entropy."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
import torch
import torch.distributed as dist
from torch import nn

from mlearn.heads import Margin, PartialFC

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD as in arcface_torch: lr 0.1, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


@dataclass
class HeadConfig:
    """The classifier's settings; ``embedding_size`` and ``num_classes`` come from the backbone and data.

    Fields map 1:1 onto :class:`mlearn.heads.PartialFC` arguments (``--model.head.margin.m 0.4``).
    """

    margin: Margin
    sample_rate: float = 1.0
    num_subcenters: int = 1
    straight_through: bool = False


class EmbeddingModule(pl.LightningModule):
    """Train ``backbone`` so that its embeddings separate identities under a margin head.

    ``forward(x)`` returns raw (un-normalised) embeddings [B, D]: that is what gets exported.
    The head is built in :meth:`configure_model`, once the process group exists, so that Partial FC
    shards the class centers over the ranks.

    Distributed gradients: every rank back-propagates the same global loss, but only through its
    own samples, so the exact backbone gradient is the SUM of the per-rank gradients. DDP averages;
    :meth:`on_fit_start` installs a communication hook that sums instead (see ``_allreduce_sum``).
    The sharded class centers are excluded from DDP (each rank owns a different block).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: HeadConfig,
        num_classes: int = 0,
        optimizer: OptimizerFactory = default_optimizer,
        head_weight_decay: Optional[float] = None,
        schedule: Literal["poly", "cosine", "constant"] = "poly",
        poly_power: float = 2.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        # From LightningCLI the hparams are the config (class_path + init_args), which rebuilds the
        # backbone on load; from Python the backbone instance is saved in the state dict only.
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else ["backbone"])
        self.backbone = backbone
        self.head_config = head
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.head_weight_decay = head_weight_decay
        self.schedule = schedule
        self.poly_power = poly_power
        self.warmup_epochs = warmup_epochs
        self.head: Optional[PartialFC] = None
        self._corrupt_in_epoch = 0
        self._tic: Optional[float] = None

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.embedding_size)

    def configure_model(self) -> None:
        if self.head is not None:
            return
        if self.num_classes <= 0:
            raise ValueError(f"model.num_classes={self.num_classes}: expected a positive class count "
                             "(it is linked from the data when training from the CLI)")
        cfg = self.head_config
        self.head = PartialFC(cfg.margin, self.embedding_size, self.num_classes, sample_rate=cfg.sample_rate,
                              num_subcenters=cfg.num_subcenters, straight_through=cfg.straight_through)
        sharded = self.head.sharded_parameter_names() + self.head.sharded_buffer_names()
        ignored = [f"head.{name}" for name in sharded]
        # DDP must neither broadcast nor average the per-rank shards.
        self._ddp_params_and_buffers_to_ignore = ignored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] (or the backbone's input) -> embeddings [B, D]."""
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        images, labels, num_corrupt = _unpack(batch)
        self._corrupt_in_epoch += num_corrupt
        if labels.numel() == 0:  # every sample of the batch was corrupt: nothing to learn from
            log.warning("step %d: batch skipped, all %d samples corrupt", self.global_step, num_corrupt)
            return None
        assert self.head is not None
        loss = self.head(self.backbone(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        self._log_throughput(images.shape[0])
        return loss

    def _log_throughput(self, batch_size: int) -> None:
        now = time.perf_counter()
        if self._tic is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/images_per_sec", batch_size * world / max(now - self._tic, 1e-9), prog_bar=True)
        self._tic = now

    def on_train_epoch_end(self) -> None:
        corrupt = self._corrupt_in_epoch
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([corrupt], dtype=torch.long, device=self.device)
            dist.all_reduce(count)
            corrupt = int(count.item())
        if corrupt:
            log.warning("epoch %d: skipped %d corrupt or unreadable samples", self.current_epoch, corrupt)
        self.log("train/corrupt_samples", float(corrupt))
        self._corrupt_in_epoch = 0

    def on_fit_start(self) -> None:
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, nn.parallel.DistributedDataParallel) and self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            if getattr(strategy, "_ddp_comm_hook", None) is not None:
                raise ValueError("EmbeddingModule installs its own DDP communication hook (gradient sum); "
                                 "remove strategy.ddp_comm_hook")
            wrapped.register_comm_hook(state=None, hook=_allreduce_sum)

    def _param_groups(self) -> List[Dict[str, Any]]:
        assert self.head is not None
        head_group: Dict[str, Any] = {"params": list(self.head.parameters())}
        if self.head_weight_decay is not None:
            head_group["weight_decay"] = self.head_weight_decay
        return [{"params": list(self.backbone.parameters())}, head_group]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The centers are saved gathered (PartialFC's state_dict); so is their optimizer state
        # (momentum), so that a run resumes on any number of ranks with each rank's own rows.
        self._map_sharded_optimizer_state(checkpoint, lambda head, rows: head.gather_rows(rows))

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._map_sharded_optimizer_state(checkpoint, lambda head, rows: head.local_rows(rows))

    def _map_sharded_optimizer_state(self, checkpoint: Dict[str, Any], fn: Callable[[Any, torch.Tensor], Any]) -> None:
        if self.head is None:
            return
        flat = [p for group in self._param_groups() for p in group["params"]]
        sharded = {id(getattr(self.head, name)) for name in self.head.sharded_parameter_names()}
        indices = [i for i, p in enumerate(flat) if id(p) in sharded]
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for index in indices:
                state = optimizer_state["state"].get(index, {})
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0:  # per-row state, not the step count
                        state[key] = fn(self.head, value)

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = self.optimizer_factory(self._param_groups())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = int(self.warmup_epochs * total / epochs)
        lr_lambda = _schedule(self.schedule, total, warmup, self.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _unpack(batch: Any) -> tuple:
    if len(batch) == 3:
        images, labels, num_corrupt = batch
        return images, labels, int(num_corrupt)
    images, labels = batch
    return images, labels, 0


def _schedule(kind: str, total: int, warmup: int, power: float) -> Callable[[int], float]:
    """Per-step learning-rate factor: linear warmup, then poly (arcface_torch) / cosine / constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "poly":
            return (1.0 - progress) ** power
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _allreduce_sum(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size).

    Unannotated on purpose: DDP rejects string annotations (``from __future__ import annotations``).
    """
    work = dist.all_reduce(bucket.buffer(), group=state, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
