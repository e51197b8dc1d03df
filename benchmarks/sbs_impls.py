"""The implementations the side-by-side benchmark compares: every one computes the same thing.

For a model with meta-parameters θ and a meta-batch of T tasks, the gradient of

    (1/T) Σ_t L_q,t(θ_K,t),   θ_0 = θ,  θ_{i+1} = θ_i − α ∇L_s,t(θ_i)   (K inner SGD steps, fixed α)

exact (second order) or first order (FOMAML: the inner gradients treated as constants).

``make(name, model, loss_fn, steps, lr, order)`` returns ``fn(tasks)`` that leaves the meta-gradient
in ``p.grad`` for every ``p in model.parameters()`` (callers zero them first); ``tasks`` are the
stacked ``(xs, ys, xq, yq)`` of :mod:`sbs_workloads`. Every implementation is written the way the
library's own examples write MAML (per-task ``backward()`` for the loop-based ones, so that only
one task's graph is alive at a time).

The model runs in train mode: BatchNorm normalises with batch statistics, as in the MAML paper
(pymaml does so by policy; the others update the running statistics as a side effect, which does
not change any output in train mode).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch.func import functional_call

__all__ = ["Impl", "IMPLS", "available", "make", "impl_names"]


@dataclass(frozen=True)
class Impl:
    name: str
    orders: Tuple[str, ...]          # subset of ("second", "first")
    library: str                     # module that must import ("" for torch itself)
    backend: str = ""                # pymaml only: "compiled" | "torch"
    engine: str = ""                 # pymaml only
    hvp: str = ""                    # pymaml recompute only
    note: str = ""


IMPLS: Dict[str, Impl] = {i.name: i for i in [
    Impl("pymaml:recompute/double_backward", ("second",), "pymaml", "compiled", "recompute", "double_backward"),
    Impl("pymaml:recompute/jvp", ("second",), "pymaml", "compiled", "recompute", "jvp"),
    Impl("pymaml:recompute/finite_difference", ("second",), "pymaml", "compiled", "recompute", "finite_difference",
         note="approximate second order: central differences of two plain gradients per HVP"),
    Impl("pymaml:unrolled", ("second",), "pymaml", "compiled", "unrolled"),
    Impl("pymaml:first_order", ("first",), "pymaml", "compiled", "first_order"),
    Impl("pymaml[torch]:recompute/double_backward", ("second",), "pymaml", "torch", "recompute", "double_backward"),
    Impl("pymaml[torch]:recompute/jvp", ("second",), "pymaml", "torch", "recompute", "jvp"),
    Impl("pymaml[torch]:unrolled", ("second",), "pymaml", "torch", "unrolled"),
    Impl("pymaml[torch]:first_order", ("first",), "pymaml", "torch", "first_order"),
    Impl("plain loop (create_graph)", ("second", "first"), ""),
    Impl("torch.func + vmap", ("second", "first"), ""),
    Impl("learn2learn", ("second", "first"), "learn2learn"),
    Impl("higher", ("second", "first"), "higher"),
    Impl("torchopt", ("second", "first"), "torchopt",
         note="second order: MetaSGD; first order: functional torchopt.sgd with non-differentiated grads"),
]}


def impl_names(order: str) -> List[str]:
    return [n for n, i in IMPLS.items() if order in i.orders]


def is_pymaml(name: str) -> bool:
    return IMPLS[name].library == "pymaml"


def library_version(lib: str) -> str:
    if not lib:
        return torch.__version__
    try:
        from importlib.metadata import version
        return version(lib)
    except Exception:  # noqa: BLE001 - version is informational
        m = importlib.import_module(lib)
        return getattr(m, "__version__", "?")


def available(name: str) -> Tuple[bool, str]:
    """(usable in THIS process, reason if not). A pymaml backend variant is usable only in a
    process whose backend is that one (``PYMAML_BACKEND=torch`` forces the pure-torch one)."""
    impl = IMPLS[name]
    if not impl.library:
        return True, ""
    try:
        importlib.import_module(impl.library)
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
        return False, f"not installed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if impl.library == "pymaml":
        active = pymaml_backend()
        if active != impl.backend:
            return False, f"pymaml backend in this process is {active!r}"
    return True, ""


def pymaml_backend() -> str:
    """'compiled' or 'torch': what pymaml actually runs in this process."""
    import pymaml
    fn = getattr(pymaml, "backend", None)
    if fn is None:
        return "torch"  # no compiled ops module yet: ops is the reference
    b = fn()
    b = getattr(b, "name", b)
    if isinstance(b, dict):
        b = b.get("name", b.get("backend", ""))
    s = str(b).lower()
    return "torch" if ("torch" in s or "reference" in s) and "compiled" not in s else "compiled"


# ---------------------------------------------------------------------------------------------
def _assign_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g if p.grad is None else p.grad + g


def _pymaml(impl: Impl, model, loss_fn, steps, lr, order):
    from pymaml.functional import Task, meta_gradient
    engine = impl.engine
    hvp = impl.hvp or "auto"
    names = [n for n, _ in model.named_parameters()]

    def fn(tasks):
        xs, ys, xq, yq = tasks
        res = meta_gradient(model, Task((xs, ys), (xq, yq)), loss_fn, steps=steps, lr=lr,
                            engine=engine, hvp=hvp)
        _assign_grads(model, [res.grads[n] for n in names])
    return fn


def _plain(model, loss_fn, steps, lr, order):
    so = order == "second"
    names = [n for n, _ in model.named_parameters()]

    def fn(tasks):
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        for t in range(T):
            p = list(model.parameters())
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, p)), (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, p, create_graph=so)
                p = [w - lr * gi for w, gi in zip(p, g)]
            lq = loss_fn(functional_call(model, dict(zip(names, p)), (xq[t],)), yq[t]) / T
            lq.backward()
    return fn


def _vmap(model, loss_fn, steps, lr, order):
    # As in functorch's examples/maml_omniglot (maml-omniglot-transforms.py): BatchNorm without
    # running statistics (replace_all_batch_norm_modules_) on a copy that shares nothing but the
    # structure; the model's own parameters are passed in, so the gradient lands on them.
    so = order == "second"
    net = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(net)
    params = dict(model.named_parameters())

    def inner_loss(p, x, y):
        return loss_fn(functional_call(net, p, (x,)), y)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = torch.func.grad(inner_loss)(p, xs, ys)
            if not so:
                g = {n: v.detach() for n, v in g.items()}
            p = {n: p[n] - lr * g[n] for n in p}
        return inner_loss(p, xq, yq)

    def fn(tasks):
        losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *tasks)
        losses.mean().backward()
    return fn


def _learn2learn(model, loss_fn, steps, lr, order):
    import learn2learn as l2l
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=(order == "first"))

    def fn(tasks):
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        for t in range(T):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(xs[t]), ys[t]))
            (loss_fn(learner(xq[t]), yq[t]) / T).backward()
    return fn


def _higher(model, loss_fn, steps, lr, order):
    import higher
    so = order == "second"
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

    def fn(tasks):
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        for t in range(T):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=so) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(xs[t]), ys[t]))
                lq = loss_fn(fmodel(xq[t]), yq[t]) / T
                if so:
                    lq.backward()
                else:
                    # track_higher_grads=False detaches each fast weight: the gradient at θ_K is
                    # the first-order meta-gradient; hand it to the initial weights.
                    fast = list(fmodel.parameters())
                    if steps == 0:
                        lq.backward()
                    else:
                        _assign_grads(model, torch.autograd.grad(lq, fast))
    return fn


def _torchopt(model, loss_fn, steps, lr, order):
    import torchopt
    if order == "second":
        # TorchOpt's MAML example (examples/few-shot/maml_omniglot.py): MetaSGD on the stateful
        # module, recover the initial weights after each task.
        inner_opt = torchopt.MetaSGD(model, lr=lr)

        def fn(tasks):
            xs, ys, xq, yq = tasks
            T = xs.shape[0]
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner_opt)
            for t in range(T):
                for _ in range(steps):
                    inner_opt.step(loss_fn(model(xs[t]), ys[t]))
                (loss_fn(model(xq[t]), yq[t]) / T).backward()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
        return fn

    # MetaSGD always differentiates its gradients (create_graph=True); first order uses TorchOpt's
    # functional optimizer on gradients taken without a graph.
    names = [n for n, _ in model.named_parameters()]
    sgd = torchopt.sgd(lr=lr)

    def fn(tasks):
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        for t in range(T):
            p = tuple(model.parameters())
            state = sgd.init(p)
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, p)), (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, p)
                updates, state = sgd.update(g, state, inplace=False)
                p = torchopt.apply_updates(p, updates, inplace=False)
            (loss_fn(functional_call(model, dict(zip(names, p)), (xq[t],)), yq[t]) / T).backward()
    return fn


_MAKERS = {
    "plain loop (create_graph)": _plain,
    "torch.func + vmap": _vmap,
    "learn2learn": _learn2learn,
    "higher": _higher,
    "torchopt": _torchopt,
}


def make(name: str, model, loss_fn, steps: int, lr: float, order: str) -> Callable:
    impl = IMPLS[name]
    if order not in impl.orders:
        raise ValueError(f"side_by_side: {name} has no {order}-order variant (has {impl.orders})")
    if impl.library == "pymaml":
        return _pymaml(impl, model, loss_fn, steps, lr, order)
    return _MAKERS[name](model, loss_fn, steps, lr, order)
