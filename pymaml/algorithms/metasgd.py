"""Meta-SGD (Li et al. 2017): one learned step size per parameter element.

θ_{i+1} = θ_i − α ⊙ ∇L_s(θ_i) with α (shape of θ) meta-learned together with θ; its gradient
∂L_q/∂α = −Σ_i g_i ⊙ v_{i+1} comes from the engine. α is initialised to ``inner_lr`` and lives
in this module's parameters (``lr.<name with dots as __>``), so an outer optimizer must see them
(:class:`pymaml.MetaOptimizer` adds them).
"""
from typing import Dict

import torch
from torch import nn

from .base import Algorithm, safe_name


class MetaSGD(Algorithm):
    name = "metasgd"
    second_order = True

    def __init__(self, model, loss_fn, **kw):
        super().__init__(model, loss_fn, **kw)
        self.lr = nn.ParameterDict({safe_name(n): nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
                                    for n, p in model.named_parameters()})

    def step_sizes(self, steps: int, detach: bool = False):
        return {n: (self.lr[safe_name(n)].detach() if detach else self.lr[safe_name(n)])
                for n, _ in self.model.named_parameters()}

    def lr_grads_to_params(self, lr_grads) -> Dict[str, torch.Tensor]:
        return {f"lr.{safe_name(n)}": g for n, g in lr_grads.items()}
