"""Exact Hessian-vector products through a BatchNorm conv net: F.batch_norm against pymaml.batch_norm.

One HVP = forward, backward with create_graph, and the double backward along a random direction
(what every step of an exact second-order meta-gradient does), for the MAML paper's conv nets,
with BatchNorm computed by
  * ``F.batch_norm``               torch's own; its double backward is the composite batchnorm_double_backward,
  * pymaml compiled                ``pymaml::batch_norm`` whose double backward is the fused CPU/CUDA op,
  * pymaml pure torch              the twin (``pymaml.reference_bn.BatchNormFn``), same formulas as ATen ops.
Also the plain gradient (no create_graph) for scale, and the largest relative difference of the HVP
to F.batch_norm's. Median of ``--repeats`` after one warm-up, one torch thread by default.

    python benchmarks/bench_batch_norm.py [--device cpu] [--threads 1] [--repeats 5]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pymaml  # noqa: E402
from pymaml import batch_norm as bnmod, reference_bn  # noqa: E402
from pymaml.models import ConvNet  # noqa: E402

NETS = {  # name: (ConvNet args, batch)
    "MiniImageNet ConvNet(3, 5, 32, 84), 25 images": ((3, 5, 32, 84), 25),
    "Omniglot ConvNet(1, 5, 64, 28), 80 images": ((1, 5, 64, 28), 80),
}


def _native(x, w, b, eps):
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def _reference(x, w, b, eps):
    return reference_bn.BatchNormFn.apply(x, w, b, eps)[0]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(net_args, batch, device, repeats):
    torch.manual_seed(0)
    model = ConvNet(*net_args).to(device)
    x = torch.randn(batch, net_args[0], net_args[3], net_args[3], device=device)
    y = torch.arange(net_args[1], device=device).repeat(batch // net_args[1] + 1)[:batch]
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    u = [torch.randn_like(v) for v in params.values()]
    variants = [("F.batch_norm", _native), ("pymaml compiled", bnmod.batch_norm), ("pymaml pure torch", _reference)]
    if not bnmod.compiled_available(device):
        variants = [v for v in variants if v[0] != "pymaml compiled"]
    rows, ref = [], None
    for name, fn in variants:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.forward = (lambda m: lambda z: fn(z, m.weight, m.bias, m.eps))(m)

        def loss():
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        def hvp():
            g = torch.autograd.grad(loss(), list(params.values()), create_graph=True)
            return torch.autograd.grad(g, list(params.values()), grad_outputs=u)

        def plain():
            return torch.autograd.grad(loss(), list(params.values()))

        times = {}
        for key, f in (("plain", plain), ("hvp", hvp)):
            f()
            ts = []
            for _ in range(repeats):
                _sync(device)
                t = time.perf_counter()
                out = f()
                _sync(device)
                ts.append(time.perf_counter() - t)
            times[key] = statistics.median(ts)
        h = torch.cat([t.flatten() for t in hvp()])
        ref = h if ref is None else ref
        rows.append((name, times["plain"], times["hvp"], float((h - ref).norm() / ref.norm())))
        del out
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {what}; torch {torch.__version__}; {args.threads} thread(s); float32; "
          f"pymaml backend {pymaml.backend()}; load average {os.getloadavg()[0]:.2f}")
    for title, (net_args, batch) in NETS.items():
        rows = run(net_args, batch, device, args.repeats)
        base = rows[0][2]
        print(f"\n#### {title}\n")
        print("| BatchNorm | gradient (ms) | exact HVP (ms) | HVP speed-up vs F.batch_norm | HVP rel. diff. |")
        print("|---|---:|---:|---:|---:|")
        for name, tp, th, d in rows:
            print(f"| {name} | {tp * 1e3:,.1f} | {th * 1e3:,.1f} | {base / th:.2f}× | {d:.1e} |")


if __name__ == "__main__":
    main()
