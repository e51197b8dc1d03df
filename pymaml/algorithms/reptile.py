"""Reptile (Nichol et al. 2018): θ ← θ + ε(θ_K − θ), θ_K from plain SGD on the task.

``meta_gradient`` returns the surrogate gradient θ − mean_τ θ_K(τ); an outer SGD step with learning
rate ε then is exactly Reptile's update (any torch.optim optimizer may be used instead). The inner
loop (:func:`pymaml.functional.inner_loop`) runs on the support set, one task at a time; the
reported query loss is measured at θ_K and is not differentiated. Reptile differentiates nothing,
so ``engine`` and ``hvp`` must stay ``"auto"`` and ``task_batching`` may not be ``"vmap"``;
``memory_format`` is honoured as by the engines (channels-last for conv nets on the CPU under
``"auto"``).

Non-finite values: every inner update sets its entry of the step's ``found_inf`` flag on the
device (:class:`pymaml.functional.nonfinite.StepFlags`, row 0, shared by the tasks), so that
:class:`pymaml.MetaOptimizer` can name the inner step and the parameters where a NaN or Inf first
appeared; nothing is read on the host here.
"""
import torch

from ..functional import layout as _layout
from ..functional.buffers import batch_norm_policy
from ..functional.nonfinite import StepFlags
from .._checks import check_loss_scale
from .base import Algorithm, MetaStep, task_list


class Reptile(Algorithm):
    name = "reptile"
    second_order = False
    supported = {"engine": ("auto",), "hvp": ("auto",), "task_batching": ("auto", "loop")}

    def _why(self, key: str) -> str:
        if key == "task_batching":
            return "its inner loops run one task at a time"
        return "it differentiates nothing: its meta-gradient is θ − θ_K"

    def meta_gradient(self, tasks, loss_scale: float = 1.0) -> MetaStep:
        # nothing is differentiated, so nothing can underflow: loss_scale only multiplies the result,
        # as the other algorithms' gradients come back multiplied
        loss_scale = check_loss_scale(f"{self.name}.meta_gradient", loss_scale)
        tasks = task_list(tasks)
        own = {n: p.detach() for n, p in self.params().items()}
        layout = _layout.resolve(self.name, self.memory_format, self.model, list(own.values()), False)
        params = {n: _layout.to_layout(p, layout) for n, p in own.items()}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        adapted = self.adapted_names() or list(params)
        flags = StepFlags.new(adapted, [params[n] for n in adapted], self.inner_steps)
        q_losses, s_losses, outputs = [], [], []
        for t in tasks:
            x_s, x_q = _layout.to_layout(t.support[0], layout), _layout.to_layout(t.query[0], layout)
            fast = self.adapt((x_s, t.support[1]), self.inner_steps, params=params, flags=flags)
            for n in grads:
                grads[n] += params[n] - fast[n]
            out, lq = self.query_pass(fast, (x_q, t.query[1]))
            q_losses.append(lq)
            with torch.no_grad(), batch_norm_policy(self.model, policy=self.batch_norm):  # not a counted pass
                s_losses.append(self.loss_fn(torch.func.functional_call(self.model, params, (x_s,)), t.support[1]))
            outputs.append(out)
        T = len(tasks)
        self.iteration += 1
        return MetaStep(grads={n: _layout.like(g / T * loss_scale if loss_scale != 1.0 else g / T, own[n]) for n, g in grads.items()}, extra_grads={},
                        query_loss=torch.stack(q_losses).mean(), query_outputs=outputs,
                        support_loss=torch.stack(s_losses).mean(),
                        info={"engine": "reptile", "hvp": None, "task_batching": "loop", "memory_format": layout,
                              "batch_norm": self.batch_norm}, nonfinite=flags)
