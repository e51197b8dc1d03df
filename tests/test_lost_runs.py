"""A training job killed with SIGKILL at any moment resumes from its last complete checkpoint and
ends bit-identical to an uninterrupted run.

Each job (sinusoid MAML++, whose iteration counter drives its schedules, and Omniglot Meta-SGD on
the conv+BatchNorm net, with running statistics) first runs once uninterrupted, keeping every
checkpoint. Then it runs again, checkpointing every iteration and keeping the last two (sinusoid) or one, killed over
and over at seeded random points and restarted with ``--resume`` each time, until it finishes.
Kill points:

* inside a checkpoint write: the job wraps the calls :mod:`pymaml.checkpoint` makes
  (``torch.save``, ``os.fsync``, ``os.replace``, ``os.link``, ``shutil.copyfile``, ``os.remove``)
  and sends itself SIGKILL before or after a seeded random one of them, or half-way through the
  bytes that ``torch.save`` or ``shutil.copyfile`` write (a torn temporary file on disk). The
  Omniglot job runs as on a file system without hard links, where ``checkpoint.pt`` is a copy;
* anywhere else: the test sends SIGKILL after a seeded random delay (start-up, resumption,
  meta-steps, evaluation, the final test, the summary).

After every kill the output folder must hold only complete checkpoints, each bit-identical to the
uninterrupted run's checkpoint of the same iteration; ``checkpoint.pt`` must never go back;
temporary files must be hidden ones that resumption never reads. At the end none may be left, and
the final checkpoint (model, BatchNorm statistics, outer optimizer, learned step sizes, iteration
counters, RNG states, history) and the final test must equal the uninterrupted run's bit for bit.

Starting an interpreter (importing torch) takes seconds on a busy machine, so the jobs run in
processes forked from one helper that imported torch and pymaml once (this file run as a script);
each runs ``pymaml.cli.main``, which is what ``python -m pymaml train`` runs. Every meta-step of
these jobs also draws from the torch, numpy and Python generators, as dropout or data augmentation
would, so that a resumption which forgot to restore one of them shows.
"""
import errno
import io
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the jobs are forked from a helper process")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "omniglot"))
HAVE_OMNIGLOT = os.path.exists(os.path.join(DATA, "images_evaluation.zip"))
TEMPORARY = re.compile(r"\.(checkpoint(-\d+)?\.pt|summary\.(json|md))\.\d+\.tmp$")
NUMBERED = re.compile(r"checkpoint-(\d+)\.pt$")
#: what may differ between two runs of one job: wall-clock times, the output folder and the
#: restart's own flags
VARIABLE = {"elapsed", "out", "resume", "keep_checkpoints"}
TORN = "half-written"
COMMON = ["--no-progress", "--no-plots", "--threads", "1", "--checkpoint-every", "1"]
SINUSOID = ["train", "sinusoid", "--algorithm", "mamlpp", "--inner-steps", "2", "--first-order-iterations", "6",
            "--msl-iterations", "10", "--iterations", "16", "--meta-batch", "4", "--eval-every", "5",
            "--eval-tasks", "4", "--test-tasks", "4", *COMMON]
OMNIGLOT = ["train", "omniglot", "--data", DATA, "--algorithm", "metasgd", "--iterations", "6", "--meta-batch", "2",
            "--eval-every", "3", "--eval-tasks", "2", "--test-tasks", "2", "--eval-steps", "1", *COMMON]


# -- in the killed process ---------------------------------------------------------------------------

class _Tripwire:
    """Logs the checkpoint code's file-system calls to a file (so that the test knows where a
    process died) and sends this process SIGKILL at the ``n``-th one whose label starts with
    ``label`` (None: any)."""

    def __init__(self, log_fd: int, kill_at):
        self.fd, (self.label, self.n) = log_fd, kill_at or (None, 0)

    def mark(self, label: str) -> None:
        os.write(self.fd, f"{label}\n".encode())

    def event(self, label: str) -> None:
        self.mark(label)
        if self.label is None or label.startswith(self.label):
            self.n -= 1
            if self.n == 0:
                os.kill(os.getpid(), signal.SIGKILL)


class _Watched:
    """Stands in for a module inside pymaml.checkpoint: the calls in ``names`` go through the
    tripwire before and after they run; ``overrides`` replace some functions; the rest is the
    module's."""

    def __init__(self, module, names, trip: _Tripwire, overrides=None):
        self._module, self._names, self._trip, self._overrides = module, set(names), trip, overrides or {}

    def __getattr__(self, name):
        real = self._overrides[name] if name in self._overrides else getattr(self._module, name)
        if name not in self._names:
            return real

        def watched(*args, **kwargs):
            self._trip.event(f"before {name}")
            out = real(*args, **kwargs)
            self._trip.event(f"after {name}")
            return out
        return watched


def _no_link(src, dst):
    raise OSError(errno.EPERM, "hard links are not supported here", dst)


def _instrument(trip: _Tripwire, algo_settings: dict, hard_links: bool) -> None:
    import pymaml.checkpoint as ckpt
    from pymaml import optim, training

    real_torch_save, real_save, real_train = torch.save, ckpt.save, training.train
    real_write_text = ckpt.write_text_atomic
    real_step, real_evaluate = optim.MetaOptimizer.step, training._Job.evaluate

    def in_halves(f, data, what):  # a kill between them leaves a torn temporary file
        f.write(data[:len(data) // 2])
        f.flush()
        trip.event(f"{TORN}: {what}")
        f.write(data[len(data) // 2:])

    def torch_save(obj, f):
        buf = io.BytesIO()
        real_torch_save(obj, buf)
        in_halves(f, buf.getbuffer(), "torch.save")

    def copyfile(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            in_halves(g, f.read(), "copyfile")
        return dst

    def save(*args, **kwargs):
        trip.mark("checkpoint begins")
        out = real_save(*args, **kwargs)
        trip.mark("checkpoint ends")
        return out

    def write_text(*args, **kwargs):
        trip.mark("summary begins")
        real_write_text(*args, **kwargs)
        trip.mark("summary ends")

    def step(self, tasks):
        trip.mark("meta-step")
        torch.rand(1)  # as dropout or data augmentation would
        np.random.random()
        random.random()
        return real_step(self, tasks)

    def evaluate(*args, **kwargs):
        trip.mark("evaluation")
        return real_evaluate(*args, **kwargs)

    def train(config):  # the command line has no flag for the BatchNorm policy
        config.algo_settings.update(algo_settings)
        return real_train(config)

    ckpt.os = _Watched(os, ("fsync", "replace", "link", "remove"), trip, {} if hard_links else {"link": _no_link})
    ckpt.shutil = _Watched(shutil, ("copyfile",), trip, {"copyfile": copyfile})
    ckpt.torch = _Watched(torch, (), trip, {"save": torch_save})
    ckpt.save = save
    ckpt.write_text_atomic = write_text
    optim.MetaOptimizer.step = step
    training._Job.evaluate = evaluate
    training.train = train


def _child(req: dict) -> None:
    """Runs one job in a forked process; never returns."""
    rc = 1
    try:
        out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        _instrument(_Tripwire(os.open(req["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                              req.get("kill_at")), req["algo_settings"], req["hard_links"])
        from pymaml import cli
        rc = cli.main(req["argv"])
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _serve() -> None:
    """The helper process: imports torch and pymaml once, then forks one job per request on stdin,
    answering with the job's pid and, when it ends, its exit status (−9: killed)."""
    import pymaml.cli  # noqa: F401
    import pymaml.training  # noqa: F401
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first construction imports torch._dynamo
    if HAVE_OMNIGLOT:
        from pymaml.data.omniglot import load_images
        load_images(DATA, download=False)  # decoded once, shared with every job
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line))
        print(pid, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    _serve()


# -- in the test -------------------------------------------------------------------------------------

class _Forker:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, cwd=ROOT, env=env)
        self.buf = b""
        assert self._line(300) == "ready", "the helper process did not start"

    def _line(self, timeout):
        """The helper's next line, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the helper process died"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, req: dict, kill_after=None, timeout=300) -> int:
        """Runs one job; SIGKILLs it after ``kill_after`` seconds if it is still running. Its exit status."""
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = int(self._line(timeout))
        rc = self._line(kill_after if kill_after is not None else timeout)
        if rc is None:
            os.kill(pid, signal.SIGKILL)
            rc = self._line(timeout)
            assert kill_after is not None, f"the job did not finish within {timeout} s"
        return int(rc)

    def close(self):
        self.proc.kill()  # no job runs now; an orderly exit of torch would only take seconds
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker():
    f = _Forker()
    yield f
    f.close()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def differences(a, b, path="") -> list:
    """Where ``a`` and ``b`` differ, bit for bit (dtypes, shapes, every byte; -0.0 is not 0.0),
    leaving out the keys in VARIABLE."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) - VARIABLE != set(b) - VARIABLE:
            return [f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str) if isinstance(b, dict) else b!r}"]
        return [d for k in a if k not in VARIABLE for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {type(a).__name__} of {len(a)} vs {b!r}"[:300]]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return [f"{path}: {a.dtype} {tuple(a.shape)} vs {b!r}"[:300]]
        if _tensor_bytes(a) != _tensor_bytes(b):
            n = int((a.reshape(-1) != b.reshape(-1)).sum()) if a.numel() else 0
            return [f"{path}: {n} of {a.numel()} elements differ"]
        return []
    if isinstance(a, np.ndarray):
        same = isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        same = isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b)
    else:
        same = type(a) is type(b) and a == b
    return [] if same else [f"{path}: {a!r} vs {b!r}"[:300]]


def _load(path):
    return torch.load(path, weights_only=False, map_location="cpu")


def _check_folder(out, reference: dict, latest_before: int) -> int:
    """After a kill: only complete checkpoints, each the uninterrupted run's; ``checkpoint.pt`` not
    older than before; temporary files hidden. Returns the iteration ``checkpoint.pt`` holds (0: none)."""
    names = set(os.listdir(out))
    temporary = {n for n in names if TEMPORARY.fullmatch(n)}
    numbered = {n for n in names if NUMBERED.fullmatch(n)}
    assert names - temporary - numbered <= {"checkpoint.pt", "summary.json", "summary.md"}, sorted(names)
    for name in sorted(numbered):
        ck = _load(os.path.join(out, name))
        it = int(NUMBERED.fullmatch(name).group(1))
        assert ck["iteration"] == it
        assert not differences(ck, reference[it]), (name, differences(ck, reference[it])[:5])
    if "checkpoint.pt" not in names:
        assert latest_before == 0, "checkpoint.pt disappeared"
        return 0
    ck = _load(os.path.join(out, "checkpoint.pt"))
    # kills between writing a checkpoint and removing the oldest leave more than kept (the next
    # complete write removes them), and the one being written may be complete but not yet current
    assert max(int(NUMBERED.fullmatch(n).group(1)) for n in numbered) <= ck["iteration"] + 1, sorted(numbered)
    assert not differences(ck, reference[ck["iteration"]]), differences(ck, reference[ck["iteration"]])[:5]
    assert ck["iteration"] >= latest_before, f"checkpoint.pt went back from {latest_before} to {ck['iteration']}"
    return ck["iteration"]


def _summary_results(out):
    s = json.loads((out / "summary.json").read_text())
    return {"test": s["test"], "last_eval": {k: v for k, v in s["last_eval"].items() if k != "elapsed"},
            "iterations": s["iterations"]}


_PHASES = {None: "start-up or resumption", "meta-step": "a meta-step", "evaluation": "an evaluation or the final test",
           "checkpoint ends": "after a checkpoint (next step, final test or summary)",
           "summary ends": "after a summary file"}


def _where(events_path) -> str:
    """Where a killed job died: the last checkpoint call it made, or what it was doing besides."""
    lines = open(events_path).read().split("\n")[:-1] if os.path.exists(events_path) else []
    opened = [i for i, line in enumerate(lines) if line in ("checkpoint begins", "summary begins")]
    if not opened or lines[opened[-1]].replace("begins", "ends") in lines[opened[-1]:]:
        return "outside a checkpoint write: " + _PHASES[lines[-1] if lines else None]
    what = "" if lines[opened[-1]] == "checkpoint begins" else " of a summary"
    return f"mid-write{what}, {lines[-1]}" if lines[-1] != lines[opened[-1]] else f"mid-write{what}, before its first call"


def kill_and_resume(forker, tmp_path, argv, iterations, kills, seed, keep, algo_settings=None, hard_links=True):
    """Runs the job uninterrupted, then killed ``kills`` times and resumed, keeping ``keep``
    checkpoints (``hard_links=False``: as on a file system without them, where ``checkpoint.pt``
    is a copy). Returns the final checkpoint, the uninterrupted run's checkpoints by iteration and
    where the kills landed."""
    job = dict(algo_settings=algo_settings or {}, hard_links=hard_links)
    ref_out = tmp_path / "uninterrupted"
    t0 = time.monotonic()
    rc = forker.run(dict(job, argv=argv + ["--out", str(ref_out), "--keep-checkpoints", str(iterations)],
                         log=str(tmp_path / "uninterrupted.log"), events=str(tmp_path / "uninterrupted.events")))
    assert rc == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    per_iteration = (time.monotonic() - t0) / iterations
    reference = {it: _load(ref_out / f"checkpoint-{it:08d}.pt") for it in range(1, iterations + 1)}
    ref_events = open(tmp_path / "uninterrupted.events").read().split("\n")
    # calls per checkpoint write here, plus the removal of the oldest one that keeping fewer adds
    calls, block = 0, None
    for line in ref_events:
        if line.endswith((" begins", " ends")):
            block = line if line == "checkpoint begins" else None
        elif block is not None:
            calls += 1
    per_write = calls // iterations + 2

    rng = random.Random(seed)
    out, latest, where, attempts = tmp_path / "killed", 0, Counter(), 0
    while True:
        attempts += 1
        # --resume starts from checkpoint.pt, or from the newest numbered one a kill left uncurrent
        resume = ["--resume"] if out.exists() and any(NUMBERED.fullmatch(n) or n == "checkpoint.pt"
                                                      for n in os.listdir(out)) else []
        log, events = tmp_path / f"attempt{attempts}.log", tmp_path / f"attempt{attempts}.events"
        req = dict(job, argv=argv + ["--out", str(out), "--keep-checkpoints", str(keep), *resume], log=str(log),
                   events=str(events))
        kill_after = None
        if sum(where.values()) < kills:
            u = rng.random()
            if u < 0.55:  # at any call of the next two checkpoint writes
                req["kill_at"] = (None, rng.randint(1, 2 * per_write))
            elif u < 0.75:  # half-way through the bytes of the first or second write (or its copy)
                req["kill_at"] = (TORN, rng.randint(1, 2 if hard_links else 4))
            else:
                kill_after = rng.uniform(0.0, 3.0 * per_iteration)
        rc = forker.run(req, kill_after=kill_after)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, log.read_text()[-3000:]
        where[_where(events) if kill_after is None else "timer, " + _where(events)] += 1
        latest = _check_folder(out, reference, latest)

    final, want = _load(out / "checkpoint.pt"), reference[iterations]
    assert final["iteration"] == iterations
    assert not differences(final, want), differences(final, want)[:10]
    assert _summary_results(out) == _summary_results(ref_out)
    # every temporary file left by a kill is gone, and only the last ``keep`` checkpoints are kept
    assert sorted(os.listdir(out)) == sorted([f"checkpoint-{it:08d}.pt" for it in range(iterations - keep + 1,
                                                                                         iterations + 1)]
                                             + ["checkpoint.pt", "summary.json", "summary.md"])
    print(f"\n{argv[1]}: {sum(where.values())} kills in {attempts} runs:", dict(sorted(where.items())))
    return final, reference, where


def _mid_write(where: Counter) -> int:
    return sum(n for k, n in where.items() if "mid-write" in k)


def test_sinusoid_job_killed_anywhere_resumes_bit_identically(forker, tmp_path):
    final, reference, where = kill_and_resume(forker, tmp_path, SINUSOID, iterations=16, kills=24, seed=13, keep=2)
    assert sum(where.values()) >= 12 and _mid_write(where) >= 6 and where["mid-write, half-written: torch.save"]
    # the iteration counter drove MAML++'s schedules, and the learned per-step sizes moved after
    # the first checkpoint, so their survival was tested
    assert int(final["meta"]["algorithm"]["iteration"]) == 16
    sizes = {k: v for k, v in final["meta"]["algorithm"].items() if k.startswith("lr.")}
    assert sizes and all(not torch.equal(v, reference[1]["meta"]["algorithm"][k]) for k, v in sizes.items())


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason=f"Omniglot archives not found in {DATA}")
def test_omniglot_job_killed_anywhere_resumes_bit_identically(forker, tmp_path):
    final, reference, where = kill_and_resume(forker, tmp_path, OMNIGLOT, iterations=6, kills=10, seed=31, keep=1,
                                              algo_settings={"batch_norm": "mode"}, hard_links=False)
    assert sum(where.values()) >= 5 and _mid_write(where) >= 2 and where["mid-write, half-written: copyfile"], where
    # the BatchNorm running statistics and the learned step sizes moved after the first
    # checkpoint, so their survival was tested (not the step sizes of the conv biases: BatchNorm
    # cancels those biases, so their meta-gradient is zero)
    stats = {k: v for k, v in final["model"].items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(not torch.equal(v, reference[1]["model"][k]) for k, v in stats.items())
    sizes = {k: v for k, v in final["meta"]["algorithm"].items() if k.startswith("lr.")}
    assert sum(not torch.equal(v, reference[1]["meta"]["algorithm"][k]) for k, v in sizes.items()) > len(sizes) // 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sinusoid_job_killed_a_hundred_times_resumes_bit_identically(forker, tmp_path, seed):
    """Longer runs: 100 kills over 60 iterations, keeping one or two checkpoints, with and without
    hard links."""
    argv = list(SINUSOID)
    argv[argv.index("--iterations") + 1] = "60"
    _, _, where = kill_and_resume(forker, tmp_path, argv, iterations=60, kills=100, seed=seed, keep=1 + seed % 2,
                                  hard_links=seed != 2)
    assert sum(where.values()) >= 40, where


def test_a_save_removes_what_killed_writes_left_and_nothing_else(tmp_path):
    from pymaml import checkpoint as ckpt
    stale = [".checkpoint-00000007.pt.4242.tmp", ".checkpoint.pt.4242.tmp", f".checkpoint-00000008.pt.{os.getpid()}.tmp",
             ".summary.json.4242.tmp", ".summary.md.4242.tmp"]
    kept = ["notes.tmp", ".checkpoint.pt.tmp", "checkpoint.pt.4242.tmp", ".checkpoint-7.pt.x.tmp", "checkpoint-00000003.pt",
            "summary.json.4242.tmp", ".summary.txt.4242.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    ckpt.save(str(tmp_path), {"iteration": 8}, 8, keep=2)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["checkpoint-00000008.pt", "checkpoint.pt"])


def test_resume_starts_from_the_newest_numbered_checkpoint_when_checkpoint_pt_is_missing(tmp_path):
    """A run killed after its first checkpoint-N.pt was complete but before checkpoint.pt pointed at
    it resumes from checkpoint-N.pt; with checkpoint.pt present, that one is used."""
    from pymaml import checkpoint as ckpt
    assert ckpt.latest(str(tmp_path)) == str(tmp_path / "checkpoint.pt")  # nothing: loading it says so
    for it in (2, 10):
        ckpt.save_atomic(str(tmp_path / f"checkpoint-{it:08d}.pt"), {"iteration": it})
    assert ckpt.latest(str(tmp_path)) == str(tmp_path / "checkpoint-00000010.pt")
    ckpt.save_atomic(str(tmp_path / "checkpoint.pt"), {"iteration": 2})
    assert ckpt.latest(str(tmp_path)) == str(tmp_path / "checkpoint.pt")
