"""Per-op CPU time of bench_dropin.py's loop, learn2learn and pymaml side by side.

Runs the meta-step of ``bench_dropin.py`` (learn2learn's example loop; the wrapper class is the only
difference) under ``torch.profiler`` for both libraries, alternately, several rounds, and prints each
op's self CPU time: the smallest over the rounds, so that a round slowed by other work on the machine
does not count. The wall time per meta-step (smallest over the rounds, without the profiler) and the
load average are printed with the table.

    python benchmarks/profile_dropin.py --threads 1 --meta-batch 2 --rounds 6
    python benchmarks/profile_dropin.py --threads 2 --shapes      # one row per op and input shapes
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_dropin as B  # noqa: E402
import pymaml  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="omniglot", choices=sorted(B.WORKLOADS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--meta-batch", type=int, default=2, help="tasks per meta-step (the loop is the same)")
    ap.add_argument("--rounds", type=int, default=6, help="profiled meta-steps per library")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    args = ap.parse_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn as l2l
    except Exception as e:  # noqa: BLE001 - report why the peer is missing and stop
        sys.exit(f"profile_dropin: learn2learn is not importable ({type(e).__name__}: {e})")
    torch.set_num_threads(args.threads)
    w = dict(B.WORKLOADS[args.workload], meta_batch=args.meta_batch)
    state = B.make_learners(w, l2l)
    libs = list(state)
    tasks = B.make_tasks(w, seed=100)
    best = {lib: {} for lib in libs}
    wall = {lib: float("inf") for lib in libs}
    ops_total = {lib: float("inf") for lib in libs}
    for r in range(args.rounds + 1):  # round 0: warm-up, unprofiled
        for lib in (list(libs) if r % 2 == 0 else list(reversed(list(libs)))):
            t0 = time.perf_counter()
            B.meta_step(*state[lib], w, tasks)
            wall[lib] = min(wall[lib], time.perf_counter() - t0)
            if r == 0:
                continue
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                B.meta_step(*state[lib], w, tasks)
            events = prof.key_averages(group_by_input_shape=args.shapes)
            ops_total[lib] = min(ops_total[lib], sum(e.self_cpu_time_total for e in events) / 1e3)
            for e in events:
                key = (e.key, str(e.input_shapes) if args.shapes else "")
                ms = e.self_cpu_time_total / 1e3
                if key not in best[lib] or ms < best[lib][key][0]:
                    best[lib][key] = (ms, e.count)
    title = w["title"].split(", meta-batch")[0]
    print(f"# {title}, meta-batch {args.meta_batch}: learn2learn {l2l.__version__} vs pymaml "
          f"{pymaml.__version__} ({pymaml.backend()} ops), torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"# smallest of {args.rounds} rounds; wall s/meta-step: learn2learn {wall['learn2learn']:.3f}, "
          f"pymaml {wall['pymaml']:.3f} ({wall['learn2learn'] / wall['pymaml']:.2f}x); self CPU of all ops, ms: "
          f"learn2learn {ops_total['learn2learn']:.0f}, pymaml {ops_total['pymaml']:.0f}")
    print("| op | input shapes | learn2learn ms | calls | pymaml ms | calls |")
    print("|---|---|---|---|---|---|")
    keys = set(best["learn2learn"]) | set(best["pymaml"])
    top = lambda k: -max(best[lib].get(k, (0.0, 0))[0] for lib in libs)  # noqa: E731
    for key in sorted(keys, key=top)[:args.rows]:
        a, b = best["learn2learn"].get(key, (0.0, 0)), best["pymaml"].get(key, (0.0, 0))
        print(f"| {key[0][:60]} | {key[1][:80]} | {a[0]:.1f} | {a[1]} | {b[0]:.1f} | {b[1]} |")


if __name__ == "__main__":
    main()
