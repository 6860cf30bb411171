"""Run an evaluation suite (YAML) on a model with ``.embed(batch, normalize=False)``.

A suite is ``{name, protocols: [{type, ...options}, ...]}``. Each protocol type is served by a module
with ``run_protocol(model, protocol, root, batch_size) -> rows``, ``PROTOCOL_KEYS`` (accepted keys) and
``REQUIRED_KEYS`` (imported only when used, so FAISS and audio code load only for the suites that need
them). :func:`load_suite` checks the whole file (YAML syntax, keys, value types) before anything is
embedded; a model whose embeddings are NaN/inf stops the run with the benchmark named.
"""
from __future__ import annotations

import importlib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
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


@dataclass(frozen=True)
class KeyType:
    """What a protocol key accepts: ``check(value)`` and its description for the error line."""

    check: Callable[[Any], bool]
    expected: str
    nullable: bool = False  # null means "the default"


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


_TEXT = KeyType(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_PATH = KeyType(lambda v: isinstance(v, str) and bool(v.strip()), "a path (a non-empty string)")
_FLAG = KeyType(lambda v: isinstance(v, bool), "true or false")
_POSITIVE = KeyType(_int_at_least(1), "a positive integer")
_POSITIVE_OR_NULL = KeyType(_int_at_least(1), "a positive integer or null", nullable=True)

# Value types of protocol keys, by key (a key means the same in every protocol type that accepts it).
KEY_TYPES: Dict[str, KeyType] = {
    "type": _TEXT,
    "name": KeyType(lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() != "",
                    "a non-empty string"),
    **{key: _PATH for key in ("path", "trials", "wav_root", "query", "gallery")},
    "cohort": KeyType(_PATH.check, "a path (a non-empty string) or null", nullable=True),
    **{key: _FLAG for key in ("flip", "detector_score", "one_to_n", "subtract_mean")},
    "baselines": KeyType(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                         "a list of baseline names, e.g. [mfcc_mean]"),
    "ks": KeyType(lambda v: isinstance(v, list) and bool(v) and all(_int_at_least(1)(k) for k in v),
                  "a non-empty list of positive integers, e.g. [1, 5, 10]"),
    "index": _TEXT,
    "workers": KeyType(_int_at_least(0), "a non-negative integer"),
    **{key: _POSITIVE for key in ("nlist", "nprobe", "hnsw_m", "ef_search")},
    **{key: _POSITIVE_OR_NULL for key in ("as_norm_top_n", "cohort_utts_per_speaker", "max_trials")},
}
SUITE_KEYS = ("name", "protocols")
_MAIN_PATH_KEY = {"bin": "path", "ijb": "path", "trials": "trials", "retrieval": "query"}


def _benchmark_name(protocol: Dict[str, Any]) -> str:
    """``name``, else the stem of the protocol's main file (as the runners name their rows)."""
    return str(protocol.get("name") or Path(str(protocol.get(_MAIN_PATH_KEY[protocol["type"]], ""))).stem)


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
        raise ValueError(f"{where}: expected a mapping with keys {list(SUITE_KEYS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(SUITE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {list(SUITE_KEYS)}")
    if "name" in config and not KEY_TYPES["name"].check(config["name"]):
        raise ValueError(f"{where}: name={config['name']!r}; expected a non-empty string")
    protocols = config.get("protocols")
    if not isinstance(protocols, list) or not protocols:
        raise ValueError(f"{where}: expected a non-empty 'protocols' list, got {protocols!r:.80}")
    for index, protocol in enumerate(protocols):
        _check_protocol(protocol, f"{where}: protocols[{index}]")
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


def _check_protocol(protocol: Any, where: str) -> None:
    if not isinstance(protocol, dict):
        raise ValueError(f"{where}: expected a mapping {{type: ..., ...}}, got {protocol!r:.80}")
    kind = protocol.get("type")
    if kind not in PROTOCOL_MODULES:
        raise ValueError(f"{where}: type={kind!r}; expected one of {list(PROTOCOL_TYPES)}")
    if protocol.get("name") is not None:
        where += f" ({protocol['name']})"
    module = importlib.import_module(PROTOCOL_MODULES[kind])
    unknown = sorted(set(protocol) - set(module.PROTOCOL_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for type {kind}; "
                         f"accepted: {list(module.PROTOCOL_KEYS)}")
    for key in module.REQUIRED_KEYS:
        if protocol.get(key) is None:
            raise ValueError(f"{where}: missing required key {key!r} "
                             f"(type {kind} needs {list(module.REQUIRED_KEYS)})")
    for key, value in protocol.items():
        expected = KEY_TYPES[key]
        if not (value is None and expected.nullable) and not expected.check(value):
            raise ValueError(f"{where}: {key}={value!r:.80}; expected {expected.expected}")


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
        values = np.asarray(out)
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
        raise FileNotFoundError(f"data root not found: {root} (the folder the suite's relative paths start from)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    checked = _CheckedModel(model)
    token = _RUN_CACHE.set({})
    try:
        for protocol in config["protocols"]:
            runner = importlib.import_module(PROTOCOL_MODULES[protocol["type"]]).run_protocol
            try:
                rows += runner(checked, protocol, root, batch_size)
            except NonFiniteEmbeddings as exc:
                raise NonFiniteEmbeddings(
                    f"benchmark {_benchmark_name(protocol)!r}: the model's embeddings contain NaN or inf ({exc}); "
                    "nothing is scored "
                    "(check the checkpoint for NaN weights, e.g. from a diverged run)") from None
    finally:
        _RUN_CACHE.reset(token)
    plot_curves(rows, out)
    results = write_results(config.get("name", "suite"), rows, out)
    print(format_table(rows))
    return results
