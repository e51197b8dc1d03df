"""Smoke tests of the side-by-side benchmark (benchmarks/side_by_side.py).

The agreement check on tiny workloads: every implementation that is installed here (pymaml's
engines, a plain create_graph loop, torch.func + vmap, and learn2learn / higher / TorchOpt when
present) must compute the same meta-gradient as pymaml's unrolled engine in float64. Plus one
end-to-end run of the harness (fork server, a timing point, the tables) on the smallest workload.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sbs_impls  # noqa: E402
import sbs_measure  # noqa: E402
import sbs_report  # noqa: E402
import sbs_workloads  # noqa: E402

TINY = {
    "sinusoid": replace(sbs_workloads.WORKLOADS["sinusoid-5"], name="tiny-sinusoid", meta_batch=3, steps=3),
    "conv": replace(sbs_workloads.WORKLOADS["omniglot"], name="tiny-conv", meta_batch=2, steps=2, shots=1,
                    queries=1, hidden=4, image_size=16, lr=0.1),
}


def _grads(w, name, order):
    torch.manual_seed(0)
    tasks = w.tasks(seed=1, dtype=torch.float64)
    model = w.model(seed=0).double().train()
    sbs_impls.make(name, model, w.loss_fn, w.steps, w.lr, order)(tasks)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def _available(order):
    return [n for n in sbs_impls.impl_names(order) if sbs_impls.available(n)[0]]


@pytest.mark.parametrize("kind", ["sinusoid", "conv"])
@pytest.mark.parametrize("order", ["second", "first"])
def test_every_installed_impl_agrees_with_pymaml(kind, order):
    w = TINY[kind]
    names = _available(order)
    ref_name = next(n for n in names if n.endswith(":unrolled" if order == "second" else ":first_order"))
    ref = _grads(w, ref_name, order)
    assert ref.norm() > 0
    for n in names:
        rel = ((_grads(w, n, order) - ref).norm() / ref.norm()).item()
        if n == "torch.func + vmap" and kind == "conv" and order == "second":
            # torch 2.14: double backward of F.batch_norm (batch statistics) under vmap is wrong
            # (docs/design.md, known pitfalls); the harness reports it. It must still be close, not garbage.
            assert rel < 5e-2, (n, rel)
            continue
        tol = 1e-6 if "finite_difference" in n else 1e-10  # central differences: approximate
        assert rel < tol, (kind, order, n, rel)


def test_first_order_differs_from_second_order():
    w = TINY["conv"]
    so = _grads(w, "plain loop (create_graph)", "second")
    fo = _grads(w, "plain loop (create_graph)", "first")
    assert ((so - fo).norm() / so.norm()).item() > 1e-4


def test_uninstalled_peer_is_reported_not_dropped(monkeypatch):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "higher":
            raise ImportError("No module named 'higher'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    ok, why = sbs_impls.available("higher")
    assert not ok and why.startswith("not installed")
    grads = sbs_measure.check_grads(["sinusoid-1"], ["higher", "plain loop (create_graph)"], ["first"])
    assert grads["sinusoid-1"]["first"]["higher"].startswith("not installed")
    assert isinstance(grads["sinusoid-1"]["first"]["plain loop (create_graph)"], torch.Tensor)


def test_harness_end_to_end(tmp_path):
    import side_by_side
    out = tmp_path / "res"
    rc = side_by_side.main(["--quick", "--workloads", "sinusoid-1", "--orders", "first",
                            "--impls", "pymaml,plain,higher", "--out", str(out),
                            "--notes", str(tmp_path / "frag.md")])
    assert rc == 0
    res = json.loads((out / "side_by_side.json").read_text())
    pts = {p["impl"]: p for p in res["points"]}
    assert pts["plain loop (create_graph)"]["status"] == "ok"
    assert pts["plain loop (create_graph)"]["median_s"] > 0
    assert pts["plain loop (create_graph)"]["peak_bytes"] >= 0
    for n in ("pymaml:first_order", "pymaml[torch]:first_order", "higher"):  # ran, or said why not
        assert pts[n]["status"] == "ok" or pts[n].get("reason")
    ag = res["agreement"]["sinusoid-1"]["first"]
    assert ag["plain loop (create_graph)"] < 1e-10
    md = (out / "side_by_side.md").read_text()
    assert "Headline" in md and "plain loop (create_graph)" in md and "torch" in md
    assert (tmp_path / "frag.md").read_text().count("|") > 10
    # --render re-draws the tables from saved results, merging files (a later point wins)
    out2 = tmp_path / "rendered"
    assert side_by_side.main(["--render", str(out / "side_by_side.json"), str(out / "side_by_side.json"),
                              "--out", str(out2)]) == 0
    merged = json.loads((out2 / "side_by_side.json").read_text())
    assert len(merged["points"]) == len(res["points"])
    assert "Headline" in (out2 / "side_by_side.md").read_text()
