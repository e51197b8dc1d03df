"""One random stream per task: the same tasks whatever the number of processes.

Task ``i`` of a sampler with seed ``s`` draws from its own generator, seeded by ``(s, i)`` through
numpy's ``SeedSequence`` spawn keys, so a meta-batch split across ranks by global task index
(:func:`pymaml.distributed.shard`) samples exactly the tasks that one process samples for the whole
meta-batch, and resuming needs no sampler state: only the index of the next task.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def task_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of global task ``index`` in the stream of ``seed``."""
    if index < 0:
        raise ValueError(f"task_rng: task index must be >= 0, got {index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


def indices(ix: Iterable[int]) -> list:
    """``ix`` (a range, list or array of global task indices) as a list of ints."""
    return [int(i) for i in ix]
