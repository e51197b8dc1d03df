"""Data parallel with a GradScaler: a NaN or Inf on one rank only makes every rank skip the same
outer step (and back off the same scale, or raise together), and the ranks stay bit-identical.

Two gloo processes on loopback (this file run as a script) train with MetaOptimizer(scaler=...,
distributed=True); faults go into one rank's share only: a NaN in a support input on rank 1, an Inf
in a query target on rank 0. Each rank records its own (unreduced) meta-gradient's finiteness, the
skip decisions, the scales and its parameters after every step; the tests compare the ranks.
Without a scaler, a step flag set on one rank only (its meta-gradient finite) counts on every rank.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import pymaml
from pymaml import distributed as pdist
from pymaml.models import MLP

WORLD = 2
STEPS = 5
#: outer step -> (rank, tensor of the 4-tuple, value): the faults, each on one rank only
FAULTS = {1: (1, 0, float("nan")), 3: (0, 3, float("inf"))}


def meta_batch(step: int):
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.rand(4, 12, 1, generator=g) * 10 - 5
    y = torch.sin(x) * (1 + torch.rand(4, 1, 1, generator=g))
    return x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]


def train(rank: int, nonfinite: str):
    torch.manual_seed(300 + rank)  # different on each rank: the broadcast from rank 0 fixes it
    model = MLP((1, 8, 8, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
    meta = pymaml.MetaOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.01), "maml", F.mse_loss,
                                inner_lr=0.05, inner_steps=2, distributed=True, check_every=1,
                                scaler=scaler, nonfinite=nonfinite)
    local = []  # per step: this rank's own meta-gradient was finite (before the reduction)
    orig = meta.algorithm.meta_gradient

    def watched(tasks, **kw):
        res = orig(tasks, **kw)
        local.append(all(bool(g.isfinite().all()) for g in res.grads.values()))
        return res

    meta.algorithm.meta_gradient = watched
    steps = []
    for step in range(STEPS):
        share = [t.clone() for t in pdist.local_share(meta_batch(step))]
        if step in FAULTS and FAULTS[step][0] == rank:
            _, k, value = FAULTS[step]
            share[k].view(-1)[-1 if rank == 0 else 0] = value
        try:
            stats = meta.step(tuple(share))
            outcome = "skipped" if stats.get("skipped") else "stepped"
        except FloatingPointError as e:
            outcome = "raised: " + str(e).split(" at outer step")[0]
        steps.append((outcome, scaler.get_scale(), [p.detach().clone() for p in meta.parameters()]))
    return {"local": local, "steps": steps, "skipped": meta.skipped_steps, "done": meta.steps_done}


def train_flag_only(rank: int, nonfinite: str):
    """Without a scaler: at outer step 1 rank 1's inner loop records a non-finite value that its
    meta-gradient does not show (as a ReLU's backward drops a NaN); the reduced meta-gradient is
    finite, yet every rank must decide alike."""
    from pymaml.functional import nonfinite as nf
    torch.manual_seed(300 + rank)
    model = MLP((1, 8, 8, 1))
    meta = pymaml.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), "maml", F.mse_loss,
                                inner_lr=0.05, inner_steps=2, distributed=True, check_every=1, nonfinite=nonfinite)
    orig = nf.StepFlags.new
    out = []
    for step in range(3):
        def preset(*a, **k):
            flags = orig(*a, **k)
            flags.flags[0, 1, 5] = 1.0  # as if sgd_update of inner step 1 had met a NaN in 'head.bias'
            return flags
        nf.StepFlags.new = staticmethod(preset) if (rank == 1 and step == 1) else orig
        try:
            out.append("skipped" if meta.step(pdist.local_share(meta_batch(step))).get("skipped") else "stepped")
        except FloatingPointError as e:
            out.append("raised: " + str(e))
        finally:
            nf.StepFlags.new = orig
    return out, [p.detach().clone() for p in meta.parameters()]


def worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    assert pdist.init_from_env("gloo", timeout_s=60)
    r = pdist.rank()
    res = {mode: train(r, mode) for mode in ("skip", "raise")}
    res.update({"flag-" + mode: train_flag_only(r, mode) for mode in ("skip", "raise")})
    torch.save(res, os.path.join(out_dir, f"rank{r}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from test_distributed import run_ranks
    return run_ranks(__file__, tmp_path_factory.mktemp("dist_amp"), WORLD, timeout=120)


def test_a_fault_on_one_rank_skips_the_step_on_every_rank(ranks):
    a, b = (res["skip"] for res in ranks)
    # the faults were each on one rank: the other rank's own meta-gradient was finite
    assert a["local"] == [True, True, True, False, True] and b["local"] == [True, False, True, True, True]
    want = ["stepped", "skipped", "stepped", "skipped", "stepped"]
    assert [s[0] for s in a["steps"]] == want and [s[0] for s in b["steps"]] == want
    assert a["skipped"] == b["skipped"] == 2 and a["done"] == b["done"] == 3
    scales = [s[1] for s in a["steps"]]
    assert scales == [s[1] for s in b["steps"]] == [2.0 ** 13, 2.0 ** 12, 2.0 ** 13, 2.0 ** 12, 2.0 ** 13]
    for step, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
        for p, q in zip(sa[2], sb[2]):
            assert torch.equal(p, q), f"the ranks differ after outer step {step}"
            assert bool(p.isfinite().all())
    for step in (1, 3):  # a skipped step leaves the parameters as they were
        assert all(torch.equal(p, q) for p, q in zip(a["steps"][step - 1][2], a["steps"][step][2]))


def test_with_raise_every_rank_raises_at_the_same_step(ranks):
    a, b = (res["raise"] for res in ranks)
    outcomes = [[s[0] for s in r["steps"]] for r in (a, b)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "stepped" and outcomes[0][1].startswith("raised: MetaOptimizer.step: the meta-gradient")
    assert outcomes[0][3].startswith("raised: ")
    for sa, sb in zip(a["steps"], b["steps"]):
        assert all(torch.equal(p, q) for p, q in zip(sa[2], sb[2]))


def test_a_step_flag_on_one_rank_counts_on_every_rank(ranks):
    (out_a, pa), (out_b, pb) = ranks[0]["flag-skip"], ranks[1]["flag-skip"]
    assert out_a == out_b == ["stepped", "skipped", "stepped"]
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))
    (out_a, _), (out_b, _) = ranks[0]["flag-raise"], ranks[1]["flag-raise"]
    assert out_a[1].startswith("raised: MetaOptimizer.step: NaN or Inf at outer step 1: first in another rank's "
                               "inner loop or adjoint sweep; the meta-gradient is finite"), out_a
    assert out_b[1].startswith("raised: MetaOptimizer.step: NaN or Inf at outer step 1: first in sgd_update at "
                               "inner step 1: "), out_b
    assert "in ['head.bias']; the meta-gradient is finite" in out_b[1]
    assert out_a[0] == out_b[0] == out_a[2] == out_b[2] == "stepped"


if __name__ == "__main__":
    worker(sys.argv[1])
