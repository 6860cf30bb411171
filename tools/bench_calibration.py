"""Speaker score calibration on synthetic speakers with 1-8 s utterances: lower Cllr on held-out trials?

1. a synthetic speaker corpus (:func:`mlearn.data.synthetic.speech.make_speaker_dataset`) whose validation
   utterances last ``min_seconds``-``max_seconds`` (uniform), with its trial list;
2. the trials are split by speaker: dev trials use only the first half of the speakers, test trials only
   the second half (mixed non-target trials are dropped): no speaker of the test split is seen in the fit;
3. the scoring systems: the MFCC-mean baseline of the trials protocol (30 MFCCs of the Kaldi log-mel,
   averaged over time, cosine; no training needed) and, with ``--model``, a trained speaker model
   (whole utterances through :func:`mlearn.inference_audio.embed_wavs`, as ``mlearn eval`` does). Raw
   cosines are far from LLRs, and short utterances make them noisier, which is what calibration with
   durations corrects;
4. on the test split, per system: EER, minDCF(0.01), Cllr, minCllr and actual DCF(0.01) of the raw cosine
   (taken as the LLR) and of three calibrations: on the score alone, on the score and the log durations
   of both sides, and on those plus the score times each log duration (the trials protocol's features,
   :func:`mlearn.evaluation.metrics.calibration.quality_features`; all fitted by
   :func:`mlearn.evaluation.metrics.calibration.fit_calibration`, prior-weighted at P_target = 0.01).

The corpus is generated with seed ``CORPUS_SEED_OFFSET + --seed``: the quickstart corpora use seed 0,
and the same seed would draw the same voices, i.e. a trained quickstart model's training speakers.

  python tools/bench_calibration.py                    # ~1 min on 2 CPU cores
  python tools/bench_calibration.py --model runs/speaker_quickstart --utterances 40 --trials 400000  # ~4 min
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch

from mlearn import load_model
from mlearn.data.audio.fbank import INPUT_SCALE, kaldi_fbank
from mlearn.data.synthetic.speech import make_speaker_dataset
from mlearn.evaluation.metrics.calibration import (
    PRODUCT_PREFIX,
    fit_calibration,
    llr_metrics,
    quality_features,
)
from mlearn.evaluation.metrics.roc import roc_metrics
from mlearn.evaluation.protocols.trials import mfcc_mean, read_trials
from mlearn.inference_audio import embed_wavs

P_TARGET = 0.01
CORPUS_SEED_OFFSET = 1000


def mfcc_vectors(root: Path, keys: List[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """MFCC-mean vector and duration (s) of each wav ``root / key``."""
    vectors, seconds = {}, {}
    for key in keys:
        wave, rate = sf.read(str(root / key), dtype="float32")
        features = kaldi_fbank(torch.from_numpy(wave) * INPUT_SCALE, sample_rate=rate, num_mel_bins=80)
        vectors[key] = mfcc_mean(features.numpy())
        seconds[key] = len(wave) / rate
    return vectors, seconds


def split_by_speaker(enroll: List[str], test: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Boolean masks (dev, test) over the trials: both sides from the first / second half of the speakers."""
    speakers = sorted({key.split("/")[0] for key in enroll + test})
    first = set(speakers[: len(speakers) // 2])
    a = np.array([key.split("/")[0] in first for key in enroll])
    b = np.array([key.split("/")[0] in first for key in test])
    return a & b, ~a & ~b


def figures(llr: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    roc = roc_metrics(llr, labels)
    calibration = llr_metrics(llr, labels, p_targets=(P_TARGET,))
    return {"eer": float(roc["eer"]), "min_dcf": float(roc["min_dcf"]), "cllr": calibration["cllr"],
            "min_cllr": calibration["min_cllr"], "act_dcf": calibration["act_dcf"][str(P_TARGET)]}


def model_vectors(model: Any, root: Path, keys: List[str]) -> Dict[str, np.ndarray]:
    """The model's embedding of each wav ``root / key`` (whole utterance, as ``mlearn eval``)."""
    embeddings, _, failures = embed_wavs(model, [root / key for key in keys], progress=False)
    if failures:
        path, why = next(iter(failures.items()))
        raise RuntimeError(f"{len(failures)} synthetic wavs could not be embedded, e.g. {path}: {why}")
    return dict(zip(keys, embeddings["model"]))


def run(root: Path, speakers: int, utterances: int, trials: int, min_seconds: float, max_seconds: float,
        seed: int, model: Optional[Any] = None) -> Dict[str, Dict[str, float]]:
    make_speaker_dataset(root, num_speakers=1, utterances_per_speaker=1, num_val_speakers=speakers,
                         val_utterances_per_speaker=utterances, num_val_trials=trials,
                         min_seconds=min_seconds, max_seconds=max_seconds, augmentation_files=0,
                         seed=CORPUS_SEED_OFFSET + seed)
    listed = read_trials(root / "val_trials.txt")
    keys = sorted(set(listed.enroll) | set(listed.test))
    vectors, seconds = mfcc_vectors(root / "val", keys)
    systems = {"mfcc_mean": vectors}
    if model is not None:
        systems["model"] = model_vectors(model, root / "val", keys)
    enroll_s = np.array([seconds[e] for e in listed.enroll])
    test_s = np.array([seconds[t] for t in listed.test])
    labels = np.asarray(listed.labels, np.int64)
    dev, held_out = split_by_speaker(listed.enroll, listed.test)
    results: Dict[str, Dict[str, float]] = {}
    for system, system_vectors in systems.items():
        unit = {k: v / np.linalg.norm(v) for k, v in system_vectors.items()}
        scores = np.array([unit[e] @ unit[t] for e, t in zip(listed.enroll, listed.test)])
        features, names = quality_features(scores, enroll_s, test_s)
        results[f"{system}: raw cosine as LLR"] = figures(scores[held_out], labels[held_out])
        shift_only = [c for c, n in enumerate(names) if not n.startswith(PRODUCT_PREFIX)]
        for name, columns in (("calibrated: score", [names.index("score")]),
                              ("calibrated: score + log durations", shift_only),
                              ("calibrated: score + log durations + products", list(range(len(names))))):
            calibration = fit_calibration(features[dev][:, columns], labels[dev], prior=P_TARGET,
                                          feature_names=[names[c] for c in columns])
            llr = calibration.apply(features[held_out][:, columns])
            results[f"{system}: {name}"] = figures(llr, labels[held_out])
    results["_counts"] = {"dev_trials": float(dev.sum()), "test_trials": float(held_out.sum()),
                          "test_targets": float(labels[held_out].sum()),
                          "seconds_min": float(min(seconds.values())),
                          "seconds_max": float(max(seconds.values()))}
    return results


def markdown(results: Dict[str, Dict[str, float]]) -> str:
    lines = ["| scores (test split) | EER | minDCF0.01 | Cllr (bits) | minCllr (bits) | actDCF0.01 |",
             "|---|---|---|---|---|---|"]
    for name, f in results.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | {f['eer']:.4f} | {f['min_dcf']:.4f} | {f['cllr']:.4f} | "
                         f"{f['min_cllr']:.4f} | {f['act_dcf']:.4f} |")
    counts = results["_counts"]
    lines.append(f"\ndev trials {int(counts['dev_trials'])}, test trials {int(counts['test_trials'])} "
                 f"({int(counts['test_targets'])} targets); utterances of {counts['seconds_min']:.1f}-"
                 f"{counts['seconds_max']:.1f} s")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--utterances", type=int, default=20, help="per speaker")
    parser.add_argument("--trials", type=int, default=12000, help="before the split by speaker")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0, help=f"the corpus uses {CORPUS_SEED_OFFSET} + SEED")
    parser.add_argument("--model", default=None, help="a trained speaker model (model dir or run dir) to "
                                                      "calibrate next to the MFCC-mean baseline")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(args.model) if args.model else None
        results = run(Path(tmp) / "speakers", args.speakers, args.utterances, args.trials, args.min_seconds,
                      args.max_seconds, args.seed, model)
    table = markdown(results)
    print(table + f"{time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
