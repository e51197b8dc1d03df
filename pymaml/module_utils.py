"""Differentiable module surgery for the learn2learn-style door: clone, update, detach.

The same contract as learn2learn's ``clone_module``/``update_module``/``detach_module``:

- :func:`clone_module` returns a copy of every submodule whose parameters are ``torch.clone``-d
  (differentiable, non-leaf) tensors. Buffers are shared with the original (a BatchNorm layer of the
  clone updates the running statistics of the original), except buffers that require grad, which
  are cloned. Parameters shared between submodules stay shared in the clone. The submodules are new
  objects, so ``train()``, ``eval()`` or ``.to()`` on the clone do not reach the original.
- :func:`update_module` swaps each parameter for its update in every submodule that holds it.
- :func:`detach_module` cuts a clone from the graph.

``clone_module(module, memory_format="channels_last")`` lays the 4-D parameters (conv weights) of
the clone out channels-last, which is how :class:`pymaml.MAML` keeps a CPU conv net in NHWC order
(see ``docs/design.md``, layout policy); values are unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["clone_module", "update_module", "detach_module", "swap_parameters"]


def clone_tensor(t: Tensor, memory_format: str = "preserve") -> Tensor:
    """``t.clone()``; with ``memory_format="channels_last"`` a 4-D ``t`` is cloned into channels-last
    strides (explicit NHWC strides also for one channel, where ``t.contiguous(memory_format=...)``
    would keep the NCHW ones)."""
    if memory_format == "channels_last" and t.dim() == 4:
        return t.clone(memory_format=torch.channels_last)
    return t.clone()


def _refresh_rnn(m: nn.Module) -> None:
    """RNN modules keep a flat list of their weights; rebuild it after the parameters were swapped."""
    if hasattr(m, "_init_flat_weights"):
        m._init_flat_weights()
    elif hasattr(m, "flatten_parameters"):
        m._apply(lambda t: t)


def clone_module(module: nn.Module, memory_format: str = "preserve",
                 _memo: Optional[Dict[int, Tensor]] = None, _mods: Optional[Dict[int, nn.Module]] = None) -> nn.Module:
    """A copy of ``module`` with differentiable clones of its parameters (learn2learn's contract).

    ``memory_format``: ``"preserve"`` (clones keep the parameters' strides) or ``"channels_last"``
    (4-D parameters are cloned into channels-last strides)."""
    if not isinstance(module, nn.Module):
        return module
    memo = {} if _memo is None else _memo
    mods = {} if _mods is None else _mods
    if id(module) in mods:  # a submodule registered twice stays one object in the clone
        return mods[id(module)]
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    clone._modules = module._modules.copy()
    mods[id(module)] = clone
    for key, p in module._parameters.items():
        if p is None:
            continue
        if id(p) not in memo:
            memo[id(p)] = clone_tensor(p, memory_format)
        clone._parameters[key] = memo[id(p)]
    for key, b in module._buffers.items():
        if b is not None and b.requires_grad:
            if id(b) not in memo:
                memo[id(b)] = b.clone()
            clone._buffers[key] = memo[id(b)]
    for key, sub in module._modules.items():
        clone._modules[key] = clone_module(sub, memory_format, memo, mods)
    _refresh_rnn(clone)
    return clone


def swap_parameters(module: nn.Module, new: Dict[int, Tensor], _seen: Optional[set] = None) -> nn.Module:
    """Replaces, in every submodule, each parameter ``p`` with ``id(p)`` in ``new`` by ``new[id(p)]``
    (in place on the module objects; the tensors themselves are not modified)."""
    seen = set() if _seen is None else _seen
    if id(module) in seen:
        return module
    seen.add(id(module))
    for key, p in module._parameters.items():
        if p is not None and id(p) in new:
            module._parameters[key] = new[id(p)]
    for sub in module._modules.values():
        if sub is not None:
            swap_parameters(sub, new, seen)
    _refresh_rnn(module)
    return module


def update_module(module: nn.Module, updates: Optional[Sequence[Optional[Tensor]]] = None) -> nn.Module:
    """learn2learn's ``update_module``: ``p <- p + u`` for each parameter ``p`` of
    ``module.parameters()`` and its update ``u`` in ``updates`` (``None``: left as it is), in every
    submodule that holds ``p``; differentiable. Without ``updates``, each parameter's ``.update``
    attribute is used (and reset), as in learn2learn."""
    params = list(module.parameters())
    if updates is None:
        updates = [getattr(p, "update", None) for p in params]
        for p in params:
            if getattr(p, "update", None) is not None:
                p.update = None
    updates = list(updates)
    if len(updates) != len(params):
        raise ValueError(f"update_module: the module has {len(params)} parameters but {len(updates)} updates were given")
    return swap_parameters(module, {id(p): p + u for p, u in zip(params, updates) if u is not None})


def detach_module(module: nn.Module, keep_requires_grad: bool = False,
                  _memo: Optional[Dict[int, Tensor]] = None) -> nn.Module:
    """Detaches the parameters (and the buffers that require grad) of a clone from its graph; with
    ``keep_requires_grad`` the ones that required grad still do (as new leaves). A tensor shared by
    several submodules stays shared."""
    memo = {} if _memo is None else _memo

    def cut(t: Tensor, was: bool) -> Tensor:
        if id(t) not in memo:
            d = t.detach()
            if keep_requires_grad and was:
                d.requires_grad_()
            memo[id(t)] = d
        return memo[id(t)]

    for key, p in module._parameters.items():
        if p is not None:
            module._parameters[key] = cut(p, p.requires_grad)
    for key, b in module._buffers.items():
        if b is not None and b.requires_grad:
            module._buffers[key] = cut(b, True)
    for sub in module._modules.values():
        if sub is not None:
            detach_module(sub, keep_requires_grad, memo)
    _refresh_rnn(module)
    return module
