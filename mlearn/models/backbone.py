"""The backbone registry (``build_backbone``, ``list_backbones``) and the timm wrapper.

Every backbone maps its input to raw (un-normalised) embeddings ``[B, embedding_size]`` and has an
``embedding_size: int`` attribute and an ``input_spec`` dict (preprocessing, written into exports).
``build_backbone("timm/<model_name>", **kw)`` builds :class:`TimmBackbone` for any timm model.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from mlearn.input_spec import image_spec
from mlearn.registry import Registry, check_kwargs

BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register
TIMM_PREFIX = "timm/"


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone, or ``timm/<model_name>`` through :class:`TimmBackbone`.

    Raises ``KeyError`` (unknown name, listing the known ones) or ``TypeError`` (unknown keyword).
    """
    if name.lower().startswith(TIMM_PREFIX):
        check_kwargs(TimmBackbone, kwargs, f"backbone '{name}'")
        return TimmBackbone(name[len(TIMM_PREFIX):], **kwargs)
    return BACKBONES.build(name, **kwargs)


def list_backbones() -> List[str]:
    """Registered backbone names (any ``timm/<model_name>`` is accepted besides these)."""
    return BACKBONES.names()


def register_variant(
    constructor: Callable[..., nn.Module], *names: str, **fixed: Any
) -> Callable[..., nn.Module]:
    """Register ``names`` for ``constructor`` with the arguments ``fixed`` bound (e.g. ``layers``).

    The returned factory takes the remaining constructor arguments as keywords; its signature is
    the constructor's minus ``fixed``, so the registry still rejects unknown keywords.
    """

    def factory(**kwargs: Any) -> nn.Module:
        return constructor(**fixed, **kwargs)

    signature = inspect.signature(constructor)
    factory.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in signature.parameters.items()
                    if n not in fixed],
        return_annotation=constructor if inspect.isclass(constructor) else signature.return_annotation)
    factory.__name__ = factory.__qualname__ = names[0]
    factory.__module__ = constructor.__module__
    factory.__doc__ = f"``{getattr(constructor, '__name__', constructor)}`` with {fixed}."
    return register_backbone(*names)(factory)


class TimmBackbone(nn.Module):
    """Any timm model as a trunk (``num_classes=0``: pooled features) + neck Linear -> BatchNorm1d.

    [B, 3, input_size, input_size] -> [B, embedding_size]. Nothing is downloaded: the trunk is
    created with ``pretrained=False``; ``pretrained_path`` loads a local timm state dict into it
    (its classifier is dropped, ViT position embeddings are resampled to ``input_size``). Models that
    take ``img_size`` (ViTs and other transformers) are built for ``input_size``. Preprocessing is
    ``(x - 127.5) / 127.5`` like the face backbones; fine-tuning ImageNet weights may prefer the
    model's own mean/std (``timm.data.resolve_data_config``), set ``input_spec`` accordingly.
    """

    def __init__(
        self,
        model_name: str,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        pretrained_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
            raise KeyError(f"unknown timm model '{model_name}'; close matches: {close}; "
                           f"see timm.list_models('*{model_name.split('_')[0]}*')")
        self.model_name = model_name
        self.embedding_size = int(embedding_size)
        self.input_spec: Dict[str, Any] = image_spec(input_size)
        self.trunk = _create_timm(model_name, input_size, pretrained_path)
        num_features = _feature_dim(self.trunk, input_size)
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, embedding_size, bias=False),
                                  nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] normalised -> [B, embedding_size]."""
        return self.neck(self.trunk(x))


def _create_timm(model_name: str, input_size: int, pretrained_path: Optional[str]) -> nn.Module:
    import timm

    kwargs: Dict[str, Any] = {"num_classes": 0}
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained_path '{pretrained_path}' for timm model '{model_name}' does not exist")
        # timm's own loader filters the classifier and adapts position embeddings; with a file source
        # it never touches the network.
        overlay = {"file": str(path), "hf_hub_id": None, "url": None}
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    else:
        kwargs["pretrained"] = False
    try:
        return timm.create_model(model_name, img_size=input_size, **kwargs)
    except TypeError as error:  # convnets take no img_size
        if "img_size" not in str(error):
            raise
    return timm.create_model(model_name, **kwargs)


@torch.no_grad()
def _feature_dim(trunk: nn.Module, input_size: int) -> int:
    """Width of the trunk's pooled output (``num_features`` is not it for every timm model)."""
    was_training = trunk.training
    trunk.eval()
    try:
        return int(trunk(torch.zeros(1, 3, input_size, input_size)).shape[-1])
    finally:
        trunk.train(was_training)
