"""What one side-by-side worker process does: an agreement check or one timing point.

Timing point (one fresh process each, so that CPU memory figures belong to that point alone):
build the model, tasks and outer Adam optimizer, make the implementation, record the memory just
before the first meta-step, run ``warmup`` warm-up meta-steps then up to ``repeats`` timed ones
(stopping early once ``budget_s`` seconds of timed steps have run, at least one), and report the
median time per meta-step and the peak memory above that baseline.

On the CPU the process's CPU time per meta-step (user + system, all its threads) is recorded too:
on a machine shared with other jobs, wall time also counts the time the process waited for a core,
while CPU time counts only the work it did.

Warm-up steps run on a meta-batch of the FIRST TASK ONLY (same shapes per task, same K), which
exercises every code path (oneDNN primitive caches, lazy initialisation) at 1/T of the cost: a
full warm-up step of the long-horizon workload takes over a minute on one CPU core. Implementations
that batch tasks (vmap) see the full task dimension first in the timed steps; with several timed
steps the median absorbs that.

A meta-step is what a training loop does: zero the grads, the implementation's forward passes,
inner loop and meta-gradient (into ``p.grad``), and the outer ``Adam.step()``.

Memory. GPU: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` just
before the first step, over the warm-up and timed steps. CPU: the timed steps run with glibc's
allocator as users get it (its default mmap threshold rises dynamically, so freed activation
buffers stay in the heap and are reused; RSS then counts that retention, not live tensors).
Memory is measured on ONE more full meta-step after them: the mmap threshold is fixed at
``mmap_threshold_mib`` (``mallopt``; buffers above it are mapped and unmapped, so RSS follows live
tensors), free heap memory is returned to the OS (``malloc_trim``), and the peak resident set
during that step (VmHWM of /proc/self/status, reset by writing 5 to /proc/self/clear_refs; where
that is not allowed a thread samples VmRSS every millisecond) minus the resident set just before
it is the figure. Fixing the threshold for the timed steps instead would make every
implementation slower (one exact HVP through the MiniImageNet conv net: 576 → 1032 ms, page faults
on every fresh large buffer) and favour those that allocate less.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import threading
import time
from typing import Dict, List

import torch

import sbs_impls
import sbs_workloads


# ---- memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"side_by_side: no {field} in /proc/self/status")


class CpuPeak:
    """Peak RSS above the RSS at ``start()``, in bytes."""

    def start(self):
        self.base = _status_kib("VmRSS")
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS (1 ms)"
            self.peak, self._stop = self.base, threading.Event()

            def loop():
                while not self._stop.is_set():
                    self.peak = max(self.peak, _status_kib("VmRSS"))
                    time.sleep(0.001)
            self.sampler = threading.Thread(target=loop, daemon=True)
            self.sampler.start()

    def stop(self) -> int:
        if self.sampler is not None:
            self._stop.set()
            self.sampler.join()
            peak = self.peak
        else:
            peak = _status_kib("VmHWM")
        return max(0, peak - self.base) * 1024


def fix_mmap_threshold(mib: float) -> bool:
    """glibc only: fixes the mmap threshold at ``mib`` and returns free heap memory to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, int(mib * 2**20)) == 1  # M_MMAP_THRESHOLD
        gc.collect()
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


class CudaPeak:
    method = "torch.cuda.max_memory_allocated"

    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self.base)


# ---- one timing point ---------------------------------------------------------------------------
def time_point(workload: str, impl: str, order: str, steps=None, device="cpu", warmup=1, repeats=5,
               budget_s=20.0, small=False, mmap_threshold_mib=4.0) -> Dict:
    ok, why = sbs_impls.available(impl)
    if not ok:
        return {"status": "unavailable", "reason": why}
    w = sbs_workloads.get(workload, steps)
    if small:
        w = w.small()
    dev = torch.device(device)
    model = w.model(seed=0).to(dev).train()
    tasks = w.tasks(seed=1, device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fn = sbs_impls.make(impl, model, w.loss_fn, w.steps, w.lr, order)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def meta_step():
        opt.zero_grad(set_to_none=True)
        fn(tasks)
        opt.step()

    full = tasks
    mem = CudaPeak() if cuda else CpuPeak()
    if cuda:
        mem.start()
    tasks = tuple(t[:1] for t in full)
    for _ in range(warmup):
        meta_step()
    sync()
    tasks = full
    times: List[float] = []
    cpu_times: List[float] = []
    while len(times) < max(1, repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        meta_step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if sum(times) >= budget_s:
            break
    if cuda:
        peak = mem.stop()
    else:  # one more meta-step, for memory only (module docstring)
        fixed = fix_mmap_threshold(mmap_threshold_mib) if mmap_threshold_mib > 0 else False
        mem.start()
        meta_step()
        peak = mem.stop()
        if fixed:
            mem.method += f", one extra meta-step, mmap threshold {mmap_threshold_mib:g} MiB after malloc_trim"
    extra = {"backend": sbs_impls.pymaml_backend()} if sbs_impls.is_pymaml(impl) else {}
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times,
            "cpu_median_s": None if cuda else statistics.median(cpu_times), "cpu_times_s": cpu_times,
            "peak_bytes": peak, "memory_method": mem.method, "warmup": warmup,
            "torch_threads": torch.get_num_threads(), **extra}


# ---- agreement check --------------------------------------------------------------------------
def check_grads(workloads, impls, orders, device="cpu", dtype="float64", small=True) -> Dict:
    """Meta-gradient (flattened, float64 on the CPU) of every available implementation in this
    process, for each workload and order: {workload: {order: {impl: Tensor | reason str}}}."""
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    out: Dict = {}
    for wname in workloads:
        w = sbs_workloads.get(wname)
        if small:
            w = w.small()
        tasks = w.tasks(seed=1, dtype=dt, device=dev)
        out[wname] = {}
        for order in orders:
            res = out[wname][order] = {}
            for name in impls:
                if order not in sbs_impls.IMPLS[name].orders:
                    continue
                ok, why = sbs_impls.available(name)
                if not ok:
                    res[name] = why
                    continue
                model = w.model(seed=0).to(device=dev, dtype=dt).train()
                try:
                    fn = sbs_impls.make(name, model, w.loss_fn, w.steps, w.lr, order)
                    fn(tasks)
                    res[name] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                           .detach().reshape(-1).double().cpu() for p in model.parameters()])
                except Exception as e:  # noqa: BLE001 - reported in the agreement table
                    res[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out
