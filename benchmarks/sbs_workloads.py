"""Workloads of the side-by-side benchmark (the settings of the MAML paper, Finn et al. 2017).

Each :class:`Workload` builds the model (a ``pymaml.models`` reference net, the same initial weights
for every implementation: seeded), its loss, and a meta-batch of tasks as STACKED tensors
``(xs, ys, xq, yq)`` with a leading task dimension. Implementations that loop over tasks index them.

The timed instances are the paper sizes; ``small()`` gives the instance the float64 agreement
check runs on: the same architecture (4 × [conv, BatchNorm, ReLU, max-pool], head), inner loop,
steps and shots, but fewer tasks, queries and filters and smaller images, because float64
convolutions on the CPU have no fast kernel and 25 exact second-order steps must stay cheap.

Image tasks use random synthetic images (normal noise) and balanced labels: the cost of a
meta-step does not depend on what the pixels show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Workload", "WORKLOADS", "get"]

Tasks = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str                   # "sinusoid" | "conv"
    meta_batch: int
    steps: int                  # inner SGD steps K
    lr: float                   # inner step size α (fixed)
    shots: int                  # support examples per class (sinusoid: points per task)
    queries: int                # query examples per class (sinusoid: points per task)
    ways: int = 1
    in_channels: int = 1
    hidden: int = 64
    image_size: int = 28
    small_overrides: Tuple[Tuple[str, object], ...] = ()

    # ---- model, loss, data -------------------------------------------------------------------
    def model(self, seed: int = 0) -> torch.nn.Module:
        from pymaml.models import MLP, ConvNet
        torch.manual_seed(seed)
        if self.kind == "sinusoid":
            return MLP((1, 40, 40, 1))
        return ConvNet(self.in_channels, self.ways, self.hidden, self.image_size, blocks=4, batch_norm=True)

    @property
    def loss_fn(self) -> Callable:
        return F.mse_loss if self.kind == "sinusoid" else F.cross_entropy

    def tasks(self, seed: int = 1, dtype=torch.float32, device="cpu") -> Tasks:
        g = torch.Generator().manual_seed(seed)
        T = self.meta_batch
        if self.kind == "sinusoid":
            amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
            phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)
            xs = torch.empty(T, self.shots, 1).uniform_(-5.0, 5.0, generator=g)
            xq = torch.empty(T, self.queries, 1).uniform_(-5.0, 5.0, generator=g)
            ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
        else:
            c, s = self.in_channels, self.image_size
            xs = torch.randn(T, self.ways * self.shots, c, s, s, generator=g)
            xq = torch.randn(T, self.ways * self.queries, c, s, s, generator=g)
            ys = torch.arange(self.ways).repeat(self.shots).expand(T, -1).clone()
            yq = torch.arange(self.ways).repeat(self.queries).expand(T, -1).clone()
        cast = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        return cast(xs), cast(ys), cast(xq), cast(yq)

    def small(self) -> "Workload":
        return replace(self, **dict(self.small_overrides))

    def describe(self) -> str:
        if self.kind == "sinusoid":
            return (f"MLP 1-40-40-1, meta-batch {self.meta_batch}, K={self.shots} support/"
                    f"{self.queries} query points, {self.steps} inner step(s), α={self.lr}")
        return (f"ConvNet {self.in_channels}×{self.image_size}×{self.image_size}, {self.hidden} filters, BN, "
                f"{self.ways}-way {self.shots}-shot, {self.queries} queries/class, meta-batch "
                f"{self.meta_batch}, {self.steps} inner step(s), α={self.lr}")


_SIN = dict(kind="sinusoid", meta_batch=25, lr=0.01, shots=10, queries=10)
WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    Workload("sinusoid-1", "Sinusoid, 1 step", steps=1, **_SIN),
    Workload("sinusoid-5", "Sinusoid, 5 steps", steps=5, **_SIN),
    Workload("omniglot", "Omniglot 5w1s, 1 step", kind="conv", meta_batch=32, steps=1, lr=0.4, shots=1,
             queries=15, ways=5, in_channels=1, hidden=64, image_size=28,
             small_overrides=(("meta_batch", 2), ("queries", 2), ("hidden", 16))),
    Workload("miniimagenet", "MiniImageNet 5w1s, 5 steps", kind="conv", meta_batch=4, steps=5, lr=0.01,
             shots=1, queries=15, ways=5, in_channels=3, hidden=32, image_size=84,
             small_overrides=(("meta_batch", 2), ("queries", 2), ("hidden", 8), ("image_size", 42))),
    Workload("long-horizon", "MiniImageNet 5w5s, 25 steps", kind="conv", meta_batch=2, steps=25, lr=0.01,
             shots=5, queries=15, ways=5, in_channels=3, hidden=32, image_size=84,
             small_overrides=(("queries", 2), ("hidden", 8), ("image_size", 16))),
]}


def get(name: str, steps: int = None) -> Workload:
    """The workload ``name``; ``steps`` overrides its number of inner steps (the K sweep)."""
    if name not in WORKLOADS:
        raise ValueError(f"side_by_side: unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    w = WORKLOADS[name]
    return w if steps is None else replace(w, steps=int(steps))
