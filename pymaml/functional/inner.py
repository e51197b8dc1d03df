"""The inner loop on any nn.Module, and the step-size forms it accepts.

θ_0 = θ;  θ_{i+1} = θ_i − α_i ⊙ (∇L_s(θ_i) + weight_decay · θ_i),  i = 0 … K−1,
with the update done by the fused ``pymaml.ops.sgd_update`` and the model run through
``torch.func.functional_call`` on a dict of parameters (the module's own tensors are never
modified).

Step sizes ``lr`` (the same forms are accepted by :func:`pymaml.functional.meta_gradient`):

* a Python float (fixed);
* a one-element Tensor shared by every adapted tensor;
* a dict ``name -> Tensor`` with, per adapted tensor, one element (per tensor, MAML++ LSLR) or the
  parameter's shape (per element, Meta-SGD); every adapted name must be present, extra keys are
  allowed (they receive zero gradient);
* a list of length ``steps`` of the above, one entry per inner step (MAML++).

Tensors in ``lr`` are read, never modified; the same tensor object used in several places is one
variable (its gradient sums the uses), exactly as autograd would see it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .buffers import batch_norm_policy
from .layout import has_conv2d

__all__ = ["Task", "inner_loop", "adapt", "split_params", "LrPlan"]


class Task(NamedTuple):
    """One few-shot task: ``support=(x_s, y_s)`` and ``query=(x_q, y_q)``. For batched tasks every
    tensor carries a leading task dimension."""
    support: Tuple[Tensor, Tensor]
    query: Tuple[Tensor, Tensor]


def split_params(op: str, params: Mapping[str, Tensor], adapt: Optional[Iterable[str]]
                 ) -> Tuple[List[str], List[str]]:
    """(adapted names, fixed names), both in ``params`` order."""
    names = list(params.keys())
    for n, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: params[{n!r}] is a {type(p).__name__}, not a Tensor")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{op}: params[{n!r}] has dtype {p.dtype}; only floating-point params are supported")
    if adapt is None:
        return names, []
    if isinstance(adapt, str):
        adapt = [adapt]
    wanted = set(adapt)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"{op}: adapt names {unknown} are not in params (known: {names})")
    return [n for n in names if n in wanted], [n for n in names if n not in wanted]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class LrPlan:
    """Parses a user ``lr`` into per-step ops-form step sizes and maps gradients back.

    ``leaves`` are detached aliases of the user's tensors (deduplicated by identity); engines may
    set ``requires_grad`` on them. ``step_lr(i, T)`` gives the ``pymaml.ops`` form for step i (a
    float, a 0-d Tensor, or a list over the adapted tensors); with a task-stack size ``T``
    per-element entries are expanded to ``(T, *shape)``.
    """

    def __init__(self, op: str, lr, steps: int, names: Sequence[str], params: Sequence[Tensor]):
        self.op, self.names, self.shapes = op, list(names), [tuple(p.shape) for p in params]
        self.leaves: List[Tensor] = []
        self._ids: Dict[int, int] = {}
        if isinstance(lr, (list, tuple)):
            if len(lr) != steps:
                raise ValueError(f"{op}: a per-step lr list must have one entry per inner step: "
                                 f"got {len(lr)} entries for steps={steps}")
            self.per_step = True
            self.entries = [self._parse(x, f"lr[{i}]") for i, x in enumerate(lr)]
        else:
            self.per_step = False
            e = self._parse(lr, "lr")
            self.entries = [e] * steps if steps > 0 else [e]
        self.any_tensor = bool(self.leaves)

    def _leaf(self, t: Tensor, where: str) -> int:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{self.op}: {where} has dtype {t.dtype}; step sizes must be floating point")
        key = id(t)
        if key not in self._ids:
            self._ids[key] = len(self.leaves)
            self.leaves.append(t.detach())
        return self._ids[key]

    def _parse(self, x, where: str):
        if _is_number(x):
            if x - x != 0:
                raise ValueError(f"{self.op}: {where} must be finite, got {x}")
            return ("float", float(x))
        if isinstance(x, Tensor):
            if x.numel() != 1:
                raise ValueError(f"{self.op}: {where} is a Tensor of shape {tuple(x.shape)}; a shared step size "
                                 f"holds one number (use a dict name -> Tensor for per-tensor/per-element)")
            return ("shared", self._leaf(x, where))
        if isinstance(x, Mapping):
            missing = [n for n in self.names if n not in x]
            if missing:
                raise ValueError(f"{self.op}: {where} has no step size for adapted params {missing}")
            keys = {}
            for k, v in x.items():
                if _is_number(v):
                    raise TypeError(f"{self.op}: {where}[{k!r}] is a number; dict step sizes must be Tensors")
                if not isinstance(v, Tensor):
                    raise TypeError(f"{self.op}: {where}[{k!r}] is a {type(v).__name__}, not a Tensor")
                keys[k] = self._leaf(v, f"{where}[{k!r}]")
            for n, shape in zip(self.names, self.shapes):
                t = self.leaves[keys[n]]
                if t.numel() != 1 and tuple(t.shape) != shape:
                    raise ValueError(f"{self.op}: {where}[{n!r}] has shape {tuple(t.shape)}; expected one element "
                                     f"or the parameter's shape {shape}")
            return ("dict", keys)
        raise TypeError(f"{self.op}: {where} must be a float, a one-element Tensor, a dict name -> Tensor "
                        f"or a per-step list of those, got {type(x).__name__}")

    def requires_grad_(self) -> List[Tensor]:
        """Makes the leaves differentiable (fresh aliases) and returns them, for autograd engines."""
        self.leaves = [t.detach().requires_grad_() for t in self.leaves]
        return self.leaves

    def step_lr(self, i: int, T: Optional[int] = None):
        kind, val = self.entries[i]
        if kind == "float":
            return val
        if kind == "shared":
            return self.leaves[val]
        out = []
        for n in self.names:
            t = self.leaves[val[n]]
            if T is not None and t.numel() != 1:
                t = t.expand(T, *t.shape)
            out.append(t)
        return out

    def zero_grads(self) -> List[Optional[Tensor]]:
        return [None] * len(self.leaves)

    def accumulate(self, acc: List[Optional[Tensor]], i: int, lr_grad, T: Optional[int] = None) -> None:
        """Adds the ``pymaml.ops.backward_step`` α-gradient of step i into the per-leaf ``acc``."""
        kind, val = self.entries[i]
        if kind == "float" or lr_grad is None:
            return
        if kind == "shared":
            pairs = [(val, lr_grad)]
        else:
            pairs = []
            for n, g in zip(self.names, lr_grad):
                leaf = self.leaves[val[n]]
                if T is not None and leaf.numel() != 1 and g.dim() == leaf.dim() + 1:
                    g = g.sum(0)
                pairs.append((val[n], g))
        for j, g in pairs:
            g = g.reshape(self.leaves[j].shape).to(self.leaves[j].dtype)
            acc[j] = g if acc[j] is None else acc[j] + g

    def to_user(self, leaf_grads: Sequence[Optional[Tensor]]):
        """Gradients in the structure of the user's ``lr`` (None for float entries)."""
        def one(entry):
            kind, val = entry
            if kind == "float":
                return None
            if kind == "shared":
                return self._g(leaf_grads, val)
            return {k: self._g(leaf_grads, j) for k, j in val.items()}
        if not self.per_step:
            return one(self.entries[0])
        return [one(e) for e in self.entries]

    def _g(self, grads, j):
        g = grads[j]
        return torch.zeros_like(self.leaves[j]) if g is None else g.detach()


def mul_lr(lr, v: Sequence[Tensor]) -> List[Tensor]:
    """α ⊙ v for an ops-form step size."""
    if isinstance(lr, float):
        return [lr * t for t in v]
    if isinstance(lr, Tensor):
        return [lr.to(t.dtype).reshape(()) * t for t in v]
    return [(a.to(t.dtype).reshape(()) if a.numel() == 1 else a.to(t.dtype)) * t for a, t in zip(lr, v)]


_HAS_CONV2D: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _has_conv2d(model: nn.Module) -> bool:
    has = _HAS_CONV2D.get(model)
    if has is None:
        has = _HAS_CONV2D[model] = has_conv2d(model)
    return has


def model_call(model: nn.Module, names_ad: Sequence[str], names_fx: Sequence[str],
               theta: Sequence[Tensor], phi: Sequence[Tensor], x: Tensor) -> Tensor:
    """The model at (θ, φ). A conv net's convolutions run through ``pymaml::convolution`` (see
    :mod:`pymaml.fast_forward`; BatchNorm is handled by :mod:`.buffers`): torch's values, and
    exact derivatives whose second order costs a weight-gradient kernel instead of torch's
    whole-feature-map convolution (under torch.func transforms, plain ``F.conv2d``)."""
    d = dict(zip(names_ad, theta))
    d.update(zip(names_fx, phi))
    if _has_conv2d(model):
        from ..fast_forward import fast_forward
        with fast_forward(fused_batch_norm=False):
            return torch.func.functional_call(model, d, (x,))
    return torch.func.functional_call(model, d, (x,))


def inner_loop(model: nn.Module, support: Tuple[Tensor, Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor], *,
          params: Optional[Mapping[str, Tensor]] = None, steps: int = 1, lr=0.01,
          adapt: Optional[Iterable[str]] = None, create_graph: bool = False,
          weight_decay: float = 0.0, batch_norm: str = "mode", flags=None) -> Dict[str, Tensor]:
    """Runs K inner SGD steps on one task's support set; returns θ_K as a dict over every name in
    ``params`` (fixed, non-adapted entries are returned as given).

    ``create_graph=True`` keeps the graph so θ_K is differentiable in ``params`` and in the ``lr``
    tensors (the unrolled path); otherwise θ_K is detached. BatchNorm follows ``batch_norm``
    (:mod:`pymaml.functional.buffers`): under ``"mode"`` a train-mode layer's running statistics
    are updated once per inner step, as by an ordinary forward pass. ``adapt`` names the adapted parameters, as in
    :func:`~pymaml.functional.meta_gradient` (default: all). ``flags`` (a
    :class:`pymaml.functional.nonfinite.StepFlags` over the adapted tensors, at least ``steps`` long)
    records on the device, without a host sync, where the update of step i met NaN or Inf (row 0,
    entry i); it is only ever set, so several tasks may share one.

    Also available under its former name ``pymaml.functional.adapt``.
    """
    op = "inner_loop"
    if params is None:
        params = dict(model.named_parameters())
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{op}: steps must be a non-negative int, got {steps!r}")
    names_ad, names_fx = split_params(op, params, adapt)
    theta = [params[n] for n in names_ad]
    phi = [params[n] for n in names_fx]
    x, y = support
    plan = LrPlan(op, lr, steps, names_ad, theta)  # validates lr whichever path runs
    with batch_norm_policy(model, policy=batch_norm) as bn, bn.counted(), torch.enable_grad():
        if create_graph:
            plan_lr = _user_lr_forms(lr, steps, names_ad)  # the user's own tensors: the graph reaches them
            th = list(theta)
            for i in range(steps):
                leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in th]
                loss = loss_fn(model_call(model, names_ad, names_fx, leaves, phi, x), y)
                g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]
                th = ops.sgd_update(leaves, g, plan_lr[i], weight_decay, found_inf=_slot(flags, i))
        else:
            th = [t.detach() for t in theta]
            ph = [p.detach() for p in phi]
            for i in range(steps):
                leaves = [t.requires_grad_() for t in (t.detach() for t in th)]
                loss = loss_fn(model_call(model, names_ad, names_fx, leaves, ph, x), y)
                g = torch.autograd.grad(loss, leaves, allow_unused=True)
                g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]
                with torch.no_grad():
                    th = ops.sgd_update([t.detach() for t in leaves], g, plan.step_lr(i), weight_decay,
                                        found_inf=_slot(flags, i))
    out = dict(params)
    out.update(zip(names_ad, th))
    return out


def _slot(flags, i: int) -> Optional[Tensor]:
    """The ``found_inf`` of the update of inner step i (None when not recorded)."""
    return None if flags is None else flags.slot(0, i)


#: former name of :func:`inner_loop`
adapt = inner_loop


def _user_lr_forms(lr, steps: int, names: Sequence[str]):
    """Per-step ops-form step sizes built from the user's own tensors (graph kept)."""
    def one(x):
        if isinstance(x, Mapping):
            return [x[n] for n in names]
        return x
    if isinstance(lr, (list, tuple)):
        if len(lr) != steps:
            raise ValueError(f"inner_loop: a per-step lr list must have one entry per inner step: "
                             f"got {len(lr)} entries for steps={steps}")
        return [one(x) for x in lr]
    return [one(lr)] * steps
