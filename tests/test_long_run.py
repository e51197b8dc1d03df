"""Long-run stability: hundreds of meta-steps (MetaOptimizer on sinusoid regression, with an
evaluation every few steps) keep memory flat, and the compiled and pure-torch ops stay equal to
rounding over the whole run.

Memory is measured two ways between a warm-up step and the last: the number of live torch Tensor
objects (exact for anything a Python object keeps alive, such as a kept loss, its graph or an output
list: ``test_a_leak_is_detected`` keeps the evaluation losses on purpose and checks that the count
sees it), and the process's resident memory, which must grow by less than MARGIN_MIB (coarse: it
catches memory held outside Python objects only when it adds up to that much).
"""
import gc

import pytest
import torch
import torch.nn.functional as F

import pymaml
import pymaml.reference
from pymaml import MetaOptimizer
from pymaml.data import SinusoidTasks
from pymaml.functional import Task
from pymaml.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 100
WARMUP = 20
EVAL_EVERY = 10
MARGIN_MIB = 24
TOL = 1e-6  # float32: about 10 roundings
OPS_NAMES = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm",
             "clip_grad_norm_"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def run(algorithm, steps, keep=None, probe=None):
    """Meta-trains a 1-40-40-1 MLP; returns the parameter snapshots after every step. ``probe(step)``
    is called after each step; ``keep`` (a list) receives each step's graph-holding loss."""
    torch.manual_seed(0)
    model = MLP((1, 40, 40, 1))
    opt = MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3), algorithm, F.mse_loss,
                        inner_steps=3, inner_lr=0.01)
    sampler = SinusoidTasks(shots=10, queries=10, seed=1)
    snapshots = []
    for step in range(steps):
        xs, ys, xq, yq = sampler.sample(8)
        opt.step(Task((xs, ys), (xq, yq)))
        if step % EVAL_EVERY == 0:  # evaluation: adapt a clone, read the query loss, drop it
            xs, ys, xq, yq = sampler.sample(2)
            learner = pymaml.MAML(model, lr=0.01).clone()
            learner.adapt(F.mse_loss(learner(xs[0]), ys[0]))
            loss = F.mse_loss(learner(xq[0]), yq[0])
            if keep is not None:
                keep.append(loss)
            del learner, loss
        snapshots.append([p.detach().clone() for p in model.parameters()]
                         + [p.detach().clone() for p in opt.algorithm.parameters()])
        if probe is not None:
            probe(step)
    return snapshots


def memory_profile(algorithm, steps=STEPS, keep=None):
    """(live tensors gained, resident MiB gained) from the warm-up step to the last."""
    marks = {}

    def probe(step):
        if step in (WARMUP, steps - 1):
            marks[step] = (live_tensors(), rss_mib())

    snapshots = run(algorithm, steps, keep=keep, probe=probe)
    (t0, m0), (t1, m1) = marks[WARMUP], marks[steps - 1]
    # the snapshots are the test's own: one list of clones per step
    return t1 - t0 - len(snapshots[0]) * (steps - 1 - WARMUP), m1 - m0


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_memory_stays_flat(algorithm):
    tensors, mib = memory_profile(algorithm)
    print(f"{algorithm}: {tensors:+d} live tensors, {mib:+.1f} MiB resident over {STEPS - 1 - WARMUP} meta-steps")
    assert tensors <= 0, f"{tensors} more live tensors after {STEPS - WARMUP} more meta-steps"
    assert mib < MARGIN_MIB, f"resident memory grew by {mib:.1f} MiB over {STEPS - WARMUP} meta-steps"


def test_a_leak_is_detected():
    """The control: keeping each evaluation's loss (and so its graph) is seen by the tensor count."""
    kept = []
    tensors, _ = memory_profile("maml", steps=60, keep=kept)
    assert tensors >= len(kept) - WARMUP // EVAL_EVERY - 1 > 0, tensors


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_compiled_and_pure_torch_stay_equal(algorithm, monkeypatch):
    """Every parameter and learned step size after every meta-step, compiled against pure torch.

    The element-wise ops agree bit for bit (tests/test_fuzz.py), but an output's strides may differ
    (the CPU kernels lay an output out like the first operand, torch's element-wise ops choose from
    all operands), and a matrix product then rounds differently; so the runs agree to rounding, and
    that difference must not grow: at most TOL relative at every step."""
    if pymaml.backend() != "compiled":
        pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    compiled = run(algorithm, STEPS // 2)
    for name in OPS_NAMES:
        monkeypatch.setattr(pymaml.ops, name, getattr(pymaml.reference, name))
    reference = run(algorithm, STEPS // 2)
    worst = 0.0
    for step, (a, b) in enumerate(zip(compiled, reference)):
        x, y = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
        rel = ((x - y).norm() / y.norm()).item()
        worst = max(worst, rel)
        assert rel <= TOL, f"{algorithm}: the paths differ by {rel:.3g} relative after meta-step {step}"
    print(f"{algorithm}: largest relative difference over {len(compiled)} meta-steps: {worst:.3g}")
