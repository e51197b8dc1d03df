"""learn2learn's ``MAML`` and ``MetaSGD``, at pymaml's speed: change the import, keep the script.

    maml = pymaml.MAML(model, lr=0.4, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    for task in batch:
        learner = maml.clone()                       # differentiable copies of θ
        learner.adapt(loss_fn(learner(x_s), y_s))    # θ' = θ − α ∇L_s, one fused update
        (loss_fn(learner(x_q), y_q) / len(batch)).backward()
    opt.step()

Everything a learn2learn (0.2.x) script can observe is the same: a learner's ``parameters()``,
``named_parameters()``, ``state_dict()`` and ``.module`` hold the adapted weights
(``learner.module(x)`` equals ``learner(x)``); unknown attributes and methods reach the wrapped
module and run with the adapted weights; ``clone()`` of a clone, ``adapt()`` on the wrapper itself,
``first_order``/``allow_unused``/``allow_nograd``, shared parameters, RNNs, ``deepcopy`` of the
wrapper; ``train()``/``eval()``/``.to()`` on a learner stay on the learner; BatchNorm follows the
module's mode (train: batch statistics, running statistics updated by every forward pass of every
learner, which shares them with the meta-model; eval: running statistics). The differences are
listed in the README ("Drop-in for learn2learn"): errors are raised as exceptions with the
parameter names where learn2learn prints a traceback and fails later.

What is faster: the update is one fused multi-tensor op; BatchNorm layers with batch statistics
run through the fused double backward, and convolutions through an op whose second derivative
uses the weight-gradient kernel instead of torch's whole-feature-map convolution
(:mod:`pymaml.fast_forward`); the autograd of these ops runs in C++, with no Python per backward
node; CPU conv nets are kept in channels-last order end to end (``memory_format="auto"``, as
:func:`pymaml.functional.meta_gradient`). Results are those of learn2learn up to floating-point
rounding (convolutions in another layout, and second derivatives of convolutions, sum in another
order). This is the unrolled path: memory grows with the number of adaptation steps;
for the memory-flat exact engine use :class:`pymaml.MetaOptimizer` or
:func:`pymaml.functional.meta_gradient`.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .fast_forward import fast_forward, layout_inputs
from .functional.layout import MEMORY_FORMATS, is_layout_error, resolve as resolve_layout
from .module_utils import clone_module, clone_tensor, swap_parameters

__all__ = ["MAML", "MetaSGD"]


class _Shared:
    """Settings and findings shared by a wrapper and every learner cloned from it."""

    def __init__(self, memory_format: str, fused_batch_norm: bool):
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"pymaml.MAML: memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.memory_format = memory_format
        self.fused_batch_norm = fused_batch_norm
        self.layout_failed = False   # the model raised in channels-last: stay in the given layout
        self.layout_verified = False  # one channels-last forward succeeded

    def clone_layout(self, module: nn.Module) -> str:
        """The engines' rule (:func:`pymaml.functional.layout.resolve`, one task at a time), unless
        the model has shown it cannot run channels-last."""
        if self.layout_failed:
            return "preserve"
        return resolve_layout("pymaml.MAML", self.memory_format, module, list(module.parameters()), batched=False)


def _bn_buffers(module: nn.Module) -> List[Tensor]:
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers() if b is not None]


class _Learner(nn.Module):
    """What MAML and MetaSGD share: the wrapped ``module``, attribute pass-through, the fast forward."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], name)

    def _init_shared(self, memory_format: str, fused_batch_norm: bool, shared: Optional[_Shared], layout: str):
        self.__dict__["_shared"] = shared if shared is not None else _Shared(memory_format, fused_batch_norm)
        self.__dict__["_layout"] = layout

    def forward(self, *args, **kwargs):
        shared, layout = self._shared, self._layout
        if layout != "channels_last":
            with fast_forward(shared.fused_batch_norm):
                return self.module(*args, **kwargs)
        saved = None if shared.layout_verified else [b.clone() for b in _bn_buffers(self.module)]
        try:
            cargs, ckwargs = layout_inputs(args, kwargs, layout)
            with fast_forward(shared.fused_batch_norm):
                out = self.module(*cargs, **ckwargs)
        except RuntimeError as e:
            if shared.layout_verified or not is_layout_error(e):
                raise
            warnings.warn(f"pymaml.{type(self).__name__}: the model does not run in channels-last order "
                          f"({str(e).splitlines()[0]}); running it in the layout it was given (slower on the "
                          "CPU). Use .reshape or torch.flatten instead of .view to keep the fast layout, "
                          "or pass memory_format='preserve' to silence this warning.", stacklevel=2)
            shared.layout_failed = True
            with torch.no_grad():
                for b, s in zip(_bn_buffers(self.module), saved):
                    b.copy_(s)
            self._drop_channels_last()
            return self.forward(*args, **kwargs)
        shared.layout_verified = True
        return out

    def _drop_channels_last(self) -> None:
        """Lays the learner's 4-D parameters out in NCHW order again (differentiably)."""
        # clone(contiguous_format), not .contiguous(): a one-channel weight in NHWC strides
        # counts as contiguous and would keep them (and the conv its NHWC output)
        new = {id(p): p.clone(memory_format=torch.contiguous_format) for p in self.module.parameters()
               if p.dim() == 4 and p.stride() != torch.empty(p.shape, device="meta").stride()}
        swap_parameters(self.module, new)
        self.__dict__["_layout"] = "preserve"

    def _clone_module(self) -> nn.Module:
        layout = self._shared.clone_layout(self.module)
        return clone_module(self.module, layout), layout

    def _gradients(self, op: str, loss: Tensor, params: Sequence[Tensor], first_order: bool,
                   allow_unused: bool, allow_nograd: bool) -> List[Optional[Tensor]]:
        """``∇loss`` for each of ``params`` (None where learn2learn leaves a parameter as it is)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        frozen = [names[id(p)] for p in params if not p.requires_grad]
        if frozen and not allow_nograd:
            raise RuntimeError(f"{op}: parameters {frozen} do not require grad; pass allow_nograd=True to "
                               "adapt only the others")
        diff = [p for p in params if p.requires_grad]
        second_order = not first_order
        got = torch.autograd.grad(loss, diff, retain_graph=second_order, create_graph=second_order,
                                  allow_unused=True) if diff else ()
        unused = [names[id(p)] for p, g in zip(diff, got) if g is None]
        if unused and not allow_unused:
            raise RuntimeError(f"{op}: the loss does not depend on parameters {unused}; pass allow_unused=True "
                               "to leave them unchanged")
        by_id = {id(p): g for p, g in zip(diff, got)}
        return [by_id.get(id(p)) for p in params]


class MAML(_Learner):
    """learn2learn's ``MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False)``.

    Extra keyword arguments (pymaml's): ``memory_format`` (``"auto"``: channels-last for CPU conv
    nets; ``"channels_last"``; ``"preserve"``) and ``fused_batch_norm`` (default True)."""

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False, *, memory_format: str = "auto", fused_batch_norm: bool = True,
                 _shared: Optional[_Shared] = None, _layout: str = "preserve"):
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self._init_shared(memory_format, fused_batch_norm, _shared, _layout)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A learner whose parameters are differentiable copies (``torch.clone``) of this one's."""
        module, layout = self._clone_module()
        return MAML(module, self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
                    _shared=self._shared, _layout=layout)

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One SGD step on ``loss``, θ ← θ − lr ∇θ loss, in place on this learner's module; kept in
        the graph (second order) unless ``first_order``."""
        params = list(self.module.parameters())
        grads = self._gradients("MAML.adapt", loss, params,
                                self.first_order if first_order is None else first_order,
                                self.allow_unused if allow_unused is None else allow_unused,
                                self.allow_nograd if allow_nograd is None else allow_nograd)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not pairs:
            return
        new = ops.sgd_update([p for p, _ in pairs], [g for _, g in pairs], self.lr)
        swap_parameters(self.module, {id(p): n for (p, _), n in zip(pairs, new)})


class MetaSGD(_Learner):
    """learn2learn's ``MetaSGD(model, lr=1.0, first_order=False, lrs=None)``: per-element step sizes
    ``lrs`` (one tensor per parameter, initialised to ``lr``), learned with the model."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None, *,
                 memory_format: str = "auto", fused_batch_norm: bool = True,
                 _shared: Optional[_Shared] = None, _layout: str = "preserve"):
        super().__init__()
        self.module = model
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order
        self._init_shared(memory_format, fused_batch_norm, _shared, _layout)

    def clone(self) -> "MetaSGD":
        """A learner with differentiable copies of the parameters and of the step sizes."""
        module, layout = self._clone_module()
        lrs = [clone_tensor(lr, layout) for lr in self.lrs]  # laid out as their parameters
        return MetaSGD(module, lrs=lrs, first_order=self.first_order, _shared=self._shared, _layout=layout)

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None) -> None:
        """One step θ ← θ − lrs ⊙ ∇θ loss (second order unless ``first_order``)."""
        params = list(self.module.parameters())
        lrs = list(self.lrs)
        if len(lrs) != len(params):
            raise ValueError(f"MetaSGD.adapt: {len(lrs)} step sizes for {len(params)} parameters")
        grads = self._gradients("MetaSGD.adapt", loss, params,
                                self.first_order if first_order is None else first_order, False, False)
        if all(isinstance(lr, Tensor) and lr.shape == p.shape for p, lr in zip(params, lrs)):
            new = ops.sgd_update(params, grads, lrs)
        else:  # step sizes that broadcast (a scalar per tensor, say): learn2learn's arithmetic
            new = [p - lr * g for p, lr, g in zip(params, lrs, grads)]
        swap_parameters(self.module, {id(p): n for p, n in zip(params, new)})
