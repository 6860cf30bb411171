"""Typed options of the suite protocols, built from one entry of a suite YAML's ``protocols`` list.

``build_options(entry)`` picks the dataclass by ``type`` and returns ``Options(**entry)`` after one
check pass with one-line errors: an unknown key (naming it, the type and the accepted keys, as the
registries do), a missing required key, a value of the wrong type. Imports nothing heavy, so a whole
suite file is checked before any protocol module (FAISS, audio) is loaded.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type, Union


@dataclass(frozen=True)
class KeyType:
    """What a protocol key accepts: ``check(value)`` and its description for the error line."""

    check: Callable[[Any], bool]
    expected: str
    nullable: bool = False  # null means "the default"


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


_PATH = KeyType(_text, "a path (a non-empty string)")
_FLAG = KeyType(lambda v: isinstance(v, bool), "true or false")
_POSITIVE = KeyType(_int_at_least(1), "a positive integer")
_POSITIVE_OR_NULL = KeyType(_int_at_least(1), "a positive integer or null", nullable=True)


def _calibration_spec(value: Any) -> bool:
    """``{dev_trials: path, prior: p?}``, ``{file: path}`` or ``{from_model: true}`` (the trials
    protocol's ``calibration``)."""
    if value == {"from_model": True}:
        return True
    if not isinstance(value, dict) or not value or set(value) - {"dev_trials", "prior", "file"}:
        return False
    if ("dev_trials" in value) == ("file" in value) or ("file" in value and "prior" in value):
        return False
    prior = value.get("prior")
    prior_ok = prior is None or (isinstance(prior, float) and 0 < prior < 1)
    return prior_ok and all(_text(value[k]) for k in ("dev_trials", "file") if k in value)


def _rates(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in value)


QUALITY_SOURCES = ("head", "norm")  # as mlearn.inference.QUALITY_CHOICES (not imported: torch)
QUALITY_FMRS = (1e-3, 1e-4)  # each reported only when the impostor count supports it (>= 10 / FMR)
IJB_POOLINGS = ("standard", "quality")  # quality: an extra row pooled by image quality (g.5)

# Value types by key (a key means the same in every protocol type that accepts it).
KEY_TYPES: Dict[str, KeyType] = {
    "type": KeyType(_text, "a non-empty string"),
    "name": KeyType(lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() != "",
                    "a non-empty string"),
    **{key: _PATH for key in ("path", "trials", "wav_root", "query", "gallery")},
    "cohort": KeyType(_PATH.check, "a path (a non-empty string) or null", nullable=True),
    **{key: _FLAG for key in ("flip", "detector_score", "one_to_n", "subtract_mean")},
    "baselines": KeyType(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                         "a list of baseline names, e.g. [mfcc_mean]"),
    "ks": KeyType(lambda v: isinstance(v, list) and bool(v) and all(_int_at_least(1)(k) for k in v),
                  "a non-empty list of positive integers, e.g. [1, 5, 10]"),
    "index": KeyType(_text, "a non-empty string"),
    "workers": KeyType(_int_at_least(0), "a non-negative integer"),
    **{key: _POSITIVE for key in ("nlist", "nprobe", "hnsw_m", "ef_search")},
    **{key: _POSITIVE_OR_NULL for key in ("as_norm_top_n", "cohort_utts_per_speaker", "max_trials")},
    **{key: _PATH for key in ("folder", "pairs", "files_root")},
    **{key: _POSITIVE_OR_NULL for key in ("max_impostors", "max_genuine")},
    **{key: KeyType(_int_at_least(0), "a non-negative integer") for key in ("seed", "bootstrap")},
    "calibration": KeyType(
        _calibration_spec,
        "a mapping {dev_trials: <trial list>, prior: <P_target in (0, 1), default 0.01>} (fit on it) or "
        "{file: <calibration.json>} (apply a stored one) or {from_model: true} (apply the one stored in "
        "the exported model)", nullable=True),
    **{key: KeyType(_rates, "a non-empty list of rates in (0, 1), e.g. [0.01, 0.001, 0.0001]")
       for key in ("fars", "quality_fmrs")},
    "quality": KeyType(lambda v: isinstance(v, list) and all(q in QUALITY_SOURCES for q in v),
                       "a list of quality sources from [head, norm], e.g. [head, norm]"),
    "pooling": KeyType(lambda v: v in IJB_POOLINGS, f"one of {list(IJB_POOLINGS)}"),
}


@dataclass(frozen=True)
class BinOptions:
    """``type: bin``: one insightface ``.bin`` pair set (``path`` relative to the data root)."""

    path: str
    name: Optional[str] = None
    flip: bool = True
    baselines: List[str] = field(default_factory=list)
    quality: List[str] = field(default_factory=list)  # quality-aware rows (docs/protocols.md g.4)
    quality_fmrs: List[float] = field(default_factory=lambda: list(QUALITY_FMRS))

    @property
    def benchmark(self) -> str:
        return self.name or Path(self.path).stem


@dataclass(frozen=True)
class IJBOptions:
    """``type: ijb``: ``name`` IJBB / IJBC picks the meta file names; ``path`` the folder with
    ``loose_crop/`` and ``meta/`` (default: the name); ``workers``: decoding threads (default
    min(8, CPUs)); ``quality`` / ``quality_fmrs`` quality-aware 1:1 rows and ``pooling: quality`` an
    extra 1:1 row pooled by image quality (docs/protocols.md g.5)."""

    name: str
    path: Optional[str] = None
    flip: bool = True
    detector_score: bool = True
    one_to_n: bool = False
    workers: Optional[int] = None
    quality: List[str] = field(default_factory=list)
    quality_fmrs: List[float] = field(default_factory=lambda: list(QUALITY_FMRS))
    pooling: str = "standard"  # "quality": adds the quality-pooled 1:1 rows, the standard ones stay

    @property
    def benchmark(self) -> str:
        return self.name


@dataclass(frozen=True)
class TrialsOptions:
    """``type: trials``: a speaker-verification trial list; see :mod:`mlearn.evaluation.protocols.trials`."""

    trials: str
    wav_root: str
    name: Optional[str] = None
    cohort: Optional[str] = None
    as_norm_top_n: Optional[int] = 300
    subtract_mean: Optional[bool] = None  # None: true with a cohort
    baselines: List[str] = field(default_factory=list)
    cohort_utts_per_speaker: Optional[int] = None
    max_trials: Optional[int] = None
    calibration: Optional[Dict[str, Any]] = None  # {dev_trials, prior}, {file}, {from_model}; trials.run

    @property
    def benchmark(self) -> str:
        return self.name or Path(self.trials).stem


@dataclass(frozen=True)
class RetrievalOptions:
    """``type: retrieval``: ``query`` (and ``gallery``; absent = leave-one-out over the query set);
    index parameters left ``None`` take :func:`~mlearn.evaluation.metrics.retrieval.retrieval_metrics`'
    defaults and are not reported."""

    query: str
    name: Optional[str] = None
    gallery: Optional[str] = None
    ks: List[int] = field(default_factory=lambda: [1, 5, 10])
    index: str = "flat"
    flip: bool = False
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    hnsw_m: Optional[int] = None
    ef_search: Optional[int] = None
    workers: int = 0

    @property
    def benchmark(self) -> str:
        return self.name or Path(self.query).stem

    def index_options(self) -> Dict[str, Any]:
        """The index parameters the suite entry sets."""
        values = {"nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                  "ef_search": self.ef_search}
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class OwnDataOptions:
    """``type: own_data``: the user's files, exactly one of ``folder`` (``<folder>/<identity>/<file>``),
    ``pairs`` (``path1 path2 label`` lines) or ``trials`` (a speaker trial list); list paths start at
    ``files_root`` (default: the list's folder). See :mod:`mlearn.evaluation.protocols.own_data`."""

    folder: Optional[str] = None
    pairs: Optional[str] = None
    trials: Optional[str] = None
    files_root: Optional[str] = None
    name: Optional[str] = None
    max_impostors: Optional[int] = 1_000_000
    max_genuine: Optional[int] = 1_000_000
    seed: int = 0
    fars: List[float] = field(default_factory=lambda: [0.01, 0.001, 0.0001])
    bootstrap: int = 200
    ks: List[int] = field(default_factory=lambda: [1, 5])
    workers: int = 0
    quality: List[str] = field(default_factory=list)  # quality-aware rows (docs/protocols.md g.4)
    quality_fmrs: List[float] = field(default_factory=lambda: list(QUALITY_FMRS))

    def __post_init__(self) -> None:
        given = [k for k in ("folder", "pairs", "trials") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"own_data protocol {self.name or ''}: set exactly one of folder, pairs, trials "
                             f"(got {given or 'none'})".replace("  ", " "))
        object.__setattr__(self, "fars", [float(f) for f in self.fars])

    @property
    def benchmark(self) -> str:
        return self.name or Path(str(self.folder or self.pairs or self.trials)).stem or "own_data"


ProtocolOptions = Union[BinOptions, IJBOptions, TrialsOptions, RetrievalOptions, OwnDataOptions]
OPTIONS: Dict[str, Type[Any]] = {"bin": BinOptions, "ijb": IJBOptions, "trials": TrialsOptions,
                                 "retrieval": RetrievalOptions, "own_data": OwnDataOptions}


def accepted_keys(kind: str) -> List[str]:
    """The keys a ``kind`` entry accepts, ``type`` first."""
    return ["type", *(f.name for f in fields(OPTIONS[kind]))]


def required_keys(kind: str) -> List[str]:
    """The keys a ``kind`` entry must set (the option fields without a default)."""
    return [f.name for f in fields(OPTIONS[kind]) if f.default is MISSING and f.default_factory is MISSING]


def build_options(entry: Any, where: str = "protocol") -> Any:
    """``Options(**entry)`` of the entry's ``type`` (one of :data:`OPTIONS`), checked first: a
    ``ValueError`` starting with ``where`` names an unknown key (with the accepted ones), a missing
    required key or a value of the wrong type."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping {{type: ..., ...}}, got {entry!r:.80}")
    kind = entry.get("type")
    if kind not in OPTIONS:
        raise ValueError(f"{where}: type={kind!r}; expected one of {list(OPTIONS)}")
    if entry.get("name") is not None:
        where += f" ({entry['name']})"
    accepted = accepted_keys(kind)
    unknown = sorted(set(entry) - set(accepted), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for type {kind}; accepted: {accepted}")
    required = required_keys(kind)
    for key in required:
        if entry.get(key) is None:
            raise ValueError(f"{where}: missing required key {key!r} (type {kind} needs {required})")
    for key, value in entry.items():
        expected = KEY_TYPES[key]
        if not (value is None and expected.nullable) and not expected.check(value):
            raise ValueError(f"{where}: {key}={value!r:.80}; expected {expected.expected}")
    values = {k: v for k, v in entry.items() if k != "type"}
    if values.get("name") is not None:
        values["name"] = str(values["name"])
    return OPTIONS[kind](**values)
