"""``pymaml`` command line: ``pymaml train sinusoid`` and ``pymaml train omniglot --data DIR``.

Under ``torchrun --nproc-per-node N -m pymaml train ...`` the same job runs data-parallel on N
processes (``docs/distributed.md``); rank 0 alone shows progress and writes the outputs."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .algorithms import ALGORITHMS
from .functional import ENGINES, HVP_METHODS, MEMORY_FORMATS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pymaml", description="Gradient-based meta-learning (the MAML family).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train on sinusoid regression or Omniglot",
                       description="Meta-train, evaluate on held-out tasks, save checkpoints, plots and a summary. "
                                   "Unset numbers take the paper's settings for the task.")
    t.add_argument("task", choices=["sinusoid", "omniglot"])
    t.add_argument("--algorithm", default="maml", choices=sorted(ALGORITHMS))
    t.add_argument("--engine", default="auto", choices=["auto", *ENGINES],
                   help="meta-gradient engine for second-order algorithms (auto = recompute)")
    t.add_argument("--hvp", default="auto", choices=["auto", *HVP_METHODS])
    t.add_argument("--task-batching", default="auto", choices=["auto", "vmap", "loop"])
    t.add_argument("--memory-format", default="auto", choices=list(MEMORY_FORMATS),
                   help="layout of the meta-gradient computation (auto: channels-last for conv nets on the CPU)")
    t.add_argument("--data", default="data/omniglot",
                   help="folder with images_background.zip and images_evaluation.zip (downloaded if missing)")
    t.add_argument("--ways", type=int)
    t.add_argument("--shots", type=int)
    t.add_argument("--queries", type=int, help="query examples per class (per task for sinusoid)")
    t.add_argument("--iterations", type=int)
    t.add_argument("--meta-batch", type=int)
    t.add_argument("--inner-lr", type=float)
    t.add_argument("--inner-steps", type=int)
    t.add_argument("--eval-steps", type=int, help="inner steps at evaluation")
    t.add_argument("--outer-lr", type=float)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--eval-tasks", type=int)
    t.add_argument("--test-tasks", type=int)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--keep-checkpoints", type=int, default=3, help="numbered checkpoints kept in OUT")
    t.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds a rank waits for the others before stopping with an error")
    t.add_argument("--max-minutes", type=float, help="stop meta-training after this much training time")
    t.add_argument("--out", default=None, help="output folder (default runs/<task>-<algorithm>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--threads", type=int, help="torch intra-op threads")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-plots", action="store_true")
    t.add_argument("--lam", type=float, help="iMAML proximal strength λ")
    t.add_argument("--cg-steps", type=int, help="iMAML conjugate-gradient iterations")
    t.add_argument("--first-order-iterations", type=int, help="MAML++: first-order for this many iterations")
    t.add_argument("--msl-iterations", type=int, help="MAML++: multi-step loss annealing length")
    e = sub.add_parser("evaluate", help="final-test evaluation of a checkpoint",
                       description="Evaluate OUT/checkpoint.pt on held-out tasks (Omniglot: test characters).")
    e.add_argument("checkpoint")
    e.add_argument("--tasks", type=int, help="number of test tasks (default: the run's --test-tasks)")
    e.add_argument("--steps", type=int, help="inner steps (default: the run's --eval-steps)")
    e.add_argument("--data", help="Omniglot folder, if it moved since training")
    e.add_argument("--seed", type=int)
    return p


def _evaluate(args) -> int:
    from .training import evaluate_checkpoint
    try:
        r = evaluate_checkpoint(args.checkpoint, args.tasks, args.steps, args.data, args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pymaml evaluate: error: {e}", file=sys.stderr)
        return 2
    pct = r["metric"] == "accuracy"
    fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")
    print(f"{args.checkpoint}: iteration {r['iteration']} ({r['train_minutes']:.1f} min of training), "
          f"{r['split']} {r['metric']} after {r['steps']} step(s) on {r['tasks']} tasks: "
          f"{fmt(r['mean'])} ± {fmt(r['ci95'])} (95% CI)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "evaluate":
        return _evaluate(args)
    from .training import TrainConfig, format_summary, train
    extra = {}
    for k in ("lam", "cg_steps", "first_order_iterations", "msl_iterations"):
        if getattr(args, k) is not None:
            extra[k] = getattr(args, k)
    cfg = TrainConfig(
        task=args.task, algorithm=args.algorithm, engine=args.engine, hvp=args.hvp,
        task_batching=args.task_batching, memory_format=args.memory_format, iterations=args.iterations, meta_batch=args.meta_batch,
        inner_lr=args.inner_lr, inner_steps=args.inner_steps, eval_steps=args.eval_steps, outer_lr=args.outer_lr,
        ways=args.ways, shots=args.shots, queries=args.queries, eval_every=args.eval_every,
        eval_tasks=args.eval_tasks, test_tasks=args.test_tasks, data=args.data,
        out=args.out or f"runs/{args.task}-{args.algorithm}", seed=args.seed, resume=args.resume,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        dist_timeout=args.dist_timeout, max_minutes=args.max_minutes, threads=args.threads,
        progress=not args.no_progress, plots=not args.no_plots, algo_settings=extra)
    from . import distributed as pdist
    try:
        summary = train(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        where = f" (rank {pdist.rank()} of {pdist.world_size()})" if pdist.world_size() > 1 else ""
        where = "" if where[2:-1] in str(e) else where
        print(f"pymaml train: error{where}: {e}", file=sys.stderr)
        if pdist.is_initialized():
            # the other ranks may be gone: tearing the process group down can hang or crash, and
            # there is nothing left to finish (checkpoints are complete files)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    pdist.shutdown()
    if summary.get("rank", 0) != 0:
        return 0
    print(format_summary(summary))
    made = [f for f in ("summary.json", "summary.md", "curves.png", "fits.png", "checkpoint.pt")
            if os.path.exists(os.path.join(cfg.out, f))]
    print(f"\noutputs in {cfg.out}/ ({', '.join(made)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
