"""Import a public checkpoint into a self-contained mlearn model directory.

A family (:class:`Importer` subclass, registered with :func:`register_importer`) knows how its
checkpoints are laid out; this module does what every family shares: load the file without running
code it names, build the registered mlearn backbone, check that the converted tensors fit it EXACTLY
(no silent partial load: a wrong ``--arch`` is an error naming the first mismatching key and the arch
the file looks like), and write the model directory:

- ``OUT_DIR/backbone.safetensors``: the weights; the header metadata holds the backbone spec
  (``class_path`` + ``init_args``), the ``input_spec`` (the original network's preprocessing),
  ``embedding_size`` and ``source`` (family, arch, file name, sha256) — what
  :func:`mlearn.load_model` needs, so the source checkpoint may be deleted afterwards;
- ``OUT_DIR/model.json``: the same metadata, readable.

Nothing is written when anything fails; an existing ``OUT_DIR`` is replaced only as a whole.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch

from mlearn import __version__
from mlearn.errors import UsageError
from mlearn.inference import MODEL_DIR_WEIGHTS, instantiate
from mlearn.trust import load_checkpoint

PathLike = Union[str, Path]
METADATA_FILE = "model.json"


@dataclass(frozen=True)
class Conversion:
    """What one arch of a family becomes in mlearn."""

    backbone: Dict[str, Any]  # {"class_path": registered mlearn backbone, "init_args": {...}}
    input_spec: Dict[str, Any]  # the preprocessing embed() applies (image or audio spec)


class Importer:
    """One family of public checkpoints; subclass, fill the three methods, ``@register_importer(name)``."""

    family: str = ""
    archs: Tuple[str, ...] = ()
    config_help: str = ""  # what ``--config`` is for this family ("": not accepted)

    def read_checkpoint(self, path: Path) -> Dict[str, torch.Tensor]:
        """The source-layout tensors (head keys dropped, prefixes stripped)."""
        raise NotImplementedError

    def conversion(self, arch: str, config: Optional[Path]) -> Conversion:
        """The mlearn backbone spec and preprocessing of ``arch`` (and the family's ``--config``)."""
        raise NotImplementedError

    def convert_state(self, state: Dict[str, torch.Tensor], arch: str,
                      conversion: Conversion) -> Dict[str, torch.Tensor]:
        """Source tensors -> the mlearn backbone's state dict; unknown keys pass through unchanged."""
        return dict(state)


IMPORTERS: Dict[str, Importer] = {}


def register_importer(family: str) -> Callable[[Type[Importer]], Type[Importer]]:
    """Class decorator: ``@register_importer("insightface")`` makes the family importable by name."""
    def add(cls: Type[Importer]) -> Type[Importer]:
        if family in IMPORTERS:
            raise ValueError(f"importer '{family}' is already registered")
        instance = cls()
        instance.family = family
        IMPORTERS[family] = instance
        return cls
    return add


def get_importer(family: str) -> Importer:
    try:
        return IMPORTERS[family]
    except KeyError:
        known = sorted(IMPORTERS)
        raise UsageError(f"unknown checkpoint family '{family}'; expected one of {known}") from None


def load_tensors(path: PathLike) -> Dict[str, Any]:
    """A checkpoint's state dict, loaded without running code named by the file (weights only); a
    Lightning-style ``{"state_dict": ...}`` is unwrapped."""
    checkpoint = load_checkpoint(Path(path))
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no tensors found "
                         "(expected a state dict or a checkpoint with 'state_dict')")
    return state


def import_checkpoint(family: str, checkpoint: PathLike, arch: str, output: PathLike,
                      config: Optional[PathLike] = None) -> Path:
    """Convert ``checkpoint`` of ``family``/``arch`` into the model directory ``output`` (returned)."""
    importer = get_importer(family)
    if arch not in importer.archs:
        raise UsageError(f"--arch {arch}: not a {family} arch; expected one of {list(importer.archs)}")
    if config is not None and not importer.config_help:
        raise UsageError(f"--config is not used by {family} checkpoints")
    checkpoint, config_path = Path(checkpoint), None if config is None else Path(config)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if config_path is not None and not config_path.is_file():
        raise FileNotFoundError(f"--config not found: {config_path}")
    source = importer.read_checkpoint(checkpoint)
    conversion = importer.conversion(arch, config_path)
    backbone = instantiate(conversion.backbone, source=f"{family} {arch}")
    state = importer.convert_state(source, arch, conversion)
    problem = first_mismatch(state, backbone.state_dict())
    if problem is not None:
        guess = _closest_arch(importer, source, config_path, exclude=arch)
        looks = f"; it looks like --arch {guess}" if guess else "; it matches no known arch of this family"
        raise ValueError(f"{checkpoint}: does not fit {family} --arch {arch}: {problem}{looks}")
    backbone.load_state_dict(state, strict=True)
    metadata = {
        "backbone": conversion.backbone,
        "input_spec": conversion.input_spec,
        "embedding_size": int(backbone.embedding_size),
        "source": {"family": family, "arch": arch, "file": checkpoint.name, "sha256": _sha256(checkpoint)},
        "mlearn_version": __version__,
        "format": "safetensors",
        "precision": "fp32",
    }
    return _write_model_dir(backbone.float().eval(), metadata, Path(output))


def first_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   expected_by: str = "the arch") -> Optional[str]:
    """The first difference between a state dict and the one ``expected_by`` (a backbone) has, in
    words, or None when keys and shapes agree."""
    for key, tensor in state.items():
        if key not in expected:
            return f"unexpected key '{key}'"
        if tuple(tensor.shape) != tuple(expected[key].shape):
            return (f"key '{key}' has shape {list(tensor.shape)}, {expected_by} expects "
                    f"{list(expected[key].shape)}")
    missing = [key for key in expected if key not in state]
    return f"missing key '{missing[0]}'" if missing else None


def _closest_arch(importer: Importer, source: Dict[str, torch.Tensor], config: Optional[Path],
                  exclude: str) -> Optional[str]:
    """The family's arch whose layout the checkpoint fits (built on the meta device: no memory)."""
    scores: List[Tuple[int, str]] = []
    for arch in importer.archs:
        if arch == exclude:
            continue
        try:
            conversion = importer.conversion(arch, config)
            with torch.device("meta"):
                expected = instantiate(conversion.backbone, source=arch).state_dict()
            state = importer.convert_state(source, arch, conversion)
        except Exception:  # noqa: BLE001 - an arch whose conversion rejects this layout is no match
            continue
        bad = sum(k not in expected or tuple(v.shape) != tuple(expected[k].shape) for k, v in state.items())
        scores.append((bad + sum(k not in state for k in expected), arch))
    if not scores:
        return None
    best, arch = min(scores)
    return arch if best == 0 else f"{arch} (closest; {best} keys differ)"


def _write_model_dir(backbone: torch.nn.Module, metadata: Dict[str, Any], output: Path) -> Path:
    from safetensors.torch import save_file

    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; expected a folder for the model directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
        header = {k: json.dumps(v) for k, v in metadata.items()}
        save_file(state, str(staging / MODEL_DIR_WEIGHTS), metadata=header)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
