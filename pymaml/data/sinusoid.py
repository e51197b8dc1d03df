"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

A task is y = A·sin(x − φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs x ~ U[−5, 5].
``sample(batch)`` draws ``batch`` tasks with ``shots`` support and ``queries`` query points each and
returns x_s [batch, shots, 1], y_s [batch, shots, 1], x_q [batch, queries, 1], y_q
[batch, queries, 1]. Deterministic given ``seed``; ``state_dict()`` holds the whole sampler state.

``tasks(indices)`` returns the same four tensors for the given global task indices, each task drawn
from its own stream of (``seed``, index) (:mod:`pymaml.data.seeding`): the tasks of a meta-batch do
not depend on how it is split across processes.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .seeding import indices as _indices, task_rng

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
INPUT = (-5.0, 5.0)


class SinusoidTasks:
    def __init__(self, shots: int = 10, queries: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if shots < 1 or queries < 1:
            raise ValueError(f"SinusoidTasks: shots and queries must be >= 1, got {shots} and {queries}")
        self.shots, self.queries, self.dtype, self.device = shots, queries, dtype, device
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def sample_functions(self, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """Amplitudes and phases of ``batch`` new tasks."""
        amp = self.rng.uniform(*AMPLITUDE, size=batch)
        phase = self.rng.uniform(*PHASE, size=batch)
        return amp, phase

    def points(self, amp: np.ndarray, phase: np.ndarray, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """n random (x, y) pairs for each of the given tasks."""
        x = self.rng.uniform(*INPUT, size=(len(amp), n, 1))
        y = amp[:, None, None] * np.sin(x - phase[:, None, None])
        return self._tensor(x), self._tensor(y)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device=self.device, dtype=self.dtype)

    def tasks(self, ix):
        """The tasks with global indices ``ix`` (e.g. ``range(start, stop)``), stacked."""
        parts = []
        for i in _indices(ix):
            rng = task_rng(self.seed, i)
            amp, phase = rng.uniform(*AMPLITUDE), rng.uniform(*PHASE)
            x = rng.uniform(*INPUT, size=(self.shots + self.queries, 1))
            parts.append((x, amp * np.sin(x - phase)))
        n = len(parts)
        x = np.stack([p[0] for p in parts]) if n else np.empty((0, self.shots + self.queries, 1))
        y = np.stack([p[1] for p in parts]) if n else np.empty((0, self.shots + self.queries, 1))
        k = self.shots
        return self._tensor(x[:, :k]), self._tensor(y[:, :k]), self._tensor(x[:, k:]), self._tensor(y[:, k:])

    def sample(self, batch: int):
        amp, phase = self.sample_functions(batch)
        x_s, y_s = self.points(amp, phase, self.shots)
        x_q, y_q = self.points(amp, phase, self.queries)
        return x_s, y_s, x_q, y_q


def curve(amp: float, phase: float, n: int = 200) -> Tuple[np.ndarray, np.ndarray]:
    """The true function of one task on a dense grid (for plots)."""
    x = np.linspace(*INPUT, n)
    return x, amp * np.sin(x - phase)
