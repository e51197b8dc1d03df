"""The pure-torch reference of every pymaml op: the fallback and the test oracle.

=================  ================================================================================
module             ops
=================  ================================================================================
:mod:`.updates`    ``sgd_update``, ``sgd_update_``, ``backward_step``, ``fd_perturb``,
                   ``fd_quotient``, ``global_norm``, ``clip_grad_norm_`` (their shared contract is in
                   the module's docstring)
:mod:`.batchnorm`  ``batch_norm`` (→ ``(y, mean, invstd)``, the twin of ``torch.ops.pymaml.batch_norm``),
                   ``batch_norm_backward``, ``batch_norm_double_backward``, ``BatchNormFn``
:mod:`.heads`      ``linear_head_hvp`` (closed-form linear-head Hessian-vector products)
=================  ================================================================================

Every name is importable from here (``pymaml.reference.sgd_update``). ``pymaml.ops`` has the
same op names; its ``batch_norm`` is the layer-level function (returns ``y`` only, like
``F.batch_norm``), built on the three BatchNorm ops.
"""
from .batchnorm import (BatchNormFn, batch_norm, batch_norm_backward, batch_norm_double_backward,
                        check_batch_norm, double_backward_from_x)
from .heads import LOSSES, check_linear_head_hvp, linear_head_hvp
from .updates import (backward_step, clip_grad_norm_, fd_perturb, fd_quotient, global_norm, sgd_update,
                      sgd_update_)

#: the fused update and adjoint-step ops (the names ``pymaml.ops`` has had from the start)
UPDATE_OPS = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm",
              "clip_grad_norm_"]

__all__ = UPDATE_OPS + ["batch_norm", "batch_norm_backward", "batch_norm_double_backward", "BatchNormFn",
                        "check_batch_norm", "double_backward_from_x", "linear_head_hvp",
                        "check_linear_head_hvp", "LOSSES"]
