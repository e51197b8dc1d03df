// CPU kernel of pymaml::batch_norm_double_backward (contract and formulas:
// csrc/include/pymaml/batch_norm.h). Per channel, two passes over its M = N·S elements of the
// contiguous [N, C, S] view: the five sums Σgy, Σgy·x̂, Σgg, Σgg·x̂, Σgg·gy (x̂ recomputed on the fly),
// then both outputs, each a per-channel affine combination of gg, gy and x̂. Channels run in
// parallel; each channel's sums are in a fixed order, so results do not depend on the thread count.
// float and double here; half/bfloat16 take the composite (computed in float).
#include <pymaml/batch_norm.h>
#include <pymaml/cpu_foreach.h>
#include <torch/library.h>

#include <array>

namespace pymaml {
namespace bn {
namespace {

using at::vec::Vectorized;
using cpu::vec_loop;

template <typename T>
void run(const T* gy, const T* x, const T* gg, T* ggy_out, T* gx_out, double* gw_out, const double* w,
         const double* mean, const double* r, const double* g_w, const double* g_b, int64_t n, int64_t c,
         int64_t s) {
  using V = Vectorized<T>;
  const double m = static_cast<double>(n * s);
  auto channel = [&](int64_t ch) {
    const T mu = static_cast<T>(mean[ch]), rr = static_cast<T>(r[ch]);
    const V vmu(mu), vr(rr);
    // Pass 1: the sums, per row in T lanes, accumulated across rows in double.
    std::array<double, 5> sum{};  // gy, gy·x̂, gg, gg·x̂, gg·gy
    for (int64_t i = 0; i < n; ++i) {
      const int64_t off = (i * c + ch) * s;
      V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0)), a4(T(0));
      vec_loop<T>(s, [&](int64_t j, int64_t k) {
        const V xh = (V::loadu(x + off + j, k) - vmu) * vr;  // loadu zero-fills a partial tail
        const V y = V::loadu(gy + off + j, k);
        a0 = a0 + y;
        a1 = a1 + y * xh;
        if (gg) {
          const V g = V::loadu(gg + off + j, k);
          a2 = a2 + g;
          a3 = a3 + g * xh;
          a4 = a4 + g * y;
        }
      });
      const V* acc[5] = {&a0, &a1, &a2, &a3, &a4};
      for (int q = 0; q < (gg ? 5 : 2); ++q) {
        T lanes[V::size()];
        acc[q]->store(lanes);
        for (int64_t l = 0; l < V::size(); ++l) sum[q] += static_cast<double>(lanes[l]);
      }
    }
    // Per-channel coefficients (double).
    const double wc = w ? w[ch] : 1.0, rc = r[ch], gw = g_w ? g_w[ch] : 0.0, gb = g_b ? g_b[ch] : 0.0;
    const double mgy = sum[0] / m, q = sum[1] / m, mg = sum[2] / m, p = sum[3] / m;
    const double a = sum[4] / m - mg * mgy;
    const double wr = wc * rc;
    const double c_g = -wr * q, c_gy = gw - wr * p;
    const double m_d = c_g * mg + c_gy * mgy, m_dx = -2.0 * wr * p * q + gw * q;
    const double apq = a - p * q;
    const double k_x = -rc * m_dx - wc * rc * rc * apq;
    gw_out[ch] = m * rc * apq;
    // grad_x = xa_g·gg + xa_gy·gy + k_x·x̂ + xa_0;  ggy = ya_g·gg + ya_x·x̂ + ya_0
    const V xa_g(static_cast<T>(rc * c_g)), xa_gy(static_cast<T>(rc * c_gy)), xk(static_cast<T>(k_x)),
        xa_0(static_cast<T>(-rc * m_d));
    const V ya_g(static_cast<T>(wr)), ya_x(static_cast<T>(gw - wr * p)), ya_0(static_cast<T>(gb - wr * mg));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t off = (i * c + ch) * s;
      vec_loop<T>(s, [&](int64_t j, int64_t k) {
        const V xh = (V::loadu(x + off + j, k) - vmu) * vr;
        const V y = V::loadu(gy + off + j, k);
        V gx = xa_gy * y + xk * xh + xa_0;
        V gyy = ya_x * xh + ya_0;
        if (gg) {
          const V g = V::loadu(gg + off + j, k);
          gx = gx + xa_g * g;
          gyy = gyy + ya_g * g;
        }
        gx.store(gx_out + off + j, k);
        gyy.store(ggy_out + off + j, k);
      });
    }
  };
  if (n * s * c < 32768 || at::in_parallel_region()) {
    for (int64_t ch = 0; ch < c; ++ch) channel(ch);
  } else {
    at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) channel(ch);
    });
  }
}

// A [C] tensor as contiguous doubles (nullptr-able).
at::Tensor as_double(const std::optional<at::Tensor>& t) {
  return present(t) ? t->to(at::kDouble).contiguous() : at::Tensor();
}

Tensor3 double_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const at::Tensor& mean, const at::Tensor& invstd, double eps,
                            const std::optional<at::Tensor>& gg_x, const std::optional<at::Tensor>& gg_weight,
                            const std::optional<at::Tensor>& gg_bias) {
  const auto dt = x.scalar_type();
  const bool same = grad_y.scalar_type() == dt && (!present(gg_x) || gg_x->scalar_type() == dt);
  if (!(dt == at::kFloat || dt == at::kDouble) || !same) {
    return double_backward_composite(grad_y, x, weight, mean, invstd, eps, gg_x, gg_weight, gg_bias);
  }
  check_double_backward(grad_y, x, weight, mean, invstd, gg_x, gg_weight, gg_bias);
  const int64_t n = x.size(0), c = x.size(1), s = c ? x.numel() / (n * c) : 0;
  const at::Tensor xc = x.contiguous(), gyc = grad_y.contiguous();
  const at::Tensor ggc = present(gg_x) ? gg_x->contiguous() : at::Tensor();
  const at::Tensor wd = as_double(weight), gwd = as_double(gg_weight), gbd = as_double(gg_bias);
  const at::Tensor md = mean.to(at::kDouble).contiguous(), rd = invstd.to(at::kDouble).contiguous();
  at::Tensor ggy = cpu::new_cpu(x.sizes(), dt), gx = cpu::new_cpu(x.sizes(), dt);
  at::Tensor gw = cpu::new_cpu({c}, at::kDouble);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; };
  cpu::dispatch_t(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      run<T>(gyc.const_data_ptr<T>(), xc.const_data_ptr<T>(), ggc.defined() ? ggc.const_data_ptr<T>() : nullptr,
             ggy.mutable_data_ptr<T>(), gx.mutable_data_ptr<T>(), gw.mutable_data_ptr<double>(), ptr(wd), ptr(md),
             ptr(rd), ptr(gwd), ptr(gbd), n, c, s);
    }
  });
  return {ggy, gx, gw.to(present(weight) ? weight->scalar_type() : dt)};
}

}  // namespace
}  // namespace bn
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("batch_norm_double_backward", &pymaml::bn::double_backward_cpu);
}
