"""Run an evaluation suite (YAML) on a model with ``.embed(batch, normalize=False)``.

A suite is ``{name, protocols: [{type, ...options}, ...]}``. Each protocol type is served by a module
with ``run_protocol(model, protocol, root, batch_size) -> rows`` (imported only when used, so FAISS and
audio code load only for the suites that need them).
"""
from __future__ import annotations

import importlib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from mlearn.evaluation.report import format_table, plot_curves, write_results

PathLike = Union[str, Path]
PROTOCOL_MODULES: Dict[str, str] = {
    "bin": "mlearn.evaluation.face_bins",
    "ijb": "mlearn.evaluation.ijb",
    "trials": "mlearn.evaluation.speaker",
    "retrieval": "mlearn.evaluation.retrieval",
}
PROTOCOL_TYPES = tuple(PROTOCOL_MODULES)
_RUN_CACHE: ContextVar[Optional[Dict[Any, Any]]] = ContextVar("suite_run_cache", default=None)


def run_cache() -> Optional[Dict[Any, Any]]:
    """A dict shared by the protocols of the :func:`run_suite` call in progress (``None`` outside one):
    for what one protocol computes from the model and another can reuse (the same utterances'
    embeddings in VoxCeleb1-E and -H). It lives as long as the run, during which the model is fixed."""
    return _RUN_CACHE.get()


def load_suite(suite: Union[PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A suite dict from YAML (or a dict), with every protocol's ``type`` checked."""
    if isinstance(suite, dict):
        config = suite
    else:
        path = Path(suite)
        if not path.is_file():
            raise FileNotFoundError(f"suite not found: {path} (see evaluation/*.yaml)")
        config = yaml.safe_load(path.read_text()) or {}
    protocols = config.get("protocols")
    if not isinstance(protocols, list) or not protocols:
        raise ValueError(f"suite {suite}: expected a non-empty 'protocols' list")
    for index, protocol in enumerate(protocols):
        kind = protocol.get("type") if isinstance(protocol, dict) else None
        if kind not in PROTOCOL_MODULES:
            raise ValueError(f"suite protocol {index}: type={kind!r}; expected one of {list(PROTOCOL_TYPES)}")
    return config


def run_suite(model: Any, suite: Union[PathLike, Dict[str, Any]], data_root: Optional[PathLike] = None,
              out_dir: PathLike = "eval", batch_size: int = 128) -> Dict[str, Any]:
    """Evaluate ``model`` on every protocol of ``suite``; print one table, write results.json + plots."""
    config = load_suite(suite)
    root = Path(data_root) if data_root else Path.cwd()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    token = _RUN_CACHE.set({})
    try:
        for protocol in config["protocols"]:
            runner = importlib.import_module(PROTOCOL_MODULES[protocol["type"]]).run_protocol
            rows += runner(model, protocol, root, batch_size)
    finally:
        _RUN_CACHE.reset(token)
    plot_curves(rows, out)
    results = write_results(config.get("name", "suite"), rows, out)
    print(format_table(rows))
    return results
