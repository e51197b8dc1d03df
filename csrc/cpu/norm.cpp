// CPU kernels of the fused global gradient norm and clipping:
//   global_norm(tensors) = ‖concat(tensors)‖₂; clip_grad_norm_ scales in place by
//   min(1, max_norm / (norm + eps)) and returns the norm before clipping.
// Contract: csrc/include/pymaml/ops.h.
#include <pymaml/cpu_foreach.h>
#include <pymaml/ops.h>
#include <torch/library.h>

#include <cmath>

namespace pymaml {
namespace cpu {
namespace {

// Acc: opmath(T), or double when the list holds a float64 tensor (as the reference does).
template <typename T, typename Acc>
double sumsq_segment(const void* data, int64_t lo, int64_t hi) {
  using opm = Acc;
  using V = Vectorized<opm>;
  constexpr int64_t S = std::is_same_v<T, opm> ? 1 : kStage;
  constexpr int64_t B = stage_block<opm, T>();
  opm buf[S];
  const T* x = static_cast<const T*>(data) + lo;
  V acc(opm(0));
  const int64_t n = hi - lo;
  for (int64_t k = 0; k < n; k += B) {
    const int64_t m = std::min(B, n - k);
    const opm* X = stage_in<opm>(x + k, buf, m);
    vec_loop<opm>(m, [&](int64_t i, int64_t c) {
      const V v = V::loadu(X + i, c);
      acc = acc + v * v;
    });
  }
  opm lanes[V::size()];
  acc.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

template <typename T>
void scale_segment(void* data, int64_t lo, int64_t hi, double f) {
  using opm = at::opmath_type<T>;
  using V = Vectorized<opm>;
  constexpr int64_t S = std::is_same_v<T, opm> ? 1 : kStage;
  constexpr int64_t B = stage_block<opm, T>();
  opm buf[S];
  T* x = static_cast<T*>(data) + lo;
  const V s(static_cast<opm>(f));
  const int64_t n = hi - lo;
  for (int64_t k = 0; k < n; k += B) {
    const int64_t m = std::min(B, n - k);
    const opm* X = stage_in<opm>(x + k, buf, m);
    opm* O = stage_out<opm>(x + k, buf);
    vec_loop<opm>(m, [&](int64_t i, int64_t c) { (V::loadu(X + i, c) * s).store(O + i, c); });
    stage_store(x + k, O, m);
  }
}

struct Prepared {
  std::vector<at::Tensor> dense;  // dense tensors: the inputs, or clones of those that are not dense
  std::vector<int64_t> numels;
  bool any_double = false;
};

Prepared prepare(const char* op, at::TensorList ts) {
  TORCH_CHECK_VALUE(!ts.empty(), op, ": tensors is empty");
  check_floating(op, "tensors", ts);
  check_cpu(op, "tensors", ts);
  Prepared p;
  p.dense.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    p.dense.push_back(dense_ref(t));  // t itself when dense: walked in its memory order
    p.numels.push_back(t.numel());
  }
  p.any_double = norm_accumulates_in_double(ts);
  return p;
}

double sum_squares(const Prepared& p) {
  FlatPlan plan(p.numels);
  std::vector<double> partial(plan.num_segments(), 0.0);
  plan.run([&](const Segment& s, int64_t si) {
    const at::Tensor& t = p.dense[s.tensor];
    dispatch_t(t.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      partial[si] = p.any_double ? sumsq_segment<T, double>(t.const_data_ptr(), s.lo, s.hi)
                                 : sumsq_segment<T, at::opmath_type<T>>(t.const_data_ptr(), s.lo, s.hi);
    });
  });
  double total = 0;
  for (double x : partial) total += x;
  return total;
}

at::Tensor norm_tensor(const Prepared& p, at::Device device, double value) {
  at::Tensor out = at::empty({}, at::TensorOptions().device(device).dtype(p.any_double ? at::kDouble : at::kFloat));
  write_scalar(out, value);
  return out;
}

at::Tensor global_norm(at::TensorList tensors) {
  Prepared p = prepare("global_norm", tensors);
  return norm_tensor(p, tensors[0].device(), std::sqrt(sum_squares(p)));
}

at::Tensor clip_grad_norm_(at::TensorList tensors, double max_norm, double eps) {
  const char* op = "clip_grad_norm_";
  TORCH_CHECK_VALUE(max_norm > 0, op, ": max_norm must be positive, got ", max_norm);
  Prepared p = prepare(op, tensors);
  at::Tensor norm = norm_tensor(p, tensors[0].device(), std::sqrt(sum_squares(p)));
  // The scale is computed from the norm as returned (rounded to its dtype), like the reference.
  const double nv = read_scalar(norm);
  // min(1, q) that keeps a NaN q (as clamp(max=1) does in the reference and the CUDA kernel): a NaN
  // norm propagates to every tensor instead of silently leaving them unclipped.
  const double q = p.any_double ? max_norm / (nv + eps)
                                : static_cast<double>(static_cast<float>(max_norm) /
                                                      (static_cast<float>(nv) + static_cast<float>(eps)));
  const double scale = q > 1.0 ? 1.0 : q;
  if (!(scale >= 1.0)) {
    FlatPlan plan(p.numels);
    plan.run([&](const Segment& s, int64_t) {
      const at::Tensor& t = p.dense[s.tensor];
      dispatch_t(t.scalar_type(), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        scale_segment<T>(t.data_ptr(), s.lo, s.hi, scale);
      });
    });
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!p.dense[i].is_same(tensors[i])) tensors[i].copy_(p.dense[i]);
    }
  }
  return norm;
}

}  // namespace
}  // namespace cpu
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("global_norm", &pymaml::cpu::global_norm);
  m.impl("clip_grad_norm_", &pymaml::cpu::clip_grad_norm_);
}
