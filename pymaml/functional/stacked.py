"""A stack of tasks through a fully connected net without ``torch.func.vmap``.

For a batched unit (:mod:`pymaml.functional.batching`) the adapted parameters carry a leading task
dimension. When the model is built only from ``nn.Linear`` layers and element-wise activations —
an ``nn.Sequential`` tree of them, or :class:`pymaml.models.MLP` — its forward pass over T tasks at
once is a chain of batched matrix products (``torch.baddbmm``) and the activations applied to
[T, n, features] tensors: plain autograd ops, with none of the per-op cost of vmap's batching
rules. On the sinusoid MLP (1-40-40-1, 25 tasks of 10 points, one inner step, exact second order)
the meta-gradient took 1.45 ms this way against 2.9 ms for the same computation written with
``torch.func.vmap`` (CPU, one thread).

:func:`stacked_forward` returns ``None`` for any other model (including nets with dropout: vmap's
``randomness="different"`` then keeps the loop's semantics), and the unit keeps using vmap.
The per-task loss is computed from the stacked outputs: ``F.mse_loss`` and ``F.cross_entropy`` (mean
reductions) directly, any other loss function under ``torch.func.vmap`` (one small call).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MLP

__all__ = ["stacked_forward", "stacked_task_losses"]

# Modules applied element-wise: the same module call works on a [T, n, features] tensor.
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity,
              nn.Hardtanh, nn.ReLU6, nn.Mish)

Layer = Tuple[str, object]  # ("linear", prefix) or ("pointwise", module)


def _layers(module: nn.Module, prefix: str, out: List[Layer]) -> bool:
    # exact types: a subclass may override forward
    if type(module) is nn.Linear:
        out.append(("linear", prefix))
        return True
    if type(module) in _POINTWISE:
        out.append(("pointwise", module))
        return True
    if type(module) is nn.Sequential:
        return all(_layers(m, f"{prefix}{name}.", out) for name, m in module.named_children())
    if type(module) is MLP:
        return _layers(module.body, f"{prefix}body.", out) and _layers(module.head, f"{prefix}head.", out)
    return False


def _plan(model: nn.Module) -> Optional[List[Layer]]:
    layers: List[Layer] = []
    if not _layers(model, "", layers) or not any(k == "linear" for k, _ in layers):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None  # hooks would not run on the stacked path
    return layers


def stacked_forward(model: nn.Module) -> Optional[Callable[[Dict[str, Tensor], Tensor], Tensor]]:
    """``f(params, x)`` computing the model on a stack of tasks, or None if the model is not a plain
    chain of Linear layers and element-wise activations. ``params`` maps every parameter name to a
    tensor that is either stacked ([T, *shape], adapted) or shared (``shape``, fixed); ``x`` is
    [T, n, in_features]. Returns [T, n, out_features]."""
    layers = _plan(model)
    if layers is None:
        return None

    def own(params: Dict[str, Tensor], name: str) -> Optional[Tensor]:
        # names missing from params keep the module's own value (a frozen parameter, say)
        if name in params:
            return params[name]
        try:
            return model.get_parameter(name)
        except AttributeError:  # a Linear without bias
            return None

    def f(params: Dict[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for kind, what in layers:
            if kind == "pointwise":
                h = what(h)
                continue
            w, b = own(params, what + "weight"), own(params, what + "bias")
            if w.dim() == 3 and b is not None and b.dim() == 2:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:
                h = torch.matmul(h, w.transpose(-1, -2))
                if b is not None:
                    h = h + (b.unsqueeze(1) if b.dim() == 2 else b)
        return h

    return f


def stacked_task_losses(loss_fn: Callable, out: Tensor, y: Tensor) -> Tensor:
    """Per-task losses [T] of stacked outputs: ``loss_fn(out[t], y[t])`` for every t."""
    if loss_fn is F.mse_loss and out.shape == y.shape:
        return (out - y).square().flatten(1).mean(1)
    if loss_fn is F.cross_entropy and out.dim() == 3 and y.dim() == 2 and not y.is_floating_point():
        T, n = y.shape
        return F.cross_entropy(out.reshape(T * n, -1), y.reshape(-1), reduction="none").view(T, n).mean(1)
    losses = torch.func.vmap(loss_fn)(out, y)
    if losses.dim() != 1:
        raise ValueError(f"meta_gradient: loss_fn(output, target) must return a scalar Tensor (one loss per task), "
                         f"got shape {tuple(losses.shape[1:])}")
    return losses
