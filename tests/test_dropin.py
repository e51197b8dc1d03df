"""pymaml.MAML / pymaml.MetaSGD as drop-in replacements of learn2learn's (0.2.x) wrappers.

Each behaviour a learn2learn script can observe is pinned here, from learn2learn's documented
behaviour: learners expose the adapted weights through parameters()/named_parameters()/state_dict()/
.module, attributes pass through to the module, modes and devices of a learner stay on it, frozen,
shared and unused parameters, RNNs, BatchNorm's running statistics. Numbers are compared with an
independent plain-autograd implementation of the same loop (functional_call on cloned tensors,
θ' = θ − lr·g), in float64, on both op paths (the suite runs again with PYMAML_BACKEND=torch).
Where learn2learn itself is installed, the same script runs on both libraries and is compared.
"""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import pymaml

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Sigmoid(),
                         nn.Linear(20, 5)).to(dtype)


def conv_bn(dtype=torch.float64, flatten="flatten"):
    """4 conv blocks with BatchNorm and max-pool, as learn2learn's CNN4 (smaller)."""
    torch.manual_seed(0)
    layers = []
    for c_in in (1, 8, 8):
        layers += [nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)]
    head = nn.Flatten() if flatten == "flatten" else ViewFlatten()
    return nn.Sequential(*layers, head, nn.Linear(8 * 2 * 2, 5)).to(dtype)


class ViewFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)  # NCHW strides only


def rel(a, b):
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().norm() ** 2) for y in b) ** 0.5
    return num / max(den, 1e-300)


def reference_meta_grads(model, tasks, lr, steps, first_order=False, loss_fn=F.cross_entropy):
    """learn2learn's loop written with plain autograd: clones, θ' = θ − lr·g, functional_call."""
    names = [n for n, _ in model.named_parameters()]
    for p in model.parameters():
        p.grad = None
    for xs, ys, xq, yq in tasks:
        params = {n: p.clone() for n, p in model.named_parameters()}
        for _ in range(steps):
            loss = loss_fn(functional_call(model, params, (xs,)), ys)
            gs = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {n: params[n] - lr * g for n, g in zip(names, gs)}
        (loss_fn(functional_call(model, params, (xq,)), yq) / len(tasks)).backward()
    return [p.grad.clone() for p in model.parameters()]


def pymaml_meta_grads(model, tasks, lr, steps, first_order=False, loss_fn=F.cross_entropy, **kw):
    maml = pymaml.MAML(model, lr=lr, first_order=first_order, **kw)
    for p in model.parameters():
        p.grad = None
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys))
        (loss_fn(learner(xq), yq) / len(tasks)).backward()
    return [p.grad.clone() for p in model.parameters()]


def image_tasks(n, dtype=torch.float64, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 1, size, size, generator=g, dtype=dtype), torch.randint(0, 5, (10,), generator=g),
             torch.randn(10, 1, size, size, generator=g, dtype=dtype), torch.randint(0, 5, (10,), generator=g))
            for _ in range(n)]


def vector_tasks(n, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(7, 10, generator=g, dtype=dtype), torch.randint(0, 5, (7,), generator=g),
             torch.randn(7, 10, generator=g, dtype=dtype), torch.randint(0, 5, (7,), generator=g))
            for _ in range(n)]


# --- numbers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_meta_gradient_matches_plain_autograd(first_order):
    model = mlp()
    tasks = vector_tasks(3)
    want = reference_meta_grads(copy.deepcopy(model), tasks, 0.3, 3, first_order)
    got = pymaml_meta_grads(model, tasks, 0.3, 3, first_order)
    assert rel(got, want) < 1e-12


@pytest.mark.parametrize("memory_format", ["auto", "preserve"])
@pytest.mark.parametrize("first_order", [False, True])
def test_conv_bn_meta_gradient_and_running_stats_match(memory_format, first_order):
    model = conv_bn()
    ref_model = copy.deepcopy(model)
    tasks = image_tasks(2)
    want = reference_meta_grads(ref_model, tasks, 0.1, 2, first_order)
    got = pymaml_meta_grads(model, tasks, 0.1, 2, first_order, memory_format=memory_format)
    assert rel(got, want) < 1e-12
    # the running statistics saw the same forward passes (support twice, query once per task)
    for b, rb in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, rb, rtol=1e-12, atol=1e-14)
    assert int(model[1].num_batches_tracked) == 2 * 3


def test_conv_net_runs_channels_last_on_cpu_and_grads_keep_parameter_layout():
    model = conv_bn()
    maml = pymaml.MAML(model, lr=0.1)
    learner = maml.clone()
    assert learner.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    xs, ys, xq, yq = image_tasks(1)[0]
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert learner.module[4].weight.is_contiguous(memory_format=torch.channels_last)
    F.cross_entropy(learner(xq), yq).backward()
    assert model[0].weight.grad.is_contiguous()  # .grad follows the parameter's own layout
    assert pymaml.MAML(model, lr=0.1, memory_format="preserve").clone().module[4].weight.is_contiguous()


def test_model_that_needs_nchw_falls_back_with_one_warning_and_same_numbers():
    model = conv_bn(flatten="view")
    ref_model = copy.deepcopy(model)
    tasks = image_tasks(2)
    want = reference_meta_grads(ref_model, tasks, 0.1, 1)
    with pytest.warns(UserWarning, match="channels-last") as record:
        got = pymaml_meta_grads(model, tasks, 0.1, 1)
    assert len([w for w in record if "channels-last" in str(w.message)]) == 1
    assert rel(got, want) < 1e-12
    for b, rb in zip(model.buffers(), ref_model.buffers()):  # the failed pass did not count
        torch.testing.assert_close(b, rb, rtol=1e-12, atol=1e-14)


def test_batch_norm_eval_mode_uses_running_statistics_and_leaves_them():
    model = conv_bn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    ref_model = copy.deepcopy(model)
    tasks = image_tasks(1)
    want = reference_meta_grads(ref_model, tasks, 0.1, 2)
    before = [b.clone() for b in model.buffers()]
    got = pymaml_meta_grads(model, tasks, 0.1, 2)
    assert rel(got, want) < 1e-12
    for b, a in zip(model.buffers(), before):
        assert torch.equal(b, a)


def test_metasgd_matches_plain_autograd_with_step_size_grads():
    model = mlp()
    tasks = vector_tasks(2)
    meta = pymaml.MetaSGD(model, lr=0.2)
    torch.manual_seed(3)
    with torch.no_grad():
        for lr in meta.lrs:
            lr.uniform_(0.1, 0.3)
    lrs0 = [lr.detach().clone().requires_grad_() for lr in meta.lrs]
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters()]
    for xs, ys, xq, yq in tasks:
        learner = meta.clone()
        learner.adapt(F.cross_entropy(learner(xs), ys))
        learner.adapt(F.cross_entropy(learner(xs), ys))
        F.cross_entropy(learner(xq), yq).backward()
        params = {n: p.clone() for n, p in ref.named_parameters()}
        for _ in range(2):
            gs = torch.autograd.grad(F.cross_entropy(functional_call(ref, params, (xs,)), ys),
                                     list(params.values()), create_graph=True)
            params = {n: params[n] - lr * g for n, lr, g in zip(names, lrs0, gs)}
        F.cross_entropy(functional_call(ref, params, (xq,)), yq).backward()
    assert rel([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()]) < 1e-12
    assert rel([lr.grad for lr in meta.lrs], [lr.grad for lr in lrs0]) < 1e-12
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))
    assert len(list(meta.clone().parameters())) == len(list(model.parameters()))  # learn2learn: lrs not registered


# --- what a script can observe ------------------------------------------------------------------

def test_learner_exposes_adapted_weights():
    model = mlp()
    maml = pymaml.MAML(model, lr=0.1)
    learner = maml.clone()
    x, y = vector_tasks(1)[0][:2]
    learner.adapt(F.cross_entropy(learner(x), y))
    adapted = dict(learner.named_parameters())
    assert set(adapted) == {"module." + n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert not torch.equal(adapted["module." + n], p)
        assert adapted["module." + n].grad_fn is not None
    assert all(a is b for a, b in zip(learner.parameters(), learner.module.parameters()))
    torch.testing.assert_close(learner.module(x), learner(x), rtol=0, atol=0)
    sd = learner.state_dict()
    for n, p in learner.named_parameters():
        assert torch.equal(sd[n], p.detach())
    # the meta-model is untouched
    for n, p in model.named_parameters():
        assert p.is_leaf


def test_attributes_and_methods_pass_through_with_adapted_weights():
    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2)
            self.temperature = 2.0

        def forward(self, s):
            return self.net(s)

        def log_prob(self, s, a):
            return torch.log_softmax(self(s) / self.temperature, -1).gather(-1, a[:, None]).sum()

    torch.manual_seed(0)
    maml = pymaml.MAML(Policy().double(), lr=0.5)
    learner = maml.clone()
    s, a = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    learner.adapt(-learner.log_prob(s, a))
    assert learner.temperature == 2.0
    want = torch.log_softmax(learner.module.net(s) / 2.0, -1).gather(-1, a[:, None]).sum()
    assert torch.equal(learner.log_prob(s, a), want)
    assert not torch.equal(learner.log_prob(s, a), maml.log_prob(s, a))
    with pytest.raises(AttributeError):
        learner.no_such_attribute


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_modes_and_devices_of_a_learner_stay_on_it():
    model = conv_bn()
    maml = pymaml.MAML(model, lr=0.1)
    learner = maml.clone()
    learner.eval()
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in learner.module.modules())
    learner.float()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for b in model.buffers() if b.is_floating_point())
    maml.eval()
    assert not model.training


def test_clone_and_adapt_options():
    model = mlp()
    maml = pymaml.MAML(model, lr=0.1, first_order=True, allow_nograd=True)
    assert maml.allow_unused is True  # defaults to allow_nograd
    c = maml.clone(first_order=False, allow_unused=False, allow_nograd=False)
    assert (c.first_order, c.allow_unused, c.allow_nograd, c.lr) == (False, False, False, 0.1)
    cc = c.clone()
    assert (cc.first_order, cc.allow_unused, cc.allow_nograd) == (False, False, False)
    x, y = vector_tasks(1)[0][:2]
    cc.adapt(F.cross_entropy(cc(x), y), first_order=True)
    g = torch.autograd.grad(F.cross_entropy(cc(x), y), model[0].weight)[0]
    assert g is not None
    # clone of a clone of an adapted learner continues from the adapted weights
    w = cc.module[0].weight
    assert torch.equal(cc.clone().module[0].weight, w)


def test_first_order_adaptation_gives_the_gradient_at_the_adapted_weights():
    model = mlp()
    maml = pymaml.MAML(model, lr=0.01, first_order=True)
    x = vector_tasks(1)[0][0]
    clone = maml.clone()
    for _ in range(3):
        clone.adapt(clone(x).norm())
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for rp, cp in zip(ref.parameters(), clone.parameters()):
            rp.copy_(cp)
    ref(x).norm().backward()
    clone(x).norm().backward()
    for pm, pr in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(pm.grad, pr.grad, rtol=1e-12, atol=1e-14)


def test_adapt_on_the_wrapper_itself():
    model = mlp()
    ref = copy.deepcopy(model)
    maml = pymaml.MAML(model, lr=0.1)
    x, y = vector_tasks(1)[0][:2]
    maml.adapt(F.cross_entropy(maml(x), y))
    gs = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    for p, r, g in zip(maml.parameters(), ref.parameters(), gs):
        torch.testing.assert_close(p, r - 0.1 * g, rtol=1e-14, atol=0)


def test_frozen_parameters():
    model = mlp()
    model[2].weight.requires_grad_(False)
    x, y = vector_tasks(1)[0][:2]
    clone = pymaml.MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"MAML.adapt: parameters \['2.weight'\] do not require grad"):
        clone.adapt(F.cross_entropy(clone(x), y))
    clone.adapt(F.cross_entropy(clone(x), y), allow_nograd=True)
    assert torch.equal(clone.module[2].weight, model[2].weight)
    sum(p.norm() for p in clone.parameters()).backward()
    assert model[2].weight.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unused_parameters():
    model = mlp()
    clone = pymaml.MAML(model, lr=0.1).clone()
    loss = clone.module[0].weight.norm()
    with pytest.raises(RuntimeError, match=r"does not depend on parameters \['0.bias', '2.weight'"):
        clone.adapt(loss)
    clone = pymaml.MAML(model, lr=0.1, allow_unused=True).clone()
    clone.adapt(clone.module[0].weight.norm())
    assert torch.equal(clone.module[0].bias, model[0].bias)
    assert not torch.equal(clone.module[0].weight, model[0].weight)


def test_shared_parameters_and_submodules_stay_shared():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
            self.head = nn.Conv2d(4, 2, 3, 2, 1)
            self.net = nn.Sequential(self.seq, self.head)
            self.tied = nn.Linear(2, 2)
            self.tied2 = nn.Linear(2, 2)
            self.tied2.weight = self.tied.weight

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = Shared().double()
    clone = pymaml.MAML(model, lr=0.1).clone()
    assert clone.module.seq is clone.module.net[0]
    assert clone.module.tied.weight is clone.module.tied2.weight
    assert len(list(clone.parameters())) == len(list(model.parameters()))
    clone.adapt(sum(p.norm() for p in clone.parameters()))
    assert clone.module.seq[0].weight is clone.module.net[0][0].weight
    assert clone.module.tied.weight is clone.module.tied2.weight
    sum(p.norm() for p in clone.parameters()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_modules(cell):
    torch.manual_seed(0)
    rnn = cell(4, 6, batch_first=True).double()
    ref = copy.deepcopy(rnn)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    clone = pymaml.MAML(rnn, lr=0.1).clone()
    clone.adapt(clone(x)[0].square().mean())
    clone(x)[0].sum().backward()
    params = {n: p.clone() for n, p in ref.named_parameters()}
    gs = torch.autograd.grad(functional_call(ref, params, (x,))[0].square().mean(), list(params.values()),
                             create_graph=True)
    params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), gs)}
    functional_call(ref, params, (x,))[0].sum().backward()
    assert rel([p.grad for p in rnn.parameters()], [p.grad for p in ref.parameters()]) < 1e-12


def test_wrapper_deepcopies_and_pickles():
    maml = pymaml.MAML(conv_bn(), lr=0.1)
    maml.clone()  # a used wrapper
    for other in (copy.deepcopy(maml), pickle.loads(pickle.dumps(maml))):
        assert other.lr == 0.1
        for a, b in zip(other.parameters(), maml.parameters()):
            assert torch.equal(a, b) and a is not b
        xs, ys = image_tasks(1)[0][:2]
        learner = other.clone()
        learner.adapt(F.cross_entropy(learner(xs), ys))
    meta = copy.deepcopy(pymaml.MetaSGD(mlp(), lr=0.1))
    assert len(list(meta.parameters())) == 12


def test_learn2learn_toy_example_loop_learns():
    """learn2learn's examples/maml_toy.py loop (sine regression), short: the post-adaptation loss on
    held-out tasks falls."""
    g = torch.Generator().manual_seed(0)

    def task():
        a, ph = torch.rand(1, generator=g) * 4.9 + 0.1, torch.rand(1, generator=g) * 3.14
        x = torch.rand(10, 1, generator=g) * 10 - 5
        return x, a * torch.sin(x + ph)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    maml = pymaml.MAML(model, lr=0.01)
    opt = torch.optim.Adam(maml.parameters(), 3e-3)
    held = [task() for _ in range(20)]

    def adapted_loss(x, y):
        learner = maml.clone()
        learner.adapt(F.mse_loss(learner(x), y))
        return F.mse_loss(learner(x), y)

    start = sum(float(adapted_loss(x, y).detach()) for x, y in held)
    for _ in range(100):
        opt.zero_grad()
        for _ in range(5):
            (adapted_loss(*task()) / 5).backward()
        opt.step()
    end = sum(float(adapted_loss(x, y).detach()) for x, y in held)
    assert end < 0.8 * start, (start, end)


# --- learn2learn itself, where installed --------------------------------------------------------

def test_same_script_same_numbers_as_learn2learn():
    l2l = pytest.importorskip("learn2learn")
    for lib in ("l2l", "pymaml"):
        model = conv_bn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maml = (l2l.algorithms.MAML if lib == "l2l" else pymaml.MAML)(model, lr=0.1)
        opt = torch.optim.SGD(maml.parameters(), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            for xs, ys, xq, yq in image_tasks(2):
                learner = maml.clone()
                for _ in range(2):
                    learner.adapt(F.cross_entropy(learner(xs), ys))
                F.cross_entropy(learner(xq), yq).backward()
            opt.step()
        if lib == "l2l":
            want = [t.clone() for t in list(model.parameters()) + list(model.buffers())]
        else:
            got = list(model.parameters()) + list(model.buffers())
    assert rel(got, want) < 1e-12


def test_learner_batch_norm_runs_the_fused_op_on_the_compiled_path():
    """Train-mode BatchNorm in a learner's forward goes to pymaml::batch_norm when compiled kernels
    serve the device (the fused double backward then follows), and to ATen's otherwise."""
    from pymaml import _backend
    learner = pymaml.MAML(conv_bn(), lr=0.1).clone()
    x = image_tasks(1)[0][0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner(x)
    names = {e.name for e in prof.events()}
    fused = _backend.compiled_available("batch_norm", torch.device("cpu"))
    assert ("pymaml::batch_norm" in names) == fused
    assert fused == (pymaml.backend() == "compiled")
    learner.eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner(x)
    assert "pymaml::batch_norm" not in {e.name for e in prof.events()}
