"""MAML (Finn et al. 2017): the exact second-order meta-gradient of L_q(θ_K).

The engine (``recompute`` by default, ``unrolled`` on request) differentiates through every inner
step; see :mod:`pymaml.functional.engines`.
"""
from .base import Algorithm


class MAML(Algorithm):
    name = "maml"
    second_order = True
