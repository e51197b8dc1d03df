"""Mixed precision: torch.autocast around the meta-step.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the model's matmuls and convolutions run in
bfloat16 while the parameters, the learned step sizes, the meta-gradients and BatchNorm's running
statistics stay float32 (autocast casts the inputs of each op, not the tensors it is given). The
meta-gradient is compared with the float32 one: bfloat16 keeps 8 bits of mantissa (relative
rounding 2^-8 ≈ 4e-3 per op), and the tolerances below are what a few second-order steps of that
rounding give on these nets (measured: 1.6e-2 and 1.7e-2 relative), with a 3x margin.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.double().norm() ** 2) for y in b) ** 0.5


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 20, 1, generator=g) * 10 - 5
    sin = (x[:, :10], torch.sin(x[:, :10]), x[:, 10:], torch.sin(x[:, 10:]))
    img = (torch.randn(4, 10, 1, 16, 16, generator=g), torch.randint(0, 5, (4, 10), generator=g),
           torch.randn(4, 10, 1, 16, 16, generator=g), torch.randint(0, 5, (4, 10), generator=g))
    return {"mlp": (mlp, F.mse_loss, sin, 5e-2), "conv_bn": (conv, F.cross_entropy, img, 5e-2)}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.parametrize("net", ["mlp", "conv_bn"])
def test_bfloat16_autocast_meta_gradient_close_to_float32(net, algorithm):
    model, loss_fn, tasks, tol = _nets()[net]
    grads, extra = {}, {}
    for name, ctx in (("f32", torch.autocast("cpu", enabled=False)),
                      ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        m = copy.deepcopy(model)
        meta = pymaml.MetaOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), algorithm, loss_fn,
                                    inner_lr=0.1, inner_steps=2)
        with ctx:
            stats = meta.step(tasks)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
        grads[name] = [p.grad for p in m.parameters()]
        extra[name] = [p.grad for p in meta.algorithm.parameters()]
        # parameters, step sizes, gradients and running statistics stay float32
        for t in [*m.parameters(), *meta.algorithm.parameters(), *grads[name], *extra[name]]:
            assert t.dtype == torch.float32
        for b in m.buffers():
            assert b.dtype in (torch.float32, torch.int64)
    assert _rel(grads["bf16"], grads["f32"]) < tol
    if algorithm == "metasgd":
        assert _rel(extra["bf16"], extra["f32"]) < tol
