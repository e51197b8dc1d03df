// Autograd kernels (every device) of the ops an unrolled learn2learn-style loop calls per layer,
// per step and per task: batch_norm, batch_norm_backward, sgd_update (float step size) and
// convolution / convolution_backward. As C++ autograd Functions they add no Python to a backward
// node; the formulas are those of pymaml/_registration.py and pymaml/reference/ (the pure-torch
// twins, which the tests compare against plain autograd).
//
// convolution: the value is at::convolution's. Its derivative is convolution_backward (the values of
// at::convolution_backward; on the CPU, for small convolutions, the buffer products of
// csrc/include/pymaml/conv_gemm.h); the derivative of that is computed here with one weight-gradient and
// one input-gradient kernel, where torch's ConvolutionBackwardBackward0 computes the weight part as
// a convolution whose kernel is the whole feature map (dilated by the stride): 80 ms against 7 ms
// for one [25, 32, 42, 42] layer of the MiniImageNet net on one CPU thread. Third and higher
// derivatives go through torch's own formulas (the backward is written in differentiable ATen ops).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pymaml/conv_gemm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

namespace pymaml {
namespace grad {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Optional tensor inputs reach Function::apply as std::optional (an absent one is then no input of
// the node; an undefined at::Tensor would be). Saved, they are undefined tensors.
std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor value(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// ------------------------------------------------------------------ sgd_update (float step size)
// out_i = p_i − lr (g_i + wd p_i):  ∂/∂p_i = (1 − wd lr) go_i,  ∂/∂g_i = −lr go_i (in opmath).
struct SgdUpdateFn : public torch::autograd::Function<SgdUpdateFn> {
  // Tensor lists reach Function::apply as at::TensorList (each tensor an input of the node).
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads, double lr,
                               double wd) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pymaml::sgd_update", "")
                               .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, double, double)>();
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["wd"] = wd;
    std::vector<int64_t> p_types, g_types;
    for (const auto& p : params) p_types.push_back(static_cast<int64_t>(p.scalar_type()));
    for (const auto& g : grads) g_types.push_back(static_cast<int64_t>(g.scalar_type()));
    ctx->saved_data["p_types"] = p_types;
    ctx->saved_data["g_types"] = g_types;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(params, grads, lr, wd);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gouts) {
    const double lr = ctx->saved_data["lr"].toDouble(), wd = ctx->saved_data["wd"].toDouble();
    const auto p_types = ctx->saved_data["p_types"].toIntVector();
    const auto g_types = ctx->saved_data["g_types"].toIntVector();
    const size_t n = p_types.size();
    variable_list out(2 * n + 2);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& go = gouts[i];
      if (!go.defined()) continue;
      const auto pt = static_cast<at::ScalarType>(p_types[i]), gt = static_cast<at::ScalarType>(g_types[i]);
      const at::Tensor go32 = go.to(at::toOpMathType(pt));
      out[n + i] = go32.mul(lr).neg().to(gt);
      out[i] = wd != 0.0 ? go32.sub(go32.mul(wd * lr)).to(pt) : go;
    }
    return out;
  }
};

std::vector<at::Tensor> sgd_update_autograd(at::TensorList params, at::TensorList grads, double lr, double wd) {
  return SgdUpdateFn::apply(params, grads, lr, wd);
}

// ------------------------------------------------------------------ BatchNorm chain
// batch_norm → batch_norm_backward → batch_norm_double_backward (whose autograd, the third
// derivative, stays in pymaml/_registration.py): pymaml/reference/batchnorm.py's chain.
const auto& bn_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pymaml::batch_norm_backward", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                            const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

struct BatchNormBackwardFn : public torch::autograd::Function<BatchNormBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x,
                               const std::optional<at::Tensor>& w, const at::Tensor& mean, const at::Tensor& invstd,
                               double eps) {
    ctx->saved_data["eps"] = eps;
    ctx->save_for_backward({gy, x, value(w), mean, invstd});
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gw, gb] = bn_backward_op().call(gy, x, w, mean, invstd, eps);
    return {gx, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto dbl = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("pymaml::batch_norm_double_backward", "")
                                .typed<Tensor3(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, const at::Tensor&, double,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&)>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &gy = s[0], &x = s[1], &w = s[2], &mean = s[3], &invstd = s[4];
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(6);
    // through the dispatcher with autograd: the double backward's own derivative is registered there
    auto [ggy, gx, gw] = dbl.call(gy, x, opt(w), mean, invstd, ctx->saved_data["eps"].toDouble(), opt(grads[0]),
                                  opt(grads[1]), opt(grads[2]));
    return {ggy, gx, w.defined() ? gw : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct BatchNormFn : public torch::autograd::Function<BatchNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& w,
                               const std::optional<at::Tensor>& b, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pymaml::batch_norm", "")
                               .typed<Tensor3(const at::Tensor&, const std::optional<at::Tensor>&,
                                              const std::optional<at::Tensor>&, double)>();
    at::Tensor y, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, invstd) = op.call(x, w, b, eps);
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = value(b).defined();
    ctx->save_for_backward({x, value(w), mean, invstd});
    ctx->mark_non_differentiable({mean, invstd});
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &mean = s[2], &invstd = s[3];
    // mean and invstd are values, not differentiable outputs: their cotangents are ignored
    auto g = BatchNormBackwardFn::apply(grads[0], x, opt(w), mean, invstd, ctx->saved_data["eps"].toDouble());
    return {g[0], w.defined() ? g[1] : at::Tensor(), ctx->saved_data["has_bias"].toBool() ? g[2] : at::Tensor(),
            at::Tensor()};
  }
};

Tensor3 batch_norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  auto out = BatchNormFn::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor3 batch_norm_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                     const at::Tensor& invstd, double eps) {
  auto out = BatchNormBackwardFn::apply(grad_y, x, weight, mean, invstd, eps);
  return {out[0], out[1], out[2]};
}

// ------------------------------------------------------------------ convolution
struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  static ConvParams load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
  void store(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  std::vector<int64_t> zeros() const { return std::vector<int64_t>(stride.size(), 0); }

  // The kernels: torch's convolution for the value; the gradients of small CPU convolutions as
  // buffer products (csrc/include/pymaml/conv_gemm.h), torch's convolution_backward elsewhere.
  at::Tensor conv_kernel(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    return at::convolution(x, w, b, stride, padding, dilation, false, zeros(), groups);
  }
  Tensor3 backward_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                          std::array<bool, 3> mask) const {
    if (conv_gemm::applies(gy, x, w, stride, padding, dilation, groups))
      return conv_gemm::backward(gy, x, w, stride, padding, mask);
    return torch_backward(gy, x, w, mask);
  }
  Tensor3 torch_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                         std::array<bool, 3> mask) const {
    const std::vector<int64_t> bias_sizes{w.size(0)};
    return at::convolution_backward(gy, x, w, mask[2] ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
                                    stride, padding, dilation, false, zeros(), groups, mask);
  }

  // From the autograd Functions: the ops' kernels through the dispatcher (so that fake and
  // functional tensors reach their own kernels) where autograd does not record; torch's
  // differentiable convolutions where it does (third and higher derivatives).
  static bool recording(std::initializer_list<at::Tensor> ts) {
    if (!at::GradMode::is_enabled()) return false;
    for (const auto& t : ts)
      if (t.defined() && t.requires_grad()) return true;
    return false;
  }
  at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt) const {
    if (recording({x, w, value(b)})) return conv_kernel(x, w, b);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pymaml::convolution", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, w, b, stride, padding, dilation, groups);
  }
  Tensor3 backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, std::array<bool, 3> mask) const {
    if (recording({gy, x, w})) return torch_backward(gy, x, w, mask);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pymaml::convolution_backward", "")
                               .typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                              at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(gy, x, w, stride, padding, dilation, groups, mask);
  }
};

at::Tensor convolution_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  return ConvParams{stride.vec(), padding.vec(), dilation.vec(), groups}.conv_kernel(x, weight, bias);
}

Tensor3 convolution_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, std::array<bool, 3> mask) {
  return ConvParams{stride.vec(), padding.vec(), dilation.vec(), groups}.backward_kernel(grad_y, x, weight, mask);
}

// The derivative of convolution_backward. Only the requested outputs (mask) are outputs of the
// Function, so none of them is undefined.
struct ConvBackwardFn : public torch::autograd::Function<ConvBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                               const ConvParams& p, std::array<bool, 3> mask) {
    p.store(ctx);
    ctx->saved_data["mask"] = int64_t(mask[0]) | int64_t(mask[1]) << 1 | int64_t(mask[2]) << 2;
    ctx->save_for_backward({gy, x, w});
    ctx->set_materialize_grads(false);
    auto [gx, gw, gb] = p.backward(gy, x, w, mask);
    // the requested outputs only: at::convolution_backward may return more (grad_weight for a mask
    // that asks for grad_bias alone)
    const at::Tensor all[3] = {gx, gw, gb};
    variable_list out;
    for (size_t k = 0; k < 3; ++k)
      if (mask[k]) out.push_back(all[k]);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto p = ConvParams::load(ctx);
    const int64_t bits = ctx->saved_data["mask"].toInt();
    const bool mask[3] = {(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
    const auto s = ctx->get_saved_variables();
    const at::Tensor &gy = s[0], &x = s[1], &w = s[2];
    at::Tensor gg[3];  // cotangents of (grad_x, grad_weight, grad_bias)
    for (size_t k = 0, j = 0; k < 3; ++k)
      if (mask[k]) gg[k] = grads[j++];
    const at::Tensor &ggx = gg[0], &ggw = gg[1], &ggb = gg[2];
    at::Tensor d_gy, d_x, d_w, gy_a, gy_b;
    const bool want_gy = ctx->needs_input_grad(0);
    const bool want_x = ctx->needs_input_grad(1) && ggw.defined();
    const bool want_w = ctx->needs_input_grad(2) && ggx.defined();
    // two independent halves: the terms of ggx (conv(ggx, w), the weight gradient at ggx) and of
    // ggw (conv(x, ggw), the input gradient with ggw); side by side on two CPU threads for the small
    // convolutions whose gradients the buffer products compute (each kernel gains little from a
    // second thread there), when the op's kernels serve them (autograd not recording)
    auto half_a = [&] {
      if (want_gy && ggx.defined()) gy_a = p.conv(ggx, w);
      if (want_w) d_w = std::get<1>(p.backward(gy, ggx, w, {false, true, false}));
    };
    auto half_b = [&] {
      if (want_gy && ggw.defined()) gy_b = p.conv(x, ggw);
      if (want_x) d_x = std::get<0>(p.backward(gy, x, ggw, {true, false, false}));
    };
    if (ggx.defined() && ggw.defined() && !ConvParams::recording({gy, x, w, ggx, ggw}) &&
        conv_gemm::applies(gy, x, w, p.stride, p.padding, p.dilation, p.groups)) {
      conv_gemm::side_by_side(half_a, half_b);
    } else {
      half_a();
      half_b();
    }
    if (want_gy) {
      d_gy = gy_a.defined() ? (gy_b.defined() ? gy_a + gy_b : gy_a) : gy_b;
      if (ggb.defined()) {
        std::vector<int64_t> shape(gy.dim(), 1);
        shape[1] = -1;
        const auto b = ggb.reshape(shape);
        d_gy = d_gy.defined() ? d_gy + b : b.expand(gy.sizes());
      }
    }
    return {d_gy, d_x, d_w, at::Tensor(), at::Tensor()};
  }
};

Tensor3 unpack(const variable_list& out, std::array<bool, 3> mask) {
  at::Tensor r[3];
  for (size_t k = 0, j = 0; k < 3; ++k)
    if (mask[k]) r[k] = out[j++];
  return {r[0], r[1], r[2]};
}

struct ConvFn : public torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, const ConvParams& p) {
    p.store(ctx);
    ctx->saved_data["has_bias"] = value(b).defined();
    ctx->save_for_backward({x, w});
    return p.conv(x, w, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return variable_list(4);
    auto [gx, gw, gb] = unpack(ConvBackwardFn::apply(grads[0], s[0], s[1], ConvParams::load(ctx), mask), mask);
    return {gx, gw, gb, at::Tensor()};
  }
};

at::Tensor convolution_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  return ConvFn::apply(x, weight, bias, ConvParams{stride.vec(), padding.vec(), dilation.vec(), groups});
}

Tensor3 convolution_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, std::array<bool, 3> mask) {
  return unpack(ConvBackwardFn::apply(grad_y, x, weight, ConvParams{stride.vec(), padding.vec(), dilation.vec(), groups},
                                      mask),
                mask);
}

}  // namespace
}  // namespace grad
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, Autograd, m) {
  m.impl("sgd_update", &pymaml::grad::sgd_update_autograd);
  m.impl("batch_norm", &pymaml::grad::batch_norm_autograd);
  m.impl("batch_norm_backward", &pymaml::grad::batch_norm_backward_autograd);
  m.impl("convolution", &pymaml::grad::convolution_autograd);
  m.impl("convolution_backward", &pymaml::grad::convolution_backward_autograd);
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("convolution", &pymaml::grad::convolution_kernel);
  m.impl("convolution_backward", &pymaml::grad::convolution_backward_kernel);
}

#ifdef PYMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("convolution", &pymaml::grad::convolution_kernel);
  m.impl("convolution_backward", &pymaml::grad::convolution_backward_kernel);
}
#endif
