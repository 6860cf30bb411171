"""Run an evaluation suite (YAML) on a model with ``.embed(images, normalize=False)``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import yaml
from tqdm import tqdm

from mlearn.data.bins import read_bin
from mlearn.evaluation.roc import roc_metrics
from mlearn.evaluation.verification import kfold_verification

PathLike = Union[str, Path]
PROTOCOL_TYPES = ("bin",)
BASELINES = ("raw_pixels",)


def run_suite(model: Any, suite: Union[PathLike, Dict[str, Any]], data_root: Optional[PathLike] = None,
              out_dir: PathLike = "eval", batch_size: int = 128) -> Dict[str, Any]:
    """Evaluate ``model`` on every protocol of ``suite``; print one table, write results.json + plots."""
    config = yaml.safe_load(Path(suite).read_text()) if not isinstance(suite, dict) else suite
    root = Path(data_root) if data_root else Path.cwd()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for index, protocol in enumerate(config.get("protocols", [])):
        kind = protocol.get("type")
        if kind not in PROTOCOL_TYPES:
            raise ValueError(f"suite protocol {index}: type={kind!r}; expected one of {list(PROTOCOL_TYPES)}")
        rows += _bin_protocol(model, protocol, root, batch_size)
    _plot(rows, out)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    results = {"suite": config.get("name", "suite"), "results": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(format_table(rows))
    return results


def _bin_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int) -> List[Dict[str, Any]]:
    name = protocol.get("name") or Path(protocol["path"]).stem
    path = Path(protocol["path"])
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found (see datasets/face_bins.md for where to get it)")
    flip = bool(protocol.get("flip", True))
    images, issame = read_bin(path)
    embed = lambda batch: model.embed(batch, normalize=False)  # noqa: E731
    rows = [verification_row(name, "model", bin_embeddings(embed, images, batch_size, flip), issame, flip)]
    for baseline in protocol.get("baselines", []):
        if baseline not in BASELINES:
            raise ValueError(f"{name}: baseline={baseline!r}; expected one of {list(BASELINES)}")
        pixels = (images.reshape(len(images), -1).astype(np.float32) - 127.5) / 127.5
        rows.append(verification_row(name, "raw_pixels", pixels, issame, False))
    return rows


def bin_embeddings(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 128,
                   flip: bool = True, progress: bool = True) -> np.ndarray:
    """Raw embeddings [N, D] of uint8 [N, H, W, 3] images; with ``flip`` the embedding of the
    horizontally flipped image is added before any normalisation (insightface's flip fusion)."""
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="embedding", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        emb = embed(batch)
        if flip:
            emb = emb + embed(np.ascontiguousarray(batch[:, :, ::-1]))
        chunks.append(emb)
    return np.concatenate(chunks)


def verification_row(name: str, method: str, emb: np.ndarray, issame: np.ndarray, flip: bool) -> Dict[str, Any]:
    """10-fold accuracy and ROC metrics of pairs (emb[2i], emb[2i+1]) as one report row."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    verification = kfold_verification(unit[0::2], unit[1::2], issame)
    scores = (unit[0::2] * unit[1::2]).sum(1)
    return {"benchmark": name, "method": method, "pairs": int(len(issame)),
            "fusion": "flip-sum" if flip else "none", "distance": "squared L2 (10-fold) / cosine (ROC)",
            "normalisation": "L2", "eer_variant": "NIST linear interpolation", "p_target": 0.01,
            **verification, **roc_metrics(scores, issame), "_scores": scores, "_labels": issame}


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = f"{'benchmark':<16}{'method':<12}{'pairs':>7}  {'fusion':<9}{'accuracy':>18}{'TAR@1e-3':>10}{'EER':>8}{'AUC':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['benchmark']:<16}{r['method']:<12}{r['pairs']:>7}  {r['fusion']:<9}"
                     f"{r['accuracy'] * 100:>10.2f} ± {r['accuracy_std'] * 100:<5.2f}"
                     f"{r['tar_at_far'][1e-3] * 100:>10.2f}{r['eer'] * 100:>8.2f}{r['auc']:>8.4f}")
    lines.append("accuracy: LFW 10-fold (%), TAR@FAR=1e-3 (%): nearest FPR on sklearn ROC, EER (%): NIST interpolation")
    return "\n".join(lines)


def _plot(rows: List[Dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        fpr, tpr, _ = roc_curve(r["_labels"], r["_scores"])
        ax.plot(np.maximum(fpr, 1e-6), tpr, label=f"{r['benchmark']} {r['method']} (AUC {r['auc']:.3f})")
    ax.set(xscale="log", xlabel="FAR", ylabel="TAR", title="ROC", xlim=(1e-4, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
