"""Does channels-last help every library, or only pymaml? Each implementation of the side-by-side
harness on a conv workload twice: with the model and images as given (NCHW), and with both converted
to channels-last by hand (``model.to(memory_format=torch.channels_last)``, images with NHWC strides),
as a user could do for any library. pymaml runs channels-last by itself (``memory_format="auto"``);
its ``memory_format="preserve"`` row shows the same engine kept in the layout it is given.

Second order, the harness's meta-step (forward, inner loop, meta-gradient into ``.grad``), one
process, one thread, median of ``--repeats`` after one warm-up, the meta-batch reduced so that the
whole table takes a few minutes (the per-task cost does not depend on it: tasks run one by one).

    python benchmarks/bench_channels_last.py [--workloads omniglot miniimagenet] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import sbs_impls  # noqa: E402
import sbs_workloads  # noqa: E402

IMPLS = ["pymaml:unrolled", "pymaml:recompute/double_backward", "plain loop (create_graph)", "learn2learn",
         "higher", "torchopt"]
META_BATCH = {"omniglot": 8, "miniimagenet": 2, "long-horizon": 1}


def channels_last(model, tasks):
    cl = torch.channels_last
    model.to(memory_format=cl)

    def nhwc(x):  # [T, N, C, H, W]: every task's [N, C, H, W] with NHWC strides (also for C = 1)
        flat = x.flatten(0, 1)
        return torch.empty_like(flat, memory_format=cl).copy_(flat).unflatten(0, x.shape[:2])
    xs, ys, xq, yq = tasks
    return nhwc(xs), ys, nhwc(xq), yq


def pymaml_preserve(model, w):
    from pymaml.functional import Task, meta_gradient
    names = [n for n, _ in model.named_parameters()]

    def fn(tasks):
        xs, ys, xq, yq = tasks
        res = meta_gradient(model, Task((xs, ys), (xq, yq)), w.loss_fn, steps=w.steps, lr=w.lr, engine="unrolled",
                            memory_format="preserve")
        for n, p in model.named_parameters():
            p.grad = res.grads[n]
    return fn


def time_one(make_fn, w, layout, repeats):
    model, tasks = w.model(), w.tasks()
    if layout == "channels_last":
        tasks = channels_last(model, tasks)
    fn = make_fn(model, w)
    fn(tasks)
    times = []
    for _ in range(repeats):
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        fn(tasks)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["omniglot", "miniimagenet"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# channels-last by hand vs as given; {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s), median of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}\n")
    for name in args.workloads:
        w = sbs_workloads.get(name)
        w = replace(w, meta_batch=META_BATCH.get(name, w.meta_batch))
        print(f"## {w.title}, meta-batch {w.meta_batch} (second order)\n")
        print("| implementation | as given (NCHW), ms | channels-last by hand, ms | by hand / as given |")
        print("|---|---:|---:|---:|")
        rows = [(n, lambda m, w, n=n: sbs_impls.make(n, m, w.loss_fn, w.steps, w.lr, "second")) for n in IMPLS]
        rows.insert(1, ("pymaml:unrolled, memory_format=preserve", pymaml_preserve))
        for label, make_fn in rows:
            with contextlib.redirect_stdout(io.StringIO()):  # learn2learn's import prints gym's notice
                ok, why = sbs_impls.available(label.split(",")[0])
            if not ok:
                print(f"| {label} | not available: {why} | | |")
                continue
            a = time_one(make_fn, w, "nchw", args.repeats)
            b = time_one(make_fn, w, "channels_last", args.repeats)
            print(f"| {label} | {a * 1e3:,.0f} | {b * 1e3:,.0f} | {b / a:.2f} |", flush=True)
        print()


if __name__ == "__main__":
    main()
