// CPU kernels of the central finite-difference helpers:
//   fd_perturb:  (θ + s·u, θ − s·u) in one pass, s = eps · eps_scale
//   fd_quotient: (g₊ − g₋) / (2 · eps · eps_scale)
// Contract: csrc/include/pymaml/ops.h.
#include <pymaml/cpu_foreach.h>
#include <pymaml/ops.h>
#include <torch/library.h>

#include <tuple>

namespace pymaml {
namespace cpu {
namespace {

struct FdItem {
  at::ScalarType dtype;
  const void* a;
  const void* b;
  void* out0;
  void* out1;
};

// kQuotient: out0 = (a − b) / s.  Otherwise: out0 = a + s·b, out1 = a − s·b.
template <typename T, bool kQuotient>
void fd_segment(const FdItem& it, int64_t lo, int64_t hi, double s_) {
  using opm = at::opmath_type<T>;
  using V = Vectorized<opm>;
  constexpr int64_t S = std::is_same_v<T, opm> ? 1 : kStage;
  constexpr int64_t B = stage_block<opm, T>();
  opm ba[S], bb[S], b0[S], b1[S];
  const T* a = static_cast<const T*>(it.a) + lo;
  const T* b = static_cast<const T*>(it.b) + lo;
  T* o0 = static_cast<T*>(it.out0) + lo;
  T* o1 = kQuotient ? nullptr : static_cast<T*>(it.out1) + lo;
  const V s(static_cast<opm>(s_));
  const int64_t n = hi - lo;
  for (int64_t k = 0; k < n; k += B) {
    const int64_t m = std::min(B, n - k);
    const opm* A = stage_in<opm>(a + k, ba, m);
    const opm* Bv = stage_in<opm>(b + k, bb, m);
    opm* O0 = stage_out<opm>(o0 + k, b0);
    if constexpr (kQuotient) {
      vec_loop<opm>(m, [&](int64_t i, int64_t c) {
        ((V::loadu(A + i, c) - V::loadu(Bv + i, c)) / s).store(O0 + i, c);
      });
    } else {
      opm* O1 = stage_out<opm>(o1 + k, b1);
      vec_loop<opm>(m, [&](int64_t i, int64_t c) {
        const V x = V::loadu(A + i, c), step = s * V::loadu(Bv + i, c);
        (x + step).store(O0 + i, c);
        (x - step).store(O1 + i, c);
      });
      stage_store(o1 + k, O1, m);
    }
    stage_store(o0 + k, O0, m);
  }
}

template <bool kQuotient>
std::vector<at::Tensor> run_fd(const char* op, const char* na, const char* nb, at::TensorList a,
                               at::TensorList b, double eps, const at::Tensor& eps_scale,
                               std::vector<at::Tensor>* second) {
  check_pairs(op, {na, nb}, {a, b});
  check_cpu(op, na, a);
  check_eps_scale(op, eps_scale);
  TORCH_CHECK_VALUE(eps_scale.device().is_cpu(), op, ": eps_scale is on ", eps_scale.device(),
                    " but the tensors are on the CPU");
  TORCH_CHECK_VALUE(eps != 0.0, op, ": eps must be non-zero, got ", eps);
  const double scale = read_scalar(eps_scale);
  const size_t n = a.size();
  std::vector<FdItem> items(n);
  std::vector<int64_t> numels(n);
  std::vector<at::Tensor> keep, first;
  first.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    FdItem& it = items[i];
    it.dtype = a[i].scalar_type();
    numels[i] = a[i].numel();
    at::Tensor ac = dense_ref(a[i]), bc = as_layout(b[i], ac);
    it.a = ac.const_data_ptr();
    it.b = bc.const_data_ptr();
    first.push_back(new_cpu_like(ac));
    it.out0 = first.back().mutable_data_ptr();
    it.out1 = nullptr;
    if (!kQuotient) {
      second->push_back(new_cpu_like(ac));
      it.out1 = second->back().mutable_data_ptr();
    }
    keep.push_back(std::move(ac));
    keep.push_back(std::move(bc));
  }
  FlatPlan plan(numels);
  plan.run([&](const Segment& s, int64_t) {
    const FdItem& it = items[s.tensor];
    dispatch_t(it.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opm = at::opmath_type<T>;
      // Scalars are rounded to opmath first, as the reference does: s = opm(eps·scale), and the
      // quotient divides by opm(2·eps·scale).
      const double sc = static_cast<double>(static_cast<opm>(kQuotient ? 2.0 * eps * scale : eps * scale));
      fd_segment<T, kQuotient>(it, s.lo, s.hi, sc);
    });
  });
  return first;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fd_perturb(at::TensorList params,
                                                                         at::TensorList direction, double eps,
                                                                         const at::Tensor& eps_scale) {
  std::vector<at::Tensor> minus;
  minus.reserve(params.size());
  auto plus = run_fd<false>("fd_perturb", "params", "direction", params, direction, eps, eps_scale, &minus);
  return {std::move(plus), std::move(minus)};
}

std::vector<at::Tensor> fd_quotient(at::TensorList grads_plus, at::TensorList grads_minus, double eps,
                                    const at::Tensor& eps_scale) {
  return run_fd<true>("fd_quotient", "grads_plus", "grads_minus", grads_plus, grads_minus, eps, eps_scale,
                      nullptr);
}

}  // namespace
}  // namespace cpu
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("fd_perturb", &pymaml::cpu::fd_perturb);
  m.impl("fd_quotient", &pymaml::cpu::fd_quotient);
}
