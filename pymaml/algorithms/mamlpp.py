"""MAML++ (Antoniou et al. 2019, "How to train your MAML").

* LSLR: a learned step size per parameter tensor and per inner step (``lr.s<i>__<name>``);
* multi-step loss: the meta-loss is Σ_i w_i L_q(θ_i) with weights annealed from uniform towards the
  last step over ``msl_iterations`` (the schedule of the authors' code, in iterations instead of
  epochs: non-final weights fall to 0.03/K, the final one rises to 1 − (K−1)·0.03/K);
* derivative-order annealing: the ``first_order`` engine for the first ``first_order_iterations``
  meta-iterations, the exact engine afterwards;
* per-step BatchNorm statistics: not implemented as such. With ``batch_norm="transductive"`` every
  inner step normalises with the statistics of its own batch and no running statistics are shared
  between steps or tasks (:mod:`pymaml.functional.buffers`), which is what per-step statistics
  amount to when evaluation also uses batch statistics. With ``batch_norm="mode"`` (the default)
  a train-mode model keeps one set of running statistics, updated by every inner step's support
  pass and every query pass, and uses them in ``eval()`` mode. Per-step running averages and
  per-step BatchNorm affine parameters are not implemented.

At evaluation with more steps than in training the last step's learned sizes are reused.
The iteration counter is the buffer ``iteration`` (saved in ``state_dict``), advanced by every
``meta_gradient`` call.
"""
from typing import Dict, List

import torch
from torch import nn

from .base import Algorithm, per_step, safe_name


def multi_step_weights(steps: int, iteration: int, msl_iterations: int) -> List[float]:
    """The annealed MAML++ multi-step loss weights at ``iteration``."""
    if steps < 1:
        return []
    progress = iteration / max(msl_iterations, 1)
    lo = 0.03 / steps
    w = [max(1.0 / steps - progress / steps, lo) for _ in range(steps - 1)]
    w.append(min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * lo))
    return w


class MAMLpp(Algorithm):
    name = "mamlpp"
    second_order = True

    def __init__(self, model, loss_fn, *, msl_iterations: int = 10000, first_order_iterations: int = 0,
                 multi_step_loss: bool = True, **kw):
        super().__init__(model, loss_fn, **kw)
        self.msl_iterations = int(msl_iterations)
        self.first_order_iterations = int(first_order_iterations)
        self.multi_step_loss = multi_step_loss
        K = max(self.inner_steps, 1)
        self.lr = nn.ParameterDict({f"s{i}__{safe_name(n)}": nn.Parameter(torch.tensor(self.inner_lr, dtype=p.dtype))
                                    for i in range(K) for n, p in model.named_parameters()})
        self._names = [n for n, _ in model.named_parameters()]

    def _step(self, i: int, detach: bool) -> Dict[str, torch.Tensor]:
        return {n: (self.lr[f"s{i}__{safe_name(n)}"].detach() if detach else self.lr[f"s{i}__{safe_name(n)}"])
                for n in self._names}

    def step_sizes(self, steps: int, detach: bool = False):
        K = max(self.inner_steps, 1)
        return per_step([self._step(i, detach) for i in range(K)], steps)

    def engine_settings(self) -> dict:
        it = int(self.iteration)
        engine = "first_order" if it < self.first_order_iterations else self.engine
        kw = {"engine": engine, "hvp": self.hvp}
        if self.multi_step_loss and self.inner_steps > 1:
            kw["step_weights"] = multi_step_weights(self.inner_steps, it, self.msl_iterations)
        return kw

    def lr_grads_to_params(self, lr_grads) -> Dict[str, torch.Tensor]:
        out = {}
        for i, d in enumerate(lr_grads):
            for n, g in d.items():
                key = f"lr.s{i}__{safe_name(n)}"
                out[key] = g if key not in out else out[key] + g
        return out
