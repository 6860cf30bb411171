"""Side-by-side training table of the loss criteria (mlearn.heads.criteria) against ArcFace/AAM softmax.

Every criterion trains the same quickstart recipe (backbone, data, budget, seed list) through ``mlearn
train``: the face quickstart (configs/face/quickstart.yaml, the synthetic face corpus) and the speaker
quickstart (configs/speaker/quickstart.yaml), each with ``--config configs/<modality>/criteria/<name>.yaml``
stacked on top (``arcface``: the quickstart itself, the margin softmax CE). Each run is then evaluated
with ``mlearn eval`` on the quickstart's disjoint held-out identities:

  face      evaluation/quickstart.yaml: 10-fold accuracy, TAR@FAR=1e-3 and EER on the verification pairs
  speaker   evaluation/speaker_quickstart.yaml: EER (NIST) and minDCF (p_target = 0.01) on the trials

The table gives mean ± population std over the seeds, the training time per optimizer step (median of
the logged ``train/images_per_sec``, converted with the global batch) and each criterion's difference to
ArcFace on the first metric; a criterion that does worse than ArcFace on this data is marked as such.
Runs land in ``--out/<modality>/<criterion>/seed<N>`` (``.../<criterion>/lr<LR>/seed<N>`` with ``--lr``); a
finished run (its results.json exists) is reused, so an interrupted table resumes.

Examples:
  python tools/bench_criteria.py                                     # the full table (hours on a CPU)
  python tools/bench_criteria.py --modalities face --seeds 0 --max-epochs 1 --limit-train-batches 20
  python tools/bench_criteria.py --markdown evaluation/LOSSES_table.md
  python tools/bench_criteria.py --modalities speaker --criteria arcface sphereface2 --lr 0.01
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "arcface"
SUITES = {"face": "evaluation/quickstart.yaml", "speaker": "evaluation/speaker_quickstart.yaml"}
# (label, extractor from the model row of results.json, higher is better, decimals in the table)
METRICS = {
    "face": [("accuracy %", lambda r: 100 * r["accuracy"], True, 2),
             ("TAR@1e-3 %", lambda r: 100 * _by_far(r["tar_at_far"], 1e-3), True, 2),
             ("EER %", lambda r: 100 * r["eer"], False, 2)],
    "speaker": [("EER %", lambda r: 100 * r["eer"], False, 2),
                ("minDCF0.01", lambda r: _by_far(r["min_dcf"], 0.01), False, 3)],
}


def _by_far(values: Dict, key: float) -> float:
    """A value of a {far: value} dict whose keys became strings in JSON ("0.001", "1e-3")."""
    for k, v in values.items():
        if math.isclose(float(k), key):
            return float(v)
    raise KeyError(f"{key} not among {list(values)}")


def _mlearn(args: Sequence[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "mlearn", *args]
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {done.returncode}); see {log}")


def run_one(modality: str, criterion: str, seed: int, out: Path, extra: List[str],
            lr: Optional[float] = None) -> Dict[str, float]:
    """Train and evaluate one (modality, criterion, seed) -> {metric label: value, 'ms/step': value}.

    ``lr``: the optimizer's learning rate instead of the quickstart's (runs kept apart under ``lr<LR>``)."""
    run = out / modality / criterion / (f"lr{lr:g}" if lr is not None else "") / f"seed{seed}"
    results = run / "eval" / "results.json"
    if not results.is_file():
        run.parent.mkdir(parents=True, exist_ok=True)
        configs = ["--config", f"configs/{modality}/quickstart.yaml"]
        if criterion != BASELINE:
            configs += ["--config", f"configs/{modality}/criteria/{criterion}.yaml"]
        log = run.with_suffix(".log")
        if lr is not None:
            extra = [*extra, "--model.optimizer.init_args.lr", f"{lr:g}"]
        _mlearn(["train", *configs, "--seed_everything", str(seed), "--run_dir", str(run), *extra], log)
        _mlearn(["eval", "--model", str(run), "--suite", SUITES[modality], "--out", str(run / "eval")], log)
    rows = json.loads(results.read_text())["results"]
    model = next(r for r in rows if r.get("method") == "model")
    values = {label: float(get(model)) for label, get, _, _ in METRICS[modality]}
    values["ms/step"] = _ms_per_step(run)
    return values


def _ms_per_step(run: Path) -> float:
    config = yaml.safe_load((run / "config.yaml").read_text())
    batch = int(config["data"]["init_args"]["batch_size"]) * int(config["trainer"].get("devices") or 1)
    with (run / "metrics.csv").open(newline="") as f:
        rates = [float(row["train/images_per_sec"]) for row in csv.DictReader(f)
                 if row.get("train/images_per_sec")]
    return 1000.0 * batch / statistics.median(rates) if rates else float("nan")


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table(modality: str, results: Dict[str, List[Dict[str, float]]]) -> List[str]:
    """Markdown rows: criterion | metrics mean ± std | ms/step | Δ first metric vs ArcFace."""
    decimals = {label: digits for label, _, _, digits in METRICS[modality]}
    labels = list(decimals) + ["ms/step"]
    first, _, higher, _ = METRICS[modality][0]
    lines = ["| criterion | seeds | " + " | ".join(labels) + f" | Δ {first} vs {BASELINE} |",
             "|---" * (len(labels) + 3) + "|"]
    base = results.get(BASELINE)
    base_mean = _mean_std([r[first] for r in base])[0] if base else None
    for criterion, runs in results.items():
        cells = []
        for label in labels:
            mean, std = _mean_std([r[label] for r in runs])
            digits = decimals.get(label, 0)  # ms/step: whole milliseconds
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        delta = "-"
        if base_mean is not None and criterion != BASELINE:
            diff = _mean_std([r[first] for r in runs])[0] - base_mean
            worse = diff < 0 if higher else diff > 0
            delta = f"{diff:+.2f}" + (" (worse)" if worse else "")
        lines.append(f"| {criterion} | {len(runs)} | " + " | ".join(cells) + f" | {delta} |")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    sys.path.insert(0, str(ROOT))
    from mlearn.heads import list_criteria

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", nargs="+", choices=sorted(SUITES), default=sorted(SUITES))
    p.add_argument("--criteria", nargs="+", default=[BASELINE] + list_criteria(),
                   help=f"'{BASELINE}' (the quickstart's margin softmax) and registered criteria")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=None, help="override the quickstart's epochs")
    p.add_argument("--limit-train-batches", type=float, default=None, help="Lightning's, per epoch")
    p.add_argument("--lr", type=float, default=None,
                   help="the optimizer's learning rate for every run instead of the quickstart's")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_criteria")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = p.parse_args(argv)

    extra: List[str] = ["--trainer.log_every_n_steps", "1"]  # every step's images/s: the time per step
    if args.max_epochs is not None:
        extra += ["--trainer.max_epochs", str(args.max_epochs)]
    if args.limit_train_batches is not None:
        batches = args.limit_train_batches
        extra += ["--trainer.limit_train_batches", str(int(batches) if batches >= 1 else batches)]
    command = "python tools/bench_criteria.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out_lines = [f"Command: `{command.strip()}`", ""]
    for modality in args.modalities:
        results: Dict[str, List[Dict[str, float]]] = {}
        for criterion in args.criteria:
            for seed in args.seeds:
                values = run_one(modality, criterion, seed, args.out, extra, args.lr)
                results.setdefault(criterion, []).append(values)
                print(f"{modality} {criterion} seed={seed}: {values}", flush=True)
        lr = f", learning rate {args.lr:g}" if args.lr is not None else ""
        out_lines += [f"### {modality} ({SUITES[modality]}, seeds {args.seeds}{lr})", ""]
        out_lines += table(modality, results) + [""]
    text = "\n".join(out_lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
