// Batch-statistics BatchNorm ops (contract: csrc/include/pymaml/batch_norm.h): validation, the
// forward and first backward (ATen's own kernels, so the numbers are exactly F.batch_norm's), and
// the double backward as whole-tensor ATen ops. The CPU registers its fused double backward in
// csrc/cpu/batch_norm.cpp; CUDA uses the composite below.
#include <pymaml/batch_norm.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

namespace pymaml {
namespace bn {

void check_bn_input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [N, C, *] with at least 2 dims, got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x has dtype ", x.scalar_type(),
                   "; only floating-point tensors are supported");
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(c > 0 && x.numel() / c > 1, op, ": expected more than 1 value per channel, got x of shape ",
                    x.sizes());
  for (auto [t, name] : {std::make_pair(&weight, "weight"), std::make_pair(&bias, "bias")}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == c, op, ": ", name, " must have shape [", c, "] (C of x ",
                      x.sizes(), "), got ", p.sizes());
    TORCH_CHECK_VALUE(p.device() == x.device(), op, ": ", name, " is on ", p.device(), " but x is on ", x.device());
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op, ": ", name, " has dtype ", p.scalar_type());
  }
}

void check_stats(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd) {
  const int64_t c = x.size(1);
  for (auto [t, name] : {std::make_pair(&mean, "mean"), std::make_pair(&invstd, "invstd")}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == c, op, ": ", name, " must have shape [", c, "], got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ",
                      x.device());
  }
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_double_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& gg_x,
                           const std::optional<at::Tensor>& gg_weight, const std::optional<at::Tensor>& gg_bias) {
  const char* op = "batch_norm_double_backward";
  check_bn_input(op, x, weight, std::nullopt);
  check_like(op, "grad_y", grad_y, x);
  check_stats(op, x, mean, invstd);
  if (present(gg_x)) check_like(op, "gg_x", *gg_x, x);
  for (auto [t, name] : {std::make_pair(&gg_weight, "gg_weight"), std::make_pair(&gg_bias, "gg_bias")}) {
    if (!present(*t)) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == x.size(1), op, ": ", name, " must have shape [",
                      x.size(1), "], got ", (*t)->sizes());
  }
}

Tensor3 batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, double eps) {
  check_bn_input("batch_norm", x, weight, bias);
  return at::native_batch_norm(x, weight, bias, std::nullopt, std::nullopt, /*training=*/true, 0.0, eps);
}

Tensor3 batch_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const at::Tensor& mean, const at::Tensor& invstd, double /*eps*/) {
  const char* op = "batch_norm_backward";
  check_bn_input(op, x, weight, std::nullopt);
  check_like(op, "grad_y", grad_y, x);
  check_stats(op, x, mean, invstd);
  // x and grad_y in one layout: ATen's CPU kernel computes wrong grad_weight/grad_bias/grad_x when x
  // is channels-last only through size-1 dims (shape [1, 2, 1, 2], strides [1, 1, 2, 2]) and grad_y
  // is contiguous (torch 2.14).
  const auto fmt = x.suggest_memory_format();
  // Without a weight, ATen's CUDA kernel returns empty grad_weight and grad_bias; a weight of ones
  // gives the same grad_x and the [C] gradients the schema promises, on every device.
  const at::Tensor w = present(weight) ? *weight : at::ones({x.size(1)}, x.options());
  return at::native_batch_norm_backward(grad_y.contiguous(fmt), x.contiguous(fmt), w, std::nullopt,
                                        std::nullopt, mean, invstd, /*train=*/true, 0.0, {true, true, true});
}

Tensor3 double_backward_composite(const at::Tensor& grad_y, const at::Tensor& x,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                  const at::Tensor& invstd, double /*eps*/, const std::optional<at::Tensor>& gg_x,
                                  const std::optional<at::Tensor>& gg_weight,
                                  const std::optional<at::Tensor>& gg_bias) {
  check_double_backward(grad_y, x, weight, mean, invstd, gg_x, gg_weight, gg_bias);
  const int64_t c = x.size(1), m = x.numel() / c;
  const auto ct = at::toOpMathType(x.scalar_type());
  std::vector<int64_t> red{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) red.push_back(d);
  shape[1] = c;
  const auto X = x.to(ct), GY = grad_y.to(ct), r = invstd.to(ct), mu = mean.to(ct);
  const auto vec_opts = X.options();
  const auto w = present(weight) ? weight->to(ct) : at::ones({c}, vec_opts);
  const auto gw = present(gg_weight) ? gg_weight->to(ct) : at::zeros({c}, vec_opts);
  const auto gb = present(gg_bias) ? gg_bias->to(ct) : at::zeros({c}, vec_opts);
  const auto xh = (X - mu.view(shape)) * r.view(shape);
  const auto mgy = GY.mean(red), q = (GY * xh).mean(red);
  at::Tensor G, mg, p, a;
  if (present(gg_x)) {
    G = gg_x->to(ct);
    mg = G.mean(red);
    p = (G * xh).mean(red);
    a = (G * GY).mean(red) - mg * mgy;
  } else {
    mg = p = a = at::zeros({c}, vec_opts);
  }
  const auto wr = w * r;
  const auto c_g = -wr * q, c_gy = gw - wr * p;
  const auto m_d = c_g * mg + c_gy * mgy;
  const auto m_dx = -2 * wr * p * q + gw * q;
  const auto apq = a - p * q;
  const auto k_x = -r * m_dx - w * r * r * apq;
  auto grad_x = (r * c_gy).view(shape) * GY + k_x.view(shape) * xh - (r * m_d).view(shape);
  auto ggy = (gw - wr * p).view(shape) * xh + (gb - wr * mg).view(shape);
  if (G.defined()) {
    grad_x = grad_x + (r * c_g).view(shape) * G;
    ggy = ggy + wr.view(shape) * G;
  }
  const auto grad_w = static_cast<double>(m) * r * apq;
  // In x's layout, as the CPU kernel returns them (elementwise ops over mixed layouts need not).
  const auto fmt = x.suggest_memory_format();
  return {ggy.to(grad_y.scalar_type()).contiguous(fmt), grad_x.to(x.scalar_type()).contiguous(fmt),
          grad_w.to(present(weight) ? weight->scalar_type() : x.scalar_type())};
}

}  // namespace bn
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("batch_norm", &pymaml::bn::batch_norm);
  m.impl("batch_norm_backward", &pymaml::bn::batch_norm_backward);
}

#ifdef PYMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("batch_norm", &pymaml::bn::batch_norm);
  m.impl("batch_norm_backward", &pymaml::bn::batch_norm_backward);
  m.impl("batch_norm_double_backward", &pymaml::bn::double_backward_composite);
}
#endif
