"""Markdown tables and PNG plots of a side-by-side run (the dict side_by_side.py saves as json).

Every point carries the torch thread count it ran with (``threads``); the run's counts are
``settings.thread_counts``, and all tables and plots except the "threads" tables are for the first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

AGREE_TOL = 1e-8
MiB = 2 ** 20
VMAP_BN_NOTE = ("torch.func + vmap on the BatchNorm conv nets: second-order gradients through "
                "`F.batch_norm` with batch statistics are wrong under `torch.func.vmap` in torch 2.14 "
                "(docs/design.md, Known pitfalls); pymaml avoids it (loop, or a primitive-op BatchNorm under vmap).")


def _is_pymaml(name: str) -> bool:
    return name.startswith("pymaml")


def normalize_threads(results) -> List[int]:
    """The run's torch thread counts, the first being the one the main tables are for. Fills in
    what JSON written before thread lists lacks: each point's ``threads`` (the run's
    ``settings.threads``; 0 = torch's default) and ``settings.thread_counts``. Idempotent."""
    s = results["machine"].setdefault("settings", {})
    default = s.get("threads") or 0
    counts = list(s.get("thread_counts") or [default])
    for p in list(results.get("points", [])) + list(results.get("sweep", [])):
        t = p.setdefault("threads", default)
        if t not in counts:
            counts.append(t)
    s["thread_counts"] = counts
    return counts


def threads_label(t: int) -> str:
    return "torch's default threads" if t == 0 else f"{t} thread" + ("" if t == 1 else "s")


def _points(results, order, workload=None, sweep=False, threads=None):
    """The points of one order (and workload) at one thread count (default: the first)."""
    counts = normalize_threads(results)
    t = counts[0] if threads is None else threads
    src = results["sweep"] if sweep else results["points"]
    return [p for p in src if p["order"] == order and (workload is None or p["workload"] == workload)
            and p["threads"] == t]


def _cell_time(p) -> str:
    """wall ms, with the CPU ms in brackets where measured."""
    if p is None:
        return "–"
    if p["status"] != "ok":
        return _status(p)
    cpu = p.get("cpu_median_s")
    return f"{p['median_s'] * 1e3:,.1f}" + (f" ({cpu * 1e3:,.1f})" if cpu is not None else "")


_RANK = {"key": "median_s"}


def _t(p) -> float:
    """The time points are ranked by: CPU time where measured and asked for, else wall time."""
    if _RANK["key"] == "cpu_median_s" and p.get("cpu_median_s") is not None:
        return p["cpu_median_s"]
    return p["median_s"]


def set_rank(results) -> str:
    rank = (results["machine"].get("settings") or {}).get("rank", "wall")
    _RANK["key"] = "cpu_median_s" if rank == "cpu" else "median_s"
    return rank


def _cell_mem(p) -> str:
    if p is None:
        return "–"
    if p["status"] != "ok":
        return _status(p)
    return f"{p['peak_bytes'] / MiB:,.1f}"


def _status(p) -> str:
    r = p.get("reason", "")
    if p["status"] == "unavailable":
        return r if r.startswith("not installed") else f"n/a ({r})"
    return f"{p['status']}" + (f" ({r[:60]})" if r and p["status"] != "timeout" else f" ({r})" if r else "")


def _is_exact(name: str) -> bool:
    """Finite-difference HVPs are approximate second order: not counted as pymaml's best."""
    return "finite_difference" not in name


def _wall(p) -> float:
    return p["median_s"]


def _best(points, pymaml: bool, key="median_s", time=None) -> Optional[Dict]:
    """Fastest (``time``, default the ranking's) or leanest exact pymaml / other point."""
    time = time or _t
    ok = [p for p in points if p["status"] == "ok" and _is_pymaml(p["impl"]) == pymaml and _is_exact(p["impl"])]
    return min(ok, key=lambda p: time(p) if key == "median_s" else p["peak_bytes"]) if ok else None


# ---- agreement ----------------------------------------------------------------------------------
def agreement_table(results, impls, orders) -> str:
    ag = results.get("agreement") or {}
    if not ag:
        return "(agreement check not run)\n"
    wls = list(ag)
    lines = []
    for order in orders:
        refs = {w: ag[w].get(order, {}).get("reference") for w in wls}
        lines.append(f"\n**{order} order** — ‖g − g_ref‖/‖g_ref‖ over the whole gradient, float64, "
                     f"reference: {', '.join(sorted(set(str(r) for r in refs.values())))}\n")
        lines.append("| implementation | " + " | ".join(wls) + " |")
        lines.append("|---|" + "---|" * len(wls))
        for n in impls:
            cells, any_cell = [], False
            for w in wls:
                v = ag[w].get(order, {}).get(n)
                if v is None:
                    cells.append("–")
                    continue
                any_cell = True
                if isinstance(v, str):
                    cells.append(v)
                elif n == refs[w]:
                    cells.append("(reference)")
                else:
                    cells.append(f"{v:.1e}" + ("" if v <= AGREE_TOL else " ✗"))
            if any_cell:
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(f"\n✗: differs by more than {AGREE_TOL:g}.")
    return "\n".join(lines) + "\n"


def max_disagreement(results) -> List[Tuple[str, str, str, float]]:
    out = []
    for w, d in (results.get("agreement") or {}).items():
        for o, dd in d.items():
            for n, v in dd.items():
                if n != "reference" and not isinstance(v, str) and v > AGREE_TOL:
                    out.append((w, o, n, v))
    return out


# ---- tables ------------------------------------------------------------------------------------
def _table(results, impls, order, workloads, cell, best_key) -> str:
    titles = [results["workloads"][w]["title"] for w in workloads]
    lines = ["| implementation | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(workloads)]
    by = {(p["workload"], p["impl"]): p for p in _points(results, order)}
    best = {}
    for w in workloads:
        ok = [p for p in _points(results, order, w) if p["status"] == "ok"]
        if ok:
            best[w] = min(ok, key=lambda p: _t(p) if best_key == "median_s" else p[best_key])["impl"]
    for n in impls:
        if not any((w, n) in by for w in workloads):
            continue
        cells = []
        for w in workloads:
            c = cell(by.get((w, n)))
            cells.append(f"**{c}**" if best.get(w) == n else c)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_rows(results, workloads, order="second"):
    rows = []
    for w in workloads:
        pts = _points(results, order, w)
        pm, other = _best(pts, True), _best(pts, False)
        pm_mem = _best(pts, True, "peak")
        other_mem = _best(pts, False, "peak")
        rows.append(dict(workload=w, title=results["workloads"][w]["title"], pm=pm, other=other,
                         pm_mem=pm_mem, other_mem=other_mem,
                         speedup=(_t(other) / _t(pm)) if pm and other else None,
                         speedup_wall=(other["median_s"] / pm["median_s"]) if pm and other else None,
                         mem_ratio=(pm_mem["peak_bytes"] / max(other_mem["peak_bytes"], 1))
                         if pm_mem and other_mem else None))
    return rows


def headline(results, workloads, order="second") -> str:
    rank = set_rank(results)
    cpu = rank == "cpu"
    counts = normalize_threads(results)
    where = f"{order} order" + (f", {threads_label(counts[0])}" if len(counts) > 1 else "")
    lines = [f"| workload ({where}) | pymaml best | ms/meta-step | fastest other | ms/meta-step | "
             + ("speed-up (CPU time) | speed-up (wall) | " if cpu else "speed-up | ")
             + "pymaml lowest peak MiB | lowest other peak MiB | memory ratio |",
             "|---|---|---:|---|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|"]
    for r in headline_rows(results, workloads, order):
        pm, ot, pmm, otm = r["pm"], r["other"], r["pm_mem"], r["other_mem"]
        lines.append("| " + " | ".join([
            r["title"],
            pm["impl"] if pm else "–", _cell_time(pm),
            ot["impl"] if ot else "–", _cell_time(ot),
            f"{r['speedup']:.2f}×" if r["speedup"] else "–"]
            + ([f"{r['speedup_wall']:.2f}×" if r["speedup_wall"] else "–"] if cpu else []) + [
            f"{_cell_mem(pmm)} ({pmm['impl'].split(':', 1)[-1]})" if pmm else "–",
            f"{_cell_mem(otm)} ({otm['impl']})" if otm else "–",
            f"{r['mem_ratio']:.3f}" if r["mem_ratio"] is not None else "–"]) + " |")
    approx = []
    for r in headline_rows(results, workloads, order):
        fd = [p for p in _points(results, order, r["workload"]) if p["status"] == "ok" and not _is_exact(p["impl"])]
        for p in fd:
            if r["other"]:
                approx.append(f"{r['title']}: {p['impl']} {_cell_time(p)} ms, "
                              f"{_t(r['other']) / _t(p):.2f}× the fastest other, {_cell_mem(p)} MiB")
    if approx:
        lines.append("\nApproximate second order (finite-difference HVPs, not counted above): " + "; ".join(approx) + ".")
    return "\n".join(lines) + "\n"


def _sweep_table(results) -> str:
    counts = normalize_threads(results)
    out = []
    for t in counts:
        sw = _points(results, "second", sweep=True, threads=t)
        if not sw:
            continue
        w = sw[0]["workload"]
        ks = sorted({p["steps"] for p in sw})
        impls = list(dict.fromkeys(p["impl"] for p in sw))
        by = {(p["impl"], p["steps"]): p for p in sw}
        out += [f"### Against the number of inner steps: {results['workloads'].get(w, {}).get('title', w)} "
                f"(second order; K varies" + (f"; {threads_label(t)}" if len(counts) > 1 else "") + ")\n",
                "ms per meta-step / peak MiB above baseline\n",
                "| implementation | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for n in impls:
            cells = []
            for k in ks:
                p = by.get((n, k))
                cells.append("–" if p is None else (_cell_time(p) if p["status"] != "ok"
                                                     else f"{_cell_time(p)} / {_cell_mem(p)}"))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ---- thread counts -------------------------------------------------------------------------------
def _ratio(a: Optional[Dict], b: Optional[Dict]) -> Optional[float]:
    """Wall time of ``a`` over that of ``b`` (both measured), else None."""
    ok = a is not None and b is not None and a["status"] == "ok" and b["status"] == "ok"
    return a["median_s"] / b["median_s"] if ok else None


def _x(r: Optional[float]) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _short(t: int) -> str:
    return "default" if t == 0 else str(t)


def threads_table(results, impls, order, workload) -> str:
    """Wall time per meta-step of each implementation at each thread count, the gain over the
    first count (its time / this one's) and pymaml's lead (fastest other / best exact pymaml) at each."""
    counts = normalize_threads(results)
    if len(counts) < 2:
        return ""
    pts = {t: _points(results, order, workload, threads=t) for t in counts}
    if not any(pts.values()):
        return ""
    base = counts[0]
    by = {(p["impl"], t): p for t in counts for p in pts[t]}
    fastest = {}
    for t in counts:
        ok = [p for p in pts[t] if p["status"] == "ok"]
        if ok:
            fastest[t] = min(ok, key=_wall)["impl"]
    lines = [f"#### {results['workloads'].get(workload, {}).get('title', workload)}, {order} order\n",
             "| implementation | " + " | ".join(threads_label(t) for t in counts) + " | "
             + " | ".join(f"gain {_short(t)} vs {_short(base)}" for t in counts[1:]) + " |",
             "|---|" + "---:|" * (2 * len(counts) - 1)]
    for n in impls:
        if not any((n, t) in by for t in counts):
            continue
        cells = [by.get((n, t)) for t in counts]
        lines.append(f"| {n} | " + " | ".join(f"**{_cell_time(p)}**" if fastest.get(t) == n else _cell_time(p)
                                                for t, p in zip(counts, cells))
                     + " | " + " | ".join(_x(_ratio(cells[0], p)) for p in cells[1:]) + " |")
    best = {t: (_best(pts[t], True, time=_wall), _best(pts[t], False, time=_wall)) for t in counts}
    for label, i in (("pymaml's best" + (" (exact)" if order == "second" else ""), 0), ("fastest other", 1)):
        bs = [best[t][i] for t in counts]
        lines.append(f"| *{label}* | " + " | ".join("–" if p is None else f"{p['median_s'] * 1e3:,.1f} ({p['impl']})"
                                                    for p in bs)
                     + " | " + " | ".join(_x(_ratio(bs[0], p)) for p in bs[1:]) + " |")
    lines.append("| *pymaml's lead* | " + " | ".join(_x(_ratio(best[t][1], best[t][0])) for t in counts)
                 + " |" + " |" * (len(counts) - 1))
    return "\n".join(lines) + "\n"


def threads_summary(results, workloads, order="second") -> str:
    """One row per workload: pymaml's lead at each thread count and the gain of the best pymaml
    and of the fastest other implementation from more threads (wall time)."""
    counts = normalize_threads(results)
    if len(counts) < 2:
        return ""
    base = counts[0]
    lines = [f"| workload ({order} order) | " + " | ".join(f"pymaml's lead, {threads_label(t)}" for t in counts)
             + " | " + " | ".join(f"gain {_short(t)} vs {_short(base)}, {who}" for t in counts[1:]
                                  for who in ("pymaml's best", "fastest other")) + " |",
             "|---|" + "---:|" * (len(counts) + 2 * (len(counts) - 1))]
    for w in workloads:
        pts = {t: _points(results, order, w, threads=t) for t in counts}
        best = {t: (_best(pts[t], True, time=_wall), _best(pts[t], False, time=_wall)) for t in counts}
        if not any(b for pair in best.values() for b in pair):
            continue
        cells = [_x(_ratio(best[t][1], best[t][0])) for t in counts]
        for t in counts[1:]:
            cells += [_x(_ratio(best[base][0], best[t][0])), _x(_ratio(best[base][1], best[t][1]))]
        lines.append(f"| {results['workloads'].get(w, {}).get('title', w)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _threads_section(results, impls, orders, workloads) -> List[str]:
    counts = normalize_threads(results)
    if len(counts) < 2:
        return []
    out = [f"## Torch threads: {', '.join(threads_label(t) for t in counts)}\n",
           "Wall-clock ms per meta-step at each torch thread count (the CPU time of all the worker's "
           "threads in brackets; fastest in bold); gain = the time at "
           f"{threads_label(counts[0])} / the time at the other count; pymaml's lead = the fastest other "
           "implementation's time / pymaml's best exact time at the same count. All by wall time, "
           "since CPU time adds up the threads. More threads pay only where cores are free: on a "
           "loaded machine each parallel region waits for time slices (see the load averages above).\n"]
    for order in orders:
        out.append(threads_summary(results, workloads, order))
    for order in orders:
        for w in workloads:
            out.append(threads_table(results, impls, order, w))
    return out


def markdown(results, impls, orders, workloads) -> str:
    rank = set_rank(results)
    m = results["machine"]
    v = m.get("versions", {})
    s = m.get("settings", {})
    out = [f"# Side-by-side meta-gradient benchmark ({m['device']})\n",
           f"- date: {m['date']}; command: `{m.get('command', '')}`",
           f"- machine: {m['cpu']}, {m['cores']} cores" + (f"; GPU {m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else "")
           + f"; torch threads per worker {_threads_phrase(results)}; load average at start {m['load_avg_start']}, "
             f"at end {m.get('load_avg_end', '?')} (shared machine: other jobs ran alongside)",
           f"- python {m['python']}, torch {m['torch']}, " + ", ".join(f"{k} {x}" for k, x in v.items())
           + f"; pymaml backend by default: {m.get('pymaml_backend_default')}",
           f"- settings: up to {s.get('repeats')} timed meta-steps per point after {s.get('warmup')} warm-up meta-step(s) on a one-task meta-batch "
           f"(fewer once {s.get('budget_s')} s of timed steps have run), median reported; per-point "
           f"timeout {s.get('timeout_s')} s; one fresh process per point; total wall time "
           f"{m.get('total_wall_s', 0) / 60:.1f} min",
           "- a meta-step = zero grads + forward passes + inner loop + meta-gradient + outer Adam step; "
           "memory = peak above the memory just before the first step ("
           + ("torch.cuda.max_memory_allocated" if m["device"].startswith("cuda") else
              "peak RSS: VmHWM after /proc/self/clear_refs") + ")"
           + (f"; CPU times are measured with glibc's default allocator settings, memory on one extra "
              f"meta-step after them with the mmap threshold fixed at {s['mmap_threshold_mib']:g} MiB after "
              "malloc_trim (so RSS follows live tensors rather than heap retention; the same for every "
              "implementation; see benchmarks/sbs_measure.py)"
              if s.get("mmap_threshold_mib") else ""),
           "- times: wall-clock ms per meta-step, with the process's CPU time (user + system) in brackets "
           "where measured; " + ("implementations are RANKED BY CPU TIME here (best/fastest, bold, "
           "speed-ups): on this shared machine wall time also counts the time spent waiting for a core "
           "while other jobs ran, which varied by ±30% between points; each worker uses "
           f"{threads_label(normalize_threads(results)[0])}, so CPU time is the work done"
           if rank == "cpu" else "ranked by wall time"),
           "- image tasks use random synthetic images (timing does not depend on pixel values); "
           "sinusoid tasks follow Finn et al. 2017",
           "", "## Workloads\n"]
    for w in workloads:
        d = results["workloads"][w]
        out.append(f"- **{d['title']}** (`{w}`): {d['describe']}. Agreement instance: {d['check_instance']}.")
    out += ["", "## Headline: pymaml's best against the fastest other implementation\n",
            headline(results, workloads, "second")]
    if "first" in orders:
        out.append(headline(results, workloads, "first"))
    out += ["## Agreement of the meta-gradients\n", agreement_table(results, impls, orders)]
    if any(n == "torch.func + vmap" and o == "second" and w in ("omniglot", "miniimagenet", "long-horizon")
           for w, o, n, _ in max_disagreement(results)):
        out.append(f"Note: {VMAP_BN_NOTE}\n")
    for order in orders:
        out += [f"## {order.capitalize()} order: median ms per meta-step, wall (CPU) (fastest in bold)\n",
                _table(results, impls, order, workloads, _cell_time, "median_s"),
                f"## {order.capitalize()} order: peak memory above baseline, MiB (lowest in bold)\n",
                _table(results, impls, order, workloads, _cell_mem, "peak_bytes")]
    out += _threads_section(results, impls, orders, workloads)
    out.append(_sweep_table(results))
    return "\n".join(out)


def _threads_phrase(results) -> str:
    counts = normalize_threads(results)
    m = results["machine"]
    first = counts[0] or m.get("torch_threads_default")
    if len(counts) == 1:
        return str(first)
    return f"{first} in all tables but the threads tables, which compare {', '.join(_short(t) for t in counts)}"


def notes_fragment(results, workloads, out_dir) -> str:
    m = results["machine"]
    return "\n".join(part for part in [
        f"### Side by side with learn2learn, higher, TorchOpt, a plain loop and torch.func ({m['device']})\n",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, shared; load {m['load_avg_start']}), "
        f"torch {m['torch']}, " + ", ".join(f"{k} {x}" for k, x in m.get("versions", {}).items()) + ".\n",
        "```\nbash benchmarks/install_peers.sh   # the peers, without touching torch\n"
        + "\n".join(_clean(c) for c in [m.get("command", "python benchmarks/side_by_side.py")]
                    + m.get("merged_from", [])) + "\n```\n"
        + ("(the later commands add points; their results were merged with `--render`)\n"
           if m.get("merged_from") else ""),
        headline(results, workloads, "second"),
        headline(results, workloads, "first"),
        _threads_caption(results) + threads_summary(results, workloads, "second"),
        f"Full tables, agreement check and plots: `{_rel(out_dir)}/side_by_side.md`.\n"] if part)


def _threads_caption(results) -> str:
    counts = normalize_threads(results)
    if len(counts) < 2:
        return ""
    return (f"At {', '.join(threads_label(t) for t in counts)} per worker, by wall time (lead: fastest other / "
            f"pymaml's best at the same count; gain: time at {threads_label(counts[0])} / time at more):\n\n")


def _clean(cmd: str) -> str:
    """The command without the --notes/--out arguments (where a run wrote its files)."""
    import shlex
    toks, out, skip = shlex.split(cmd.replace("--sweep  ", "--sweep '' ")), [], False
    for t in toks:
        if skip:
            skip = False
            continue
        if t in ("--notes", "--out"):
            skip = True
            continue
        out.append(t)
    return shlex.join(out)


def _rel(out_dir) -> str:
    parts = Path(out_dir).resolve().parts
    return "/".join(parts[parts.index("benchmarks"):]) if "benchmarks" in parts else str(out_dir)


# ---- plots ---------------------------------------------------------------------------------------
def plots(results, impls, orders, workloads, out_dir) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    paths = []
    dev = results["machine"]["device"]
    cpu_rank = set_rank(results) == "cpu"
    first = normalize_threads(results)[0]
    tlabel = f"CPU ms per meta-step ({threads_label(first)})" if cpu_rank else "ms per meta-step"
    for order in orders:
        names = [n for n in impls if any(p["impl"] == n for p in _points(results, order))]
        if not names:
            continue
        by = {(p["workload"], p["impl"]): p for p in _points(results, order)}
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.9 * len(workloads)), 9))
        x = np.arange(len(workloads))
        width = 0.85 / len(names)
        cmap = plt.get_cmap("tab20")
        for ax, key, label in [(axes[0], "median_s", tlabel),
                               (axes[1], "peak_bytes", "peak MiB above baseline")]:
            for j, n in enumerate(names):
                vals = []
                for w in workloads:
                    p = by.get((w, n))
                    ok = p is not None and p["status"] == "ok"
                    vals.append(((_t(p) * 1e3) if key == "median_s" else p[key] / MiB) if ok else np.nan)
                hatch = None if _is_pymaml(n) else "//"
                ax.bar(x + (j - len(names) / 2 + 0.5) * width, vals, width, label=n, color=cmap(j % 20),
                       hatch=hatch, edgecolor="black", linewidth=0.3)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_xticks(x)
            ax.set_xticklabels([results["workloads"][w]["title"] for w in workloads], fontsize=8)
            ax.grid(axis="y", alpha=0.3, which="both")
        axes[0].set_title(f"{order} order, {dev} ({results['machine']['date']}); missing bar = not run / failed")
        axes[0].legend(fontsize=7, ncol=3)
        fig.tight_layout()
        p = Path(out_dir) / f"side_by_side_{order}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    sw = _points(results, "second", sweep=True, threads=first)
    if sw:
        w = sw[0]["workload"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for n in dict.fromkeys(p["impl"] for p in sw):
            pts = sorted([p for p in sw if p["impl"] == n and p["status"] == "ok"], key=lambda p: p["steps"])
            if not pts:
                continue
            ks = [p["steps"] for p in pts]
            style = "-o" if _is_pymaml(n) else "--s"
            axes[0].plot(ks, [_t(p) * 1e3 for p in pts], style, label=n)
            axes[1].plot(ks, [p["peak_bytes"] / MiB for p in pts], style, label=n)
        axes[0].set_ylabel(tlabel)
        axes[1].set_ylabel("peak MiB above baseline")
        for ax in axes:
            ax.set_xlabel("inner steps K")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_title(f"{results['workloads'].get(w, {}).get('title', w).split(',')[0]}, second order, {dev}")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        p = Path(out_dir) / "side_by_side_steps.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
