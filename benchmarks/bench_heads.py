"""Closed-form linear-head HVP against double backward, CPU.

Each method produces the same three tensors: H·(V, v_b) for (W, b) and grad_x = ∂/∂x ⟨∇_{W,b} L, (V, v_b)⟩.
  double backward  autograd: loss, grad with create_graph, grad of ⟨grad, v⟩ w.r.t. (W, b, x)
  fwd-over-rev     torch.func.jvp of torch.func.grad, for (W, b) only (grad_x would need another
                   pass, so this row is a lower bound for that method)
  twin             pymaml.reference_heads.linear_head_hvp (pure torch, no graph)
  compiled         torch.ops.pymaml.linear_head_hvp (C++), and through the public wrapper

Run:  python benchmarks/bench_heads.py [--threads N (default 1)]   (after `pip install --no-build-isolation -e .`)
Prints a markdown table (median of torch.utils.benchmark blocked_autorange) with the speed-up over
double backward.
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pymaml  # noqa: E402,F401 - loads the extension when it is built
from pymaml import reference_heads  # noqa: E402
from pymaml.functional import heads  # noqa: E402


def loss_fn(z, t, loss):
    return F.cross_entropy(z, t) if loss == "cross_entropy" else F.mse_loss(z, t)


def double_backward(x, w, b, t, vw, vb, loss):
    x, w, b = (a.detach().requires_grad_() for a in (x, w, b))
    L = loss_fn(F.linear(x, w, b), t, loss)
    gw, gb = torch.autograd.grad(L, [w, b], create_graph=True)
    return torch.autograd.grad((gw * vw).sum() + (gb * vb).sum(), [w, b, x])


def fwd_over_rev(x, w, b, t, vw, vb, loss):
    # torch 2.14.1: jvp of grad through F.mse_loss fails ("ZeroTensors are immutable"); the same
    # mean written from primitives works.
    lf = (lambda z: F.cross_entropy(z, t)) if loss == "cross_entropy" else (lambda z: (z - t).square().mean())
    g = torch.func.grad(lambda w_, b_: lf(F.linear(x, w_, b_)), argnums=(0, 1))
    return torch.func.jvp(g, (w, b), (vw, vb))[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread by default: at this size nothing gains from threads, and on a shared, busy CPU an
    # OpenMP/MKL parallel region (torch.exp or softmax of 400 numbers) can cost a scheduler tick
    # (~20 ms measured here at load 10 on 2 cores), which would swamp the comparison.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    compiled = heads.compiled_available(torch.device("cpu"))

    n, f, c = 80, 64, 5
    print(f"linear head HVP, N={n} examples, F={f} features, C={c} classes, CPU "
          f"({platform.processor() or platform.machine()}, {args.threads} threads), torch {torch.__version__}, "
          f"compiled op {'present' if compiled else 'ABSENT'}\n")
    rows = []
    for loss in ("cross_entropy", "mse"):
        for dtype in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, f, generator=g, dtype=dtype)
            w, vw = (torch.randn(c, f, generator=g, dtype=dtype) for _ in range(2))
            b, vb = (torch.randn(c, generator=g, dtype=dtype) for _ in range(2))
            t = (torch.randint(0, c, (n,), generator=g) if loss == "cross_entropy"
                 else torch.randn(n, c, generator=g, dtype=dtype))
            a = (x, w, b, t, vw, vb, loss)
            methods = {"double backward": lambda: double_backward(*a),
                       "fwd-over-rev (no grad_x)": lambda: fwd_over_rev(*a),
                       "twin (pure torch)": lambda: reference_heads.linear_head_hvp(*a)}
            if compiled:
                methods["compiled op"] = lambda: torch.ops.pymaml.linear_head_hvp(*a)
                methods["compiled, via heads.linear_head_hvp"] = lambda: heads.linear_head_hvp(*a)
            # all closed forms agree with double backward before anything is timed
            ref = double_backward(*a)
            for name in methods:
                if name.startswith(("twin", "compiled")):
                    got = methods[name]()
                    for u, e in zip(got, ref):
                        torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-5)
            base = None
            for name, fn in methods.items():
                m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=args.threads).blocked_autorange(
                    min_run_time=args.min_run_time)
                us = m.median * 1e6
                base = us if base is None else base
                rows.append((loss, str(dtype).replace("torch.", ""), name, us, base / us))
    print("| loss | dtype | method | median µs | speed-up vs double backward |")
    print("| --- | --- | --- | ---: | ---: |")
    for loss, dt, name, us, sp in rows:
        print(f"| {loss} | {dt} | {name} | {us:.1f} | {sp:.2f}× |")


if __name__ == "__main__":
    main()
