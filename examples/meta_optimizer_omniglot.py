"""MAML on Omniglot with pymaml.MetaOptimizer inside an ordinary torch training loop.

    python examples/meta_optimizer_omniglot.py --data ../shared/data/omniglot --iterations 200

Any torch.optim optimizer, LR scheduler or gradient clipping works: ``meta.backward(tasks)`` only
writes the meta-gradient into ``.grad``; ``meta.step(tasks)`` also calls ``optimizer.step()``.
"""
import argparse

import torch
import torch.nn.functional as F

import pymaml
from pymaml.data import Omniglot, OmniglotTasks
from pymaml.models import OmniglotNet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/omniglot")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--algorithm", default="maml")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = OmniglotNet(ways=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iterations)
    meta = pymaml.MetaOptimizer(model, opt, algorithm=args.algorithm, loss_fn=F.cross_entropy,
                                inner_lr=0.4, inner_steps=1, engine="auto")
    tasks = OmniglotTasks(Omniglot(args.data, "train"), ways=5, shots=1, queries=1, seed=0)
    for it in range(1, args.iterations + 1):
        meta.zero_grad()
        stats = meta.backward(tasks.sample(32))               # meta-gradient into .grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if it % 20 == 0:
            print(f"iteration {it}: query loss {stats['query_loss']:.3f}, accuracy {stats['accuracy']:.3f}")


if __name__ == "__main__":
    main()
