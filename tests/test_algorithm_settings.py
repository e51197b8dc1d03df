"""Every algorithm honours its settings or refuses them by name: iMAML's HVP methods and layouts,
Reptile's layouts, first-order algorithms and ``second_order``, and clear errors for settings an
algorithm cannot honour (float64, compared with plain autograd or with another setting)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pymaml.algorithms import ANIL, FOMAML, MAML, MetaSGD, Reptile, iMAML, make
from pymaml.functional import Task
from pymaml.models import MLP, ConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sin_tasks(n=3, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = [10 * torch.rand(k, 1, generator=g, dtype=torch.float64) - 5 for _ in range(2)]
        out.append(Task((x[0], torch.sin(x[0])), (x[1], torch.sin(x[1]))))
    return out


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP((1, 8, 8, 1)).double()


def conv_setup(seed=0):
    torch.manual_seed(seed)
    model = ConvNet(in_channels=1, ways=3, hidden=4, image_size=8, blocks=2).double()
    g = torch.Generator().manual_seed(seed + 1)
    tasks = [Task(*[(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
                    for _ in range(2)]) for _ in range(2)]
    return model, tasks


@pytest.mark.parametrize("hvp,tol", [("jvp", 1e-10), ("finite_difference", 1e-6)])
def test_imaml_hvp_methods_agree_with_double_backward(hvp, tol):
    tasks = sin_tasks()
    want = iMAML(mlp(), F.mse_loss, lam=2.0, inner_lr=0.05, inner_steps=5, cg_steps=4,
                 hvp="double_backward").meta_gradient(tasks)
    got = iMAML(mlp(), F.mse_loss, lam=2.0, inner_lr=0.05, inner_steps=5, cg_steps=4, hvp=hvp).meta_gradient(tasks)
    assert got.info["hvp"] == hvp and want.info["hvp"] == "double_backward"
    assert rel(list(got.grads.values()), list(want.grads.values())) < tol


def test_imaml_first_order_is_query_gradient_at_proximal_point():
    model, tasks = mlp(), sin_tasks(n=1)
    algo = iMAML(model, F.mse_loss, lam=1.0, inner_lr=0.05, inner_steps=3, engine="first_order")
    res = algo.meta_gradient(tasks)
    phi = {n: p.detach().requires_grad_() for n, p in algo.adapt(tasks[0].support, 3).items()}
    lq = F.mse_loss(torch.func.functional_call(model, phi, (tasks[0].query[0],)), tasks[0].query[1])
    want = torch.autograd.grad(lq, list(phi.values()))
    assert rel(list(res.grads.values()), list(want)) < 1e-12
    assert res.info["engine"] == "first_order"


@pytest.mark.parametrize("name", ["imaml", "reptile"])
def test_layout_is_honoured_and_gradients_come_back_in_the_parameters_layout(name):
    model, tasks = conv_setup()
    kw = dict(inner_lr=0.1, inner_steps=2)
    cl = make(name, model, F.cross_entropy, memory_format="channels_last", **kw).meta_gradient(tasks)
    pr = make(name, model, F.cross_entropy, memory_format="preserve", **kw).meta_gradient(tasks)
    assert cl.info["memory_format"] == "channels_last" and pr.info["memory_format"] == "preserve"
    names = list(pr.grads)
    assert rel([cl.grads[n] for n in names], [pr.grads[n] for n in names]) < 1e-10
    assert all(cl.grads[n].stride() == p.stride() for n, p in model.named_parameters())


@pytest.mark.parametrize("cls,kw,match", [
    (iMAML, dict(engine="unrolled"), r"imaml: engine='unrolled' is not supported .*implicit"),
    (iMAML, dict(engine="recompute"), r"imaml: engine='recompute' is not supported"),
    (iMAML, dict(task_batching="vmap"), r"imaml: task_batching='vmap' is not supported"),
    (Reptile, dict(engine="recompute"), r"reptile: engine='recompute' is not supported"),
    (Reptile, dict(hvp="jvp"), r"reptile: hvp='jvp' is not supported"),
    (Reptile, dict(task_batching="vmap"), r"reptile: task_batching='vmap' is not supported"),
    (FOMAML, dict(engine="unrolled"), r"fomaml: engine='unrolled' is not supported .*first order"),
    (FOMAML, dict(hvp="double_backward"), r"fomaml: hvp='double_backward' is not supported"),
    (MAML, dict(memory_format="nhwc"), r"maml: memory_format must be one of .* got 'nhwc'"),
    (MAML, dict(engine="fast"), r"maml: engine must be one of .* got 'fast'"),
    (MetaSGD, dict(hvp="exact"), r"metasgd: hvp must be one of .* got 'exact'"),
])
def test_unsupported_settings_raise_naming_algorithm_and_value(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp(), F.mse_loss, **kw)


def test_second_order_decides_the_engine():
    tasks = sin_tasks()
    fo = FOMAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2).meta_gradient(tasks)
    assert fo.info["engine"] == "first_order"
    anil_fo = ANIL(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=True)
    assert not anil_fo.second_order and anil_fo.first_order
    assert anil_fo.meta_gradient(tasks).info["engine"] == "first_order"
    anil = ANIL(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2)
    assert anil.second_order and anil.meta_gradient(tasks).info["engine"] == "recompute"
    # the engine named by a second-order algorithm is the one that runs
    assert MAML(mlp(), F.mse_loss, engine="unrolled").meta_gradient(tasks).info["engine"] == "unrolled"


def test_reptile_and_imaml_accept_the_defaults_the_cli_passes():
    for name in ("reptile", "imaml", "fomaml"):
        make(name, mlp(), F.mse_loss, engine="auto", hvp="auto", task_batching="auto", memory_format="auto")
    Reptile(nn.Linear(2, 1).double(), F.mse_loss, task_batching="loop", memory_format="preserve")
