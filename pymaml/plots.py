"""The figures of ``pymaml train``: ``curves.png`` (training loss and held-out metric) and, for
sinusoid regression, ``fits.png`` (fitted curves before and after adaptation). Needs matplotlib."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["plot_curves", "plot_fits"]


def _smooth(y, n=50):
    y = np.asarray(y, dtype=np.float64)
    if len(y) < n:
        return y
    k = np.ones(n) / n
    return np.convolve(y, k, mode="valid")


def plot_curves(path: str, hist: dict, metric: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    it = np.asarray(hist["iteration"])
    key = "accuracy" if metric == "accuracy" else "query_loss"
    ax = axes[0]
    ax.plot(it, hist["query_loss"], alpha=0.25, lw=0.5, color="C0")
    s = _smooth(hist["query_loss"])
    ax.plot(it[len(it) - len(s):], s, color="C0", label="meta-train query loss (moving avg)")
    ax.set_xlabel("iteration"); ax.set_ylabel("query loss after adaptation"); ax.set_yscale("log")
    ax.legend(); ax.grid(alpha=0.3)
    ax = axes[1]
    ev = hist["eval"]
    if ev:
        x = [e["iteration"] for e in ev]
        y = [e["mean"] for e in ev]
        ci = [e["ci95"] for e in ev]
        ax.errorbar(x, y, yerr=ci, marker="o", ms=3, capsize=2, label=f"held-out {metric} ± 95% CI")
    if metric == "accuracy" and "accuracy" in hist and hist["accuracy"]:
        s = _smooth(hist["accuracy"])
        ax.plot(it[len(it) - len(s):], s, color="C1", alpha=0.7, label="meta-train query accuracy")
    ax.set_xlabel("iteration"); ax.set_ylabel(metric); ax.grid(alpha=0.3); ax.legend()
    if metric == "mse":
        ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fits(path: str, job, algo, seed: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .data.sinusoid import SinusoidTasks, curve
    from .functional.buffers import batch_norm_policy
    sampler = SinusoidTasks(job.c.shots, 1, seed=seed)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax in axes:
        amp, phase = sampler.sample_functions(1)
        x_s, y_s = sampler.points(amp, phase, job.c.shots)
        xs, ys = curve(float(amp[0]), float(phase[0]))
        grid = torch.tensor(xs, dtype=torch.float32)[:, None]
        ax.plot(xs, ys, "k-", lw=2, label="true function")
        ax.plot(x_s[0, :, 0].numpy(), y_s[0, :, 0].numpy(), "k^", label=f"{job.c.shots} support points")
        for steps, style in ((0, "C2:"), (1, "C0--"), (10, "C3-")):
            fast = algo.adapt((x_s[0], y_s[0]), steps)
            with torch.no_grad(), batch_norm_policy(job.model):
                pred = torch.func.functional_call(job.model, fast, (grid,))
            label = "before adaptation (θ)" if steps == 0 else f"after {steps} step{'s' if steps > 1 else ''}"
            ax.plot(xs, pred[:, 0].numpy(), style, label=label)
        ax.set_xlim(-5, 5); ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
