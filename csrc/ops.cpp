// The schemas of every pymaml op, declared once. Implementations are registered per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Autograd is registered in C++ (csrc/autograd.cpp)
// for sgd_update (float step size), batch_norm, batch_norm_backward, convolution and
// convolution_backward, and from Python (pymaml/_registration.py) for the others; fake kernels are
// registered from Python. The contracts are stated in csrc/include/pymaml/ops.h.
#include <Python.h>
#include <torch/library.h>

// Importing pymaml._C runs the static registrations below; there is no pybind11 glue.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pymaml, m) {
  // θ' = θ − α (g + wd θ). The `_lrs` forms take α as tensors: one entry shared by every parameter,
  // or one entry per parameter holding either one number or one number per element.
  m.def("sgd_update(Tensor[] params, Tensor[] grads, float lr, float weight_decay) -> Tensor[]");
  m.def("sgd_update_lrs(Tensor[] params, Tensor[] grads, Tensor[] lrs, float weight_decay) -> Tensor[]");
  m.def("sgd_update_(Tensor(a!)[] params, Tensor[] grads, float lr, float weight_decay, *, "
        "Tensor(b!)? found_inf=None) -> ()");
  m.def("sgd_update_lrs_(Tensor(a!)[] params, Tensor[] grads, Tensor[] lrs, float weight_decay, *, "
        "Tensor(b!)? found_inf=None) -> ()");
  // The same with the non-finite flag found_inf (contract in ops.h), set in the same pass. Overloads,
  // not an optional argument of the default ones: an op that mutates an argument cannot have the
  // autograd formula the default overloads carry, so these are for no-grad use.
  m.def("sgd_update.found_inf(Tensor[] params, Tensor[] grads, float lr, float weight_decay, *, "
        "Tensor(a!) found_inf) -> Tensor[]");
  m.def("sgd_update_lrs.found_inf(Tensor[] params, Tensor[] grads, Tensor[] lrs, float weight_decay, *, "
        "Tensor(a!) found_inf) -> Tensor[]");

  // One step of the adjoint recursion: v_out = v − hvp; lr_grad = −g ⊙ v reduced to the form of
  // `lrs` (empty `lrs`: α is a fixed float, no lr_grad); u_next = α_next ⊙ v_out where α_next is
  // `next_lrs` when non-empty, else `next_lr` when has_next, and u_next is empty when !has_next.
  m.def(
      "backward_step(Tensor[] v, Tensor[] hvp, Tensor[] grads, Tensor[] lrs, Tensor[] next_lrs, "
      "float next_lr, bool has_next) -> (Tensor[] v_out, Tensor[] lr_grad, Tensor[] u_next)");
  m.def(
      "backward_step.found_inf(Tensor[] v, Tensor[] hvp, Tensor[] grads, Tensor[] lrs, Tensor[] next_lrs, "
      "float next_lr, bool has_next, *, Tensor(a!) found_inf) -> (Tensor[] v_out, Tensor[] lr_grad, Tensor[] u_next)");

  // Central finite differences; the step is eps * eps_scale where eps_scale (a one-element tensor,
  // e.g. 1/‖u‖) stays on the device.
  m.def("fd_perturb(Tensor[] params, Tensor[] direction, float eps, Tensor eps_scale) -> (Tensor[] plus, Tensor[] minus)");
  m.def("fd_quotient(Tensor[] grads_plus, Tensor[] grads_minus, float eps, Tensor eps_scale) -> Tensor[]");

  // ‖concat(tensors)‖₂ as a 0-d tensor (float64 if any input is float64, else float32).
  m.def("global_norm(Tensor[] tensors) -> Tensor");
  // Scales in place by min(1, max_norm / (norm + eps)) with no host sync; returns the norm.
  m.def("clip_grad_norm_(Tensor(a!)[] tensors, float max_norm, float eps) -> Tensor");

  // Batch-statistics BatchNorm whose derivatives of every order are pymaml ops, so the double
  // backward of a second-order meta-gradient is one fused pass (contract: csrc/include/pymaml/batch_norm.h).
  // x is [N, C, *]; weight/bias [C] or None (then 1 and 0); mean and invstd are the per-channel batch
  // statistics the forward saved (float32 for half/bfloat16 x), read as values, never differentiated.
  m.def("batch_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor invstd)");
  m.def(
      "batch_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, float eps) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_double_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, float eps, "
      "Tensor? gg_x, Tensor? gg_weight, Tensor? gg_bias) -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");

  // at::convolution (not transposed) and at::convolution_backward (grad_bias when mask[2]), whose
  // autograd (csrc/autograd.cpp) differentiates convolution_backward with a weight-gradient kernel
  // instead of torch's whole-feature-map convolution. Outputs not in mask are undefined (None).
  m.def(
      "convolution(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) "
      "-> Tensor");
  m.def(
      "convolution_backward(Tensor grad_y, Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool[3] mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Closed-form Hessian-vector product of a linear head z = x Wᵀ + b under loss "cross_entropy"
  // (target: int64 class indices [N]) or "mse" (target [N, C]), both means, along (v_weight, v_bias),
  // plus grad_x = ∂/∂x ⟨∇_{W,b} L, (v_weight, v_bias)⟩. hvp_bias is returned even when bias is None.
  // Contract: csrc/include/pymaml/head_hvp.h.
  m.def(
      "linear_head_hvp(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor v_weight, Tensor? v_bias, "
      "str loss) -> (Tensor hvp_weight, Tensor hvp_bias, Tensor grad_x)");
}
