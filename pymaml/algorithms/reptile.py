"""Reptile (Nichol et al. 2018): θ ← θ + ε(θ_K − θ), θ_K from plain SGD on the task.

``meta_gradient`` returns the surrogate gradient θ − mean_τ θ_K(τ); an outer SGD step with learning
rate ε then is exactly Reptile's update (any torch.optim optimizer may be used instead). The inner
loop runs on the support set; the reported query loss is measured at θ_K and is not differentiated.
"""
import torch

from .base import Algorithm, MetaStep, task_list


class Reptile(Algorithm):
    name = "reptile"
    second_order = False

    def meta_gradient(self, tasks) -> MetaStep:
        tasks = task_list(tasks)
        params = {n: p.detach() for n, p in self.params().items()}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        q_losses, s_losses, outputs = [], [], []
        from ..functional.buffers import batch_norm_policy
        for t in tasks:
            fast = self.adapt(t.support, self.inner_steps)
            for n in grads:
                grads[n] += params[n] - fast[n]
            with torch.no_grad(), batch_norm_policy(self.model):
                out = torch.func.functional_call(self.model, fast, (t.query[0],))
                q_losses.append(self.loss_fn(out, t.query[1]))
                s_losses.append(self.loss_fn(torch.func.functional_call(self.model, params, (t.support[0],)),
                                             t.support[1]))
            outputs.append(out)
        T = len(tasks)
        self.iteration += 1
        return MetaStep(grads={n: g / T for n, g in grads.items()}, extra_grads={},
                        query_loss=torch.stack(q_losses).mean(), query_outputs=outputs,
                        support_loss=torch.stack(s_losses).mean(),
                        info={"engine": "reptile", "hvp": None, "task_batching": "loop"})
