"""Data-parallel scaling: meta-steps per second on 1, 2, … processes for the same total meta-batch.

Each configuration starts N processes on this machine (gloo on loopback for the CPU, NCCL for
GPUs, one GPU per process), joined as torchrun would join them, each with ``--threads`` torch
threads. Every process meta-trains on its share of the meta-batch with
``MetaOptimizer(distributed=True)``; rank 0 times ``--steps`` outer steps after ``--warmup``
steps, between two barriers. Parallel efficiency is (steps/s on N) / (N × steps/s on 1).

Workloads (MAML, exact second order, the ``recompute`` engine):
  * sinusoid: the 1-40-40-1 MLP, 10 support and 10 query points, 1 inner step, meta-batch 24;
  * omniglot: the MAML paper's Omniglot net (``OmniglotNet``), 5-way 1-shot, 1 query per class,
    1 inner step, meta-batch 32. Images are random (timing does not depend on their content, and
    no dataset is needed). Task sampling is outside the timed loop.

    python benchmarks/bench_distributed.py [--procs 1 2] [--workloads sinusoid omniglot]
        [--threads 1] [--steps 20] [--warmup 3] [--device cpu]
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pymaml  # noqa: E402
from pymaml import distributed as pdist  # noqa: E402
from pymaml.models import MLP, OmniglotNet  # noqa: E402

WORKLOADS = {
    # name: (meta-batch, inner_lr, loss)
    "sinusoid": (24, 0.01, F.mse_loss),
    "omniglot": (32, 0.4, F.cross_entropy),
}


def tasks(workload, n, device):
    g = torch.Generator().manual_seed(0)
    if workload == "sinusoid":
        x = torch.rand(n, 20, 1, generator=g) * 10 - 5
        y = torch.sin(x)
        t = (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    else:
        x = torch.rand(n, 10, 1, 28, 28, generator=g)
        y = torch.arange(5).repeat(2).expand(n, 10).clone()
        t = (x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    return tuple(a.to(device) for a in t)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    pdist.init_from_env(timeout_s=120)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    meta_batch, inner_lr, loss = WORKLOADS[args.workload]
    torch.manual_seed(0)
    model = (MLP((1, 40, 40, 1)) if args.workload == "sinusoid" else OmniglotNet(5)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = pymaml.MetaOptimizer(model, opt, "maml", loss, inner_lr=inner_lr, inner_steps=1, engine="recompute",
                                distributed=pdist.world_size() > 1)
    mine = pdist.local_share(tasks(args.workload, meta_batch, device))

    def barrier():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if pdist.is_initialized():
            torch.distributed.barrier()

    for _ in range(args.warmup):
        meta.step(mine)
    barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stats = meta.step(mine)
    barrier()
    dt = time.perf_counter() - t0
    if pdist.rank() == 0:
        print(json.dumps({"steps_per_s": args.steps / dt, "loss": stats["query_loss"],
                          "info": meta.last_info}), flush=True)
    if pdist.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, workload, procs) -> dict:
    port = free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", workload, "--threads",
           str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    ps = []
    for r in range(procs):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
        ps.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in ps]
    for r, (p, (_, err)) in enumerate(zip(ps, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"bench_distributed: {workload} on {procs} processes, rank {r} failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, pymaml backend {pymaml.backend()}, {args.device}: {dev}, "
          f"{os.cpu_count()} CPU cores, {args.threads} torch thread(s) per process, "
          f"{'NCCL' if args.device == 'cuda' else 'gloo'}; {args.steps} timed steps after {args.warmup}")
    print("| workload | meta-batch | processes | tasks per process | meta-steps/s | speed-up | parallel efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for w in args.workloads:
        base = None
        mb = WORKLOADS[w][0]
        for n in args.procs:
            r = measure(args, w, n)
            base = r["steps_per_s"] if base is None and n == args.procs[0] else base
            speedup = r["steps_per_s"] / base
            eff = speedup * args.procs[0] / n
            share = "/".join(str(s) for s in sorted({b - a for a, b in (pdist.shard(mb, k, n) for k in range(n))},
                                                    reverse=True))
            print(f"| {w} | {mb} | {n} | {share} | {r['steps_per_s']:.2f} | {speedup:.2f}x | {100 * eff:.0f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
