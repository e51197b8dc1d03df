"""The ops library code calls, one namespace: same names and signatures as ``pymaml.reference``.

=====================  =========================================================================
op                     what it does
=====================  =========================================================================
``sgd_update(_)``      θ' = θ − α ⊙ (g + λθ) over a list of tensors (out of place / in place)
``backward_step``      one step of the adjoint recursion: v − Hu, ∂L/∂α, the next direction
``fd_perturb``         θ ± εu in one pass
``fd_quotient``        (g₊ − g₋) / 2ε
``global_norm``        ‖concat(tensors)‖₂ without a host sync
``clip_grad_norm_``    in-place clipping by the global norm
``batch_norm``         batch-statistics BatchNorm with the fused double backward (returns y;
                       ``pymaml.reference.batch_norm`` is the op twin returning (y, mean, invstd))
``linear_head_hvp``    closed-form linear-head Hessian-vector product (:class:`HeadHVP`)
=====================  =========================================================================

Each call validates its inputs once (:mod:`pymaml._checks`), groups lists that mix devices by
device, and runs each group on the compiled kernels (``torch.ops.pymaml.*``) when they serve that
device type (:func:`pymaml._backend.compiled_available`, decided once), on the pure-torch reference
otherwise. The backend is decided once at import (:mod:`pymaml._backend`); ``PYMAML_BACKEND=torch``
forces the reference everywhere. Calls that need no autograd go straight to the kernel, below the
autograd dispatch key. A kernel's error reaches the caller: nothing is silently rerun on the
reference (see :mod:`pymaml.ops._dispatch`).

``sgd_update``, ``sgd_update_`` and ``backward_step`` take an optional ``found_inf`` flag that the
kernels set on the device, in the same pass, when they meet NaN or Inf (the contract is in
:mod:`pymaml.reference.updates`).
"""
from .fd_norms import clip_grad_norm_, fd_perturb, fd_quotient, global_norm
from .layers import HeadHVP, batch_norm, linear_head_hvp
from .updates import backward_step, sgd_update, sgd_update_

__all__ = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm",
           "clip_grad_norm_", "batch_norm", "linear_head_hvp", "HeadHVP"]
