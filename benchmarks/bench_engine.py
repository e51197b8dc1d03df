"""Meta-gradient engines: wall time per meta-step and peak memory against the number of inner steps.

Workloads, float32, CPU:
  sinusoid  MLP 1-40-40-1, meta-batch 25, 10 support and 10 query points per task, MSE
  conv      ConvNet(3, 5, 32, 84) (MiniImageNet size, 4 × [conv3×3 32, BatchNorm, ReLU, max-pool]),
            5-way 5-shot, 15 queries per class, meta-batch 2, cross-entropy
Engines: unrolled, recompute (double backward and forward-over-reverse HVPs), first_order; plus
vmap against the task loop on the sinusoid workload. An engine is written ``engine[:hvp[:keep_mib]]``,
e.g. ``recompute:double_backward:0`` for the pure recursion that keeps no step graph.

Every point runs in a fresh process (``nice``d): it initialises torch's lazily loaded pieces on toy
tensors, builds the model and data, records its RSS,
runs one warm-up meta-step at K=1 and then ``--repeats`` meta-steps at K, while a sampler thread
reads /proc/self/statm every millisecond; the peak memory is the highest RSS (also checked against
``ru_maxrss`` when that rose during the run) minus the RSS just before the first meta-step. Wall time
is the fastest timed meta-step. Each point runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
``--mmap-threshold-mib`` (4 MiB): by default glibc raises the threshold dynamically up to 32 MiB, after
which freed activation buffers stay in the fragmented heap and RSS measures allocator retention
rather than live tensors (the recompute engine, which frees and re-allocates one step's activations
per step, then appeared to grow from 590 to 965 MiB between K=1 and K=10 on the conv workload; with
the fixed threshold the same K=10 point measured 349 MiB). The same setting applies to every engine.
Cost of that choice: every buffer above the threshold is mapped afresh and page-faults, so the
times here are slower than with glibc's defaults (an exact HVP through the conv net: 576 ms → 1032 ms,
bench_batch_norm.py with and without the variable) and weigh allocation more;
``side_by_side.py`` instead times with the default allocator and measures memory on one extra step.
A point that exceeds ``--mem-limit-gib`` above baseline is stopped
and reported as OOM; one that runs past ``--timeout`` seconds as "timeout".

Run:  nice python benchmarks/bench_engine.py [--workloads sinusoid conv] [--ks 1 5 10 25 50]
          [--engines unrolled recompute:double_backward recompute:jvp first_order]
          [--threads 1] [--timeout 420] [--mem-limit-gib 8] [--note FILE]
Prints markdown tables, writes benchmarks/results/cpu/engine.json and engine_*.png, and with --note
the same tables as a markdown file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "cpu")
ENGINES = ["unrolled", "recompute:double_backward", "recompute:double_backward:0", "recompute:jvp",
           "recompute:finite_difference", "first_order"]
CONV_ENGINES = ["unrolled", "recompute:double_backward", "recompute:jvp", "recompute:finite_difference", "first_order"]
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------ child side

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _Sampler(threading.Thread):
    def __init__(self, baseline: int, limit: int):
        super().__init__(daemon=True)
        self.peak, self.baseline, self.limit, self.stop = baseline, baseline, limit, False

    def run(self):
        while not self.stop:
            r = _rss()
            if r > self.peak:
                self.peak = r
                if r - self.baseline > self.limit:
                    print(json.dumps({"status": "oom", "peak_mib": (r - self.baseline) / 2**20}), flush=True)
                    os._exit(3)
            time.sleep(0.001)


def _workload(name: str):
    import torch
    import torch.nn.functional as F
    from pymaml.functional import Task
    from pymaml.models import MLP, ConvNet
    g = torch.Generator().manual_seed(0)
    if name == "sinusoid":
        T, n = 25, 10
        amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=g) * math.pi
        xs = torch.rand(T, n, 1, generator=g) * 10 - 5
        xq = torch.rand(T, n, 1, generator=g) * 10 - 5
        task = Task((xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase)))
        return MLP((1, 40, 40, 1)), task, F.mse_loss, 0.01
    if name == "conv":
        tasks = []
        for _ in range(2):
            ys = torch.arange(5).repeat_interleave(5)
            yq = torch.arange(5).repeat_interleave(15)
            tasks.append(Task((torch.randn(25, 3, 84, 84, generator=g), ys),
                              (torch.randn(75, 3, 84, 84, generator=g), yq)))
        return ConvNet(3, 5, 32, 84), tasks, F.cross_entropy, 0.01
    raise ValueError(f"bench_engine: unknown workload {name!r}")


def _library_warmup() -> None:
    """Lazy one-time library initialisation (about 35 MiB of RSS the first time any double backward
    runs in a process) on toy tensors, so that it is not charged to whichever engine runs first."""
    import torch
    w = torch.randn(2, 3, 3, requires_grad=True)
    y = torch.func.vmap(torch.nn.functional.linear)(torch.randn(2, 4, 3), w).tanh().sum()
    g, = torch.autograd.grad(y, w, create_graph=True)
    torch.autograd.grad(g, w, torch.ones_like(g))
    torch.func.jvp(torch.func.grad(lambda a: (a @ a).tanh().sum()), (torch.randn(3, 3),), (torch.randn(3, 3),))


def child(spec: dict) -> None:
    import gc
    import torch
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, ROOT)
    from pymaml.functional import meta_gradient
    torch.manual_seed(0)
    _library_warmup()
    model, tasks, loss_fn, lr = _workload(spec["workload"])
    engine, _, hvp = spec["engine"].partition(":")
    kw = dict(lr=lr, engine=engine, hvp=hvp or "auto", task_batching=spec["batching"])
    if len(spec["engine"].split(":")) > 2:
        kw["keep_graphs_mib"] = float(spec["engine"].split(":")[2])
        kw["hvp"] = hvp.split(":")[0]
    gc.collect()
    base = _rss()
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = _Sampler(base, int(spec["mem_limit_gib"] * 2**30))
    sampler.start()
    meta_gradient(model, tasks, loss_fn, steps=1, **kw)  # warm-up (lazy initialisation)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        res = meta_gradient(model, tasks, loss_fn, steps=spec["k"], **kw)
        times.append(time.perf_counter() - t0)
    sampler.stop = True
    sampler.join()
    ru1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(sampler.peak, ru1 if ru1 > ru0 else 0)
    import pymaml
    print(json.dumps({"status": "ok", "time_s": min(times), "peak_mib": (peak - base) / 2**20,
                      "baseline_mib": base / 2**20, "batching": res.task_batching,
                      "memory_format": res.memory_format, "backend": pymaml.backend(),
                      "query_loss": float(res.query_loss)}), flush=True)


# ----------------------------------------------------------------------------------- parent side

def run_point(args, workload, engine, k, batching):
    spec = dict(workload=workload, engine=engine, k=k, batching=batching, threads=args.threads,
                repeats=args.repeats if workload == "sinusoid" else 1, mem_limit_gib=args.mem_limit_gib)
    cmd = ["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if args.mmap_threshold_mib > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(args.mmap_threshold_mib * 2**20))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "wall": time.time() - t0}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {**spec, "status": "error", "error": p.stderr[-2000:], "wall": time.time() - t0}
    return {**spec, **json.loads(lines[-1]), "wall": time.time() - t0}


def cell(r, what):
    if r is None:
        return "–"
    if r["status"] == "oom":
        return f"OOM (>{r['mem_limit_gib']:g} GiB)"
    if r["status"] == "timeout":
        return "timeout"
    if r["status"] != "ok":
        return "error"
    return f"{r['time_s'] * 1000:.0f}" if what == "time" and r["time_s"] < 1 else (
        f"{r['time_s']:.1f} s" if what == "time" else f"{r['peak_mib']:.0f}")


def table(results, workload, ks, engines, batching, what):
    unit = "ms per meta-step" if what == "time" else "MiB peak above baseline"
    head = f"| engine \\ K ({unit}) | " + " | ".join(str(k) for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 1)]
    for e in engines:
        row = [cell(results.get((workload, e, k, batching)), what) for k in ks]
        lines.append(f"| {e} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def vmap_table(results, ks, engines):
    lines = ["| engine | K | loop (ms) | vmap (ms) | loop / vmap |", "|---|---|---|---|---|"]
    for e in engines:
        for k in ks:
            a, b = results.get(("sinusoid", e, k, "loop")), results.get(("sinusoid", e, k, "vmap"))
            if a and b and a["status"] == b["status"] == "ok":
                lines.append(f"| {e} | {k} | {a['time_s']*1000:.0f} | {b['time_s']*1000:.0f} | "
                             f"{a['time_s']/b['time_s']:.1f}× |")
    return "\n".join(lines)


def checks(results, ks):
    out = []
    def ok(w, e, k, b):
        r = results.get((w, e, k, b))
        return r if r and r["status"] == "ok" else None
    rec = "recompute:double_backward"
    fd = "recompute:finite_difference"
    for w, b in (("sinusoid", "vmap"), ("conv", "loop")):
        for k in (1, 25):
            r, u, f = ok(w, rec, k, b), ok(w, "unrolled", k, b), ok(w, fd, k, b)
            if r and u:
                ratio = r["time_s"] / u["time_s"]
                out.append(f"- {w}, K={k}: recompute (exact HVPs) / unrolled time = {ratio:.2f}"
                           + (f"; with finite-difference HVPs (approximate): {f['time_s'] / u['time_s']:.2f}"
                              if f else ""))
            elif r and not u and k in ks:
                st = results.get((w, "unrolled", k, b), {}).get("status", "not run")
                out.append(f"- {w}, K={k}: unrolled {st}; recompute {r['time_s']:.2f} s")
    r1, r50 = ok("conv", rec, 1, "loop"), ok("conv", rec, 50, "loop")
    if r1 and r50:
        ratio = r50["peak_mib"] / r1["peak_mib"]
        out.append(f"- conv: recompute peak memory K=50 / K=1 = {ratio:.2f}")
    u = [ok("conv", "unrolled", k, "loop") for k in ks]
    u = [(k, r["peak_mib"]) for k, r in zip(ks, u) if r]
    if len(u) > 1:
        out.append("- conv: unrolled peak memory " + ", ".join(f"K={k}: {m:.0f} MiB" for k, m in u))
    for k in ks:
        a, b = ok("sinusoid", rec, k, "loop"), ok("sinusoid", rec, k, "vmap")
        if a and b:
            s = a["time_s"] / b["time_s"]
            out.append(f"- sinusoid K={k}: vmap {s:.1f}× faster than the loop")
    return "\n".join(out)


def plots(results, args, engines):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for what, ylabel in (("time", "wall time per meta-step (s)"), ("memory", "peak memory above baseline (MiB)")):
        fig, axes = plt.subplots(1, len(args.workloads), figsize=(6 * len(args.workloads), 4.2), squeeze=False)
        for ax, w in zip(axes[0], args.workloads):
            b = "vmap" if w == "sinusoid" else "loop"
            for e in engines[w]:
                pts = [(k, results.get((w, e, k, b))) for k in args.ks]
                pts = [(k, r["time_s"] if what == "time" else r["peak_mib"]) for k, r in pts if r and r["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=e)
                for k in args.ks:
                    r = results.get((w, e, k, b))
                    if r and r["status"] in ("oom", "timeout"):
                        ax.annotate(r["status"].upper(), (k, ax.get_ylim()[1]), fontsize=7, ha="center", va="top")
            ax.set_title(f"{w} ({b})")
            ax.set_xlabel("inner steps K")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(OUT, f"engine_{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    if "sinusoid" in args.workloads and args.vmap_ks:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for e in args.vmap_engines:
            for b, ls in (("vmap", "-"), ("loop", "--")):
                pts = [(k, results.get(("sinusoid", e, k, b))) for k in args.vmap_ks]
                pts = [(k, r["time_s"]) for k, r in pts if r and r["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", label=f"{e} {b}")
        ax.set_xlabel("inner steps K")
        ax.set_ylabel("wall time per meta-step (s)")
        ax.set_title("sinusoid: vmap vs task loop (meta-batch 25)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(OUT, "engine_vmap.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", nargs="+", default=["sinusoid", "conv"], choices=["sinusoid", "conv"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 25, 50])
    ap.add_argument("--vmap-ks", nargs="*", type=int, default=[1, 5, 25], help="K values of the vmap/loop table")
    ap.add_argument("--engines", nargs="+", default=ENGINES, help="engines on the sinusoid workload")
    ap.add_argument("--vmap-engines", nargs="+", default=["unrolled", "recompute:double_backward"],
                    help="engines of the vmap/loop comparison")
    ap.add_argument("--conv-engines", nargs="+", default=CONV_ENGINES, help="engines on the conv workload")
    ap.add_argument("--conv-jvp-max-k", type=int, default=10, help="largest K for recompute:jvp on conv (time)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per point (default 1)")
    ap.add_argument("--repeats", type=int, default=10, help="timed meta-steps per sinusoid point (conv: 1)")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per point")
    ap.add_argument("--mem-limit-gib", type=float, default=8.0, help="peak above baseline reported as OOM")
    ap.add_argument("--mmap-threshold-mib", type=float, default=4.0,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for each point (0: glibc's dynamic default)")
    ap.add_argument("--note", default="", help="also write the tables to this markdown file")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    os.makedirs(OUT, exist_ok=True)
    import torch
    results = {}
    jobs = []
    engines = {"sinusoid": args.engines, "conv": args.conv_engines}
    for w in args.workloads:
        b = "vmap" if w == "sinusoid" else "loop"
        for k in args.ks:
            for e in engines[w]:
                if w == "conv" and e == "recompute:jvp" and k > args.conv_jvp_max_k:
                    continue
                jobs.append((w, e, k, b))
        if w == "sinusoid":
            for k in args.vmap_ks:
                for e in args.vmap_engines:
                    jobs += [(w, e, k, "loop")] + ([(w, e, k, "vmap")] if k not in args.ks else [])
    t_start = time.time()
    for w, e, k, b in jobs:
        r = run_point(args, w, e, k, b)
        results[(w, e, k, b)] = r
        extra = (f"{r['time_s']:.3f} s, {r['peak_mib']:.0f} MiB" if r["status"] == "ok" else r.get("error", "")[-300:])
        print(f"[{time.time() - t_start:6.0f} s] {w} {e} K={k} {b}: {r['status']} {extra}", file=sys.stderr, flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), torch "
               f"{torch.__version__}, {args.threads} intra-op thread(s), float32, "
               f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold_mib:g} MiB")
    # what the points ran (each child reports its own backend and layout)
    ran = [r for r in results.values() if r.get("status") == "ok"]
    backend = ", ".join(sorted({r.get("backend", "?") for r in ran})) or "none ran"
    layouts = "; ".join(f"{w}: " + ", ".join(sorted({r.get("memory_format", "?") for (w2, *_), r in results.items()
                                                   if w2 == w and r.get("status") == "ok"}))
                        for w in args.workloads)
    cmd = "nice python benchmarks/bench_engine.py " + " ".join(a for a in sys.argv[1:])
    parts = [f"Machine: {machine}; pymaml ops backend: {backend}; memory format: {layouts}. "
             f"Total benchmark time {time.time() - t_start:.0f} s.",
             f"Command: `{cmd.strip()}`"]
    for w in args.workloads:
        b = "vmap" if w == "sinusoid" else "loop"
        title = ("sinusoid MLP 1-40-40-1, meta-batch 25 (vmap)" if w == "sinusoid" else
                 "MiniImageNet-size ConvNet(3, 5, 32, 84), 5-way 5-shot, 15 queries/class, meta-batch 2 (loop)")
        parts.append(f"**{title}: time per meta-step**\n\n" + table(results, w, args.ks, engines[w], b, "time"))
        parts.append(f"**{title}: peak memory**\n\n" + table(results, w, args.ks, engines[w], b, "memory"))
    if "sinusoid" in args.workloads and args.vmap_ks:
        parts.append("**sinusoid: vmap vs task loop**\n\n" + vmap_table(results, args.vmap_ks, args.vmap_engines))
    parts.append("**Ratios**\n\n" + checks(results, args.ks))
    files = plots(results, args, engines)
    parts.append("Plots: " + ", ".join(f"`{os.path.relpath(f, ROOT)}`" for f in files))
    text = "\n\n".join(parts)
    print(text)
    with open(os.path.join(OUT, "engine.json"), "w") as f:
        json.dump([{**r} for r in results.values()], f, indent=1)
    if args.note:
        with open(args.note, "w") as f:
            f.write("## Meta-gradient engines: time and memory against K (CPU)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
