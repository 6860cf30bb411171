"""The ``mlearn`` command: ``train``, ``eval``, ``export``, ``embed``, ``data``, ``import``, ``verify``.

Every failure ends with one ``mlearn <cmd>: error: ...`` line on stderr, never a traceback (set
``MLEARN_DEBUG=1`` to see the traceback instead). Expected errors (bad input: :class:`UsageError`,
``ValueError``, ``KeyError``, ``TypeError``, ``OSError`` with the file it names, malformed YAML) print
their message; any other exception type prints its type and message and points to ``MLEARN_DEBUG=1``
(it may be a bug worth reporting). Exit status: 2 for errors, 1 when a training guard stopped the run
(:class:`mlearn.callbacks.TrainingStopped`: non-finite loss, no usable data), 143 after SIGTERM
(checkpoint saved; requeue and resume with ``--ckpt_path last``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mlearn.errors import UsageError

USAGE = """usage: mlearn <command> [options]

commands:
  train    train an embedding model (LightningCLI: --config FILE.yaml, dotted overrides)
  eval     evaluate a run dir / checkpoint / ONNX model on a benchmark suite, or on your own files
           (--folder / --pairs / --trials: metrics and score thresholds at target FARs)
  export   export a trained backbone to ONNX / TorchScript / safetensors with a parity check
  embed    embed a folder or list of images with a run dir / checkpoint / exported model
  verify   decide same / different identity for a list of pairs at a stored FAR threshold
  data     inspect a dataset (counts, class sizes, corrupt records) or convert rec <-> folder
  import   turn a public checkpoint (insightface, AdaFace, WeSpeaker) into an mlearn model directory

`mlearn <command> --help` lists each command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from mlearn import __version__

        print(f"mlearn {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mlearn: error: unknown command '{command}'; known: {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[command](rest)
    except Exception as exc:  # every failure ends in one line; MLEARN_DEBUG=1 shows the traceback
        if os.environ.get("MLEARN_DEBUG"):
            raise
        print(f"mlearn {command}: error: {describe_error(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))


_EXPECTED = (UsageError, OSError, KeyError, ValueError, TypeError)
# user errors of lazily imported libraries, matched by name so that `mlearn --help` imports none of them
_EXPECTED_NAMES = {"MisconfigurationException", "YAMLError"}


def describe_error(exc: BaseException) -> str:
    """One line for the user: an expected error's message (an ``OSError``'s reason and file), else the
    exception's type and message and a pointer to ``MLEARN_DEBUG=1``."""
    if isinstance(exc, OSError) and exc.filename is not None:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        message = f"{exc.strerror or type(exc).__name__}: {target}"
    elif isinstance(exc, KeyError) and exc.args:
        message = str(exc.args[0])
    else:
        message = str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip() not in ("", "^")]  # YAML's caret
    message = "; ".join(lines) or type(exc).__name__
    if isinstance(exc, _EXPECTED) or hasattr(exc, "exit_code") or _expected_by_name(exc):
        return message
    return f"{type(exc).__name__}: {message} (unexpected error; set MLEARN_DEBUG=1 for the traceback)"


def _expected_by_name(exc: BaseException) -> bool:
    return any(cls.__name__ in _EXPECTED_NAMES for cls in type(exc).__mro__)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, worker counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def train(argv: List[str]) -> int:
    from mlearn.train_cli import run_training

    return run_training(argv)


def evaluate(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlearn eval", description=(
        "Evaluate a model on a benchmark suite, or on your own files (--folder / --pairs / --trials: "
        "ROC, EER, minDCF, rank-k and the score thresholds at target FARs, see docs/protocols.md f)."))
    parser.add_argument("--model", required=True, help="run dir, .ckpt, model dir or exported model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--suite", help="suite YAML, e.g. evaluation/face_bins.yaml")
    source.add_argument("--folder", help="your files as <folder>/<identity>/<file> (images, or wavs)")
    source.add_argument("--pairs", help="pair list: 'path1 path2 label' lines, label 1 same / 0 different")
    source.add_argument("--trials", help="speaker trial list ('1 enroll test' or 'enroll test target')")
    parser.add_argument("--files-root", default=None,
                        help="--pairs / --trials: the folder the list's paths start from "
                             "(default: the list's folder)")
    parser.add_argument("--max-impostors", type=positive_int, default=1_000_000,
                        help="--folder: impostor pairs, a seeded uniform sample when there are more")
    parser.add_argument("--all-pairs", action="store_true",
                        help="--folder: every genuine and impostor pair, no sampling (over --max-impostors)")
    parser.add_argument("--quality", nargs="+", choices=["head", "norm"], default=None,
                        help="also quality-aware rows and curves (EDC and CR-FIQA ERC, docs/protocols.md g): "
                             "head = the model's trained quality head, norm = the embedding-norm baseline")
    parser.add_argument("--quality-fmrs", default="0.001,0.0001",
                        help="--quality: target FMRs, comma-separated (each needs >= 10 / FMR impostors)")
    parser.add_argument("--fars", default="0.01,0.001,0.0001",
                        help="target FARs for TAR@FAR and thresholds (comma-separated)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap rounds of the threshold intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="impostor sampling and bootstrap seed")
    parser.add_argument("--data-root", default=None, help="folder the suite's relative paths start from")
    parser.add_argument("--out", default=None, help="output dir (default: <run dir>/eval/<suite or folder>)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    from mlearn.trust import add_trust_arguments

    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    from mlearn.evaluation.suite import run_suite
    from mlearn.inference import load_model

    model_path = Path(args.model)
    if args.suite is not None and (args.quality or args.all_pairs):
        raise UsageError("--quality / --all-pairs apply to --folder / --pairs / --trials; with --suite set "
                         "quality: [head, norm] in the suite's own_data / bin entries")
    if args.suite is not None:
        suite: Any = Path(args.suite)
        if not Path(args.suite).is_file():
            raise FileNotFoundError(f"suite not found: {args.suite} (see evaluation/*.yaml)")
        name = Path(args.suite).stem
    else:
        suite, name = _own_data_suite(args)
    out = Path(args.out) if args.out else _default_eval_dir(model_path, Path(name))
    model = load_model(model_path, unsafe=args.unsafe_load, allow_any_class=args.allow_any_class)
    run_suite(model, suite, data_root=args.data_root, out_dir=out, batch_size=args.batch_size)
    print(f"results written to {out}")
    return 0


def _own_data_suite(args: argparse.Namespace) -> Tuple[Dict[str, Any], str]:
    """The one-entry ``own_data`` suite of ``mlearn eval --folder / --pairs / --trials`` and its name."""
    kind, value = next((k, getattr(args, k)) for k in ("folder", "pairs", "trials") if getattr(args, k))
    path = Path(value)
    if not path.exists():
        what = "folder <folder>/<identity>/<file>" if kind == "folder" else f"{kind} list"
        raise FileNotFoundError(f"--{kind} {path} not found (expected a {what})")
    fars, quality_fmrs = _rates(args.fars, "--fars"), _rates(args.quality_fmrs, "--quality-fmrs")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap}: expected a non-negative integer")
    name = path.resolve().name if kind == "folder" else path.stem
    entry = {"type": "own_data", kind: str(path.resolve()), "name": name, "fars": fars,
             "bootstrap": args.bootstrap, "seed": args.seed, "max_impostors": args.max_impostors}
    if args.all_pairs:
        entry.update(max_impostors=None, max_genuine=None)
    if args.quality:
        entry.update(quality=args.quality, quality_fmrs=quality_fmrs)
    if args.files_root:
        entry["files_root"] = str(Path(args.files_root).resolve())
    return {"name": f"own_data_{name}", "protocols": [entry]}, name


def _rates(text: str, flag: str) -> List[float]:
    """Comma-separated rates of ``flag`` as floats (``UsageError`` when one is not a number)."""
    try:
        return [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated rates, e.g. 0.01,0.001") from None


def export(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlearn export", description=(
        "Export a trained backbone (no head) with its preprocessing as metadata, then check parity "
        "(exported vs PyTorch embeddings on a random batch; exit 1 above tolerance)."))
    parser.add_argument("--model", required=True, help="run dir or .ckpt")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "safetensors"])
    parser.add_argument("--output", default=None,
                        help="output file (default: <run dir>/model[_fp16].onnx|.pt|.safetensors)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights and compute, float32 input/output (parity tolerance 1e-2 vs "
                             "fp32)")
    parser.add_argument("--parity-batch", type=positive_int, default=3,
                        help="random inputs in the parity check")
    parser.add_argument("--thresholds", nargs="?", const="", default=None, metavar="RESULTS",
                        help="store the verification thresholds of an own-data evaluation (results.json or "
                             "its folder; alone: the newest <run>/eval/*/results.json with thresholds)")
    parser.add_argument("--thresholds-benchmark", default=None,
                        help="the benchmark row to take thresholds from when several have them")
    parser.add_argument("--calibration", nargs="?", const="", default=None, metavar="SOURCE",
                        help="store a speaker score calibration: a calibration JSON, or a results.json / "
                             "its folder with a calibrated trials row (alone: the newest "
                             "<run>/eval/*/results.json with one); a trials entry applies it with "
                             "calibration: {from_model: true}")
    parser.add_argument("--calibration-benchmark", default=None,
                        help="the benchmark row to take the calibration from when several have one")
    from mlearn.trust import add_trust_arguments

    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    from mlearn.export import ParityError, export_model

    model = Path(args.model)
    run = model if model.is_dir() else model.parent
    run = run.parent if run.name == "checkpoints" else run
    # --thresholds / --calibration alone: the latest evaluation of the run
    thresholds = str(run) if args.thresholds == "" else args.thresholds
    calibration = str(run) if args.calibration == "" else args.calibration
    try:
        result = export_model(args.model, args.format, args.output, fp16=args.fp16, opset=args.opset,
                              parity_batch=args.parity_batch, unsafe=args.unsafe_load,
                              allow_any_class=args.allow_any_class, thresholds=thresholds,
                              thresholds_benchmark=args.thresholds_benchmark, calibration=calibration,
                              calibration_benchmark=args.calibration_benchmark)
    except ParityError as exc:
        print(f"mlearn export: error: {exc}", file=sys.stderr)
        return 1
    print(result)
    if "thresholds" in result.metadata:
        stored = result.metadata["thresholds"]
        listed = ", ".join(f"FAR {float(k):g}: {v['threshold']:.4f}" for k, v in stored["far"].items())
        print(f"thresholds from {stored['source']} stored ({listed})")
    if "calibration" in result.metadata:
        cal = result.metadata["calibration"]
        print(f"calibration from {cal['info'].get('source')} stored "
              f"(features {', '.join(cal['feature_names'])}, prior {cal['prior']:g})")
    if "quality" in result.metadata:
        print(f"quality head ({result.metadata['quality']['method']}) exported: output 'quality' [B]")
    return 0


def verify(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlearn verify", description=(
        "Verify a list of pairs ('path1 path2 [label]' lines, images or wavs): writes OUT.tsv with the "
        "cosine score and the decision at the threshold for --far stored in the model (mlearn export "
        "--thresholds) or read from --thresholds."))
    parser.add_argument("--model", required=True, help=".onnx, TorchScript .pt, .safetensors, run/model dir")
    parser.add_argument("--pairs", required=True, help="pair list; paths relative to its folder")
    parser.add_argument("--output", required=True, help="OUT.tsv: path1, path2, score, decision[, label]")
    parser.add_argument("--far", type=float, default=1e-3, help="target false-accept rate (default 1e-3)")
    parser.add_argument("--thresholds", default=None,
                        help="results.json of an own-data evaluation, its folder or a run dir (default: the "
                             "thresholds stored in the model)")
    parser.add_argument("--thresholds-benchmark", default=None,
                        help="the benchmark row to use when several have thresholds")
    parser.add_argument("--files-root", default=None, help="folder the list's paths start from")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    from mlearn.trust import add_trust_arguments

    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    from mlearn.evaluation.protocols.own_data import check_probe, read_thresholds, verify_pair_list
    from mlearn.inference import load_model

    if not Path(args.pairs).is_file():
        raise FileNotFoundError(f"--pairs {args.pairs} not found (expected 'path1 path2 [label]' lines)")
    model = load_model(args.model, unsafe=args.unsafe_load, allow_any_class=args.allow_any_class)
    record = None
    if args.thresholds is not None:
        record = read_thresholds(args.thresholds, args.thresholds_benchmark)
        check_probe(model, record, record["source"])
    summary = verify_pair_list(model, args.pairs, args.output, far=args.far, thresholds=record,
                               files_root=args.files_root, batch_size=args.batch_size)
    line = (f"{summary['pairs']} pairs -> {args.output}: {summary['accepted']} accepted at threshold "
            f"{summary['threshold']:.4f} (FAR {args.far:g}), {summary['errors']} with unreadable files")
    if "tar" in summary:
        def rate(v: Optional[float]) -> str:
            return "n/a" if v is None else f"{v * 100:.2f}%"

        line += f"; on the labels: FAR {rate(summary['realised_far'])}, TAR {rate(summary['tar'])}"
    print(line)
    return 0


def embed(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlearn embed", description=(
        "Embed images (wav files for speaker models): writes OUT.npy (float32 [N, D], L2-normalised), "
        "OUT.ids.txt (one relative path "
        "per row) and OUT.errors.txt (unreadable inputs, skipped)."))
    parser.add_argument("--model", required=True,
                        help=".onnx, TorchScript .pt, .safetensors, run dir or .ckpt")
    parser.add_argument("--input", required=True,
                        help="image (or wav) folder, recursive, or list file of paths")
    parser.add_argument("--output", required=True, help="OUT.npy")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="image decoding threads (default: up to 4)")
    parser.add_argument("--quality", nargs="?", const="head", default=None, choices=["head", "norm"],
                        help="also write OUT.quality.npy (float32 [N]): the model's trained quality head "
                             "(default) or the embedding norm baseline (norm, any model)")
    from mlearn.trust import add_trust_arguments

    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    from mlearn.embed import embed_to_files
    from mlearn.inference import load_model

    model = load_model(args.model, unsafe=args.unsafe_load, allow_any_class=args.allow_any_class)
    result, output = embed_to_files(model, args.input, args.output, batch_size=args.batch_size,
                                    workers=args.workers, quality=args.quality)
    stem = output.with_suffix("")
    print(f"embedded {len(result.ids)} inputs -> {output} {tuple(result.embeddings.shape)}, "
          f"ids in {stem}.ids.txt")
    if result.quality is not None:
        print(f"quality ({args.quality}) in {stem}.quality.npy")
    listed = f" listed in {stem}.errors.txt" if result.errors else ""
    print(f"{len(result.errors)} unreadable inputs{listed}")
    return 0


def data(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlearn data", description="Check or convert a training set.")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="counts, class-size histogram, corrupt records")
    inspect.add_argument("path", help="RecordIO folder (train.rec/.idx), image folder or list file")
    inspect.add_argument("--sample", type=positive_int, default=None, help="decode only this many images")
    convert = sub.add_parser("convert", help="RecordIO -> image folder, or folder/list -> RecordIO")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=["rec", "folder"])
    args = parser.parse_args(argv)
    from mlearn.data.images.inspect import convert_dataset, format_inspect_report, inspect_dataset

    if args.action == "inspect":
        print(format_inspect_report(inspect_dataset(args.path, sample=args.sample)))
    else:
        summary = convert_dataset(args.src, args.dst, to=args.to)
        print(f"converted {args.src} -> {args.dst} ({args.to}): {summary['images']} images, "
              f"{summary['classes']} classes, {summary['skipped']} skipped as unreadable")
    return 0


def import_model(argv: List[str]) -> int:
    from mlearn.models.importers import IMPORTERS, import_checkpoint

    parser = argparse.ArgumentParser(prog="mlearn import", description=(
        "Convert a public checkpoint into a model directory (backbone.safetensors + model.json) that "
        "`mlearn eval/embed/export --model` and `--model.init_from` accept; see docs/pretrained.md."))
    parser.add_argument("family", choices=sorted(IMPORTERS), help="who published the checkpoint")
    parser.add_argument("checkpoint", help="the published weights file (e.g. model.pt, .ckpt, avg_model.pt)")
    parser.add_argument("--arch", required=True, help="; ".join(
        f"{name}: {', '.join(importer.archs)}" for name, importer in sorted(IMPORTERS.items())))
    parser.add_argument("--output", required=True, help="model directory to write (replaced if it exists)")
    parser.add_argument("--config", default=None, help="; ".join(
        f"{name}: {importer.config_help}" for name, importer in sorted(IMPORTERS.items())
        if importer.config_help) or "not used")
    args = parser.parse_args(argv)
    output = import_checkpoint(args.family, args.checkpoint, args.arch, args.output, config=args.config)
    print(f"imported {args.family} {args.arch} from {args.checkpoint} -> {output}")
    return 0


def _default_eval_dir(model: Path, suite: Path) -> Path:
    base = model if model.is_dir() else model.parent
    return base / "eval" / suite.stem


COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "train": train, "eval": evaluate, "export": export, "embed": embed, "data": data, "import": import_model,
    "verify": verify,
}
