"""Data-parallel meta-training: 2 gloo processes on loopback give the single-process result.

One pair of worker processes (this file run as a script) does every distributed check in one
process group and saves what it computed; the tests compare it with one process running the whole
meta-batch here.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import pymaml
from pymaml import distributed as pdist
from pymaml.algorithms import as_tasks
from pymaml.functional import meta_gradient
from pymaml.models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
META_BATCH = 5  # uneven on 2 ranks: 3 + 2
STEPS = 5
#: (id, algorithm, settings, meta-batch)
CONFIGS = [
    ("maml-recompute", "maml", dict(engine="recompute"), META_BATCH),
    ("maml-unrolled", "maml", dict(engine="unrolled"), META_BATCH),
    ("fomaml", "fomaml", {}, META_BATCH),
    ("metasgd", "metasgd", {}, META_BATCH),
    ("mamlpp", "mamlpp", dict(first_order_iterations=2, msl_iterations=10), META_BATCH),
    ("maml-empty-share", "maml", {}, 1),  # rank 1 has no task
]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
RTOL = {"float64": 1e-12, "float32": 1e-6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tasks(step: int, dtype, n: int = META_BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    amp, phase = torch.rand(n, 1, 1, generator=g) * 4 + 0.5, torch.rand(n, 1, 1, generator=g) * 3
    x = torch.rand(n, 14, 1, generator=g) * 10 - 5
    y = amp * torch.sin(x - phase)
    return tuple(t.to(dtype) for t in (x[:, :7], y[:, :7], x[:, 7:], y[:, 7:]))


def train(algorithm, settings, dtype, meta_batch, seed, distributed=False):
    torch.manual_seed(seed)
    model = MLP((1, 8, 8, 1)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    meta = pymaml.MetaOptimizer(model, opt, algorithm, F.mse_loss, inner_lr=0.05, inner_steps=2,
                                distributed=distributed, check_every=1, **settings)
    for step in range(STEPS):
        batch = tasks(step, dtype, meta_batch)
        meta.step(pdist.local_share(batch) if distributed else batch)
    return [p.detach().clone() for p in meta.parameters()], int(meta.algorithm.iteration)


def rel(a, b):
    a = torch.cat([t.reshape(-1).double() for t in a])
    b = torch.cat([t.reshape(-1).double() for t in b])
    return float((a - b).norm() / b.norm())


# -- the worker ------------------------------------------------------------------------------------

def worker(out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    assert pdist.init_from_env("gloo", timeout_s=60)
    r = dist.get_rank()
    res = {}
    for cid, algorithm, settings, mb in CONFIGS:
        for dname, dtype in DTYPES.items():
            # a different initialisation on each rank: the broadcast from rank 0 must fix it
            res[f"{cid}-{dname}"] = train(algorithm, settings, dtype, mb, seed=100 + r, distributed=True)

    # functional API: reduce a MetaGradient computed on this rank's share
    torch.manual_seed(100)
    model = MLP((1, 8, 8, 1)).double()
    lr = {n: torch.full_like(p, 0.05) for n, p in model.named_parameters()}
    mine = pdist.local_share(tasks(0, torch.float64))
    g = meta_gradient(model, as_tasks(mine), F.mse_loss, steps=2, lr=lr)
    res["functional"] = pdist.reduce_meta_gradient(g, mine[0].shape[0])

    # a gradient missing on one rank contributes zeros, missing everywhere stays None
    named = [("a", torch.zeros(3, dtype=torch.float64)), ("b", torch.zeros(2, dtype=torch.float64)),
             ("c", torch.zeros(1, dtype=torch.float64))]
    grads = {"a": torch.full((3,), 1.0 + r, dtype=torch.float64)}
    if r == 0:
        grads["b"] = torch.tensor([3.0, 6.0], dtype=torch.float64)
    res["missing"] = pdist.reduce_grads(named, grads, 3 - r, [torch.tensor(10.0 * (r + 1))])

    # drift is detected on every rank
    torch.manual_seed(0)
    model = MLP((1, 4, 1))
    meta = pymaml.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "fomaml", F.mse_loss,
                                distributed=True)
    meta.check_in_sync()
    if r == 1:
        with torch.no_grad():
            model.head.bias.add_(1e-7)
    try:
        meta.check_in_sync()
        res["drift"] = "not detected"
    except pdist.ParameterDriftError as e:
        res["drift"] = str(e)

    # DistributedDataParallel gets a clear error
    try:
        pymaml.MetaOptimizer(torch.nn.parallel.DistributedDataParallel(MLP((1, 4, 1))), None, "maml", F.mse_loss)
        res["ddp"] = "accepted"
    except TypeError as e:
        res["ddp"] = str(e)

    # BatchNorm running statistics: the mean over ranks
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(r))
    bn.running_var.fill_(1.0 + 2 * r)
    pdist.average_buffers(bn)
    res["bn"] = (bn.running_mean.clone(), bn.running_var.clone())
    res["gathered"] = pdist.gather_objects({"rank": r})

    # a rank that stops answering: the other one raises after the group's timeout instead of hanging
    import datetime
    import time
    quick = dist.new_group(timeout=datetime.timedelta(seconds=2))
    if r == 0:
        t0 = time.time()
        try:
            pdist.reduce_sum([torch.ones(3)], group=quick)
            res["timeout"] = ("no error", 0.0)
        except RuntimeError as e:
            res["timeout"] = (str(e), time.time() - t0)
        torch.save(res, os.path.join(out_dir, f"rank{r}.pt"))
    else:
        torch.save(res, os.path.join(out_dir, f"rank{r}.pt"))
        time.sleep(6)  # silent, never joins the collective


def run_ranks(script, out, world, timeout):
    """Runs `script out` as `world` gloo ranks on this machine (torchrun's environment variables) and
    returns what each rank saved as out/rank{r}.pt; fails the test naming the rank that failed."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), str(out)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return run_ranks(__file__, tmp_path_factory.mktemp("dist"), WORLD, timeout=240)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("cid,algorithm,settings,meta_batch", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_two_ranks_equal_one_process_on_the_whole_meta_batch(workers, cid, algorithm, settings, meta_batch, dname):
    want, iters = train(algorithm, settings, DTYPES[dname], meta_batch, seed=100)
    for r in range(WORLD):
        got, got_iters = workers[r][f"{cid}-{dname}"]
        assert got_iters == iters == STEPS
        err = rel(got, want)
        assert err <= RTOL[dname], f"rank {r}: relative difference {err:.3e} from one process"
        assert all(g.dtype == DTYPES[dname] for g in got)
    assert rel(workers[0][f"{cid}-{dname}"][0], workers[1][f"{cid}-{dname}"][0]) == 0.0  # identical across ranks


def test_reduced_functional_meta_gradient_is_the_whole_batch_one(workers):
    torch.manual_seed(100)
    model = MLP((1, 8, 8, 1)).double()
    lr = {n: torch.full_like(p, 0.05) for n, p in model.named_parameters()}
    whole = meta_gradient(model, as_tasks(tasks(0, torch.float64)), F.mse_loss, steps=2, lr=lr)
    for r in range(WORLD):
        got = workers[r]["functional"]
        assert rel(list(got.grads.values()), list(whole.grads.values())) < 1e-13
        assert rel(list(got.lr_grads.values()), list(whole.lr_grads.values())) < 1e-13
        for k in ("query_loss", "support_loss", "meta_loss"):
            assert abs(float(getattr(got, k)) - float(getattr(whole, k))) <= 1e-13 * abs(float(getattr(whole, k)))
    # and a rank's own share alone is not it (the reduction did something)
    mine = meta_gradient(model, as_tasks(pdist.local_share(tasks(0, torch.float64), 0, WORLD)), F.mse_loss, steps=2, lr=lr)
    assert rel(list(mine.grads.values()), list(whole.grads.values())) > 1e-3


def test_missing_gradients_are_zeros_and_none_everywhere_stays_none(workers):
    for r in range(WORLD):
        grads, (stat,), total = workers[r]["missing"]
        assert total == 5
        # rank 0: 3 tasks with a = 1, b = [3, 6]; rank 1: 2 tasks with a = 2, no b
        assert torch.allclose(grads["a"], torch.full((3,), (3 * 1.0 + 2 * 2.0) / 5, dtype=torch.float64))
        assert torch.allclose(grads["b"], torch.tensor([9.0 / 5, 18.0 / 5], dtype=torch.float64))
        assert grads["c"] is None
        assert abs(float(stat) - (3 * 10.0 + 2 * 20.0) / 5) < 1e-12


def test_drift_ddp_batch_norm_and_gather(workers):
    for r in range(WORLD):
        w = workers[r]
        assert "parameters differ between the 2 ranks" in w["drift"], w["drift"]
        assert "DistributedDataParallel" in w["ddp"] and "ddp_model.module" in w["ddp"], w["ddp"]
        assert torch.equal(w["bn"][0], torch.full((3,), 0.5)) and torch.equal(w["bn"][1], torch.full((3,), 2.0))
        assert w["gathered"] == [{"rank": 0}, {"rank": 1}]
    msg, took = workers[0]["timeout"]
    assert "another process stopped or did not answer" in msg and "rank 0 of 2" in msg, msg
    assert 1.5 < took < 5.5, took


def test_shard_covers_the_meta_batch_once():
    for total in range(0, 12):
        for world in range(1, 5):
            parts = [pdist.shard(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        pdist.shard(5, 2, 2)


def test_without_a_process_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        pymaml.MetaOptimizer(MLP((1, 4, 1)), None, "maml", F.mse_loss, distributed=True)
    assert pdist.world_size() == 1 and pdist.rank() == 0 and pdist.gather_objects(3) == [3]


if __name__ == "__main__":
    worker(sys.argv[1])


# -- the training job under torchrun, a killed rank, resumption ---------------------------------------

JOB = ["train", "sinusoid", "--meta-batch", "5", "--eval-tasks", "10", "--test-tasks", "10", "--no-plots",
       "--no-progress", "--threads", "1", "--algorithm", "metasgd"]


def launch(argv, rank, port, world=WORLD):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "pymaml", *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def flat_model(path):
    ck = torch.load(path, weights_only=False)
    return ck, [v for k, v in sorted(ck["model"].items())] + [v for k, v in sorted(ck["meta"]["algorithm"].items())
                                                          if v.is_floating_point()]


def test_torchrun_two_processes_end_where_one_process_ends(tmp_path):
    argv = JOB + ["--iterations", "200", "--eval-every", "100", "--checkpoint-every", "100"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "pymaml", *argv, "--out",
                        str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("## pymaml train sinusoid") == 1  # one set of outputs
    from pymaml import cli
    assert cli.main(argv + ["--out", str(tmp_path / "one")]) == 0
    two, p2 = flat_model(tmp_path / "two" / "checkpoint.pt")
    one, p1 = flat_model(tmp_path / "one" / "checkpoint.pt")
    assert two["iteration"] == one["iteration"] == 200 and two["world_size"] == 2
    assert len(two["history"]["query_loss"]) == 200
    # float32; the sums run in another order, so only rounding differs (measured: ~5e-8)
    assert rel(p2, p1) < 1e-5
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s2["processes"] == 2 and abs(s2["test"]["1_steps"]["mean"] - s1["test"]["1_steps"]["mean"]) < 1e-4
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint-00000100.pt", "checkpoint-00000200.pt",
                                                    "checkpoint.pt", "summary.json", "summary.md"]


def test_a_killed_rank_stops_the_other_with_an_error_and_the_run_resumes(tmp_path):
    import signal
    out = tmp_path / "run"
    argv = JOB + ["--iterations", "100000", "--eval-every", "100000", "--checkpoint-every", "10",
                  "--keep-checkpoints", "2", "--dist-timeout", "5", "--out", str(out)]
    port = free_port()
    procs = [launch(argv, r, port) for r in range(WORLD)]
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint-00000020.pt").exists():
            assert time.time() < deadline and procs[0].poll() is None, "no checkpoint written"
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=60)
        took = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 2, f"exit status {procs[0].returncode}: {err[-3000:]}"
    assert "pymaml train: error" in err and "another process stopped or did not answer" in err, err[-3000:]
    assert took < 30  # no hang (the group's timeout bounds a silent rank: see the worker's last check)
    ck, _ = flat_model(out / "checkpoint.pt")  # intact
    n = ck["iteration"]
    assert n >= 20 and n % 10 == 0 and len(ck["history"]["query_loss"]) == n
    kept = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-"))
    assert len(kept) == 2 and kept[-1] == f"checkpoint-{n:08d}.pt" and not [f for f in os.listdir(out) if "tmp" in f]
    # resume on 2 ranks and on 1 rank: both continue from iteration n to the same parameters
    import shutil
    shutil.copytree(out, tmp_path / "one")
    more = ["--iterations", str(n + 10), "--resume"]
    port = free_port()
    procs = [launch(argv[:-2] + ["--out", str(out)] + more, r, port) for r in range(WORLD)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    from pymaml import cli
    assert cli.main(argv[:-2] + ["--out", str(tmp_path / "one")] + more) == 0
    two, p2 = flat_model(out / "checkpoint.pt")
    one, p1 = flat_model(tmp_path / "one" / "checkpoint.pt")
    assert two["iteration"] == one["iteration"] == n + 10
    assert two["history"]["query_loss"][:n] == ck["history"]["query_loss"]
    assert rel(p2, p1) < 1e-5
    assert rel(p2, flat_model(out / f"checkpoint-{n:08d}.pt")[1]) > 1e-6  # it did train further
