"""Measure the own-data thresholds (docs/protocols.md f): FAR calibration on held-out identities and the
time to score and threshold 1e6 pairs.

Synthetic embeddings with identity structure (one random unit center per identity, each sample the
center plus isotropic Gaussian noise, L2-normalised) stand in for a model's embeddings: embedding
enough images through a network for 1e6 pairs on 2 CPU cores would measure the network, not this code.
The identities are split into a calibration and a test half (disjoint). On the calibration half the
protocol's own functions sample the pairs (all genuine, a seeded uniform sample of ``--impostors``
impostor pairs), score them, compute ROC metrics and the thresholds at 1e-2, 1e-3, 1e-4 with the
identity bootstrap; on the test half a fresh impostor sample measures the realised FAR at the stored
thresholds. Repeated over ``--repeats`` seeds.

    python tools/bench_thresholds.py --out /tmp/bench_H3.md       # 2 threads, as CI
"""
from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import numpy as np  # noqa: E402

from mlearn.evaluation.metrics.roc import roc_metrics  # noqa: E402
from mlearn.evaluation.metrics.thresholds import far_thresholds  # noqa: E402
from mlearn.evaluation.protocols.own_data_pairs import pair_cosines, pairs_of  # noqa: E402
from mlearn.inference import l2_normalize  # noqa: E402

FARS = (1e-2, 1e-3, 1e-4)


def identity_embeddings(identities: int, per_identity: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((identities, dim)).astype(np.float32))
    labels = np.repeat(np.arange(identities), per_identity)
    noise = rng.standard_normal((len(labels), dim)).astype(np.float32) * np.float32(spread / np.sqrt(dim))
    return l2_normalize(centers[labels] + noise), labels


def one_run(args: argparse.Namespace, seed: int) -> dict:
    emb, labels = identity_embeddings(2 * args.identities, args.per_identity, args.dim, args.spread, seed)
    halves = {"cal": labels < args.identities, "test": labels >= args.identities}
    timing = {}
    out = {}
    for half, mask in halves.items():
        unit, lab = emb[mask], labels[mask] - labels[mask].min()
        rng = np.random.default_rng(seed + (0 if half == "cal" else 1000))
        start = time.perf_counter()
        (g1, g2), _ = pairs_of(lab, True, None, rng)
        (i1, i2), possible = pairs_of(lab, False, args.impostors, rng)
        timing[f"{half} sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        genuine, impostor = pair_cosines(unit, g1, g2), pair_cosines(unit, i1, i2)
        timing[f"{half} scoring"] = time.perf_counter() - start
        out[half] = (genuine, impostor, (lab[i1], lab[i2]), possible)
    genuine, impostor, groups, possible = out["cal"]
    scores = np.r_[genuine, impostor]
    labels01 = np.r_[np.ones(len(genuine), np.int8), np.zeros(len(impostor), np.int8)]
    start = time.perf_counter()
    roc = roc_metrics(scores, labels01, fars=FARS)
    timing["cal ROC / EER / minDCF"] = time.perf_counter() - start
    start = time.perf_counter()
    table = far_thresholds(genuine, impostor, FARS, rounds=args.rounds, seed=seed, groups=groups)
    timing[f"cal thresholds + {args.rounds} bootstrap rounds"] = time.perf_counter() - start
    test_impostor = out["test"][1]
    checks = []
    for far in FARS:
        record = table["thresholds"][repr(far)]
        realised = float(np.mean(test_impostor >= record["threshold"]))
        lo, hi = record["far_ci95"]
        checks.append({"far": far, "threshold": record["threshold"], "ci": record["threshold_ci95"],
                       "far_ci": (lo, hi), "realised": realised, "in_ci": lo <= realised <= hi,
                       "rel_err": (realised - far) / far})
    return {"timing": timing, "checks": checks, "eer": roc["eer"], "genuine": len(genuine),
            "impostor": len(impostor), "possible": possible, "test_impostor": len(test_impostor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=2000, help="per half")
    parser.add_argument("--per-identity", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--spread", type=float, default=2.2, help="noise norm relative to the unit center")
    parser.add_argument("--impostors", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/bench_H3.md")
    args = parser.parse_args()
    runs = [one_run(args, seed) for seed in range(args.repeats)]
    first = runs[0]
    lines = [
        "## Own-data thresholds (tools/bench_thresholds.py)",
        "",
        f"Synthetic embeddings with identity structure (D={args.dim}, {args.per_identity} per identity, "
        f"noise {args.spread} x the unit center), {args.identities} calibration + {args.identities} test "
        f"identities (disjoint); calibration: {first['genuine']} genuine + {first['impostor']} sampled "
        f"impostor pairs (of {first['possible']}); test: {first['test_impostor']} impostor pairs; identity "
        f"bootstrap, {args.rounds} rounds; {os.environ['OMP_NUM_THREADS']} threads on "
        f"{os.cpu_count()} cores; EER {first['eer'] * 100:.2f}%.",
        "",
        "### Time (first run, seconds)",
        "",
        "| step | s |",
        "|---|---|",
    ]
    lines += [f"| {step} | {sec:.2f} |" for step, sec in first["timing"].items()]
    total = sum(v for k, v in first["timing"].items() if k.startswith("cal"))
    lines += [f"| **calibration half total (sample + score + ROC + thresholds)** | **{total:.2f}** |", ""]
    lines += ["### Realised FAR on the test half at the stored thresholds", "",
              "| seed | target FAR | threshold [95% CI] | FAR interval | realised test FAR | in interval | "
              "rel. error |", "|---|---|---|---|---|---|---|"]
    for seed, run in enumerate(runs):
        for c in run["checks"]:
            ci = f"[{c['ci'][0]:.4f}, {c['ci'][1]:.4f}]"
            lines.append(f"| {seed} | {c['far']:g} | {c['threshold']:.4f} {ci} | "
                         f"[{c['far_ci'][0]:.2e}, {c['far_ci'][1]:.2e}] | {c['realised']:.2e} | "
                         f"{'yes' if c['in_ci'] else 'no'} | {c['rel_err'] * 100:+.1f}% |")
    for far in FARS:
        cs = [c for run in runs for c in run["checks"] if c["far"] == far]
        inside = sum(c["in_ci"] for c in cs)
        within = sum(c["in_ci"] or abs(c["rel_err"]) <= 0.3 for c in cs)
        lines.append(f"\nFAR {far:g}: realised FAR in the bootstrap interval in {inside}/{len(cs)} runs, "
                     f"in the interval or within ±30% in {within}/{len(cs)}; max |rel. error| "
                     f"{max(abs(c['rel_err']) for c in cs) * 100:.1f}%.")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
