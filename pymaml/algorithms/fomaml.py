"""First-order MAML: the meta-gradient is ∇L_q(θ_K), every Hessian term dropped (the
``first_order`` engine, chosen by ``second_order = False``)."""
from .base import Algorithm


class FOMAML(Algorithm):
    name = "fomaml"
    second_order = False
