#!/usr/bin/env python3
"""Side-by-side benchmark: pymaml against learn2learn, higher, TorchOpt, a plain create_graph
loop and torch.func + vmap, on the workloads of the MAML paper, in one run.

    python benchmarks/side_by_side.py                      # everything, CPU (~20 min on 2 cores)
    python benchmarks/side_by_side.py --quick              # small instances, 1 timed step: minutes
    python benchmarks/side_by_side.py --device cuda        # GPU (memory: max_memory_allocated)
    python benchmarks/side_by_side.py --workloads omniglot --impls pymaml,learn2learn --orders second
    python benchmarks/side_by_side.py --threads 1,2           # every point at 1 and at 2 torch threads

What it does, in order:
1. Agreement check. Every implementation computes the meta-gradient (mean over tasks of the query
   loss after K inner SGD steps of fixed α; exact second order, and first order) for the same
   initial weights and tasks, in float64 on a small instance of each workload. Reported: the
   relative difference ‖g − g_pymaml‖ / ‖g_pymaml‖ over the whole gradient vector (BatchNorm'd
   conv biases have a zero true gradient, so per-tensor figures would be rounding noise).
2. Timing. One fresh process per (workload, order, implementation): median wall time per
   meta-step (zero grads, forward passes, inner loop, meta-gradient, outer Adam step) after warm-up,
   and the peak memory above the memory just before the step (CPU: one extra meta-step after the
   timed ones, with glibc's mmap threshold fixed at ``--mmap-threshold-mib``, 4 MiB; see
   sbs_measure.py). A point that exceeds
   ``--timeout`` is reported as a timeout, one that fails (e.g. out of memory) as failed.
   With several ``--threads`` counts every point (and every sweep point) runs at each of them, one
   after the other, so that the counts of one point are measured under the same load.
3. Output in ``--out`` (default benchmarks/results/<device>/): side_by_side.md (tables, machine,
   versions, date, command), side_by_side.json (every figure), PNG plots (time and memory per
   implementation; time and memory against the number of inner steps for the ``--sweep`` workload).
   The tables and plots are for the first thread count; with several, a "threads" table per workload
   and order gives each implementation's time at each count, the gain from more threads and
   pymaml's lead over the fastest other implementation at each count.

pymaml's compiled and pure-torch backends are chosen at import (PYMAML_BACKEND=torch forces the
latter), so each runs in its own process. A peer that does not import is listed as "not
installed: <reason>" (install them with benchmarks/install_peers.sh).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:  # an installed pymaml (with its compiled extension) wins; else the working tree
    import pymaml  # noqa: F401
except ImportError:
    sys.path.insert(1, str(ROOT))

ORDERS = ("second", "first")
AGREE_TOL = 1e-8          # float64 relative agreement counted as "agrees"
_MARK = "@@SBS_RESULT@@"
#: points left out of the default CPU run for time (each over a minute per meta-step on one core);
#: the compiled recompute/double_backward, unrolled and first_order still run there (the compiled
#: kernels only do the element-wise parameter updates, a negligible share of a conv meta-step).
DEFAULT_SKIP = ("long-horizon:pymaml:recompute/jvp,long-horizon:pymaml[torch]:recompute/jvp,"
                "long-horizon:pymaml[torch]:unrolled,long-horizon:pymaml[torch]:recompute/double_backward,"
                "long-horizon:pymaml[torch]:first_order")


# =============================================================================================
# worker side: a fork server per (pymaml backend, torch threads); one forked child per point
# =============================================================================================
# Importing torch and the peers takes 5-15 s on this shared 2-core machine, longer than most
# points, so each (backend, thread count) gets one server process, started when its first point
# runs, that imports everything once and then FORKS a fresh child per point. The child is a new
# process with its own memory accounting; its baseline is taken just before its first meta-step,
# as for a freshly started interpreter. Nothing has run an OpenMP region or touched CUDA in the
# server (checked), so the children start clean: a child's OpenMP pool, of the server's thread
# count, starts with its first parallel region.

def _do(spec: Dict) -> Dict:
    """Runs in the forked child."""
    import torch
    import sbs_measure
    if spec["mode"] == "check":
        grads = sbs_measure.check_grads(spec["workloads"], spec["impls"], spec["orders"], spec["device"],
                                        spec.get("dtype", "float64"), spec.get("small", True))
        torch.save(grads, spec["out"])
        return {"status": "ok"}
    try:
        return sbs_measure.time_point(spec["workload"], spec["impl"], spec["order"], spec.get("steps"),
                                      spec["device"], spec["warmup"], spec["repeats"], spec["budget_s"],
                                      spec.get("small", False), spec.get("mmap_threshold_mib", 4.0))
    except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        return {"status": "oom", "reason": str(e).splitlines()[0][:200]}
    except (RuntimeError, MemoryError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        status = "oom" if ("out of memory" in msg.lower() or isinstance(e, MemoryError)) else "failed"
        return {"status": status, "reason": f"{type(e).__name__}: {msg}"}


def _collect(pid: int, fd: int, timeout: float) -> Dict:
    import select
    import signal
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
            return {"status": "timeout", "reason": f"over {timeout:.0f} s"}
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
    os.close(fd)
    _, st = os.waitpid(pid, 0)
    data = b"".join(chunks).decode()
    if data:
        return json.loads(data)
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        return {"status": "oom" if sig == 9 else "failed",
                "reason": f"killed by signal {sig}" + (" (out of memory?)" if sig == 9 else "")}
    return {"status": "failed", "reason": f"exit {os.WEXITSTATUS(st)} without a result"}


def _serve(device: str, threads: int) -> None:
    import importlib
    import torch
    if threads:
        torch.set_num_threads(threads)
    import sbs_measure  # noqa: F401
    import sbs_impls  # noqa: F401
    if not device.startswith("cuda"):  # on a GPU the children import what touches CUDA themselves
        for lib in ("pymaml", "pymaml.functional", "learn2learn", "higher", "torchopt"):
            try:
                importlib.import_module(lib)
            except Exception:  # noqa: BLE001 - reported per point by sbs_impls.available
                pass
    fork_ok = not (torch.cuda.is_available() and torch.cuda.is_initialized())
    print(_MARK + json.dumps({"status": "ready", "fork": fork_ok}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        t0 = time.perf_counter()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, report through the pipe, exit without cleanup
            os.close(r)
            try:
                res = _do(spec)
            except BaseException as e:  # noqa: BLE001 - reported as a failed point
                res = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            os.write(w, json.dumps(res).encode())
            os.close(w)
            os._exit(0)
        os.close(w)
        res = _collect(pid, r, spec["timeout"])
        res["wall_s"] = time.perf_counter() - t0
        print(_MARK + json.dumps(res), flush=True)


class _Server:
    """The driver's handle on one fork server (one per pymaml backend and thread count)."""

    def __init__(self, env_backend: Optional[str], device: str, threads: int, log_path: Path):
        env = dict(os.environ)
        # Timed steps run with glibc's allocator as users get it; the memory step fixes the mmap
        # threshold itself (sbs_measure.time_point).
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("PYMAML_BACKEND", None) if env_backend is None else env.update(PYMAML_BACKEND=env_backend)
        env.setdefault("PYTHONWARNINGS", "ignore")
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.args = ([sys.executable, str(Path(__file__).resolve()), "--serve", device, str(threads)], env)
        self.log_path = log_path
        self.p = None

    def _start(self):
        self.err = open(self.log_path, "a")
        self.p = subprocess.Popen(self.args[0], env=self.args[1], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        ready = self._read()
        if ready.get("status") != "ready":
            raise RuntimeError(f"side_by_side: worker server did not start: {ready}")

    def _read(self) -> Dict:
        for line in self.p.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        self.p.wait()
        self.p = None
        return {"status": "failed", "reason": f"worker server died (see {self.log_path.name})"}

    def run(self, spec: Dict, timeout: float) -> Dict:
        if self.p is None:
            self._start()
        spec = dict(spec, timeout=timeout)
        self.p.stdin.write(json.dumps(spec) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        if self.p is not None:
            self.p.stdin.close()
            self.p.wait()
            self.p = None


_SERVERS: Dict[Tuple[Optional[str], int], _Server] = {}


def _run_worker(spec: Dict, env_backend: Optional[str], threads: int, timeout: float) -> Dict:
    srv = _SERVERS.get((env_backend, threads))
    if srv is None:
        raise RuntimeError(f"side_by_side: no worker server for backend {env_backend or 'default'} "
                           f"with {threads} threads")
    return srv.run(spec, timeout)


def _backend_env(impl: str) -> Optional[str]:
    import sbs_impls
    i = sbs_impls.IMPLS[impl]
    return "torch" if (i.library == "pymaml" and i.backend == "torch") else None


# =============================================================================================
# driver side
# =============================================================================================
def parse_threads(spec: str, device: str) -> List[int]:
    """``--threads``: one count or a comma list (``all`` = os.cpu_count(), 0 = torch's default);
    empty, or a single negative count, gives the device's default: 1 on the CPU, 0 on a GPU."""
    toks = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not toks or (len(toks) == 1 and toks[0].lstrip("-").isdigit() and int(toks[0]) < 0):
        return [0 if device.startswith("cuda") else 1]
    out: List[int] = []
    for tok in toks:
        if tok == "all":
            n = os.cpu_count() or 1
        elif tok.isdigit():
            n = int(tok)
        else:
            raise SystemExit(f"side_by_side: --threads {spec!r}: {tok!r} is not a thread count "
                             "(a whole number ≥ 0, or 'all')")
        if n not in out:
            out.append(n)
    return out


def _select_impls(spec: Optional[str]) -> List[str]:
    import sbs_impls
    names = list(sbs_impls.IMPLS)
    if not spec:
        return names
    out = []
    for tok in [t.strip() for t in spec.split(",") if t.strip()]:
        hit = [n for n in names if n == tok] or [n for n in names if n.startswith(tok)]
        if not hit:
            raise SystemExit(f"side_by_side: --impls {tok!r} matches none of {names}")
        out += [h for h in hit if h not in out]
    return out


def _machine(device: str) -> Dict:
    import torch
    import sbs_impls
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "device": device,
        "load_avg_start": _loadavg(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    versions = {}
    for lib in ("pymaml", "learn2learn", "higher", "torchopt"):
        try:
            versions[lib] = sbs_impls.library_version(lib)
        except Exception as e:  # noqa: BLE001
            versions[lib] = f"not installed ({type(e).__name__})"
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "pymaml", "csrc"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        versions["pymaml"] += f" (git {rev}{', uncommitted changes in pymaml/ or csrc/' if dirty else ''})"
    except Exception:  # noqa: BLE001 - informational
        pass
    info["versions"] = versions
    try:
        import sbs_impls as si
        info["pymaml_backend_default"] = si.pymaml_backend()
    except Exception as e:  # noqa: BLE001
        info["pymaml_backend_default"] = f"unknown ({e})"
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def run_check(workloads, impls, orders, device, timeout, log, threads=1) -> Dict:
    """{workload: {order: {impl: rel diff float | reason str}}}, plus the reference used."""
    import torch
    groups: Dict[Optional[str], List[str]] = {}
    for n in impls:
        groups.setdefault(_backend_env(n), []).append(n)
    merged: Dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for env_backend, names in groups.items():
            out = os.path.join(tmp, f"check_{env_backend or 'default'}.pt")
            spec = dict(mode="check", workloads=workloads, impls=names, orders=orders, device=device,
                        out=out, small=True, threads=threads)
            t0 = time.perf_counter()
            res = _run_worker(spec, env_backend, threads, timeout)
            log(f"  check ({'PYMAML_BACKEND=' + env_backend if env_backend else 'default backend'}, "
                f"{len(names)} impls): {res['status']} in {time.perf_counter() - t0:.0f} s")
            if res["status"] != "ok":
                for w in workloads:
                    for o in orders:
                        for n in names:
                            merged.setdefault(w, {}).setdefault(o, {})[n] = f"check {res['status']}: {res.get('reason', '')}"
                continue
            got = torch.load(out)
            for w, d in got.items():
                for o, dd in d.items():
                    merged.setdefault(w, {}).setdefault(o, {}).update(dd)
    table: Dict = {}
    for w, d in merged.items():
        for o, dd in d.items():
            ref_name = _reference(dd, o)
            row = table.setdefault(w, {}).setdefault(o, {"reference": ref_name})
            ref = dd.get(ref_name) if ref_name else None
            for n, g in dd.items():
                if isinstance(g, str):
                    row[n] = g
                elif ref is None:
                    row[n] = "no pymaml reference"
                else:
                    row[n] = float((g - ref).norm() / ref.norm().clamp_min(1e-300))
    return table


def _reference(dd: Dict, order: str) -> Optional[str]:
    prefs = (["pymaml:unrolled", "pymaml[torch]:unrolled", "pymaml:recompute/double_backward",
              "pymaml[torch]:recompute/double_backward"] if order == "second"
             else ["pymaml:first_order", "pymaml[torch]:first_order"])
    for p in prefs:
        if not isinstance(dd.get(p, "x"), str):
            return p
    return None


def _merge(paths) -> Dict:
    import sbs_report
    res: Dict = {}
    for path in paths:
        r = json.loads(Path(path).read_text())
        counts = sbs_report.normalize_threads(r)  # files without thread counts: the run's setting
        if not res:
            res = r
            continue
        settings = res["machine"]["settings"]
        settings["thread_counts"] += [t for t in counts if t not in settings["thread_counts"]]
        for key in ("points", "sweep"):  # a later file's point wins, unless it was only skipped
            k = lambda p: (p["workload"], p["order"], p["impl"], p["steps"], p["threads"])  # noqa: E731
            have = {k(p) for p in res[key]}
            add = [p for p in r[key] if not (p["status"] == "skipped" and k(p) in have)]
            new = {k(p) for p in add}
            res[key] = [p for p in res[key] if k(p) not in new] + add
        for w, d in r.get("agreement", {}).items():
            for o, dd in d.items():
                tgt = res.setdefault("agreement", {}).setdefault(w, {}).setdefault(o, {})
                ref = tgt.get("reference")
                if ref is not None and dd.get("reference") not in (None, ref):
                    raise SystemExit(f"side_by_side --render: {path}: agreement reference {dd.get('reference')} "
                                     f"differs from {ref} for {w}/{o}")
                tgt.update(dd)
        res["workloads"].update(r["workloads"])
        res["machine"].setdefault("merged_from", []).append(r["machine"].get("command", str(path)))
    return res


def _render(args) -> int:
    import sbs_impls
    import sbs_report
    results = _merge(args.render)
    out_dir = Path(args.out) if args.out else Path(args.render[0]).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = {p["impl"] for p in results["points"]} | {p["impl"] for p in results["sweep"]}
    impls = [n for n in sbs_impls.IMPLS if n in seen]
    orders = [o for o in ORDERS if any(p["order"] == o for p in results["points"])]
    workloads = list(dict.fromkeys(p["workload"] for p in results["points"]))
    (out_dir / "side_by_side.json").write_text(json.dumps(results, indent=1))
    (out_dir / "side_by_side.md").write_text(sbs_report.markdown(results, impls, orders, workloads))
    for p in sbs_report.plots(results, impls, orders, workloads, out_dir):
        print(f"plot: {p}")
    if args.notes:
        Path(args.notes).write_text(sbs_report.notes_fragment(results, workloads, out_dir))
    print(sbs_report.headline(results, workloads))
    return 0


def main(argv=None) -> int:
    import sbs_workloads
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default=",".join(sbs_workloads.WORKLOADS),
                    help=f"comma list from {list(sbs_workloads.WORKLOADS)}")
    ap.add_argument("--impls", default="", help="comma list of names or name prefixes (default: all)")
    ap.add_argument("--orders", default="second,first")
    ap.add_argument("--repeats", type=int, default=20, help="timed meta-steps per point (at most)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=12.0,
                    help="stop timing a point after this many seconds of timed steps (≥1 step)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per point, reported as timeout")
    ap.add_argument("--check-timeout", type=float, default=900.0)
    ap.add_argument("--sweep", default=None,
                    help="WORKLOAD:K1,K2,... for the time/memory-against-inner-steps plot, second "
                         "order, at every --threads count ('' to skip; default long-horizon:1,5,10,25, "
                         "none with --quick); the point at the workload's own K is reused")
    ap.add_argument("--sweep-impls", default="pymaml:recompute/double_backward,pymaml:unrolled,plain,"
                                             "learn2learn")
    ap.add_argument("--skip", default=DEFAULT_SKIP,
                    help="WORKLOAD:IMPL,... points not timed (reported as skipped); default: the "
                         "slowest redundant long-horizon points, to fit ~20 min on 2 CPU cores; "
                         "--skip '' runs everything")
    ap.add_argument("--rank", choices=("cpu", "wall"), default=None,
                    help="rank implementations by CPU time or wall time (default: cpu on the CPU, "
                         "wall on a GPU)")
    ap.add_argument("--mmap-threshold-mib", type=float, default=4.0,
                    help="CPU: glibc mmap threshold fixed (mallopt, after malloc_trim) for the extra meta-step "
                         "that measures memory; the timed steps keep glibc's defaults (0: no extra step, "
                         "memory over the timed steps with the default allocator)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="small instances, 1 warm-up + 1 timed step, no sweep unless --sweep is "
                         "given: a smoke run")
    ap.add_argument("--threads", default="",
                    help="torch threads in every worker: a count, or a comma list (e.g. 1,2; 'all' = "
                         f"os.cpu_count(), here {os.cpu_count()}) to run every point at each count; the "
                         "main tables are for the first, a 'threads' table per workload compares them "
                         "(0: torch's default; default: 1 on the CPU, because on a shared, oversubscribed "
                         "machine OpenMP's spinning threads made 2-thread runs 10-100x slower and "
                         "erratic; 0 on GPU)")
    ap.add_argument("--out", default="")
    ap.add_argument("--notes", default="", help="also write the headline fragment (markdown) here")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="no measuring: merge these side_by_side.json files (later ones win for the "
                         "same point: workload, order, implementation, inner steps and thread count; a "
                         "file without thread counts ran at its settings.threads) and write the "
                         "tables, plots and notes to --out")
    ap.add_argument("--serve", nargs=2, metavar=("DEVICE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return 0

    if args.render:
        return _render(args)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        sbs_workloads.get(w)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    impls = _select_impls(args.impls)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    if args.sweep is None:
        args.sweep = "" if args.quick else "long-horizon:1,5,10,25"
    dev_name = "cuda" if args.device.startswith("cuda") else args.device
    thread_counts = parse_threads(args.threads, dev_name)
    if args.rank is None:
        args.rank = "wall" if dev_name == "cuda" else "cpu"
    out_dir = Path(args.out) if args.out else HERE / "results" / (dev_name + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(out_dir / "side_by_side.log", "w")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    _SERVERS.clear()
    for env_backend in (None, "torch"):
        for t in thread_counts:
            _SERVERS[(env_backend, t)] = _Server(env_backend, args.device, t, out_dir / "workers.log")
    (out_dir / "workers.log").write_text("")
    try:
        return _measure(args, argv, workloads, orders, impls, thread_counts, out_dir, log)
    finally:
        for srv in _SERVERS.values():
            srv.close()
        log_f.close()


def _measure(args, argv, workloads, orders, impls, thread_counts, out_dir, log) -> int:
    import sbs_impls
    import sbs_report
    import sbs_workloads
    t_start = time.perf_counter()
    info = _machine(args.device)
    info["command"] = "python benchmarks/side_by_side.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    info["settings"] = dict(repeats=args.repeats, warmup=args.warmup, budget_s=args.budget,
                            timeout_s=args.timeout, quick=args.quick, threads=thread_counts[0],
                            thread_counts=thread_counts, rank=args.rank, skip=args.skip,
                            mmap_threshold_mib=args.mmap_threshold_mib if args.device == "cpu" else None)
    log(f"# side-by-side on {args.device}: {info['cpu']} / {info.get('gpu', '')}; torch {info['torch']}; "
        f"versions {info['versions']}; load {info['load_avg_start']}; torch threads {thread_counts}")
    results: Dict = {"machine": info, "workloads": {}, "agreement": {}, "points": [], "sweep": []}
    for w in workloads:
        wl = sbs_workloads.get(w)
        results["workloads"][w] = {"title": wl.title, "describe": wl.describe(),
                                   "check_instance": wl.small().describe()}
    json_path = out_dir / "side_by_side.json"

    def save():
        results["machine"]["total_wall_s"] = time.perf_counter() - t_start
        results["machine"]["load_avg_end"] = _loadavg()
        json_path.write_text(json.dumps(results, indent=1))

    # 1. agreement (at the first thread count: the figures are float64 rounding either way)
    if not args.no_check:
        log("## agreement check (float64, small instances)")
        results["agreement"] = run_check(workloads, impls, orders, args.device, args.check_timeout, log,
                                          thread_counts[0])
        log(sbs_report.agreement_table(results, impls, orders))
        save()

    # 2. timing points, each at every thread count in turn
    skip = set()
    for tok in [t.strip() for t in args.skip.split(",") if t.strip()]:
        wl, _, nm = tok.partition(":")
        skip.add((wl, nm))
    tag = (lambda t: f" {t:2d}T") if len(thread_counts) > 1 else (lambda t: "")

    def point(w, order, impl, threads, steps=None):
        if (w, impl) in skip and steps is None:
            res = {"status": "skipped", "reason": "left out for time; run with --skip ''"}
            res.update(workload=w, order=order, impl=impl, steps=sbs_workloads.get(w).steps, threads=threads)
            log(f"  {w:13s} {order:6s} {impl:42s}{tag(threads)} skipped")
            return res
        spec = dict(mode="time", workload=w, impl=impl, order=order, steps=steps, device=args.device,
                    warmup=args.warmup, repeats=args.repeats, budget_s=args.budget, small=args.quick,
                    threads=threads, mmap_threshold_mib=args.mmap_threshold_mib)
        res = _run_worker(spec, _backend_env(impl), threads, args.timeout)
        res.update(workload=w, order=order, impl=impl,
                   steps=steps if steps is not None else sbs_workloads.get(w).steps, threads=threads)
        if res["status"] == "ok":
            log(f"  {w:13s} {order:6s} {impl:42s}{tag(threads)} {res['median_s'] * 1e3:10.1f} ms "
                f"(cpu {(res.get('cpu_median_s') or float('nan')) * 1e3:10.1f}) "
                f"{res['peak_bytes'] / 2**20:9.1f} MiB  ({len(res['times_s'])} timed, {res['wall_s']:.0f} s)")
        else:
            log(f"  {w:13s} {order:6s} {impl:42s}{tag(threads)} {res['status']}: {res.get('reason', '')}")
        return res

    log("## timing")
    for w in workloads:
        for order in orders:
            for impl in impls:
                if order not in sbs_impls.IMPLS[impl].orders:
                    continue
                for t in thread_counts:
                    results["points"].append(point(w, order, impl, t))
                    save()

    # 3. sweep over inner steps (second order), at every thread count
    if args.sweep and "second" in orders:
        sw, ks = args.sweep.split(":")
        ks = [int(k) for k in ks.split(",") if k]
        sweep_impls = [n for n in _select_impls(args.sweep_impls) if n in impls and "second" in sbs_impls.IMPLS[n].orders]
        log(f"## sweep over inner steps: {sw}, K={ks}")
        own_k = sbs_workloads.get(sw).steps
        for k in ks:
            for impl in sweep_impls:
                for t in thread_counts:
                    reuse = [p for p in results["points"] if p["workload"] == sw and p["order"] == "second"
                             and p["impl"] == impl and p["threads"] == t and k == own_k]
                    results["sweep"].append(dict(reuse[0]) if reuse else point(sw, "second", impl, t, k))
                    save()

    save()
    md = sbs_report.markdown(results, impls, orders, workloads)
    (out_dir / "side_by_side.md").write_text(md)
    try:
        for p in sbs_report.plots(results, impls, orders, workloads, out_dir):
            log(f"  plot: {p}")
    except ImportError as e:
        log(f"  plots skipped: {e}")
    head = sbs_report.headline(results, workloads)
    log(head)
    if args.notes:
        Path(args.notes).write_text(sbs_report.notes_fragment(results, workloads, out_dir))
    log(f"# done in {time.perf_counter() - t_start:.0f} s; results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
