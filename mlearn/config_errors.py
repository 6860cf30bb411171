"""One line for a training config that does not parse: jsonargparse's multi-line error reduced to its
cause, with the valid choices for the offending key (margins, backbones, a class's arguments, the keys
of a group) and where a key of an older config moved.

The messages are jsonargparse's free text, read with regular expressions: pinned in ``constraints.txt``
with the other private uses (:mod:`mlearn._compat`), and covered by ``tests/test_cli.py``.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, List, Optional

from mlearn import _compat


def describe_parse_error(parser: Any, message: str) -> str:
    """One line from jsonargparse's multi-line error, plus the valid choices for the offending key."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    text = "; ".join(dict.fromkeys(lines))
    key = _offending_key(message)
    if key is None:
        return text
    moved = _moved_schedule_key(key, message)
    if moved:
        return moved
    bad_class = (re.search(r"Expected a dot import path string: (\S+)", message)
                 or re.search(r"Problem with given class_path '([^']+)':\s+module", message))
    if key.endswith("margin") and bad_class:
        from mlearn.heads.margins import MARGINS

        classes = sorted({f"mlearn.heads.{MARGINS.get(name).__name__}" for name in MARGINS.names()})
        return (f"{key}: unknown margin '{bad_class.group(1)}'; known: {classes} "
                f"(short names also work, e.g. CosFace; registry names: {MARGINS.names()})")
    if key.endswith("backbone") and bad_class:
        from mlearn.models import list_backbones

        return (f"{key}: unknown backbone class '{bad_class.group(1)}'; give a class_path such as "
                f"mlearn.models.IResNet or mlearn.models.TimmBackbone (registered backbones: "
                f"{list_backbones()})")
    bad_option = re.search(r"Option '(\w+)' is not accepted", message)
    classes = re.findall(r"class_path '([^']+)'", message)
    if bad_option and classes:
        return (f"{key}: {classes[-1]} has no argument '{bad_option.group(1)}'; accepted: "
                f"{_init_args(classes[-1])}")
    parent = key.rpartition(".")[0]
    if "unrecognized" in text or "not expected" in text:
        children = sorted({dest[len(parent) + 1:].split(".")[0] for dest in _compat.parser_dests(parser)
                           if parent and dest.startswith(parent + ".")})
        if children:
            return f"{text} (valid keys under '{parent}': {children})"
    return text


# learning-rate keys that were arguments of the model and are fields of model.schedule (LRSchedule) now
_SCHEDULE_FIELDS = ("poly_power", "warmup_epochs", "final_lr_ratio", "lr_milestones", "lr_gamma")


def _moved_schedule_key(key: str, message: str) -> Optional[str]:
    """The line for a config written before the schedule became one group (``model.schedule: poly``,
    ``model.warmup_epochs: 2``), else None."""
    example = "e.g. 'schedule: {decay: poly, warmup_epochs: 2}'"
    if key == "model.schedule" and "Unable to load config" in message:
        return (f"model.schedule is a group of settings now ({example}); the schedule's name is "
                f"model.schedule.decay, and {', '.join(_SCHEDULE_FIELDS)} moved under model.schedule")
    name = key.rpartition(".")[2]
    if key == f"model.{name}" and name in _SCHEDULE_FIELDS:
        return f"{key} moved to model.schedule.{name} ({example})"
    return None


def _offending_key(message: str) -> Optional[str]:
    """The full dotted key: jsonargparse nests relative keys (``model.head`` then ``margin``)."""
    keys = re.findall(r'(?:Parser key|Key) "([\w.]+)"', message)
    if not keys:
        group = re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
        if group:
            return f"{group.group(1)}.{group.group(2)}"
        match = re.search(r"--([\w.]+)", message)
        return match.group(1) if match else None
    full = keys[0]
    for key in keys[1:]:
        full = key if key.startswith(full) else f"{full}.{key}"
    return full


def _init_args(class_path: str) -> List[str]:
    module, _, name = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    return [p for p in params if p != "self"]
