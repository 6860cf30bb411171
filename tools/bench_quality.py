"""CR-FIQA on synthetic faces with graded degradations: does the learned quality rank bad images first?

One flow, on CPU, everything but the held-out folder in memory:

1. training set: synthetic identities with a mid-frequency skin pattern (:mod:`mlearn.data.synthetic.faces`,
   ``detail``), rendered clean, each image then degraded with probability ``degrade_prob`` by one kind of
   :mod:`mlearn.data.synthetic.degrade` at a strength uniform in [0, ``train_max_strength``] (as real
   corpora hold some blurred, noisy, small or occluded faces, from which CR-FIQA learns);
2. held-out set: ``tools/make_degraded_faces.py --clean`` (disjoint identities, every image at a known
   kind and strength of the full grid 0..1, listed in ``degradations.csv``);
3. two runs with the same seed and budget: a small IResNet + ArcFace without and with the CR-FIQA head
   (``EmbeddingModule(quality=QualityConfig())``: smooth-L1, beta 0.5, weight 10; ``--head-only`` for
   ``train_backbone=False``);
4. on the held-out set: Spearman(quality, degradation strength) of the CR-FIQA head and of the embedding-norm
   baseline; the quality-aware verification rows over ALL pairs of the held-out set
   (:func:`mlearn.evaluation.metrics.quality.quality_rows`: EDC pAUC to 20% / 30% and CR-FIQA's ERC, FNMR
   at FMR = 1e-3, against seeded random rejection and against an oracle that rejects by the known
   strength: the best any quality measure can do on that set); the recognition accuracy of both runs
   (10-fold accuracy on all genuine pairs plus as many seeded impostor pairs, and EER over all pairs);
   the same quality figures on the held-out images up to ``mild_max_strength`` alone (the issue's
   acceptance set: on the full grid, where a third of the images carry almost no identity, even the
   oracle ends only 3-5 std below random);
5. the training step time with and without the quality head, measured side by side in this process
   (alternating, median of ``step_reps`` forward + backward passes on the same batch).

  python tools/bench_quality.py --head-only            # ~10 min per seed on 2 CPU cores
  python tools/bench_quality.py --seeds 0 1 2 --head-only --out /tmp/bench_quality.md
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

from mlearn.data.synthetic.degrade import degradation_kinds, degrade
from mlearn.data.synthetic.faces import render_face, sample_identity
from mlearn.evaluation.metrics.quality import pair_quality, quality_rows
from mlearn.evaluation.metrics.roc import roc_metrics
from mlearn.evaluation.metrics.verification import kfold_verification
from mlearn.heads import ArcFace
from mlearn.inference import instantiate, l2_normalize
from mlearn.module import EmbeddingModule, HeadConfig
from mlearn.quality import QualityConfig
from mlearn.schedules import LRSchedule

ROOT = Path(__file__).resolve().parents[1]
Split = Tuple[torch.Tensor, torch.Tensor]  # images [N, 3, S, S] normalised, labels [N]
SPEC = {"class_path": "mlearn.models.IResNet",
        "init_args": {"layers": [1, 1, 1], "width": 16, "embedding_size": 64, "input_size": 48,
                      "stem_stride": 2}}


@dataclass
class Sizes:
    """Corpus and training sizes of one run."""

    train_ids: int = 400
    train_per_id: int = 60
    degrade_prob: float = 0.5
    train_max_strength: float = 0.5  # training degradations: strength uniform in [0, this]
    epochs: int = 8
    batch_size: int = 32
    heldout_ids: int = 50
    heldout_per_id: int = 12
    draws: int = 20  # random-rejection draws
    step_reps: int = 20
    quality_weight: float = 10.0
    lr_scale: float = 0.01  # QualityConfig.lr_scale
    train_backbone: bool = True  # QualityConfig.train_backbone
    width: int = 32
    embedding_size: int = 128
    input_size: int = 48
    detail: float = 30.0  # std of the identities' mid-frequency skin pattern (sample_identity)
    mild_max_strength: float = 0.6  # the second view of the held-out set: images up to this strength


# ------------------------------------------------------------------------------------------ data


def _normalised(images: List[np.ndarray]) -> torch.Tensor:
    array = (np.stack(images).astype(np.float32) - 127.5) / 127.5
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def training_data(sizes: Sizes, seed: int) -> Split:
    """The training split: identities drawn first from ``default_rng(seed)`` (the held-out tool skips 300
    draws of the same stream, so the two never share an identity); clean renders, a ``degrade_prob``
    share of them degraded by one kind at a strength uniform in [0, ``train_max_strength``]."""
    rng = np.random.default_rng(seed)
    people = [sample_identity(rng, sizes.detail) for _ in range(sizes.train_ids)]
    kinds = degradation_kinds()
    images, labels = [], []
    for label, person in enumerate(people):
        for _ in range(sizes.train_per_id):
            image = render_face(person, rng, sizes.input_size, clean=True)
            if rng.random() < sizes.degrade_prob:
                strength = sizes.train_max_strength * float(rng.random())
                image = degrade(image, kinds[int(rng.integers(len(kinds)))], strength, rng)
            images.append(image)
            labels.append(label)
    return _normalised(images), torch.tensor(labels)


def heldout_data(sizes: Sizes, seed: int, folder: Path) -> Dict[str, Any]:
    """Write the held-out folder with ``tools/make_degraded_faces.py`` and read it back."""
    tool = ROOT / "tools" / "make_degraded_faces.py"
    subprocess.run([sys.executable, str(tool), "--out", str(folder), "--identities", str(sizes.heldout_ids),
                    "--images-per-identity", str(sizes.heldout_per_id), "--size",
                    str(sizes.input_size), "--seed", str(seed), "--detail", str(sizes.detail),
                    "--clean", "--no-progress"], check=True)
    with open(folder / "degradations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = [np.asarray(Image.open(folder / row["file"]).convert("RGB")) for row in rows]
    identities = {name: k for k, name in enumerate(sorted({row["identity"] for row in rows}))}
    return {"images": _normalised(images),
            "labels": np.array([identities[row["identity"]] for row in rows]),
            "strength": np.array([float(row["strength"]) for row in rows]),
            "kind": np.array([row["kind"] for row in rows])}


# -------------------------------------------------------------------------------------- training


def make_module(num_classes: int, with_quality: bool, sizes: Sizes) -> EmbeddingModule:
    spec = {**SPEC, "init_args": {**SPEC["init_args"], "width": sizes.width,
                                  "embedding_size": sizes.embedding_size, "input_size": sizes.input_size}}
    quality = QualityConfig(weight=sizes.quality_weight, lr_scale=sizes.lr_scale,
                            train_backbone=sizes.train_backbone) if with_quality else None
    return EmbeddingModule(instantiate(spec), HeadConfig(margin=ArcFace(s=32.0, m=0.3)),
                           num_classes=num_classes,
                           optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
                           schedule=LRSchedule("cosine"), quality=quality)


def train(module: EmbeddingModule, data: Split, sizes: Sizes, seed: int) -> float:
    """Fit ``module``; returns the seconds spent."""
    loader = DataLoader(TensorDataset(*data), batch_size=sizes.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=sizes.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small batches, no workers: Lightning's hints
        trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - started


def step_times(data: Split, sizes: Sizes, seed: int) -> Dict[str, float]:
    """Median seconds of one training step (forward + backward, no optimizer) without and with the
    quality head, alternating on the same batch."""
    x, y = data[0][: sizes.batch_size], data[1][: sizes.batch_size]
    modules = {}
    for name, with_quality in (("without", False), ("with", True)):
        torch.manual_seed(seed)
        module = make_module(int(data[1].max()) + 1, with_quality, sizes)
        module.configure_model()
        modules[name] = module.train()
    times: Dict[str, List[float]] = {name: [] for name in modules}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        for rep in range(sizes.step_reps + 2):
            for name, module in modules.items():
                module.zero_grad(set_to_none=True)
                started = time.perf_counter()
                module.training_step((x, y), 0).backward()
                if rep >= 2:  # warm-up
                    times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"ms_without": medians["without"] * 1e3, "ms_with": medians["with"] * 1e3,
            "ratio": medians["with"] / medians["without"]}


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def outputs(module: EmbeddingModule, images: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(raw embeddings [N, D], CR-FIQA quality [N] or None without a head)."""
    module.eval()
    embeddings = torch.cat([module.backbone(chunk) for chunk in images.split(256)])
    head = getattr(module, "quality_head", None)
    quality = None if head is None else head(embeddings).numpy()
    return embeddings.numpy(), quality


def evaluate(module: EmbeddingModule, heldout: Dict[str, Any], sizes: Sizes, seed: int) -> Dict[str, Any]:
    embeddings, quality = outputs(module, heldout["images"])
    norm = np.linalg.norm(embeddings, axis=1)
    unit = l2_normalize(embeddings)
    labels = heldout["labels"]
    i, j = np.triu_indices(len(labels), k=1)
    scores = np.einsum("ij,ij->i", unit[i], unit[j])
    same = labels[i] == labels[j]
    roc = roc_metrics(scores, same.astype(np.int64), fars=(1e-3,))
    rng = np.random.default_rng(seed)
    genuine = np.flatnonzero(same)
    impostor = rng.choice(np.flatnonzero(~same), size=genuine.size, replace=False)
    pick = rng.permutation(np.concatenate([genuine, impostor]))  # the folds are contiguous: mix the kinds
    accuracy = kfold_verification(unit[i[pick]], unit[j[pick]], same[pick])
    result: Dict[str, Any] = {"eer": float(roc["eer"]),
                              "tar_at_far_1e-3": float(roc["tar_at_far_strict"][1e-3]),
                              "accuracy": float(accuracy["accuracy"]),
                              "mean_score_by_strength": _mean_by_strength(scores, same, heldout["strength"],
                                                                          i, j),
                              "mean_score_vs_clean": _mean_vs_clean(scores, same, heldout, i, j)}
    qualities = {"norm": norm} if quality is None else {"cr_fiqa": quality, "norm": norm}
    # the known degradation strength as a quality: the best any quality measure can do on this set (the
    # per-image jitter, far below the grid's 0.2 step, breaks ties at random so EDC can reject 1% steps)
    qualities["oracle"] = -heldout["strength"] + 1e-3 * np.random.default_rng(seed).random(len(labels))
    everything = np.ones(len(labels), dtype=bool)
    result.update(_quality_view(scores, same, i, j, qualities, heldout["strength"], everything,
                                "synthetic_degraded", sizes, seed))
    if quality is not None:
        kinds = heldout["kind"]
        result["spearman_cr_fiqa_by_kind"] = {
            kind: float(spearmanr(quality[kinds == kind], heldout["strength"][kinds == kind])[0])
            for kind in sorted(set(kinds))}
    # the same models on the images up to mild_max_strength only: a set whose bad share fits the 30% budget
    mild = heldout["strength"] <= sizes.mild_max_strength
    result["mild"] = {"max_strength": sizes.mild_max_strength, "images": int(mild.sum()),
                      **_quality_view(scores, same, i, j, qualities, heldout["strength"], mild,
                                      "synthetic_degraded_mild", sizes, seed)}
    return result


def _quality_view(scores: np.ndarray, same: np.ndarray, i: np.ndarray, j: np.ndarray,
                  qualities: Dict[str, np.ndarray], strength: np.ndarray, images: np.ndarray,
                  benchmark: str, sizes: Sizes, seed: int) -> Dict[str, Any]:
    """Spearman(quality, strength) per quality [N] and the quality rows over the pairs (i, j) whose two
    images are both in the boolean mask ``images`` [N]."""
    keep = images[i] & images[j]
    pairs = {name: pair_quality(q[i[keep]], q[j[keep]]) for name, q in qualities.items()}
    rows, message = quality_rows(scores[keep], same[keep], pairs, benchmark=benchmark, fmrs=(1e-3,),
                                 draws=sizes.draws, seed=seed)
    view: Dict[str, Any] = {f"spearman_{name}": float(spearmanr(q[images], strength[images])[0])
                            for name, q in qualities.items()}
    return {**view, "quality_rows": [row.values for row in rows], "fmr_message": message}


def _pair_means(scores: np.ndarray, same: np.ndarray, pick: np.ndarray) -> Dict[str, float]:
    """Mean genuine and impostor score of the pairs in the boolean mask ``pick``."""
    return {"genuine": float(scores[pick & same].mean()), "impostor": float(scores[pick & ~same].mean())}


def _mean_by_strength(scores: np.ndarray, same: np.ndarray, strength: np.ndarray, i: np.ndarray,
                      j: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Mean genuine and impostor cosine by the pair's worse degradation strength (the max of the two)."""
    worst = np.maximum(strength[i], strength[j])
    return {f"{level:g}": _pair_means(scores, same, worst == level) for level in np.unique(worst)}


def _mean_vs_clean(scores: np.ndarray, same: np.ndarray, heldout: Dict[str, Any], i: np.ndarray,
                   j: np.ndarray) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean genuine and impostor cosine of degraded faces against clean ones (strength 0), by the
    degraded side's kind and strength: how much identity each degradation leaves."""
    strength, kind = heldout["strength"], heldout["kind"]
    one_clean = (strength[i] == 0) != (strength[j] == 0)
    other = np.where(strength[i] == 0, j, i)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in sorted(set(kind)):
        table[str(name)] = {}
        for level in np.unique(strength[strength > 0]):
            pick = one_clean & (kind[other] == name) & (strength[other] == level)
            table[str(name)][f"{level:g}"] = _pair_means(scores, same, pick)
    return table


def run(sizes: Sizes, seed: int, workdir: Path) -> Dict[str, Any]:
    started = time.perf_counter()
    data = training_data(sizes, seed)
    heldout = heldout_data(sizes, seed, workdir / f"heldout_seed{seed}")
    results: Dict[str, Any] = {"seed": seed, "sizes": asdict(sizes), "heldout_images": len(heldout["labels"])}
    for name, with_quality in (("baseline", False), ("cr_fiqa", True)):
        torch.manual_seed(seed)
        module = make_module(int(data[1].max()) + 1, with_quality, sizes)
        seconds = train(module, data, sizes, seed)
        results[name] = {**evaluate(module, heldout, sizes, seed), "train_seconds": round(seconds, 1)}
    results["step_time"] = step_times(data, sizes, seed)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# ---------------------------------------------------------------------------------------- report


def _row_value(rows: List[Dict[str, Any]], quality: str, convention: str, key: str) -> Any:
    for row in rows:
        if row["quality"] == quality and row["convention"].startswith(convention):
            return row[key]
    return float("nan")


_VIEW_HEADER = ("| Spearman CR-FIQA | Spearman norm | EDC pAUC30 CR-FIQA | EDC pAUC30 norm "
                "| EDC pAUC30 oracle | random (mean ± std) | below random (std) CR-FIQA / norm / oracle "
                "| ERC AUC CR-FIQA / norm / random ")
_VIEW_COLUMNS = 8


def _view_cells(view: Dict[str, Any]) -> str:
    """The quality columns of one view (all images, or the mild ones) of one seed."""
    rows = view["quality_rows"]
    return (f"| {view['spearman_cr_fiqa']:.3f} | {view['spearman_norm']:.3f} "
            f"| {_row_value(rows, 'cr_fiqa', 'EDC', 'edc_pauc_0.30'):.4f} "
            f"| {_row_value(rows, 'norm', 'EDC', 'edc_pauc_0.30'):.4f} "
            f"| {_row_value(rows, 'oracle', 'EDC', 'edc_pauc_0.30'):.4f} "
            f"| {_row_value(rows, 'cr_fiqa', 'EDC', 'random_edc_pauc_0.30_mean'):.4f} ± "
            f"{_row_value(rows, 'cr_fiqa', 'EDC', 'random_edc_pauc_0.30_std'):.4f} "
            f"| " + " / ".join(f"{_row_value(rows, name, 'EDC', 'edc_pauc_0.30_below_random_std'):.1f}"
                               for name in ("cr_fiqa", "norm", "oracle")) + " "
            f"| {_row_value(rows, 'cr_fiqa', 'ERC', 'erc_auc'):.4f} / "
            f"{_row_value(rows, 'norm', 'ERC', 'erc_auc'):.4f} / "
            f"{_row_value(rows, 'cr_fiqa', 'ERC', 'random_erc_auc_mean'):.4f} ")


def markdown(results: List[Dict[str, Any]]) -> str:
    """Two tables: every held-out image, then the images up to ``mild_max_strength``."""
    lines = ["| seed " + _VIEW_HEADER + "| accuracy with / without | EER with / without "
             "| step time with / without |", "|---" * (_VIEW_COLUMNS + 4) + "|"]
    for r in results:
        q, b, step = r["cr_fiqa"], r["baseline"], r["step_time"]
        lines.append(f"| {r['seed']} " + _view_cells(q)
                     + f"| {q['accuracy'] * 100:.2f} / {b['accuracy'] * 100:.2f} "
                     f"| {q['eer']:.4f} / {b['eer']:.4f} "
                     f"| {step['ratio']:.3f}x ({step['ms_with']:.1f} / {step['ms_without']:.1f} ms) |")
    lines += ["", "| seed | images (strength ≤ max) " + _VIEW_HEADER + "|",
              "|---" * (_VIEW_COLUMNS + 2) + "|"]
    for r in results:
        mild = r["cr_fiqa"]["mild"]
        lines.append(f"| {r['seed']} | {mild['images']} (≤ {mild['max_strength']:g}) "
                     + _view_cells(mild) + "|")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=Sizes.epochs)
    parser.add_argument("--train-ids", type=int, default=Sizes.train_ids)
    parser.add_argument("--train-per-id", type=int, default=Sizes.train_per_id)
    parser.add_argument("--quality-weight", type=float, default=Sizes.quality_weight)
    parser.add_argument("--lr-scale", type=float, default=Sizes.lr_scale,
                        help="the quality head's learning rate relative to the backbone's")
    parser.add_argument("--head-only", action="store_true",
                        help="stop the quality loss at the embedding (QualityConfig.train_backbone=False)")
    parser.add_argument("--width", type=int, default=Sizes.width)
    parser.add_argument("--embedding-size", type=int, default=Sizes.embedding_size)
    parser.add_argument("--input-size", type=int, default=Sizes.input_size, help="image side in px")
    parser.add_argument("--degrade-prob", type=float, default=Sizes.degrade_prob)
    parser.add_argument("--train-max-strength", type=float, default=Sizes.train_max_strength,
                        help="training degradations' strength is uniform in [0, this]")
    parser.add_argument("--detail", type=float, default=Sizes.detail,
                        help="std (grey levels) of the identities' mid-frequency skin pattern; 0 = none")
    parser.add_argument("--mild-max-strength", type=float, default=Sizes.mild_max_strength,
                        help="also report the held-out images up to this strength alone")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    sizes = Sizes(epochs=args.epochs, train_ids=args.train_ids, train_per_id=args.train_per_id,
                  quality_weight=args.quality_weight, lr_scale=args.lr_scale,
                  train_backbone=not args.head_only, width=args.width,
                  embedding_size=args.embedding_size,
                  degrade_prob=args.degrade_prob, train_max_strength=args.train_max_strength,
                  input_size=args.input_size, detail=args.detail,
                  mild_max_strength=args.mild_max_strength)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results.append(run(sizes, seed, Path(tmp)))
            print(f"seed {seed} done in {results[-1]['seconds']} s", flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
