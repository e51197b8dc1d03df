"""The gradients of small CPU convolutions: torch's kernels (oneDNN) against pymaml's buffer products
(im2col + one matrix product, csrc/cpu/conv_gemm.cpp), op by op, on the layers of few-shot conv nets.

    python benchmarks/bench_conv_gemm.py [--threads 1,2] [--dtype float32]

For each layer and each gradient kernel a second-order meta-step runs (both gradients, the weight
gradient alone, the input gradient alone), the two implementations alternate within one process;
the table gives the time of each (the smallest of three medians) and the ratio (torch / buffer
product: above 1 means the buffer product is faster), and which of the two the size rule of
conv_gemm.cpp picks for the layer (``auto rule``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["PYMAML_CONV_GEMM"] = "1"  # every convolution the path computes; read at the first call

import torch  # noqa: E402

import pymaml  # noqa: E402,F401  (loads the ops)

# (name, x shape, out channels, kernel, stride, padding)
LAYERS = [
    ("Omniglot 20-way conv1", (20, 1, 28, 28), 64, 3, 2, 1),
    ("Omniglot 20-way conv2", (20, 64, 14, 14), 64, 3, 2, 1),
    ("Omniglot 20-way conv3", (20, 64, 7, 7), 64, 3, 2, 1),
    ("Omniglot 20-way conv4", (20, 64, 4, 4), 64, 3, 2, 1),
    ("Omniglot 5-way conv2", (5, 64, 14, 14), 64, 3, 2, 1),
    ("Omniglot 5-way conv3", (5, 64, 7, 7), 64, 3, 2, 1),
    ("MiniImageNet 5w5s conv1", (25, 3, 84, 84), 32, 3, 1, 1),
    ("MiniImageNet 5w5s conv2", (25, 32, 42, 42), 32, 3, 1, 1),
    ("MiniImageNet 5w5s conv3", (25, 32, 21, 21), 32, 3, 1, 1),
    ("MiniImageNet 5w5s conv4", (25, 32, 10, 10), 32, 3, 1, 1),
    ("MiniImageNet 5w1s conv3", (5, 32, 21, 21), 32, 3, 1, 1),
    ("MiniImageNet 5w1s conv4", (5, 32, 10, 10), 32, 3, 1, 1),
]

AUTO_MAX_BUFFER, AUTO_MAX_UNSTRIDED_ROWS = 1 << 20, 1024  # the size rule in csrc/cpu/conv_gemm.cpp


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    aten_conv, aten_bwd = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
    ops = torch.ops.pymaml
    print(f"# torch {torch.__version__}, {args.dtype}, channels-last, {os.cpu_count()} cores; "
          "ms per call (smallest of three medians, the two alternating); ratio = torch / buffer product")
    print("| layer | x | threads | op | torch ms | buffer product ms | ratio | auto rule |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, xs, out, k, s, p in LAYERS:
            g = torch.Generator().manual_seed(0)
            cl = torch.channels_last
            x = torch.randn(xs, generator=g, dtype=dtype).contiguous(memory_format=cl)
            w = torch.randn(out, xs[1], k, k, generator=g, dtype=dtype).contiguous(memory_format=cl)
            b = torch.randn(out, generator=g, dtype=dtype)
            st, pd, dl = [s, s], [p, p], [1, 1]
            y = aten_conv(x, w, b, st, pd, dl, False, [0, 0], 1)
            gy = torch.randn(y.shape, generator=g, dtype=dtype).contiguous(memory_format=cl)
            oh, ow = y.shape[-2:]
            rows = xs[0] * oh * ow
            auto = rows * xs[1] * k * k <= AUTO_MAX_BUFFER and (s >= 2 or rows <= AUTO_MAX_UNSTRIDED_ROWS)
            cases = {
                "both gradients": (lambda: aten_bwd(gy, x, w, [out], st, pd, dl, False, [0, 0], 1, [True, True, True]),
                                   lambda: ops.convolution_backward(gy, x, w, st, pd, dl, 1, [True, True, True])),
                "weight gradient": (lambda: aten_bwd(gy, x, w, None, st, pd, dl, False, [0, 0], 1, [False, True, False]),
                                    lambda: ops.convolution_backward(gy, x, w, st, pd, dl, 1, [False, True, False])),
                "input gradient": (lambda: aten_bwd(gy, x, w, None, st, pd, dl, False, [0, 0], 1, [True, False, False]),
                                   lambda: ops.convolution_backward(gy, x, w, st, pd, dl, 1, [True, False, False])),
            }
            for op, (ref, mine) in cases.items():
                if op == "input gradient" and xs[1] == 1:
                    continue  # a first layer's input gradient is never taken
                for f in (ref, mine, ref, mine):
                    f()  # warm-up
                t_ref, t_mine = [], []
                for _ in range(3):
                    t_ref.append(timed(ref, args.reps))
                    t_mine.append(timed(mine, args.reps))
                a, m = min(t_ref) * 1e3, min(t_mine) * 1e3
                print(f"| {name} | {list(xs)} | {threads} | {op} | {a:.3f} | {m:.3f} | {a / m:.2f}× | "
                      f"{'buffer product' if auto else 'torch'} |", flush=True)


if __name__ == "__main__":
    main()
