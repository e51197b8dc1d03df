"""A learn2learn-style MAML training script that runs on pymaml.

The only change from the learn2learn version is the wrapper: ``l2l.algorithms.MAML`` becomes
``pymaml.MAML`` (same arguments, same ``clone()`` / ``adapt(loss)`` / ``learner(x)``).

    python examples/l2l_style_sinusoid.py --iterations 2000
"""
import argparse

import torch
import torch.nn.functional as F

import pymaml
from pymaml.data import SinusoidTasks
from pymaml.models import MLP


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--fast-lr", type=float, default=0.01)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--adapt-steps", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = MLP((1, 40, 40, 1))
    maml = pymaml.MAML(model, lr=args.fast_lr, first_order=False)   # was: l2l.algorithms.MAML(...)
    opt = torch.optim.Adam(maml.parameters(), args.meta_lr)
    tasks = SinusoidTasks(shots=10, queries=10, seed=0)

    for it in range(1, args.iterations + 1):
        opt.zero_grad()
        x_s, y_s, x_q, y_q = tasks.sample(args.meta_batch)
        total = 0.0
        for t in range(args.meta_batch):
            learner = maml.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(F.mse_loss(learner(x_s[t]), y_s[t]))
            loss = F.mse_loss(learner(x_q[t]), y_q[t]) / args.meta_batch
            loss.backward()
            total += loss.item()
        opt.step()
        if it % 200 == 0:
            print(f"iteration {it}: mean post-adaptation query MSE {total:.3f}")


if __name__ == "__main__":
    main()
