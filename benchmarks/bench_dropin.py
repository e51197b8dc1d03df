"""learn2learn's MAML example loops, run with learn2learn and with pymaml's drop-in wrapper.

The loops are those of learn2learn's ``examples/vision/maml_omniglot.py`` and
``maml_miniimagenet.py``: per task, ``clone()``, ``adapt()`` for the adaptation steps, the query
loss ``backward()``, then a second ``clone()``/``adapt()`` on a validation task (no backward, as
the examples do); the gradients averaged over the meta-batch; ``Adam.step()``. The only change
between the two columns is the wrapper class (``learn2learn.algorithms.MAML`` or ``pymaml.MAML``).
Data are random images of the right shapes (the cost does not depend on the pixels).

Workloads (second order, as the examples):
  omniglot      20-way 1-shot, 1 query per class, 5 adaptation steps, inner lr 0.4, meta-batch 16,
                learn2learn's OmniglotCNN (4 × [conv 3×3 stride 2, BatchNorm, ReLU], 64 filters)
  miniimagenet  5-way 5-shot, 5 queries per class, 5 adaptation steps, inner lr 0.5, meta-batch 4,
                learn2learn's MiniImagenetCNN (4 × [conv 3×3, BatchNorm, ReLU, max-pool 2], 32 filters)

Both libraries run alternately, meta-step by meta-step, in one process, so that machine noise hits
both alike; the table gives the median time per meta-step and learn2learn/pymaml. The float32
meta-gradients of the first meta-step (same initial weights, same tasks) are compared too.

    python benchmarks/bench_dropin.py                       # 1 thread and all threads
    python benchmarks/bench_dropin.py --threads 1 --steps 3 --workloads omniglot
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pymaml  # noqa: E402


class ConvBlock(nn.Module):
    """learn2learn's ConvBlock: conv 3×3 (padding 1), BatchNorm, ReLU, optional 2×2 max-pool."""

    def __init__(self, c_in, c_out, max_pool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=1 if max_pool else 2, padding=1)
        self.normalize = nn.BatchNorm2d(c_out)
        nn.init.uniform_(self.normalize.weight)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.max_pool = nn.MaxPool2d(2) if max_pool else nn.Identity()

    def forward(self, x):
        return self.max_pool(F.relu(self.normalize(self.conv(x))))


class OmniglotCNN(nn.Module):
    def __init__(self, ways, hidden=64):
        super().__init__()
        self.base = nn.Sequential(*[ConvBlock(1 if i == 0 else hidden, hidden, False) for i in range(4)])
        self.classifier = nn.Linear(hidden, ways)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.zero_()

    def forward(self, x):
        return self.classifier(self.base(x.view(-1, 1, 28, 28)).mean(dim=[2, 3]))


class MiniImagenetCNN(nn.Module):
    def __init__(self, ways, hidden=32):
        super().__init__()
        self.features = nn.Sequential(*[ConvBlock(3 if i == 0 else hidden, hidden, True) for i in range(4)])
        self.classifier = nn.Linear(25 * hidden, ways)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.features(x).reshape(x.size(0), -1))


WORKLOADS = {
    "omniglot": dict(title="Omniglot 20-way 1-shot, 5 steps, meta-batch 16", ways=20, shots=1, queries=1,
                     steps=5, lr=0.4, meta_batch=16, channels=1, size=28, model=OmniglotCNN),
    "miniimagenet": dict(title="MiniImageNet 5-way 5-shot, 5 steps, meta-batch 4", ways=5, shots=5, queries=5,
                         steps=5, lr=0.5, meta_batch=4, channels=3, size=84, model=MiniImagenetCNN),
}


def make_tasks(w, seed):
    g = torch.Generator().manual_seed(seed)

    def split(per_class):
        n = w["ways"] * per_class
        return (torch.randn(n, w["channels"], w["size"], w["size"], generator=g),
                torch.arange(w["ways"]).repeat_interleave(per_class))

    return [(split(w["shots"]), split(w["queries"])) for _ in range(2 * w["meta_batch"])]


def meta_step(maml, opt, w, tasks, loss=nn.CrossEntropyLoss()):
    """One iteration of learn2learn's example loop (training and validation tasks)."""
    opt.zero_grad()
    for t in range(w["meta_batch"]):
        for phase in ("train", "valid"):
            (xs, ys), (xq, yq) = tasks[2 * t + (phase == "valid")]
            learner = maml.clone()
            for _ in range(w["steps"]):
                learner.adapt(loss(learner(xs), ys))
            err = loss(learner(xq), yq)
            if phase == "train":
                err.backward()
    grads = [p.grad.detach().clone() for p in maml.parameters()]
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / w["meta_batch"])
    opt.step()
    return grads


def rel(a, b):
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / max(sum(float(y.double().norm() ** 2) for y in b) ** 0.5, 1e-30)


def agreement(name, l2l, tasks=2):
    """Meta-gradients of the first ``tasks`` training tasks: learn2learn float32, pymaml float32 and
    learn2learn float64 (the reference), from the same weights. Returns the two float32 errors."""
    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w["model"](w["ways"])
    data = make_tasks(w, seed=100)[:2 * tasks:2]
    out = {}
    for key, cls, dtype in (("l2l32", l2l.algorithms.MAML, torch.float32), ("pymaml32", pymaml.MAML, torch.float32),
                            ("l2l64", l2l.algorithms.MAML, torch.float64)):
        model = copy.deepcopy(base).to(dtype)
        maml = cls(model, lr=w["lr"], first_order=False)
        for (xs, ys), (xq, yq) in data:
            learner = maml.clone()
            for _ in range(w["steps"]):
                learner.adapt(F.cross_entropy(learner(xs.to(dtype)), ys))
            F.cross_entropy(learner(xq.to(dtype)), yq).backward()
        out[key] = [p.grad for p in model.parameters()]
    return rel(out["l2l32"], out["l2l64"]), rel(out["pymaml32"], out["l2l64"])


def make_learners(w, l2l):
    """{library: (MAML wrapper, Adam)} over two copies of one randomly initialised model."""
    torch.manual_seed(0)
    base = w["model"](w["ways"])
    libs = {"learn2learn": l2l.algorithms.MAML, "pymaml": pymaml.MAML}
    state = {}
    for lib, cls in libs.items():
        model = w["model"](w["ways"])
        model.load_state_dict(base.state_dict())
        maml = cls(model, lr=w["lr"], first_order=False)
        state[lib] = (maml, torch.optim.Adam(maml.parameters(), 0.003))
    return state


def run(name, threads, steps, l2l):
    w = WORKLOADS[name]
    torch.set_num_threads(threads)
    state = make_learners(w, l2l)
    libs = list(state)
    times = {lib: [] for lib in libs}
    first = {}
    for i in range(steps + 1):  # meta-step 0 is warm-up, untimed
        tasks = make_tasks(w, seed=100 + i)
        order = list(libs) if i % 2 == 0 else list(reversed(list(libs)))
        for lib in order:
            t0 = time.perf_counter()
            grads = meta_step(*state[lib], w, tasks)
            dt = time.perf_counter() - t0
            if i == 0:
                first[lib] = grads
            else:
                times[lib].append(dt)
    med = {lib: statistics.median(ts) for lib, ts in times.items()}
    return {"workload": name, "title": w["title"], "threads": threads, "steps": steps,
            "learn2learn_s": med["learn2learn"], "pymaml_s": med["pymaml"],
            "speedup": med["learn2learn"] / med["pymaml"],
            "grad_rel_diff_f32": rel(first["pymaml"], first["learn2learn"]),
            "f32_error_learn2learn": None, "f32_error_pymaml": None,
            "times": times}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="omniglot,miniimagenet")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--steps", type=int, default=5, help="timed meta-steps per library (after one warm-up)")
    ap.add_argument("--no-agreement", action="store_true", help="skip the float64 agreement check")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn as l2l
    except Exception as e:  # noqa: BLE001 - report why the peer is missing and stop
        sys.exit(f"bench_dropin: learn2learn is not importable ({type(e).__name__}: {e}); "
                 "install it with `bash benchmarks/install_peers.sh`")
    print(f"# learn2learn {l2l.__version__} vs pymaml {pymaml.__version__} ({pymaml.backend()} ops), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| workload | threads | learn2learn s/meta-step | pymaml s/meta-step | speed-up | float32 grads, pymaml vs learn2learn |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.workloads.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            r = run(name, threads, args.steps, l2l)
            rows.append(r)
            print(f"| {r['title']} | {threads} | {r['learn2learn_s']:.3f} | {r['pymaml_s']:.3f} | "
                  f"{r['speedup']:.2f}× | {r['grad_rel_diff_f32']:.1e} |", flush=True)
    if not args.no_agreement:
        print("\nfloat32 meta-gradient error against learn2learn in float64 (first 2 tasks, same weights):")
        print("| workload | learn2learn float32 | pymaml float32 |\n|---|---|---|")
        torch.set_num_threads(os.cpu_count())
        for name in args.workloads.split(","):
            e_l2l, e_pm = agreement(name, l2l)
            for r in rows:
                if r["workload"] == name:
                    r["f32_error_learn2learn"], r["f32_error_pymaml"] = e_l2l, e_pm
            print(f"| {WORKLOADS[name]['title']} | {e_l2l:.1e} | {e_pm:.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
