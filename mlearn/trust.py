"""Loading files we did not write without running code they name (see docs/security.md).

- :func:`load_checkpoint`: ``.ckpt`` / state-dict files through ``torch.load(weights_only=True)`` with a
  small allow-list of plain-data globals; a pickle that needs anything else is refused unless the
  caller opts in with ``unsafe=True`` (CLI ``--unsafe-load``).
- :func:`restricted_unpickle`: insightface verification ``.bin`` sets (lists of encoded images and
  bool flags) through an unpickler that admits only the types those sets contain.
- :func:`resolve_backbone_spec`: a ``{class_path, init_args}`` spec read from a file's metadata
  builds only a registered mlearn backbone; the string is looked up, never imported, unless the
  caller opts in with ``allow_any_class=True`` (CLI ``--allow-any-class``).

Every refusal is a ``ValueError`` whose one-line message names the file, what it asked for, and the
opt-in that would allow it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

PathLike = Union[str, Path]
UNSAFE_HINT = "pass --unsafe-load (unsafe=True) only for files you trust"
ANY_CLASS_HINT = "pass --allow-any-class (allow_any_class=True) only for files you trust"
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


# -------------------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: PathLike, *, unsafe: bool = False, map_location: Any = "cpu",
                    mmap: bool = False) -> Dict[str, Any]:
    """Load a Lightning checkpoint (or a plain state dict) without executing code from the file.

    ``torch.load(weights_only=True)``: tensors, containers, numbers, strings, plus
    :func:`checkpoint_safe_globals` (numpy scalars/arrays, paths). A file that needs another global
    raises ``ValueError`` naming it; ``unsafe=True`` loads it with ``weights_only=False`` (full pickle:
    only for files you trust). ``mmap``: map tensor storages lazily (zip-format files only).
    Raises ``FileNotFoundError`` (missing) or ``ValueError`` (truncated, corrupt, not a dict).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_archive(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (non-zip) format cannot be mapped
    try:
        if unsafe:
            checkpoint = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        else:
            with _safe_globals(torch):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not unsafe and "weights only load failed" in str(exc).lower():
            found = _GLOBAL_IN_ERROR.search(str(exc))
            what = (f"refused to unpickle {found.group(1)}" if found
                    else f"refused ({_weights_only_reason(exc)})")
            raise ValueError(f"{path}: {what}: a checkpoint needs only tensors and plain values, and "
                             f"unpickling anything else may run code the file names; {UNSAFE_HINT}") from None
        raise ValueError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                         "expected a .ckpt written by `mlearn train` or torch.save") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, expected a checkpoint dict "
                         "(with 'state_dict') or a state dict")
    return checkpoint


def checkpoint_safe_globals() -> List[Any]:
    """Globals admitted by :func:`load_checkpoint` beyond torch's own weights-only set: plain data
    that callbacks or hyper-parameters may hold (numpy scalars and arrays, filesystem paths)."""
    import pathlib

    import numpy as np

    multiarray = sys.modules.get("numpy._core.multiarray") or sys.modules.get("numpy.core.multiarray")
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int32, np.int64, np.uint8, np.uint32, np.float16,
                                          np.float32, np.float64)]
    found = [getattr(multiarray, name) for name in ("_reconstruct", "scalar") if hasattr(multiarray, name)]
    return [*found, np.ndarray, np.dtype, *dtypes, pathlib.PosixPath, pathlib.WindowsPath,
            pathlib.PurePosixPath, pathlib.PureWindowsPath]


def _safe_globals(torch: Any) -> Any:
    """The allow-list for this load only (torch < 2.5 has no context manager: its defaults apply)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    return scoped(checkpoint_safe_globals()) if scoped is not None else contextlib.nullcontext()


def _check_archive(path: Path) -> None:
    """A zip-format checkpoint cut short (e.g. a save killed mid-write) -> one clear line."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise ValueError(f"{path}: empty file, expected a checkpoint")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: truncated checkpoint (its zip archive has no central directory); "
                         "expected a complete .ckpt, e.g. an older one of the same run")


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch's weights-only error that says what was refused (not its boilerplate)."""
    boilerplate = ("weights only load failed", "check the documentation", "please file an issue",
                   "in pytorch 2.6", "re-running `torch.load`")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.lower().startswith(boilerplate)]
    return (reasons[0] if reasons else "weights-only load failed")[:200]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------- .bin pickles


def _bool_dtype(name: Any, align: Any = False, copy: Any = True) -> Any:
    import numpy as np

    text = name.decode() if isinstance(name, bytes) else name
    if text not in ("b1", "?", "bool"):
        raise _Refused(f"numpy dtype {text!r} (only bool arrays are expected)")
    return np.dtype(text, align, copy)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    import numpy as np

    if subtype is not np.ndarray:
        raise _Refused(f"array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _bool_scalar(dtype: Any, data: Any = b"") -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype != np.bool_ or not isinstance(data, bytes):
        raise _Refused(f"numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=np.bool_, count=1)[0]


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') in pickle protocols 0-2.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bin_globals() -> Dict[Tuple[str, str], Callable[..., Any]]:
    """``(module, name)`` -> what the unpickler gets, for every global the released sets contain."""
    table: Dict[Tuple[str, str], Callable[..., Any]] = {}
    for module in ("builtins", "__builtin__"):
        for name, obj in (("list", list), ("tuple", tuple), ("bytes", bytes), ("bytearray", bytearray),
                          ("bool", bool)):
            table[(module, name)] = obj
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _reconstruct
        table[(module, "scalar")] = _bool_scalar
    import numpy as np

    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = _bool_dtype
    table[("_codecs", "encode")] = _latin1_encode
    return table


class _Refused(ValueError):
    """A global or value the restricted unpickler does not admit."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _bin_globals()[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def restricted_unpickle(data: bytes, *, source: str) -> Any:
    """Unpickle an insightface ``.bin`` set admitting only lists, tuples, bytes, bools and numpy bool
    arrays (Python 2 pickles are read with ``encoding="bytes"``). Anything else raises ``ValueError``
    naming ``source`` and the refused global before it is called; a truncated or non-pickle input
    raises ``ValueError`` naming ``source``."""
    try:
        try:
            return _RestrictedUnpickler(io.BytesIO(data)).load()
        except UnicodeDecodeError:  # a Python 2 pickle: its str objects are our bytes
            return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise ValueError(f"{source}: refused to unpickle {exc}: a verification .bin holds only encoded "
                         "images (bytes) and bool flags; nothing from this file was run") from None
    except (EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{source}: truncated or not a pickle ({_first_line(exc)}); expected an "
                         "insightface verification .bin") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a malformed file
        raise ValueError(f"{source}: malformed pickle ({type(exc).__name__}: {_first_line(exc)}); "
                         "expected an insightface verification .bin") from None


# -------------------------------------------------------------------------------- backbone specs


def allowed_backbones() -> Dict[str, Callable[..., Any]]:
    """``class_path`` -> constructor for every registered backbone (and :class:`TimmBackbone`).

    Each is listed under its defining module (``mlearn.models.face.IResNet``) and under every already
    imported parent package that re-exports it (``mlearn.models.IResNet``), and by registry name
    (``iresnet50``). Nothing is imported to build this table beyond :mod:`mlearn.models`.
    """
    from mlearn.models import BACKBONES, TimmBackbone

    table: Dict[str, Callable[..., Any]] = {}
    entries = [(name, BACKBONES.get(name)) for name in BACKBONES.names()] + [("", TimmBackbone)]
    for registry_name, obj in entries:
        if registry_name:
            table[registry_name] = obj
        module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
        if not (module and name):  # e.g. a functools.partial: reachable by registry name only
            continue
        table[f"{module}.{getattr(obj, '__qualname__', name)}"] = obj
        parts = module.split(".")
        for depth in range(1, len(parts)):
            package = sys.modules.get(".".join(parts[:depth]))
            if package is not None and getattr(package, name, None) is obj:
                table[f"{package.__name__}.{name}"] = obj
    return table


def resolve_backbone_spec(spec: Any, *, allow_any_class: bool = False, source: str = "backbone spec") -> Any:
    """Build the ``nn.Module`` described by ``{"class_path": ..., "init_args": {...}}`` read from a file.

    ``class_path`` must be a registered mlearn backbone (:func:`allowed_backbones`), looked up, never
    imported; ``init_args`` must be plain JSON values (nested specs go through the same allow-list).
    ``allow_any_class=True`` imports any class path (only for files you trust). ``source`` (the file)
    starts every error message. Raises ``ValueError``.
    """
    from torch import nn

    module = _build(spec, allow_any_class, source, "backbone")
    if not isinstance(module, nn.Module):
        raise ValueError(f"{source}: backbone class_path '{spec['class_path']}' built a "
                         f"{type(module).__name__}, expected a torch.nn.Module")
    return module


def _build(spec: Any, allow_any_class: bool, source: str, key: str) -> Any:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"{source}: {key}: expected {{class_path: <registered backbone>, "
                         f"init_args: {{...}}}}, got {_short(spec)}")
    class_path = spec["class_path"]
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"{source}: {key}.init_args: expected a mapping, got {_short(init_args)}")
    constructor = _lookup(class_path, allow_any_class, source, key)
    kwargs = {name: _argument(value, allow_any_class, source, f"{key}.init_args.{name}")
              for name, value in init_args.items()}
    from mlearn.registry import check_kwargs

    try:
        check_kwargs(constructor, kwargs, f"'{class_path}'")
        return constructor(**kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"{source}: {key}: cannot build '{class_path}': {message}") from None


def _lookup(class_path: str, allow_any_class: bool, source: str, key: str) -> Callable[..., Any]:
    table = allowed_backbones()
    if class_path in table:
        return table[class_path]
    if not allow_any_class:
        known = sorted(p for p in table if "." in p and p.count(".") == 2)  # the short public paths
        raise ValueError(f"{source}: {key}: class_path '{class_path}' is not a registered mlearn backbone "
                         f"(refused without importing it; known: {known}, or import the module that "
                         f"registers yours first); {ANY_CLASS_HINT}")
    module_name, _, attr = class_path.rpartition(".")
    try:
        constructor = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{source}: {key}: cannot import class_path '{class_path}' ({exc})") from None
    if not callable(constructor):
        raise ValueError(f"{source}: {key}: class_path '{class_path}' is not callable")
    return constructor


def _argument(value: Any, allow_any_class: bool, source: str, key: str) -> Any:
    """A plain JSON value (nested class specs built through the same allow-list)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_argument(v, allow_any_class, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if "class_path" in value:
            return _build(value, allow_any_class, source, key)
        if all(isinstance(k, str) for k in value):
            return {k: _argument(v, allow_any_class, source, f"{key}.{k}") for k, v in value.items()}
    if allow_any_class:
        return value
    raise ValueError(f"{source}: {key}: expected a plain JSON value (number, string, bool, list, mapping), "
                     f"got {type(value).__name__}; {ANY_CLASS_HINT}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def checkpoint_step(checkpoint: Mapping[str, Any]) -> Tuple[int, int]:
    """``(epoch, global_step)`` recorded in a Lightning checkpoint, ``(-1, -1)`` where absent."""
    def number(key: str) -> int:
        value = checkpoint.get(key, -1)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1

    return number("epoch"), number("global_step")


def order_checkpoints(paths: List[PathLike], *, unsafe: bool = False) -> List[Path]:
    """``paths`` sorted oldest first by their recorded (epoch, global_step), then modification time
    (never by name: ``epoch=9`` < ``epoch=10``). Reads each file lazily (mmap)."""
    keyed = []
    for path in map(Path, paths):
        step = checkpoint_step(load_checkpoint(path, unsafe=unsafe, mmap=True))
        keyed.append((step, path.stat().st_mtime, str(path), path))
    return [item[-1] for item in sorted(keyed)]


def add_trust_arguments(parser: Any) -> None:
    """``--unsafe-load`` and ``--allow-any-class`` for an argparse parser that loads models."""
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load checkpoints that need a full pickle (code named by the file may run; "
                             "only for files you trust, see docs/security.md)")
    parser.add_argument("--allow-any-class", action="store_true",
                        help="let a recorded backbone class_path import any class, not only registered "
                             "mlearn backbones (only for files you trust, see docs/security.md)")
