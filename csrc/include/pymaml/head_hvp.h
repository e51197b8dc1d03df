// pymaml::linear_head_hvp: the closed-form Hessian-vector product of a linear head and the mixed
// second derivative with respect to its input features, shared host logic of the CPU and CUDA ops.
//
// Contract (the pure-torch twin, pymaml/reference_heads.py, computes the same):
//   x [N, F], weight [C, F], bias [C] or None, v_weight [C, F], v_bias [C] or None (None with a
//   bias = zero bias direction; given without a bias = error); target: int64 [N] class indices for
//   loss "cross_entropy" (mean over N), x's dtype [N, C] for "mse" (mean over N·C).
//   Z = x Wᵀ + b, Z_v = x V_Wᵀ + v_b, G = ∂L/∂Z, R = ∂G/∂Z [Z_v]:
//     cross_entropy  P = softmax(Z), G = (P − onehot(y)) / N, R = (P ⊙ Z_v − P ⊙ rowsum(P ⊙ Z_v)) / N
//     mse            G = 2 (Z − T) / (N C),          R = 2 Z_v / (N C)
//   Returns (hvp_weight = Rᵀ x [C, F], hvp_bias = Σ_n R_n [C], grad_x = G V_W + R W [N, F]);
//   hvp_bias is returned even without a bias (the Python wrapper drops it then).
//   Nothing is mutated; inputs may be strided (they are only read through GEMMs and strided
//   indexing); float16/bfloat16 are computed in float32 and rounded once; deterministic.
//
// Work: three GEMMs ([x] · [V_W; W]ᵀ, Rᵀ x, [G | R] · [V_W; W]) around one fused pass over the
// [N, 2C] logits that turns (Z_v | Z) into (G | R): the device-specific part (`RowPass`).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

namespace pymaml {
namespace heads {

enum class Loss { CrossEntropy, MSE };

// zz = (Z_v | Z) [N, 2C] contiguous in the opmath dtype; writes gr = (G | R) of the same layout.
// target: int64 [N] (strided) or opmath [N, C] (strided).
using RowPass = void (*)(const at::Tensor& zz, const at::Tensor& target, Loss loss, at::Tensor& gr);

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline Loss parse_loss(c10::string_view loss) {
  if (loss == "cross_entropy") return Loss::CrossEntropy;
  if (loss == "mse") return Loss::MSE;
  TORCH_CHECK_VALUE(false, "linear_head_hvp: loss must be one of ('cross_entropy', 'mse'), got '",
                    std::string(loss), "'");
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& target, const at::Tensor& v_weight,
                         const c10::optional<at::Tensor>& v_bias, Loss loss) {
  const char* op = "linear_head_hvp";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [N, F], got shape ", shape_str(x));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x has dtype ", x.scalar_type(),
                   "; only floating-point features are supported");
  const int64_t n = x.size(0), f = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == f, op, ": weight must be [C, F] with F = ", f,
                    " (from x ", shape_str(x), "), got shape ", shape_str(weight));
  const int64_t c = weight.size(0);
  TORCH_CHECK_VALUE(v_weight.sizes() == weight.sizes(), op, ": v_weight must have weight's shape ",
                    shape_str(weight), ", got ", shape_str(v_weight));
  TORCH_CHECK_VALUE(bias.has_value() || !v_bias.has_value(), op, ": v_bias is given (shape ",
                    shape_str(*v_bias), ") but bias is None");
  auto same = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  };
  same("weight", weight);
  same("v_weight", v_weight);
  for (auto [name, t] : {std::make_pair("bias", &bias), std::make_pair("v_bias", &v_bias)}) {
    if (!t->has_value()) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == c, op, ": ", name, " must be [C] with C = ", c,
                      " (from weight ", shape_str(weight), "), got shape ", shape_str(**t));
    same(name, **t);
  }
  TORCH_CHECK_VALUE(target.device() == x.device(), op, ": target is on ", target.device(), " but x is on ",
                    x.device());
  if (loss == Loss::CrossEntropy) {
    TORCH_CHECK_VALUE(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == n, op,
                      ": cross_entropy needs target as int64 class indices of shape [N] = [", n, "], got shape ",
                      shape_str(target), " with dtype ", target.scalar_type());
    TORCH_CHECK_VALUE(c > 0, op, ": cross_entropy needs at least one class, weight has shape ", shape_str(weight));
  } else {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == n && target.size(1) == c &&
                          target.scalar_type() == x.scalar_type(),
                      op, ": mse needs target of shape [N, C] = [", n, ", ", c, "] and x's dtype ", x.scalar_type(),
                      ", got shape ", shape_str(target), " with dtype ", target.scalar_type());
  }
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_head_hvp_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& v_weight, const c10::optional<at::Tensor>& v_bias, c10::string_view loss_name,
    RowPass row_pass) {
  const Loss loss = parse_loss(loss_name);
  check_inputs(x, weight, bias, target, v_weight, v_bias, loss);
  const auto dtype = x.scalar_type();
  const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
  auto opmath = [&](const at::Tensor& t) { return low ? t.to(at::kFloat) : t; };
  const int64_t c = weight.size(0);

  const at::Tensor xo = opmath(x);
  // M = [V_W; W], so x Mᵀ = (Z_v | Z) and (G | R) M = G V_W + R W = grad_x: one GEMM each way.
  const at::Tensor m = at::cat({opmath(v_weight), opmath(weight)}, 0);
  at::Tensor zz;
  if (bias.has_value()) {
    const at::Tensor b = opmath(*bias);
    const at::Tensor vb = v_bias.has_value() ? opmath(*v_bias) : at::zeros_like(b);
    zz = at::addmm(at::cat({vb, b}, 0), xo, m.t());
  } else {
    zz = at::mm(xo, m.t());
  }
  zz = zz.contiguous();  // a fresh GEMM output; this is a no-op kept as the kernels' precondition
  at::Tensor gr = at::empty_like(zz);
  row_pass(zz, loss == Loss::MSE ? opmath(target) : target, loss, gr);

  const at::Tensor r = gr.narrow(1, c, c);
  at::Tensor hvp_weight = at::mm(r.t(), xo);
  at::Tensor hvp_bias = r.sum(0);
  at::Tensor grad_x = at::mm(gr, m);
  if (low) {
    hvp_weight = hvp_weight.to(dtype);
    hvp_bias = hvp_bias.to(dtype);
    grad_x = grad_x.to(dtype);
  }
  return {hvp_weight, hvp_bias, grad_x};
}

}  // namespace heads
}  // namespace pymaml
