"""Old names keep working next to the new ones, and the two MAML classes stay apart."""
import importlib

import torch
from torch import nn

import pymaml
from pymaml import algorithms, functional, ops, reference
from pymaml.algorithms.base import Algorithm


def test_the_two_maml_classes():
    assert pymaml.MAML is not algorithms.MAML
    assert issubclass(algorithms.MAML, Algorithm)
    assert not issubclass(pymaml.MAML, Algorithm) and hasattr(pymaml.MAML, "clone")
    assert algorithms.make("maml", nn.Linear(1, 1), torch.nn.functional.mse_loss).__class__ is algorithms.MAML


def test_renamed_functions_keep_their_old_names():
    assert functional.adapt is functional.inner_loop
    from pymaml.functional import hessian, hvp
    assert hvp.hvp is hessian.hessian_vector_product
    assert hvp.StepGraph is hessian.StepGraph and hvp.loss_and_grad is hessian.loss_and_grad


def test_former_op_modules_and_the_reference_package():
    old = {"pymaml.reference_bn": ["batch_norm", "batch_norm_backward", "batch_norm_double_backward",
                                   "check_batch_norm", "double_backward_from_x", "BatchNormFn"],
           "pymaml.reference_heads": ["LOSSES", "check_linear_head_hvp", "linear_head_hvp"]}
    for mod, names in old.items():
        m = importlib.import_module(mod)
        for n in names:
            assert getattr(m, n) is getattr(reference, n), (mod, n)
    for n in ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm",
              "clip_grad_norm_"]:
        assert callable(getattr(reference, n)) and callable(getattr(ops, n))
        assert getattr(ops, n).__doc__ == getattr(reference, n).__doc__  # one contract, written once
    from pymaml import batch_norm as old_bn
    from pymaml.functional import heads as old_heads
    assert old_bn.batch_norm is ops.batch_norm
    assert old_heads.linear_head_hvp is ops.linear_head_hvp and old_heads.HeadHVP is ops.HeadHVP
    assert isinstance(old_bn.compiled_available(torch.device("cpu")), bool)
    assert isinstance(old_heads.compiled_available(torch.device("cpu")), bool)
    assert old_bn.register_python_kernels() == old_heads.register_python_kernels() == pymaml._backend.extension_loaded()
