"""The training job behind ``pymaml train``: meta-training, evaluation, checkpoints, plots.

:func:`train` runs one job described by a :class:`TrainConfig` and returns its summary (a dict,
also written to ``OUT/summary.json`` and ``OUT/summary.md``). Everything it writes goes under
``config.out``:

* ``checkpoint.pt`` (the newest of the last ``keep_checkpoints`` ``checkpoint-<iteration>.pt``,
  written atomically by :mod:`pymaml.checkpoint`): model, outer optimizer, algorithm state
  (learned step sizes, iteration counter), the torch/numpy/python RNG states, the history and the
  elapsed training time. ``resume=True`` continues from it and gives bit-identical parameters to an
  uninterrupted run (same machine, same thread count, same number of processes).
* ``curves.png``: training query loss (and accuracy) and the periodic held-out evaluation with its
  95% confidence interval; ``fits.png`` for sinusoid: the fitted curves before and after adaptation.

Training task ``j`` of iteration ``t`` is the sampler's task ``t · meta_batch + j``, drawn from its
own (seed, index) stream (:mod:`pymaml.data.seeding`). Evaluation tasks come from samplers with
their own fixed seeds, so evaluating never changes the training stream: the same held-out tasks are
used at every evaluation.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the job runs data-parallel (:mod:`pymaml.distributed`):
each rank samples and meta-trains on its share of every meta-batch, the meta-gradients are reduced
across ranks, evaluation tasks are shared out and their metrics gathered, and rank 0 alone shows
the progress bar and writes the outputs. Each meta-gradient is the single-process one up to
rounding (the sum over tasks runs in another order); see ``docs/distributed.md`` for how far the
parameters of a whole run then agree.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed as pdist
from .algorithms import ALGORITHMS
from .models import OmniglotNet  # noqa: F401  (also importable from here, as before)
from .optim import MetaOptimizer

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "evaluate_checkpoint", "OmniglotNet", "confidence_interval", "backend_summary"]

DEFAULTS = {
    # Finn et al. 2017, section 5.1: K = 10, one step α = 0.01, meta-batch 25, Adam 1e-3, 70k its.
    "sinusoid": dict(shots=10, queries=10, meta_batch=25, inner_lr=0.01, inner_steps=1, eval_steps=1,
                     outer_lr=1e-3, iterations=70000, eval_every=1000, eval_tasks=200, test_tasks=600),
    # Omniglot 5-way 1-shot: one step α = 0.4 (three at test), meta-batch 32, 1 query per class.
    "omniglot": dict(ways=5, shots=1, queries=1, meta_batch=32, inner_lr=0.4, inner_steps=1, eval_steps=3,
                     outer_lr=1e-3, iterations=60000, eval_every=500, eval_tasks=200, test_tasks=600),
}


@dataclass
class TrainConfig:
    task: str = "sinusoid"
    algorithm: str = "maml"
    engine: str = "auto"
    hvp: str = "auto"
    task_batching: str = "auto"
    memory_format: str = "auto"
    iterations: Optional[int] = None
    meta_batch: Optional[int] = None
    inner_lr: Optional[float] = None
    inner_steps: Optional[int] = None
    eval_steps: Optional[int] = None
    outer_lr: Optional[float] = None
    ways: Optional[int] = None
    shots: Optional[int] = None
    queries: Optional[int] = None
    eval_every: Optional[int] = None
    eval_tasks: Optional[int] = None
    test_tasks: Optional[int] = None
    data: str = "data/omniglot"
    out: str = "runs/pymaml"
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    dist_timeout: float = 300.0
    max_minutes: Optional[float] = None
    threads: Optional[int] = None
    progress: bool = True
    plots: bool = True
    algo_settings: Dict[str, object] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        if self.task not in DEFAULTS:
            raise ValueError(f"train: task must be one of {sorted(DEFAULTS)}, got {self.task!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"train: algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        c = dataclasses.replace(self, algo_settings=dict(self.algo_settings))
        for k, v in DEFAULTS[self.task].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        return c


def confidence_interval(values) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    return float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def backend_summary() -> str:
    """What ran underneath: ``pymaml.backend()`` when available."""
    import pymaml
    fn = getattr(pymaml, "backend", None)
    if fn is None:
        return "pure torch (pymaml.backend() not available in this build)"
    try:
        b = str(fn())
        reason = getattr(pymaml, "backend_reason", None)
        why = reason() if reason is not None else ""
    except Exception as e:  # report, never fail a finished run on it
        return f"unknown (pymaml.backend() raised {type(e).__name__}: {e})"
    return f"{b} ({why})" if why else b


# -- task setup ------------------------------------------------------------------------------------

class _Job:
    def __init__(self, c: TrainConfig):
        self.c = c
        if c.task == "sinusoid":
            from .data import SinusoidTasks
            from .models import MLP
            self.model = MLP((1, 40, 40, 1))
            self.loss_fn = F.mse_loss
            self.train_tasks = SinusoidTasks(c.shots, c.queries, seed=c.seed)
            self.eval_sampler = lambda split, seed: SinusoidTasks(c.shots, 100, seed=seed)
            self.metric = "mse"
        else:
            from .data import Omniglot, OmniglotTasks
            self.model = OmniglotNet(ways=c.ways)
            self.loss_fn = F.cross_entropy
            self.splits = {s: Omniglot(c.data, s) for s in ("train", "val", "test")}
            self.train_tasks = OmniglotTasks(self.splits["train"], c.ways, c.shots, c.queries, seed=c.seed)
            self.eval_sampler = lambda split, seed: OmniglotTasks(self.splits[split], c.ways, c.shots, c.queries,
                                                                  seed=seed)
            self.metric = "accuracy"

    def evaluate(self, algo, split: str, n: int, seed: int, steps: int, batch: int = 50) -> dict:
        """Held-out tasks 0 … n−1 of the ``seed`` stream, shared out across ranks; every rank
        returns the metrics of all n tasks."""
        sampler = self.eval_sampler(split, seed)
        start, stop = pdist.shard(n)
        per_task = []
        for first in range(start, stop, batch):
            x_s, y_s, x_q, y_q = sampler.tasks(range(first, min(first + batch, stop)))
            losses, outputs = algo.evaluate((x_s, y_s, x_q, y_q), steps)
            if self.metric == "accuracy":
                per_task += [float((o.argmax(-1) == y).float().mean()) for o, y in zip(outputs, y_q)]
            else:
                per_task += losses
        per_task = [v for part in pdist.gather_objects(per_task) for v in part]
        return {"mean": float(np.mean(per_task)), "ci95": confidence_interval(per_task), "tasks": n,
                "steps": steps}


# -- the job ---------------------------------------------------------------------------------------

_CHECKPOINT_KEYS = ("config", "iteration", "model", "meta", "rng", "history", "elapsed")


def _check_resumable(c: TrainConfig, ck, path: str) -> None:
    """A checkpoint resumes only the run it was written by: a training checkpoint of the same task,
    algorithm and model shape. Every rank holds the same ``ck``, so every rank raises alike."""
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"train: {path} is not a pymaml training checkpoint (missing {missing}); "
                         "it was written by something else")
    saved = ck["config"]
    for key in ("task", "algorithm", "ways"):
        if saved.get(key) != getattr(c, key):
            raise ValueError(f"train: {path} was written by a run with {key}={saved.get(key)!r}, "
                             f"but this run has {key}={getattr(c, key)!r}; resume with the same settings "
                             "or use another --out")


def _algo_settings(c: TrainConfig) -> dict:
    s = dict(inner_lr=c.inner_lr, inner_steps=c.inner_steps, eval_steps=c.eval_steps, engine=c.engine,
             hvp=c.hvp, task_batching=c.task_batching, memory_format=c.memory_format,
             batch_norm="transductive")  # the MAML paper's protocol: batch statistics, always
    s.update(c.algo_settings)
    return s


def _progress_bar(c: TrainConfig, start: int):
    if not c.progress or pdist.rank() != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("train: tqdm is not installed; no progress bar (pip install tqdm)")
        return None
    return tqdm(total=c.iterations, initial=start, desc=f"{c.task}/{c.algorithm}", dynamic_ncols=True,
                mininterval=0.5 if os.isatty(2) else 30.0)


def train(config: TrainConfig) -> dict:
    """Runs (or resumes) one training job; returns its summary (on every rank; rank 0 writes)."""
    c = config.resolved()
    if c.threads:
        torch.set_num_threads(c.threads)
    # the job trains on the CPU: gloo (NCCL is for models on GPUs, in users' own loops)
    world = pdist.world_size() if pdist.init_from_env("gloo", timeout_s=c.dist_timeout) else 1
    main_rank = pdist.rank() == 0
    if main_rank:
        os.makedirs(c.out, exist_ok=True)
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    random.seed(c.seed)
    job = _Job(c)
    model = job.model
    opt = torch.optim.Adam(model.parameters(), lr=c.outer_lr)
    meta = MetaOptimizer(model, opt, c.algorithm, job.loss_fn, distributed=world > 1, **_algo_settings(c))
    algo = meta.algorithm
    hist = {"iteration": [], "query_loss": [], "accuracy": [], "eval": []}
    start, elapsed = 0, 0.0
    if c.resume:
        path = ckpt.latest(c.out)
        ck = ckpt.load(path)
        _check_resumable(c, ck, path)
        model.load_state_dict(ck["model"])
        meta.load_state_dict(ck["meta"])
        ckpt.set_rng_state(ck["rng"])
        hist, start, elapsed = ck["history"], ck["iteration"], ck["elapsed"]

    def checkpoint(it):
        pdist.average_buffers(model)
        ckpt.save(c.out, {"config": dataclasses.asdict(c), "iteration": it, "model": model.state_dict(),
                          "meta": meta.state_dict(), "rng": ckpt.rng_state(), "history": hist,
                          "elapsed": elapsed, "world_size": world}, it, keep=c.keep_checkpoints)

    bar = _progress_bar(c, start)
    it = start
    stopped_early = False
    t_last = time.perf_counter()
    eval_seed, test_seed = c.seed + 1_000_003, c.seed + 2_000_003
    first, last = pdist.shard(c.meta_batch)
    last_info = {}
    while it < c.iterations:
        # every rank must take the same decision: rank 0's clock decides
        if c.max_minutes is not None and pdist.broadcast_object(elapsed >= 60.0 * c.max_minutes):
            stopped_early = True
            break
        base = it * c.meta_batch
        stats = meta.step(job.train_tasks.tasks(range(base + first, base + last)))
        it += 1
        last_info = meta.last_info
        hist["iteration"].append(it)
        hist["query_loss"].append(stats["query_loss"])
        if "accuracy" in stats:
            hist["accuracy"].append(stats["accuracy"])
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if it % c.eval_every == 0 or it == c.iterations:
            pdist.average_buffers(model)
            ev = job.evaluate(algo, "val", c.eval_tasks, eval_seed, c.eval_steps)
            ev.update(iteration=it, elapsed=elapsed)
            hist["eval"].append(ev)
            if main_rank:
                log.info("iteration %d: held-out %s %.4f ± %.4f", it, job.metric, ev["mean"], ev["ci95"])
            if bar is not None:
                bar.write(f"[{it}] held-out {job.metric} ({c.eval_steps} step{'s' if c.eval_steps != 1 else ''}): "
                          f"{ev['mean']:.4f} ± {ev['ci95']:.4f}  train {elapsed / 60:.1f} min")
            t_last = time.perf_counter()  # evaluation time is not training time
        if it % c.checkpoint_every == 0:
            checkpoint(it)
            t_last = time.perf_counter()
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{stats['query_loss']:.4f}"}
            if "accuracy" in stats:
                post["acc"] = f"{stats['accuracy']:.3f}"
            bar.set_postfix(post, refresh=False)
    if bar is not None:
        bar.close()
    if it % c.checkpoint_every != 0 or it == start:
        checkpoint(it)
    meta.check_in_sync()

    # final test: held-out tasks (Omniglot test characters), the training and the test step counts
    t0 = time.perf_counter()
    final = {}
    test_split = "test" if c.task == "omniglot" else "val"
    for steps in sorted({c.inner_steps, c.eval_steps, 10 if c.task == "sinusoid" else c.eval_steps}):
        final[f"{steps}_steps"] = job.evaluate(algo, test_split, c.test_tasks, test_seed, steps)
    test_time = time.perf_counter() - t0
    if not main_rank:
        return {"task": c.task, "algorithm": c.algorithm, "iterations": it, "test": final, "rank": pdist.rank()}
    tag = f"{c.task} / {c.algorithm} / engine {last_info.get('engine', c.engine)}"
    plots = c.plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("train: matplotlib is not installed; no plots (pip install matplotlib)")
            plots = False
    if plots:
        from .plots import plot_curves, plot_fits
        plot_curves(os.path.join(c.out, "curves.png"), hist, job.metric, tag)
        if c.task == "sinusoid":
            plot_fits(os.path.join(c.out, "fits.png"), job, algo, test_seed + 1, tag)
    summary = {
        "task": c.task, "algorithm": c.algorithm, "iterations": it, "stopped_by_time_limit": stopped_early,
        "train_minutes": elapsed / 60.0, "test_seconds": test_time, "metric": job.metric,
        "test": final, "last_eval": hist["eval"][-1] if hist["eval"] else None,
        "engine": last_info.get("engine"), "hvp": last_info.get("hvp"),
        "task_batching": last_info.get("task_batching"), "memory_format": last_info.get("memory_format"),
        "backend": backend_summary(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "processes": world,
        "config": {k: v for k, v in dataclasses.asdict(c).items() if k not in ("progress", "plots")},
    }
    ckpt.write_text_atomic(os.path.join(c.out, "summary.json"), json.dumps(summary, indent=2, default=str))
    ckpt.write_text_atomic(os.path.join(c.out, "summary.md"), format_summary(summary) + "\n")
    return summary


def evaluate_checkpoint(path: str, tasks: Optional[int] = None, steps: Optional[int] = None,
                        data: Optional[str] = None, seed: Optional[int] = None) -> dict:
    """Final-test evaluation of a saved checkpoint (Omniglot: the test characters; sinusoid: fresh
    tasks), with the same task stream as the end of :func:`train` unless ``seed`` is given."""
    ck = torch.load(path, weights_only=False)
    c = TrainConfig(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    if data is not None:
        c.data = data
    c = c.resolved()
    if c.threads:
        torch.set_num_threads(c.threads)
    job = _Job(c)
    opt = torch.optim.Adam(job.model.parameters(), lr=c.outer_lr)
    meta = MetaOptimizer(job.model, opt, c.algorithm, job.loss_fn, **_algo_settings(c))
    job.model.load_state_dict(ck["model"])
    meta.algorithm.load_state_dict(ck["meta"]["algorithm"])
    split = "test" if c.task == "omniglot" else "val"
    t0 = time.perf_counter()
    res = job.evaluate(meta.algorithm, split, tasks or c.test_tasks, c.seed + 2_000_003 if seed is None else seed,
                       c.eval_steps if steps is None else steps)
    res.update(iteration=ck["iteration"], train_minutes=ck["elapsed"] / 60.0, metric=job.metric, split=split,
               seconds=time.perf_counter() - t0)
    return res


def format_summary(s: dict) -> str:
    lines = [f"## pymaml train {s['task']} --algorithm {s['algorithm']}", "",
             f"- iterations: {s['iterations']}{' (stopped by the time limit)' if s['stopped_by_time_limit'] else ''}, "
             f"training time {s['train_minutes']:.1f} min, final test {s['test_seconds']:.0f} s",
             f"- engine: {s['engine']}, hvp: {s['hvp']}, task batching: {s['task_batching']}, "
             f"memory format: {s.get('memory_format')}, torch threads: {s['threads']}",
             f"- kernels/backend: {s['backend']}", "",
             f"| inner steps at test | {s['metric']} | 95% CI | tasks |", "| --- | --- | --- | --- |"]
    for k, v in s["test"].items():
        m = f"{100 * v['mean']:.2f}%" if s["metric"] == "accuracy" else f"{v['mean']:.4f}"
        ci = f"± {100 * v['ci95']:.2f}%" if s["metric"] == "accuracy" else f"± {v['ci95']:.4f}"
        lines.append(f"| {v['steps']} | {m} | {ci} | {v['tasks']} |")
    return "\n".join(lines)
