"""Run an evaluation suite (YAML) on a model with ``.embed(batch, normalize=False)``.

A suite is ``{name, protocols: [{type, ...options}, ...]}``. Each entry becomes the typed options of
its ``type`` (:mod:`mlearn.evaluation.protocols.options`); each type is served by a module of
:mod:`mlearn.evaluation.protocols` with ``run(model, options, root, batch_size, cache) -> rows``,
imported only when used (so FAISS and audio code load only for the suites that need them).
:func:`load_suite` checks the whole file (YAML syntax, keys, value types) before anything is
embedded; a model whose embeddings are NaN/inf stops the run with the benchmark named.
"""
from __future__ import annotations

import importlib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import yaml

from mlearn.evaluation.protocols.options import KEY_TYPES, build_options
from mlearn.evaluation.report import ResultRow, format_table, plot_curves, write_results

PathLike = Union[str, Path]
PROTOCOL_MODULES: Dict[str, str] = {
    "bin": "mlearn.evaluation.protocols.bins",
    "ijb": "mlearn.evaluation.protocols.ijb",
    "trials": "mlearn.evaluation.protocols.trials",
    "retrieval": "mlearn.evaluation.protocols.retrieval",
    "own_data": "mlearn.evaluation.protocols.own_data",
}
PROTOCOL_TYPES = tuple(PROTOCOL_MODULES)
_RUN_CACHE: ContextVar[Optional[Dict[Any, Any]]] = ContextVar("suite_run_cache", default=None)


def run_cache() -> Optional[Dict[Any, Any]]:
    """The dict the protocols of the :func:`run_suite` call in progress share (``None`` outside one):
    for what one protocol computes from the model and another can reuse (the same utterances'
    embeddings in VoxCeleb1-E and -H). It lives as long as the run, during which the model is fixed."""
    return _RUN_CACHE.get()


SUITE_KEYS = ("name", "protocols")


def load_suite(suite: Union[PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A suite dict from YAML (or a dict), checked before anything runs: valid YAML, a mapping with a
    non-empty ``protocols`` list, each protocol of a known ``type`` with its required keys, no unknown
    key and every value of the expected type. ``ValueError`` naming the suite file and the key."""
    if isinstance(suite, dict):
        config, where = suite, f"suite {suite.get('name', '')!r}".replace(" ''", "")
    else:
        path = Path(suite)
        if not path.is_file():
            raise FileNotFoundError(f"suite not found: {path} (see evaluation/*.yaml)")
        config, where = _read_yaml(path), str(path)
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping with keys {list(SUITE_KEYS)}, "
                         f"got {type(config).__name__}")
    unknown = sorted(set(config) - set(SUITE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {list(SUITE_KEYS)}")
    if "name" in config and not KEY_TYPES["name"].check(config["name"]):
        raise ValueError(f"{where}: name={config['name']!r}; expected a non-empty string")
    protocols = config.get("protocols")
    if not isinstance(protocols, list) or not protocols:
        raise ValueError(f"{where}: expected a non-empty 'protocols' list, got {protocols!r:.80}")
    for index, protocol in enumerate(protocols):
        build_options(protocol, f"{where}: protocols[{index}]")
    return config


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: invalid YAML{at}: {exc.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None


class NonFiniteEmbeddings(ValueError):
    """The model returned NaN or inf embeddings."""


class _CheckedModel:
    """The model with every ``embed`` output checked finite (NaN/inf would otherwise surface as an
    unrelated metric error, e.g. sklearn's 'Input contains NaN.'); other attributes pass through."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def embed(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._model.embed(batch, *args, **kwargs)
        values = np.asarray(out[0] if isinstance(out, tuple) else out)  # with_quality: (embeddings, quality)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            rows = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
            bad = int((~np.isfinite(rows)).any(axis=1).sum())
            raise NonFiniteEmbeddings(f"{bad} of the {len(rows)} embeddings of a batch")
        return out


def run_suite(model: Any, suite: Union[PathLike, Dict[str, Any]], data_root: Optional[PathLike] = None,
              out_dir: PathLike = "eval", batch_size: int = 128) -> Dict[str, Any]:
    """Evaluate ``model`` on every protocol of ``suite``; print one table, write results.json + plots."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    config = load_suite(suite)
    root = Path(data_root) if data_root else Path.cwd()
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root} "
                                "(the folder the suite's relative paths start from)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[ResultRow] = []
    checked = _CheckedModel(model)
    cache: Dict[Any, Any] = {"out_dir": out}  # quality_eval.OUT_DIR_KEY: where protocols put own figures
    token = _RUN_CACHE.set(cache)
    try:
        for protocol in config["protocols"]:
            options = build_options(protocol)
            runner = importlib.import_module(PROTOCOL_MODULES[protocol["type"]]).run
            try:
                rows += runner(checked, options, root, batch_size, cache)
            except NonFiniteEmbeddings as exc:
                raise NonFiniteEmbeddings(
                    f"benchmark {options.benchmark!r}: the model's embeddings contain NaN or inf ({exc}); "
                    "nothing is scored "
                    "(check the checkpoint for NaN weights, e.g. from a diverged run)") from None
    finally:
        _RUN_CACHE.reset(token)
    plot_curves(rows, out)
    results = write_results(config.get("name", "suite"), rows, out)
    print(format_table(rows))
    return results
