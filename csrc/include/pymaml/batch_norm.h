// Contract of the batch-statistics BatchNorm ops (schemas in csrc/ops.cpp; pure-torch twin in
// pymaml/reference_bn.py, which states the maths).
//
//   batch_norm(x, weight, bias, eps) -> (y, mean, invstd)
//       x [N, C, *]; y = (x − mean) · invstd · weight + bias per channel, with the biased batch
//       variance; mean/invstd [C] (float32 for half/bfloat16 x). Same numbers as
//       at::native_batch_norm(training=true).
//   batch_norm_backward(grad_y, x, weight, mean, invstd, eps) -> (grad_x, grad_weight, grad_bias)
//       Same numbers as at::native_batch_norm_backward(train=true). grad_weight/grad_bias are
//       returned even when weight is None.
//   batch_norm_double_backward(grad_y, x, weight, mean, invstd, eps, gg_x, gg_weight, gg_bias)
//       -> (grad_grad_y, grad_x, grad_weight): the vector-Jacobian product of batch_norm_backward
//       with (gg_x, gg_weight, gg_bias) (None = zero), taking into account that mean and invstd
//       are functions of x. With ⟨·⟩ the mean over the M = N·∏* elements of a channel,
//       x̂ = (x − mean)·r, r = invstd, P = ⟨gg_x x̂⟩, Q = ⟨grad_y x̂⟩,
//       A = ⟨gg_x grad_y⟩ − ⟨gg_x⟩⟨grad_y⟩:
//         grad_grad_y = w r (gg_x − ⟨gg_x⟩ − x̂ P) + gg_weight x̂ + gg_bias
//         grad_weight = M r (A − P Q)
//         grad_x      = r (D − ⟨D⟩ − x̂ ⟨D x̂⟩) − w r² x̂ (A − P Q),
//                       D = gg_weight grad_y − w r (Q gg_x + P grad_y)
//       The CPU kernel does it in two passes over each channel (five sums, then both outputs).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pymaml {
namespace bn {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Validation shared by every backend; errors name the op and the shapes.
void check_bn_input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias);
void check_stats(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd);
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x);
// Every check of batch_norm_double_backward's inputs (shared by the CPU kernel and the composite).
void check_double_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& gg_x,
                           const std::optional<at::Tensor>& gg_weight, const std::optional<at::Tensor>& gg_bias);

// An optional tensor argument that was given (not None).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

Tensor3 batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, double eps);
Tensor3 batch_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const at::Tensor& mean, const at::Tensor& invstd, double eps);
// The formulas above as whole-tensor ATen ops (any device, any floating dtype).
Tensor3 double_backward_composite(const at::Tensor& grad_y, const at::Tensor& x,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                  const at::Tensor& invstd, double eps, const std::optional<at::Tensor>& gg_x,
                                  const std::optional<at::Tensor>& gg_weight,
                                  const std::optional<at::Tensor>& gg_bias);

}  // namespace bn
}  // namespace pymaml
