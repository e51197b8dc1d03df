"""The meta-optimizer: meta-learning inside an existing training loop.

    model = ConvNet(1, 5, 64, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = pymaml.MetaOptimizer(model, opt, algorithm="maml", loss_fn=F.cross_entropy,
                                inner_lr=0.4, inner_steps=1)
    for x_s, y_s, x_q, y_q in batches:          # task-stacked tensors, or a list of Task
        stats = meta.step((x_s, y_s, x_q, y_q))  # zero_grad, meta-gradient into .grad, opt.step()

``step`` is ``zero_grad`` + :meth:`MetaOptimizer.backward` + (optional clipping) + the outer
optimizer's ``step()``. Code that wants its own clipping, schedulers, gradient accumulation or its
own all-reduce in between calls :meth:`backward` instead: it only ADDS the meta-gradient into ``.grad``
of the model's parameters and of the algorithm's learned step sizes (as ``loss.backward()`` would)
and leaves the optimizer alone. The learned step sizes (Meta-SGD, MAML++) are added to the outer
optimizer as an extra parameter group when it does not hold them yet.

Data parallel (``torchrun``, one process per device): ``distributed=True`` makes each process pass
its own share of the meta-batch to :meth:`step`/:meth:`backward`; the meta-gradients are then
reduced across processes so that every process steps as one process would on the whole
meta-batch (:mod:`pymaml.distributed`, ``docs/distributed.md``)::

    pymaml.distributed.init_from_env()                  # gloo on CPU, NCCL on GPU
    meta = pymaml.MetaOptimizer(model, opt, "maml", F.cross_entropy, distributed=True)
    start, stop = pymaml.distributed.shard(meta_batch)  # this rank's global task indices
    stats = meta.step(sampler.tasks(range(it * meta_batch + start, it * meta_batch + stop)))
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import ops
from .algorithms import Algorithm, make

__all__ = ["MetaOptimizer", "NONFINITE"]

#: What :meth:`MetaOptimizer.step` does with a meta-gradient holding NaN or Inf.
NONFINITE = ("raise", "skip", "allow")


class MetaOptimizer:
    """Meta-gradients for ``model`` with ``algorithm``, stepped by ``outer_optimizer``.

    Args:
        model: the nn.Module whose parameters θ are meta-learned.
        outer_optimizer: any ``torch.optim.Optimizer`` over (at least) the model's parameters.
        algorithm: a name from :data:`pymaml.algorithms.ALGORITHMS` or an :class:`Algorithm`.
        loss_fn: ``loss_fn(output, target) -> scalar`` (required with an algorithm name).
        max_grad_norm: clip the global norm of every meta-gradient in :meth:`step` (None: no clip).
        step_size_lr: outer learning rate of the learned step sizes' group (default: the first
            group's ``lr``).
        distributed: data-parallel over the default (or ``group``) process group of
            ``torch.distributed``: parameters are broadcast from rank 0 here, each call to
            :meth:`backward` takes this rank's share of the meta-batch (possibly empty) and leaves in
            ``.grad`` the meta-gradient of the whole meta-batch, and :meth:`step` checks every
            ``check_every`` steps that the parameters are still identical on every rank
            (:class:`pymaml.distributed.ParameterDriftError` otherwise; 0: never).
        nonfinite: what :meth:`step` does when a NaN or Inf appears in an inner-loop gradient, a
            Hessian-vector product or the meta-gradient: ``"raise"`` (default without a scaler: a
            ``FloatingPointError`` naming the op, the inner or adjoint step where it first appeared,
            the parameters and the outer step; nothing updated), ``"skip"`` (default with a scaler:
            no outer update, counted in ``skipped_steps``, as ``torch.amp.GradScaler`` skips), or
            ``"allow"`` (no check; not with a scaler, which always skips). The fused inner-loop and
            adjoint ops set per-step flags on the device as they pass over the data (no host sync
            inside the meta-gradient); :meth:`step` reads them, with one device-side check of the
            meta-gradient, once per outer step. With ``"skip"`` and an outer optimizer that takes
            GradScaler's ``found_inf`` (``fused=True`` SGD, Adam, AdamW, Adagrad), nothing is read:
            the optimizer skips on the device and ``skipped_steps`` is read from the device when
            asked. With ``distributed=True`` the meta-gradient is the reduced one and a step flag
            set on any rank counts on every rank (it travels in the meta-gradient's reduction), so
            the ranks decide alike; the message names the op and step where this rank met the value,
            or says that another rank did. With a scaler (whose scaled adjoint may overflow by
            design) only the meta-gradient decides; it is reduced before the scaler looks, so with
            ``distributed=True`` a NaN or Inf on one rank makes every rank skip.
        scaler: a ``torch.amp.GradScaler`` for float16 autocast. :meth:`backward` multiplies the
            query losses by the scaler's scale before differentiating (the support losses, and so
            the inner loop, are not scaled), :meth:`step` unscales the gradients once
            (``scaler.unscale_``), clips, steps through ``scaler.step`` (which skips the step when
            a gradient is not finite) and calls ``scaler.update()``. The scaler's state is part of
            :meth:`state_dict`.
        **settings: the algorithm's settings (``inner_lr``, ``inner_steps``, ``engine``, ...).
    """

    def __init__(self, model: nn.Module, outer_optimizer: torch.optim.Optimizer,
                 algorithm: Union[str, Algorithm] = "maml", loss_fn: Optional[Callable] = None, *,
                 max_grad_norm: Optional[float] = None, step_size_lr: Optional[float] = None,
                 distributed: bool = False, check_every: int = 100, group=None, nonfinite: Optional[str] = None,
                 scaler: Optional["torch.amp.GradScaler"] = None, **settings):
        _dist.reject_ddp(model, "MetaOptimizer")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"MetaOptimizer: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if nonfinite is None:
            nonfinite = "skip" if self.scaler is not None else "raise"
        if nonfinite not in NONFINITE:
            raise ValueError(f"MetaOptimizer: nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if nonfinite == "allow" and self.scaler is not None:
            raise ValueError("MetaOptimizer: nonfinite='allow' cannot be honoured with a GradScaler, which skips "
                             "every step whose gradients are not finite; use 'skip' or 'raise'")
        self.nonfinite, self._skipped, self._skipped_on_device = nonfinite, 0, None
        self._flags = None  # the StepFlags of the last meta-gradient
        self._flagged_anywhere = None  # distributed: whether a step flag was set on some rank
        if distributed and not _dist.is_initialized():
            raise RuntimeError("MetaOptimizer(distributed=True): torch.distributed is not initialized; call "
                               "pymaml.distributed.init_from_env() (under torchrun) or "
                               "torch.distributed.init_process_group() first")
        if isinstance(algorithm, Algorithm):
            if settings or loss_fn is not None:
                raise ValueError("MetaOptimizer: pass settings and loss_fn to the Algorithm, not here, "
                                 f"when giving an Algorithm instance (got {sorted(settings)})")
            self.algorithm = algorithm
        else:
            if loss_fn is None:
                raise ValueError(f"MetaOptimizer: loss_fn is required with algorithm={algorithm!r}")
            self.algorithm = make(algorithm, model, loss_fn, **settings)
        if self.algorithm.model is not model:
            raise ValueError("MetaOptimizer: the algorithm was built for another model")
        self.model, self.optimizer, self.max_grad_norm = model, outer_optimizer, max_grad_norm
        held = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
        extra = [p for p in self.algorithm.parameters() if id(p) not in held]
        if extra:
            lr = step_size_lr if step_size_lr is not None else outer_optimizer.param_groups[0]["lr"]
            outer_optimizer.add_param_group({"params": extra, "lr": lr})
        self.last_info: Dict[str, object] = {}
        self.distributed, self.check_every, self.group, self.steps_done = distributed, int(check_every), group, 0
        if distributed:
            _dist.broadcast_module(self._state_tensors(), group=group)

    def _state_tensors(self):
        """What must be identical on every rank: parameters and buffers of the model and algorithm."""
        return [*self.model.parameters(), *self.model.buffers(), *self.algorithm.parameters(),
                *self.algorithm.buffers()]

    def parameters(self):
        """Every tensor that receives a meta-gradient: the model's, then the algorithm's."""
        yield from self.model.parameters()
        yield from self.algorithm.parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @staticmethod
    def _accumulate(p: Tensor, g: Tensor) -> None:
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)

    def backward(self, tasks) -> Dict[str, float]:
        """Adds the meta-gradient of the mean query loss over ``tasks`` into ``.grad``; returns
        ``{"query_loss", "support_loss"[, "accuracy"]}`` (accuracy for integer class targets).
        With ``distributed=True``, ``tasks`` is this rank's share (``None`` or empty for none) and
        the gradient and the statistics are those of the whole meta-batch."""
        if self.distributed:
            return self._distributed_backward(tasks)
        res = self._meta_gradient(tasks)
        self._flags = res.nonfinite
        own = dict(self.algorithm.named_parameters())
        for name, p in self.model.named_parameters():
            g = res.grads.get(name)
            if g is not None and p.requires_grad:
                self._accumulate(p, g)
        for name, g in res.extra_grads.items():
            self._accumulate(own[name], g)
        self.last_info = dict(res.info)
        stats = {"query_loss": float(res.query_loss), "support_loss": float(res.support_loss)}
        acc = query_accuracy(tasks, res.query_outputs)
        if acc is not None:
            stats["accuracy"] = acc
        return stats

    def _meta_gradient(self, tasks):
        """The algorithm's meta-gradient; with a scaler, of the query losses times its scale."""
        if self.scaler is None:
            return self.algorithm.meta_gradient(tasks)
        dev = next(iter(self.parameters())).device
        self.scaler.scale(torch.zeros((), device=dev))  # the scaler's own (lazy) set-up on the device
        return self.algorithm.meta_gradient(tasks, loss_scale=self.scaler.get_scale())

    def _distributed_backward(self, tasks) -> Dict[str, float]:
        n = task_count(tasks)
        named = [(n_, p) for n_, p in self.model.named_parameters() if p.requires_grad]
        named += [("algorithm." + n_, p) for n_, p in self.algorithm.named_parameters()]
        grads, stats, acc = {}, [0.0, 0.0, 0.0, 0.0], None
        if n > 0:
            res = self._meta_gradient(tasks)
            self._flags = res.nonfinite
            grads = dict(res.grads)
            grads.update({"algorithm." + k: g for k, g in res.extra_grads.items()})
            acc = query_accuracy(tasks, res.query_outputs)
            # this rank's step flags, as one number in the statistics' reduction: > 0 when any rank's are set
            flagged = 0.0 if res.nonfinite is None else (res.nonfinite.flags != 0).any().float()
            stats = [res.query_loss, res.support_loss, 0.0 if acc is None else acc, flagged]
            self.last_info = dict(res.info)
        else:  # an empty share: zeros into the same collectives; the algorithm's counter still advances
            self.algorithm.iteration += 1
        reduced, (q, s, a, f), total = _dist.reduce_grads(named, grads, n, stats, group=self.group)
        if self.distributed:  # one reduced number, read with the losses below
            self._flagged_anywhere = float(f) > 0
        for name, p in named:
            if reduced[name] is not None:
                self._accumulate(p, reduced[name])
        out = {"query_loss": float(q), "support_loss": float(s), "tasks": total}
        if acc is not None:
            out["accuracy"] = float(a)
        return out

    def step(self, tasks) -> Dict[str, float]:
        """zero_grad, :meth:`backward`, optional clipping, ``outer_optimizer.step()``."""
        self.zero_grad()
        self._flags = self._flagged_anywhere = None
        stats = self.backward(tasks)
        if self.scaler is not None:
            return self._scaled_step(stats)
        found_inf = None
        if self.nonfinite == "skip" and getattr(self.optimizer, "_step_supports_amp_scaling", False):
            found_inf = self._found_inf_on_device()
        if self.nonfinite != "allow" and found_inf is None:
            where = self._find_nonfinite()
            if where is not None:
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"MetaOptimizer.step: NaN or Inf at outer step {self.steps_done}: {where}; nothing was "
                        "updated. Pass nonfinite='skip' to skip such steps (counted in skipped_steps) or "
                        "nonfinite='allow' to apply them")
                return self._skip(stats)
        self._clip(stats)
        if self.nonfinite != "allow" and not math.isfinite(stats.get("grad_norm", 0.0)):
            # a finite meta-gradient whose norm overflows: clipping would scale it to zero
            where = (f"global_norm: the global norm of the meta-gradient, {stats['grad_norm']}, is not finite (its "
                     f"sum of squares exceeds the range of the gradients' dtype), so clipping to max_grad_norm="
                     f"{self.max_grad_norm} would scale every gradient by 0")
            if self.nonfinite == "raise":
                raise FloatingPointError(f"MetaOptimizer.step: {where}, at outer step {self.steps_done}; nothing "
                                         "was updated. Pass nonfinite='skip' to skip such steps")
            return self._skip(stats)
        if found_inf is None:
            self.optimizer.step()
        else:  # GradScaler's protocol: the fused kernels skip the update on the device when found_inf != 0
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
            self._skipped_on_device = found_inf if self._skipped_on_device is None else self._skipped_on_device + found_inf
        return self._stepped(stats)

    def _scaled_step(self, stats: Dict[str, float]) -> Dict[str, float]:
        """unscale_, clip, ``scaler.step`` (skipped on non-finite gradients), ``scaler.update``."""
        scaler, scale = self.scaler, self.scaler.get_scale()
        scaler.unscale_(self.optimizer)
        self._clip(stats)
        # The scaled adjoint may overflow by design (the scaler then backs off): the meta-gradient decides.
        where = self._find_nonfinite(use_flags=False) if self.nonfinite == "raise" else None
        scaler.step(self.optimizer)
        scaler.update()
        stats["loss_scale"] = scale
        if scaler.get_scale() < scale:  # the scaler backs off exactly when it skipped the step
            if where is not None:
                raise FloatingPointError(
                    f"MetaOptimizer.step: {where} at outer step {self.steps_done} (loss scale {scale:g}); "
                    "nothing was updated. With a GradScaler pass nonfinite='skip' (the default) to skip such "
                    "steps and lower the scale")
            return self._skip(stats)
        return self._stepped(stats)

    def _clip(self, stats: Dict[str, float]) -> None:
        if self.max_grad_norm is not None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            stats["grad_norm"] = float(ops.clip_grad_norm_(grads, self.max_grad_norm))

    def _skip(self, stats: Dict[str, float]) -> Dict[str, float]:
        """An outer step skipped for NaN or Inf: counted, gradients cleared."""
        self._skipped += 1
        self.zero_grad()
        stats["skipped"] = 1.0
        return stats

    def _stepped(self, stats: Dict[str, float]) -> Dict[str, float]:
        """After an outer update: count it, and check the ranks every ``check_every`` steps."""
        self.steps_done += 1
        if self.distributed and self.check_every and self.steps_done % self.check_every == 0:
            self.check_in_sync()
        return stats

    def _named_parameters(self):
        yield from self.model.named_parameters()
        for n, p in self.algorithm.named_parameters():
            yield "algorithm." + n, p

    @property
    def skipped_steps(self) -> int:
        """Outer steps skipped for NaN or Inf (waits for the device when it decided the skips)."""
        n = self._skipped
        if self._skipped_on_device is not None:
            n += int(self._skipped_on_device.item())
        return n

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self._skipped, self._skipped_on_device = int(n), None

    def _step_flags(self):
        """The last meta-gradient's StepFlags when they alone may decide (not distributed: they are
        this rank's own), else None."""
        return None if self.distributed else self._flags

    def _found_inf_on_device(self) -> Optional[Tensor]:
        """A 0-d float32 flag, 1 when the meta-gradient or a step flag holds NaN or Inf, computed
        on the device without a read; None when the parameters span several devices."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flags = self._step_flags()
        devices = {g.device for g in grads} | ({flags.flags.device} if flags is not None else set())
        if len(devices) != 1:
            return None
        bad = torch.stack([~g.isfinite().all() for g in grads]).any() if grads else flags.flags.new_zeros((), dtype=torch.bool)
        if flags is not None:
            bad = bad | (flags.flags != 0).any()
        if self._flagged_anywhere is not None:  # distributed: a step flag on any rank
            bad = bad | self._flagged_anywhere
        return bad.to(torch.float32)

    def _find_nonfinite(self, use_flags: bool = True) -> Optional[str]:
        """None when every ``.grad`` (and step flag, with ``use_flags``) is finite, else where the
        NaN or Inf first appeared and which meta-gradients hold one. One device-side reduction,
        one read. Distributed, the flags of every rank count (:attr:`_flagged_anywhere`), so that
        every rank decides alike."""
        named = [(n, p.grad) for n, p in self._named_parameters() if p.grad is not None]
        flags = self._flags if use_flags else None
        if not named and flags is None:
            return None
        dev = named[0][1].device if named else flags.flags.device
        parts = [torch.stack([g.isfinite().all().to(dev) for _, g in named]).float().flatten()] if named else []
        if flags is not None:
            parts.append(flags.flags.flatten().to(dev))
        host = torch.cat(parts).cpu()  # the one read per outer step
        bad = [n for (n, _), ok in zip(named, host[:len(named)].tolist()) if not ok]
        first = flags.first(host[len(named):].view(flags.flags.shape)) if flags is not None else None
        if self.distributed and use_flags:
            anywhere = bool(self._flagged_anywhere)
            first = (first or "another rank's inner loop or adjoint sweep") if anywhere else None
        if not bad and first is None:
            return None
        where = [f"first in {first}"] if first else []
        where.append(f"the meta-gradient of {bad} holds NaN or Inf" if bad else "the meta-gradient is finite")
        return "; ".join(where)

    def check_in_sync(self) -> None:
        """Raises :class:`pymaml.distributed.ParameterDriftError` on every rank when the parameters
        differ between ranks (a no-op without ``distributed=True``)."""
        if self.distributed:
            _dist.check_in_sync(list(self.parameters()), group=self.group)

    def state_dict(self) -> dict:
        """The algorithm's state (learned step sizes, iteration counter), the outer optimizer's,
        the outer-step counters (``steps_done``, ``skipped_steps``) and the scaler's, if any, for
        exact resumption."""
        state = {"algorithm": self.algorithm.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "steps_done": self.steps_done, "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.optimizer.load_state_dict(state["optimizer"])
        # states saved without the counters resume them from 0
        self.steps_done, self.skipped_steps = int(state.get("steps_done", 0)), int(state.get("skipped_steps", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def task_count(tasks) -> int:
    """How many tasks ``tasks`` holds (0 for None or an empty list)."""
    from .algorithms.base import as_tasks
    if tasks is None or (isinstance(tasks, (list, tuple)) and len(tasks) == 0):
        return 0
    t = as_tasks(tasks)
    return len(t) if isinstance(t, list) else int(t.support[0].shape[0])


def query_accuracy(tasks, outputs) -> Optional[float]:
    """Mean query accuracy when targets are class indices and outputs are logits, else None."""
    from .algorithms.base import task_list
    if not outputs or outputs[0].dim() < 2 or outputs[0].shape[-1] < 2:
        return None
    tl = task_list(tasks)
    if tl[0].query[1].dtype not in (torch.int64, torch.int32):
        return None
    correct = sum(float((o.argmax(-1) == t.query[1]).float().mean()) for o, t in zip(outputs, tl))
    return correct / len(tl)
