"""Data-parallel meta-training on ``torch.distributed``: the meta-batch split across processes.

Each process takes a share of the meta-batch (whole tasks, never samples within a task), runs the
inner loops and the meta-gradient engine on its share, and then one bucketed all-reduce (SUM)
combines what every process computed::

    g = Σ_r n_r · ḡ_r / Σ_r n_r          ḡ_r: the mean meta-gradient over the n_r tasks of rank r

which is the gradient of the mean query loss over the whole meta-batch, so the outer step equals
the single-process step on the whole meta-batch (up to rounding). The learned step sizes'
gradients (Meta-SGD, MAML++), the task count, the losses and a "has a gradient" flag per tensor
travel in the same buffers (one per dtype): every rank issues the same collectives in the same
order whatever its share, a tensor without a gradient on some rank contributes zeros, and a tensor
that has no gradient on any rank keeps ``.grad`` untouched (as on one process).

What is communicated: parameters once at the start (a broadcast from rank 0), the reduced
meta-gradients once per outer step, a small checksum of the parameters every ``check_every``
steps, BatchNorm running statistics when :func:`average_buffers` is called, and evaluation
metrics (:func:`gather_objects`). Task data, inner-loop parameters, Hessian-vector products and
optimizer state never travel: the outer optimizer runs on every rank on identical gradients.

``torch.nn.parallel.DistributedDataParallel`` cannot carry a meta-gradient (it raises on
``backward(create_graph=True)`` and its hooks do not see ``autograd.grad``); pass the plain model
and ``distributed=True`` to :class:`pymaml.MetaOptimizer` instead (see ``docs/distributed.md``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["is_initialized", "rank", "world_size", "shard", "local_share", "init_from_env", "reduce_sum",
           "bucket_mean", "reduce_grads", "reduce_meta_gradient", "broadcast_module", "check_in_sync",
           "batch_norm_buffers", "average_buffers", "gather_objects", "broadcast_object", "reject_ddp", "shutdown",
           "ParameterDriftError"]


class ParameterDriftError(RuntimeError):
    """The parameters differ between ranks (they must stay identical in data-parallel training)."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def shard(total: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """The half-open range ``[start, stop)`` of global task indices that ``rank_`` takes out of
    ``total``: contiguous, and the first ``total % world`` ranks take one more."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"shard: rank must be in [0, {world}), got {rank_}")
    base, extra = divmod(int(total), world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def local_share(tasks, rank_: Optional[int] = None, world: Optional[int] = None):
    """This rank's share of a meta-batch given whole: a 4-tuple of task-stacked tensors (sliced
    along dim 0) or a list of tasks. Prefer sampling only the share (``sampler.tasks(range(...))``
    with the global indices from :func:`shard`): every rank then avoids building the whole batch."""
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, Tensor) for t in tasks):
        start, stop = shard(tasks[0].shape[0], rank_, world)
        return tuple(t[start:stop] for t in tasks)
    start, stop = shard(len(tasks), rank_, world)
    return list(tasks)[start:stop]


def init_from_env(backend: Optional[str] = None, timeout_s: float = 300.0) -> bool:
    """Joins the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; returns whether it did.

    ``backend``: "nccl" when CUDA is available, else "gloo" (default). ``timeout_s`` bounds how long
    a collective waits for a rank that stopped answering (then it raises instead of hanging)."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leaves the process group at the end of a run: waits until every rank has finished its work
    (a barrier), then destroys the group. A rank that destroys its group while another still works
    (rank 0 writing summaries, say) can make the last one fail at exit; the barrier prevents that.
    Does nothing when no group was joined."""
    if not is_initialized():
        return
    with _collective("shutdown"):
        dist.barrier()
    dist.destroy_process_group()


def _device(group=None) -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _collective(op: str):
    """Turns a failed collective into an error that says what probably happened."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        raise RuntimeError(f"pymaml.distributed.{op}: rank {rank()} of {world_size()}: a collective "
                           f"failed, most likely because another process stopped or did not answer within "
                           f"the process group's timeout ({type(e).__name__}: {e})") from e


def reduce_sum(tensors: Sequence[Tensor], group=None) -> List[Tensor]:
    """All-reduce (SUM) of a list of tensors in one collective per dtype (the bucket); returns new
    tensors of the same shapes, dtypes and devices. Every rank must pass the same shapes in the
    same order."""
    out: List[Optional[Tensor]] = [None] * len(tensors)
    if not is_initialized():
        return [t.clone() for t in tensors]
    dev = _device(group)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        idx = by_dtype[dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1).to(dev) for i in idx])
        with _collective("reduce_sum"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            t = tensors[i]
            out[i] = flat[offset:offset + t.numel()].view_as(t).to(t.device)
            offset += t.numel()
    return out  # type: ignore[return-value]


def reduce_meta_gradient(result, num_tasks: int, group=None):
    """The whole meta-batch's result from this rank's :class:`pymaml.functional.MetaGradient`
    computed on its ``num_tasks`` tasks (every rank needs at least one). Returns a new
    ``MetaGradient`` whose ``grads``, ``lr_grads``, ``query_loss``, ``support_loss`` and
    ``meta_loss`` are means over every rank's tasks; ``query_outputs`` stay this rank's. One
    collective per dtype::

        res = meta_gradient(model, my_tasks, loss_fn, ...)
        res = pymaml.distributed.reduce_meta_gradient(res, len(my_tasks))
    """
    import dataclasses
    if num_tasks < 1:
        raise ValueError(f"reduce_meta_gradient: rank {rank()} computed its result on {num_tasks} tasks; give every "
                         "rank at least one task (or use MetaOptimizer(distributed=True), which allows empty shares)")
    leaves, spec = tree_flatten(result.lr_grads)
    lr_idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    names = list(result.grads)
    tensors = ([result.grads[n] for n in names] + [leaves[i] for i in lr_idx]
               + [result.query_loss, result.support_loss, result.meta_loss])
    reduced, _, _ = bucket_mean(tensors, num_tasks, group=group)
    for k, i in enumerate(lr_idx):
        leaves[i] = reduced[len(names) + k]
    q, s, m = reduced[-3:]
    return dataclasses.replace(result, grads=dict(zip(names, reduced[:len(names)])),
                               lr_grads=tree_unflatten(leaves, spec), query_loss=q, support_loss=s, meta_loss=m)


def _aux_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of counts, flags and statistics: the gradients' own when it holds integers
    exactly far enough (float32, float64), so that they share the gradients' collective."""
    dt = tensors[0].dtype if tensors else torch.float64
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def bucket_mean(tensors: Sequence[Tensor], num_tasks: int, raw: Sequence[Tensor] = (),
                group=None) -> Tuple[List[Tensor], List[Tensor], int]:
    """Σ_r n_r·t_r / Σ_r n_r for each of ``tensors`` (this rank's means over its ``num_tasks``
    tasks) and Σ_r t_r for each of ``raw``, with the task count reduced in the same bucket (in the
    first tensor's dtype, so a single-dtype model needs one collective). Returns (means, sums, N)."""
    aux = _aux_dtype(tensors)
    count = torch.tensor([float(num_tasks)], dtype=aux)
    red = reduce_sum([t.detach() * num_tasks for t in tensors] + [r.to(aux) for r in raw] + [count], group)
    total = int(round(float(red[-1])))
    if total < 1:
        raise ValueError(f"pymaml.distributed: the meta-batch holds no task on any of the {world_size()} ranks")
    n = len(tensors)
    return [t / total for t in red[:n]], red[n:-1], total


def reduce_grads(named: Sequence[Tuple[str, Tensor]], grads: Dict[str, Optional[Tensor]], num_tasks: int,
                 stats: Sequence[Tensor] = (), group=None) -> Tuple[Dict[str, Optional[Tensor]], List[Tensor], int]:
    """Global means of per-parameter meta-gradients. ``named`` lists (name, parameter) in the same
    order on every rank; ``grads[name]`` is this rank's mean over its ``num_tasks`` tasks, or
    missing. A missing gradient contributes zeros; a name with no gradient on any rank comes back
    None. ``stats`` (0-d, e.g. losses) are averaged the same way. Returns (grads, stats, N)."""
    tensors, flags = [], []
    for name, p in named:
        g = grads.get(name)
        flags.append(0.0 if g is None else 1.0)
        tensors.append(torch.zeros_like(p) if g is None else g.to(p.dtype).reshape(p.shape))
    aux = _aux_dtype(tensors)
    stats = [torch.as_tensor(s, dtype=aux).reshape(()) for s in stats]
    red, (seen,), total = bucket_mean(tensors + stats, num_tasks, raw=[torch.tensor(flags, dtype=aux)], group=group)
    out = {name: (red[i] if float(seen[i]) > 0 else None) for i, (name, _) in enumerate(named)}
    return out, red[len(named):], total


def broadcast_module(tensors: Iterable[Tensor], src: int = 0, group=None) -> None:
    """Copies ``tensors`` (parameters and buffers) from rank ``src`` to every rank, in place."""
    if not is_initialized():
        return
    for t in tensors:
        with torch.no_grad(), _collective("broadcast_module"):
            if t.device == _device(group):
                dist.broadcast(t.data, src, group=group)
            else:
                buf = t.detach().to(_device(group))
                dist.broadcast(buf, src, group=group)
                t.data.copy_(buf)


def check_in_sync(tensors: Sequence[Tensor], group=None, rtol: float = 0.0) -> None:
    """Raises :class:`ParameterDriftError` on every rank when ``tensors`` differ between ranks.

    Cheap: one float64 checksum per tensor (its sum and sum of squares), reduced with MAX and MIN.
    Data-parallel meta-training applies identical updates to identical values, so with the default
    ``rtol=0`` any difference is drift (a rank that stepped differently or loaded other weights)."""
    if not is_initialized() or not tensors:
        return
    with torch.no_grad():
        sums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                            for t in tensors]).reshape(-1).to(_device(group))
    hi, lo = sums.clone(), sums.clone()
    with _collective("check_in_sync"):
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    diff = (hi - lo).abs()
    bad = diff > rtol * hi.abs().clamp_min(1e-300)
    if bool(bad.any()):
        i = int(bad.nonzero()[0]) // 2
        raise ParameterDriftError(
            f"pymaml.distributed.check_in_sync: parameters differ between the {world_size()} ranks (tensor {i} "
            f"of shape {tuple(tensors[i].shape)}: checksums from {float(lo[2 * i]):.17g} to {float(hi[2 * i]):.17g}); "
            "every rank must start from rank 0's parameters and step on the reduced meta-gradient")


def batch_norm_buffers(module: nn.Module) -> List[Tensor]:
    """The floating-point running statistics of every BatchNorm layer of ``module``."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out += [b for b in (m.running_mean, m.running_var) if b is not None and b.is_floating_point()]
    return out


def average_buffers(module: nn.Module, group=None) -> None:
    """Replaces every BatchNorm running mean and variance of ``module`` by its mean over the ranks
    (in place; call it on every rank before saving or evaluating with running statistics)."""
    bufs = batch_norm_buffers(module)
    if not is_initialized() or not bufs:
        return
    red = reduce_sum(bufs, group)
    n = world_size(group)
    with torch.no_grad():
        for b, r in zip(bufs, red):
            b.copy_(r / n)


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size(group)
    with _collective("gather_objects"):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    with _collective("broadcast_object"):
        dist.broadcast_object_list(box, src, group=group)
    return box[0]


def reject_ddp(model: nn.Module, op: str) -> None:
    """A clear error for a model wrapped in DistributedDataParallel."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"{op}: the model is wrapped in DistributedDataParallel, which cannot carry a "
                        "meta-gradient (its hooks miss autograd.grad and it rejects create_graph=True); pass the "
                        "unwrapped model (ddp_model.module) with distributed=True: the meta-optimizer reduces "
                        "the meta-gradients itself")
