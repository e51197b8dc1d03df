// CPU kernel of pymaml::linear_head_hvp (contract: csrc/include/pymaml/head_hvp.h).
// The GEMMs go to at::mm (BLAS); this file holds the fused row pass that turns the logits
// (Z_v | Z) into (G | R) in one sweep, rows split across threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "pymaml/head_hvp.h"

namespace pymaml {
namespace heads {
namespace {

// One row of softmax cross-entropy: p = softmax(z), d = ⟨p, z_v⟩,
// g = (p − e_y)/N, r = p ⊙ (z_v − d)/N. p is staged in g.
template <typename T>
void ce_row(const T* zv, const T* z, int64_t y, int64_t c, T inv_n, T* g, T* r) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < c; ++k) mx = std::max(mx, z[k]);
  T sum = 0;
  for (int64_t k = 0; k < c; ++k) {
    g[k] = std::exp(z[k] - mx);
    sum += g[k];
  }
  const T inv = T(1) / sum;
  T d = 0;
  for (int64_t k = 0; k < c; ++k) {
    g[k] *= inv;
    d += g[k] * zv[k];
  }
  for (int64_t k = 0; k < c; ++k) {
    r[k] = g[k] * (zv[k] - d) * inv_n;
    g[k] = (g[k] - (k == y ? T(1) : T(0))) * inv_n;
  }
}

void row_pass_cpu(const at::Tensor& zz, const at::Tensor& target, Loss loss, at::Tensor& gr) {
  const int64_t n = zz.size(0), c = zz.size(1) / 2;
  if (n == 0 || c == 0) return;
  // A row costs O(C); give each task enough rows to amortise the thread hand-off.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (8 * c));
  AT_DISPATCH_FLOATING_TYPES(zz.scalar_type(), "linear_head_hvp_cpu", [&] {
    const scalar_t* zp = zz.const_data_ptr<scalar_t>();
    scalar_t* gp = gr.mutable_data_ptr<scalar_t>();
    if (loss == Loss::CrossEntropy) {
      const int64_t* tp = target.const_data_ptr<int64_t>();
      const int64_t ts = target.stride(0);
      const scalar_t inv_n = scalar_t(1) / scalar_t(n);
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t y = tp[i * ts];
          TORCH_CHECK_INDEX(y >= 0 && y < c, "linear_head_hvp: target holds class ", y, " outside [0, ", c, ")");
          const scalar_t* row = zp + i * 2 * c;
          scalar_t* out = gp + i * 2 * c;
          ce_row<scalar_t>(row, row + c, y, c, inv_n, out, out + c);
        }
      });
    } else {
      const scalar_t* tp = target.const_data_ptr<scalar_t>();
      const int64_t ts0 = target.stride(0), ts1 = target.stride(1);
      const scalar_t scale = scalar_t(2) / (scalar_t(n) * scalar_t(c));
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* zv = zp + i * 2 * c;
          const scalar_t* z = zv + c;
          scalar_t* g = gp + i * 2 * c;
          scalar_t* r = g + c;
          for (int64_t k = 0; k < c; ++k) {
            g[k] = (z[k] - tp[i * ts0 + k * ts1]) * scale;
            r[k] = zv[k] * scale;
          }
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_head_hvp_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& v_weight, const c10::optional<at::Tensor>& v_bias, c10::string_view loss) {
  return linear_head_hvp_impl(x, weight, bias, target, v_weight, v_bias, loss, &row_pass_cpu);
}

// Autograd key, every device: the op is one Hessian-vector product, not itself differentiated.
// Without this kernel autograd's fallback would record the GEMMs inside the op (and not the row
// pass), a silently wrong graph; here the inputs are read as constants and the outputs never
// require grad, as the pure-torch twin does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_head_hvp_autograd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& v_weight, const c10::optional<at::Tensor>& v_bias, c10::string_view loss) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pymaml::linear_head_hvp", "")
                             .typed<decltype(linear_head_hvp_cpu)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, target, v_weight, v_bias, loss);
}

}  // namespace
}  // namespace heads
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("linear_head_hvp", &pymaml::heads::linear_head_hvp_cpu);
}

TORCH_LIBRARY_IMPL(pymaml, Autograd, m) {
  m.impl("linear_head_hvp", &pymaml::heads::linear_head_hvp_autograd);
}
