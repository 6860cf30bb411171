"""WeSpeaker checkpoints (``avg_model.pt`` / ``model_N.pt``) -> mlearn speaker backbones.

Archs (WeSpeaker's names): ``ResNet34`` (BasicBlocks), ``ResNet221`` / ``ResNet293`` (Bottlenecks) ->
:class:`~mlearn.models.speaker.ResNetSpeaker`; ``ECAPA_TDNN_GLOB_c512`` / ``_c1024`` ->
:class:`~mlearn.models.speaker.ECAPA_TDNN`. mlearn's speaker backbones use WeSpeaker's module names and
pooling statistics, so the conversion only drops the ``projection.*`` margin head and turns the
``num_batches_tracked`` counters, which checkpoint averaging leaves as floats, back into integers.

Hyper-parameters come from the run's ``config.yaml`` (``--config``: ``model``, ``model_args``,
``dataset_args`` fbank/CMVN settings), else from the released models' values (not WeSpeaker's Python
signature defaults): ResNets feat_dim 80, embed_dim 256, TSTP, one embedding layer; ECAPA-TDNNs
feat_dim 80, embed_dim 192, ASTP. The embedding is what WeSpeaker's extraction uses: the last output
(with ``two_emb_layer``, the second embedding layer). Preprocessing: Kaldi fbank of the int16-range
waveform (Hamming window, 25/10 ms, dither 0 at inference) minus its per-utterance mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mlearn.models.importers.base import Conversion, Importer, load_tensors, register_importer
from mlearn.models.speaker import audio_input_spec

RESNET = "mlearn.models.speaker.ResNetSpeaker"
ECAPA = "mlearn.models.speaker.ECAPA_TDNN"

# WeSpeaker arch -> the mlearn backbone arguments that the arch fixes
ARCHS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ResNet34": (RESNET, {"layers": [3, 4, 6, 3], "block": "basic", "base_channels": 32}),
    "ResNet221": (RESNET, {"layers": [6, 16, 48, 3], "block": "bottleneck", "base_channels": 32}),
    "ResNet293": (RESNET, {"layers": [10, 20, 64, 3], "block": "bottleneck", "base_channels": 32}),
    "ECAPA_TDNN_GLOB_c512": (ECAPA, {"channels": 512, "global_context": True, "mfa_channels": 1536}),
    "ECAPA_TDNN_GLOB_c1024": (ECAPA, {"channels": 1024, "global_context": True, "mfa_channels": 1536}),
}
# the released models' model_args (what a config.yaml may set, and the only pooling mlearn implements)
RELEASE_MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    RESNET: {"feat_dim": 80, "embed_dim": 256, "pooling_func": "TSTP", "two_emb_layer": False},
    ECAPA: {"feat_dim": 80, "embed_dim": 192, "pooling_func": "ASTP", "emb_bn": False},
}
FBANK_ARGS = {"num_mel_bins": "num_mel_bins", "frame_length": "frame_length_ms",
              "frame_shift": "frame_shift_ms", "dither": None}  # dither: training only (0 at inference)
HEAD_PREFIX = "projection."


@register_importer("wespeaker")
class WeSpeakerImporter(Importer):
    """WeSpeaker (wenet-e2e/wespeaker) ResNet and ECAPA-TDNN speaker models."""

    archs = tuple(ARCHS)
    config_help = ("the run's config.yaml (model, model_args, dataset_args fbank/CMVN settings); "
                   "default: the released models' settings")

    def read_checkpoint(self, path: Path) -> Dict[str, torch.Tensor]:
        state = load_tensors(path)
        if all(isinstance(k, str) and k.startswith("module.") for k in state):  # saved from a DDP wrapper
            state = {k[len("module."):]: v for k, v in state.items()}
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"{path}: '{bad}' is not a tensor; expected a WeSpeaker state dict "
                             "(avg_model.pt: parameter name -> tensor)")
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        if not any(k.startswith("layer1.") for k in state) or not (
                "seg_1.weight" in state or "linear.weight" in state):
            raise ValueError(f"{path}: not a WeSpeaker ResNet / ECAPA-TDNN checkpoint (expected 'layer1.*' "
                             "and 'seg_1.weight' or 'linear.weight' keys)")
        return state

    def conversion(self, arch: str, config: Optional[Path]) -> Conversion:
        class_path, fixed = ARCHS[arch]
        model_args = dict(RELEASE_MODEL_ARGS[class_path])
        fbank: Dict[str, Any] = {}
        if config is not None:
            given, fbank = _read_config(config, arch)
            unknown = sorted(set(given) - set(model_args))
            if unknown:
                raise ValueError(f"--config {config}: model_args.{unknown[0]} is not supported for {arch} "
                                 f"(mlearn reads {sorted(model_args)})")
            model_args.update(given)
        feat_dim = _positive(model_args, "feat_dim", config)
        embed_dim = _positive(model_args, "embed_dim", config)
        pooling = RELEASE_MODEL_ARGS[class_path]["pooling_func"]
        if model_args["pooling_func"] != pooling:
            raise ValueError(f"--config {config}: model_args.pooling_func={model_args['pooling_func']!r} is "
                             f"not supported for {arch} (mlearn implements {pooling})")
        if fbank.get("num_mel_bins", feat_dim) != feat_dim:
            raise ValueError(f"--config {config}: dataset_args.fbank_args.num_mel_bins="
                             f"{fbank['num_mel_bins']} differs from model_args.feat_dim={feat_dim}")
        fbank.pop("num_mel_bins", None)
        init_args = {**fixed, "embedding_size": embed_dim, "num_mel_bins": feat_dim,
                     "pooling_variance": "unbiased"}
        flag = "two_emb_layer" if class_path == RESNET else "emb_bn"
        init_args[flag] = _flag(model_args, flag, config)
        backbone = {"class_path": class_path, "init_args": init_args}
        return Conversion(backbone, audio_input_spec(feat_dim, **fbank))

    def convert_state(self, state: Dict[str, torch.Tensor], arch: str,
                      conversion: Conversion) -> Dict[str, torch.Tensor]:
        """Same names; averaged ``num_batches_tracked`` floats become int64 counters again."""
        return {k: v.round().long() if k.endswith("num_batches_tracked") else v for k, v in state.items()}


def _read_config(path: Path, arch: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_args, fbank options of :func:`audio_input_spec`) from a WeSpeaker config.yaml."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a WeSpeaker config.yaml mapping "
                         "(model, model_args, ...)")
    model = config.get("model", arch)
    if model != arch:
        raise ValueError(f"--config {path}: model {model!r} differs from --arch {arch}")
    model_args = _mapping(config, "model_args", path)
    dataset_args = _mapping(config, "dataset_args", path)
    frontend = dataset_args.get("frontend", "fbank")
    if frontend != "fbank":
        raise ValueError(f"--config {path}: dataset_args.frontend={frontend!r} is not supported "
                         "(mlearn imports fbank models)")
    fbank: Dict[str, Any] = {}
    for key, value in _mapping(dataset_args, "fbank_args", path, "dataset_args.").items():
        if key not in FBANK_ARGS:
            raise ValueError(f"--config {path}: dataset_args.fbank_args.{key} is not supported "
                             f"(mlearn reads {sorted(FBANK_ARGS)})")
        ours = FBANK_ARGS[key]
        if ours is not None:
            fbank[ours] = value
    cmvn = _mapping(dataset_args, "cmvn_args", path, "dataset_args.")
    if cmvn.get("norm_var", False):
        raise ValueError(f"--config {path}: dataset_args.cmvn_args.norm_var=true is not supported "
                         "(mlearn's fbank spec subtracts the mean only)")
    fbank["cmn"] = bool(dataset_args.get("cmvn", True)) and bool(cmvn.get("norm_mean", True))
    return model_args, fbank


def _mapping(parent: Mapping[str, Any], key: str, path: Path, prefix: str = "") -> Dict[str, Any]:
    value = parent.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"--config {path}: {prefix}{key} must be a mapping, got {value!r}")
    return value


def _positive(args: Mapping[str, Any], key: str, path: Optional[Path]) -> int:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--config {path}: model_args.{key}={value!r}: expected a positive integer")
    return value


def _flag(args: Mapping[str, Any], key: str, path: Optional[Path]) -> bool:
    value = args[key]
    if not isinstance(value, bool):
        raise ValueError(f"--config {path}: model_args.{key}={value!r}: expected true or false")
    return value
