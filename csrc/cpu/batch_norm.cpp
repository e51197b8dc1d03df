// CPU kernel of pymaml::batch_norm_double_backward (contract and formulas:
// csrc/include/pymaml/batch_norm.h). Two passes over the M = N·S elements of each channel: the five
// sums Σgy, Σgy·x̂, Σgg, Σgg·x̂, Σgg·gy (x̂ recomputed on the fly), then both outputs, each a
// per-channel affine combination of gg, gy and x̂. A contiguous [N, C, S] input runs channels in
// parallel; a channels-last one ([N·S, C] rows) is vectorised across channels and runs row blocks in
// parallel. The sums are in a fixed order either way: results do not depend on the thread count.
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

// Per-channel coefficients of both outputs from the five sums (double):
//   grad_x = xa_g·gg + xa_gy·gy + k_x·x̂ + xa_0;  ggy = ya_g·gg + ya_x·x̂ + ya_0;  grad_weight.
struct Coeffs {
  double xa_g, xa_gy, k_x, xa_0, ya_g, ya_x, ya_0, gw;
};

inline Coeffs coeffs(const double* sum, double m, double wc, double rc, double gw, double gb) {
  const double mgy = sum[0] / m, q = sum[1] / m, mg = sum[2] / m, p = sum[3] / m;
  const double a = sum[4] / m - mg * mgy;
  const double wr = wc * rc;
  const double c_g = -wr * q, c_gy = gw - wr * p;
  const double m_d = c_g * mg + c_gy * mgy, m_dx = -2.0 * wr * p * q + gw * q;
  const double apq = a - p * q;
  return {rc * c_g, rc * c_gy, -rc * m_dx - wc * rc * rc * apq, -rc * m_d, wr, gw - wr * p, gb - wr * mg,
          m * rc * apq};
}

struct Args {
  const double *w, *mean, *r, *g_w, *g_b;  // [C] doubles; w, g_w, g_b may be nullptr
  double* gw_out;                          // [C]
  int64_t c;
  double m;                                // elements per channel
  Coeffs at(int64_t ch, const double* sum) const {
    return coeffs(sum, m, w ? w[ch] : 1.0, r[ch], g_w ? g_w[ch] : 0.0, g_b ? g_b[ch] : 0.0);
  }
};

// f(begin, end) over [0, n): on the calling thread for small tensors (`elems` < 32768: a fork/join
// costs more) or inside a parallel region, else one at::parallel_for.
template <typename F>
void for_range(int64_t n, int64_t elems, const F& f) {
  if (elems < 32768 || at::in_parallel_region()) {
    f(int64_t{0}, n);
  } else {
    at::parallel_for(0, n, 1, f);
  }
}

// Contiguous [N, C, S]: channels in parallel, each a run of N rows of S elements.
template <typename T>
void run_nchw(const T* gy, const T* x, const T* gg, T* ggy_out, T* gx_out, const Args& A, int64_t n, int64_t s) {
  using V = Vectorized<T>;
  const int64_t c = A.c;
  auto channel = [&](int64_t ch) {
    const V vmu(static_cast<T>(A.mean[ch])), vr(static_cast<T>(A.r[ch]));
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
    const Coeffs k = A.at(ch, sum.data());
    A.gw_out[ch] = k.gw;
    const V xa_g(static_cast<T>(k.xa_g)), xa_gy(static_cast<T>(k.xa_gy)), xk(static_cast<T>(k.k_x)),
        xa_0(static_cast<T>(k.xa_0));
    const V ya_g(static_cast<T>(k.ya_g)), ya_x(static_cast<T>(k.ya_x)), ya_0(static_cast<T>(k.ya_0));
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
  for_range(c, n * s * c, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) channel(ch);
  });
}

// Channels-last [M, C] (rows of C channels): vectorised across channels. Pass 1 sums blocks of
// kRows rows in T lanes, each block's sums go to double partials, combined in block order (so the
// result does not depend on the thread count); pass 2 writes the rows in parallel.
template <typename T>
void run_channels_last(const T* gy, const T* x, const T* gg, T* ggy_out, T* gx_out, const Args& A, int64_t rows) {
  using V = Vectorized<T>;
  constexpr int64_t kRows = 256;
  const int64_t c = A.c, nq = gg ? 5 : 2;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  std::vector<T> mu(c), rr(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mu[ch] = static_cast<T>(A.mean[ch]);
    rr[ch] = static_cast<T>(A.r[ch]);
  }
  std::vector<double> partial(blocks * 5 * c, 0.0);
  for_range(blocks, rows * c, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(5 * c);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      T *a0 = acc.data(), *a1 = a0 + c, *a2 = a1 + c, *a3 = a2 + c, *a4 = a3 + c;
      for (int64_t i = b * kRows, e = std::min(rows, i + kRows); i < e; ++i) {
        const int64_t off = i * c;
        vec_loop<T>(c, [&](int64_t j, int64_t k) {
          const V xh = (V::loadu(x + off + j, k) - V::loadu(mu.data() + j, k)) * V::loadu(rr.data() + j, k);
          const V y = V::loadu(gy + off + j, k);
          (V::loadu(a0 + j, k) + y).store(a0 + j, k);
          (V::loadu(a1 + j, k) + y * xh).store(a1 + j, k);
          if (gg) {
            const V g = V::loadu(gg + off + j, k);
            (V::loadu(a2 + j, k) + g).store(a2 + j, k);
            (V::loadu(a3 + j, k) + g * xh).store(a3 + j, k);
            (V::loadu(a4 + j, k) + g * y).store(a4 + j, k);
          }
        });
      }
      double* out = partial.data() + b * 5 * c;
      for (int64_t q = 0; q < nq * c; ++q) out[q] = static_cast<double>(acc[q]);
    }
  });
  // Coefficients per channel, as T arrays for pass 2.
  std::vector<T> cf(7 * c);
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum[5] = {0, 0, 0, 0, 0};
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t q = 0; q < nq; ++q) sum[q] += partial[(b * 5 + q) * c + ch];
    }
    const Coeffs k = A.at(ch, sum);
    A.gw_out[ch] = k.gw;
    const double vals[7] = {k.xa_g, k.xa_gy, k.k_x, k.xa_0, k.ya_g, k.ya_x, k.ya_0};
    for (int q = 0; q < 7; ++q) cf[q * c + ch] = static_cast<T>(vals[q]);
  }
  const T *xa_g = cf.data(), *xa_gy = xa_g + c, *xk = xa_gy + c, *xa_0 = xk + c, *ya_g = xa_0 + c,
          *ya_x = ya_g + c, *ya_0 = ya_x + c;
  for_range(blocks, rows * c, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * kRows, e = std::min(rows, b1 * kRows); i < e; ++i) {
      const int64_t off = i * c;
      vec_loop<T>(c, [&](int64_t j, int64_t k) {
        const V xh = (V::loadu(x + off + j, k) - V::loadu(mu.data() + j, k)) * V::loadu(rr.data() + j, k);
        const V y = V::loadu(gy + off + j, k);
        V gx = V::loadu(xa_gy + j, k) * y + V::loadu(xk + j, k) * xh + V::loadu(xa_0 + j, k);
        V gyy = V::loadu(ya_x + j, k) * xh + V::loadu(ya_0 + j, k);
        if (gg) {
          const V g = V::loadu(gg + off + j, k);
          gx = gx + V::loadu(xa_g + j, k) * g;
          gyy = gyy + V::loadu(ya_g + j, k) * g;
        }
        gx.store(gx_out + off + j, k);
        gyy.store(ggy_out + off + j, k);
      });
    }
  });
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
  // Channels-last x (4-D/5-D, not also contiguous) is walked as [N·S, C] rows; every other layout as
  // contiguous [N, C, S]. The other operands are read in x's layout and both outputs get it.
  const auto fmt = x.dim() == 4   ? at::MemoryFormat::ChannelsLast
                   : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                  : at::MemoryFormat::Contiguous;
  const bool cl = fmt != at::MemoryFormat::Contiguous && !x.is_contiguous() && x.is_contiguous(fmt);
  const auto layout = cl ? fmt : at::MemoryFormat::Contiguous;
  const at::Tensor xc = x.contiguous(layout), gyc = grad_y.contiguous(layout);
  const at::Tensor ggc = present(gg_x) ? gg_x->contiguous(layout) : at::Tensor();
  const at::Tensor wd = as_double(weight), gwd = as_double(gg_weight), gbd = as_double(gg_bias);
  const at::Tensor md = mean.to(at::kDouble).contiguous(), rd = invstd.to(at::kDouble).contiguous();
  at::Tensor ggy = cpu::new_cpu_like(xc), gx = cpu::new_cpu_like(xc);
  at::Tensor gw = cpu::new_cpu({c}, at::kDouble);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; };
  const Args args{ptr(wd), ptr(md), ptr(rd), ptr(gwd), ptr(gbd), gw.mutable_data_ptr<double>(), c,
                  static_cast<double>(n * s)};
  cpu::dispatch_t(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const T* g = ggc.defined() ? ggc.const_data_ptr<T>() : nullptr;
      if (cl) {
        run_channels_last<T>(gyc.const_data_ptr<T>(), xc.const_data_ptr<T>(), g, ggy.mutable_data_ptr<T>(),
                             gx.mutable_data_ptr<T>(), args, n * s);
      } else {
        run_nchw<T>(gyc.const_data_ptr<T>(), xc.const_data_ptr<T>(), g, ggy.mutable_data_ptr<T>(),
                    gx.mutable_data_ptr<T>(), args, n, s);
      }
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
