"""First-order MAML: the meta-gradient is ∇L_q(θ_K), every Hessian term dropped (the
``first_order`` engine)."""
from .base import Algorithm


class FOMAML(Algorithm):
    name = "fomaml"
    second_order = False

    def engine_settings(self) -> dict:
        return {"engine": "first_order"}
