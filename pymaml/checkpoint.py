"""Checkpoints of the training job: written atomically, once, and readable on any number of ranks.

:func:`save` writes ``OUT/checkpoint-<iteration>.pt`` through a temporary file in the same folder
(written, flushed, ``fsync``-ed, then renamed over the final name, and the folder ``fsync``-ed), points
``OUT/checkpoint.pt`` at it the same way (a hard link where the file system has them, else a copy)
and removes all but the newest ``keep`` numbered files. A process killed at any moment therefore
leaves ``checkpoint.pt`` either the previous complete checkpoint or the new one, never a torn file.
What a killed write leaves besides (a hidden ``.checkpoint…tmp`` file, numbered files beyond
``keep``) is never read, and the next :func:`save` in that folder removes it.

In data-parallel training only rank 0 writes; :func:`load` reads on rank 0 and broadcasts the
contents, so ranks need no shared file system and a run resumes on any number of ranks (a
checkpoint holds only what every rank has in common: parameters, optimizer and algorithm state, the
iteration and the history; task sampling needs no state, see :mod:`pymaml.data.seeding`).
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from . import distributed as pdist

__all__ = ["save", "load", "save_atomic", "write_text_atomic", "latest", "rng_state", "set_rng_state", "LATEST"]

LATEST = "checkpoint.pt"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt$")
# the names save_atomic, _point_latest and write_text_atomic use for checkpoints and summaries
_TEMPORARY = re.compile(r"\.(checkpoint(-\d+)?\.pt|summary\.(json|md))\.\d+\.tmp$")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, mode: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed and fsync-ed, then renamed over
    ``path``: a reader, or a writer killed at any point, never leaves a partial file at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def save_atomic(path: str, obj) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a killed writer) never sees a partial file."""
    _write_atomic(path, "w", lambda f: f.write(text))


def latest(folder: str) -> str:
    """The checkpoint a resumed run starts from: ``checkpoint.pt``, or, when a run was killed before
    it first pointed ``checkpoint.pt`` at a complete checkpoint, the newest ``checkpoint-N.pt``.
    Returns the ``checkpoint.pt`` path when there is none at all (loading it then says so)."""
    path = os.path.join(folder, LATEST)
    if os.path.exists(path):
        return path
    numbered = sorted(p for p in glob.glob(os.path.join(folder, "checkpoint-*.pt")) if _NUMBERED.search(p))
    return numbered[-1] if numbered else path


def _point_latest(folder: str, target: str) -> None:
    tmp = os.path.join(folder, f".{LATEST}.{os.getpid()}.tmp")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, LATEST))
    _fsync_dir(folder)


def _remove_temporaries(folder: str) -> None:
    """Removes the temporary files of writes that were killed (a SIGKILL runs no clean-up). One
    process writes a folder's checkpoints, so before it starts a write, every one there is stale."""
    for name in os.listdir(folder):
        if _TEMPORARY.fullmatch(name):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def save(folder: str, obj: dict, iteration: int, keep: int = 3) -> Optional[str]:
    """Writes checkpoint ``iteration`` on rank 0 (a no-op elsewhere); returns its path there."""
    if pdist.rank() != 0:
        return None
    if keep < 1:
        raise ValueError(f"checkpoint.save: keep must be >= 1, got {keep}")
    os.makedirs(folder, exist_ok=True)
    _remove_temporaries(folder)
    path = os.path.join(folder, f"checkpoint-{iteration:08d}.pt")
    save_atomic(path, obj)
    _point_latest(folder, path)
    numbered = sorted(p for p in glob.glob(os.path.join(folder, "checkpoint-*.pt")) if _NUMBERED.search(p))
    for old in numbered[:-keep]:
        os.remove(old)
    return path


def load(path: str) -> dict:
    """The checkpoint at ``path``, read by rank 0 and sent to every rank. Raises on every rank:
    FileNotFoundError when it does not exist, ValueError when torch cannot read it (truncated,
    corrupt)."""
    ck, error = None, None
    if pdist.rank() == 0 and os.path.exists(path):
        try:
            ck = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
            error = f"train: {path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
    ck, error = pdist.broadcast_object((ck, error))
    if error is not None:
        raise ValueError(error)
    if ck is None:
        raise FileNotFoundError(f"train: --resume given but {path} does not exist")
    return ck


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
