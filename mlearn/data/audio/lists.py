"""Speaker training lists: a VoxCeleb-style folder ``root/<speaker>/.../<utt>.wav`` or Kaldi
``wav.scp`` + ``utt2spk``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mlearn.data.audio.io import AUDIO_EXTENSIONS, PathLike

log = logging.getLogger(__name__)


def scan_speaker_folder(root: PathLike) -> Tuple[List[str], List[str]]:
    """``root/<speaker>/.../<utt>.wav`` -> (paths relative to ``root``, speakers), sorted by path.

    ``.wav`` and ``.flac`` (any case) count; hidden entries and files directly under ``root`` are
    ignored. Raises ``FileNotFoundError`` / ``ValueError`` for a missing or empty folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"speaker folder not found: {root}")
    paths: List[str] = []
    speakers: List[str] = []
    other = 0
    for speaker in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        found = []
        for folder, dirs, files in os.walk(root / speaker):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, root)
            found += [os.path.join(rel, f) for f in files
                      if not f.startswith(".") and f.lower().endswith(AUDIO_EXTENSIONS)]
            other += sum(f.lower().endswith(".m4a") for f in files)
        if not found:
            log.warning("%s: no audio files, speaker skipped", root / speaker)
            continue
        found.sort()
        paths += found
        speakers += [speaker] * len(found)
    if not paths:
        hint = (f"; found {other} .m4a files: VoxCeleb2 ships AAC, convert it to 16 kHz mono wav first "
                "(datasets/voxceleb.md)") if other else ""
        raise ValueError(f"{root}: no audio found; expected root/<speaker>/.../<utt>.wav "
                         f"({', '.join(AUDIO_EXTENSIONS)}){hint}")
    return paths, speakers


def _read_table(path: Path, what: str) -> Dict[str, str]:
    """``key value...`` lines -> {key: rest of the line}; blank lines skipped, duplicates an error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    table: Dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(None, 1)
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<utt> <{what.split()[0]}>', got {line!r}")
            if fields[0] in table:
                raise ValueError(f"{path}:{lineno}: utterance {fields[0]!r} listed twice")
            table[fields[0]] = fields[1].strip()
    if not table:
        raise ValueError(f"{path}: empty {what}")
    return table


def read_kaldi_lists(wav_scp: PathLike, utt2spk: Optional[PathLike] = None,
                     audio_root: Optional[PathLike] = None) -> Tuple[List[str], List[str], List[str]]:
    """Read Kaldi ``wav.scp`` and ``utt2spk``. Returns (utterance ids, paths, speakers) in ``wav.scp`` order.

    ``utt2spk`` defaults to the file beside ``wav.scp``; relative paths start at ``audio_root``
    (default: the folder of ``wav.scp``). Piped entries (``cmd |``) and ``ark:`` offsets are not
    supported (``ValueError``); an utterance of ``wav.scp`` missing from ``utt2spk`` is a ``KeyError``.
    """
    wav_scp = Path(wav_scp)
    utt2spk = Path(utt2spk) if utt2spk is not None else wav_scp.parent / "utt2spk"
    wavs = _read_table(wav_scp, "path list (wav.scp)")
    spks = _read_table(utt2spk, "speaker list (utt2spk)")
    base = Path(audio_root) if audio_root is not None else wav_scp.parent
    utts, paths, speakers = [], [], []
    for utt, path in wavs.items():
        if path.endswith("|") or ".ark:" in path:
            raise ValueError(f"{wav_scp}: utterance {utt!r}: piped or archive entry {path!r} is not "
                             "supported; "
                             "expected a plain audio file path")
        if utt not in spks:
            raise KeyError(f"{utt2spk}: no speaker for utterance {utt!r} of {wav_scp}")
        utts.append(utt)
        paths.append(os.path.join(base, path))  # absolute paths survive the join
        speakers.append(spks[utt])
    extra = len(set(spks) - set(wavs))
    if extra:
        log.warning("%s: %d utterance(s) not in %s, ignored", utt2spk, extra, wav_scp)
    return utts, paths, speakers
