// CUDA kernels of the central finite-difference helpers (schemas in csrc/ops.cpp, maths in
// pymaml/reference.py):
//   fd_perturb:  (θ + e u, θ − e u) in one pass
//   fd_quotient: (g₊ − g₋) / 2e
// with e = eps * eps_scale. eps_scale is a one-element tensor: on the device it is read by the
// kernel (no host sync); on the CPU it is read on the host. e is formed in float64 and used in the
// opmath type of each tensor.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {
namespace {

// The step e (or 2e): scale_ptr == nullptr means the value is already in `factor`.
struct StepSize {
  double factor;         // eps (times 2 for the quotient), times the host value of eps_scale if on CPU
  const void* scale_ptr;  // eps_scale on the device, or nullptr
  uint8_t scale_dtype;

  template <typename O>
  __device__ __forceinline__ O get() const {
    return scale_ptr == nullptr ? static_cast<O>(factor) : static_cast<O>(factor * load_scalar<double>(scale_ptr, scale_dtype));
  }
};

// Slots: 0 θ, 1 u, 2 θ + e u, 3 θ − e u (all T).
template <typename T>
struct PerturbFunctor {
  using O = at::opmath_type<T>;
  StepSize step;

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    const T* p = slot_ptr<T>(m, 0, c);
    const T* u = slot_ptr<T>(m, 1, c);
    T* plus = slot_ptr<T>(m, 2, c);
    T* minus = slot_ptr<T>(m, 3, c);
    const O e = step.get<O>();
    const int64_t n = c.n;
    const bool vec = is_aligned(p) && is_aligned(u) && is_aligned(plus) && is_aligned(minus);
    walk_chunk(n, vec, [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O rp[kILP], ru[kILP];
      load<kVec>(rp, p, i0, stride, n);
      load<kVec>(ru, u, i0, stride, n);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const O s = mul_rn(e, ru[k]);
        ru[k] = sub_rn(rp[k], s);
        rp[k] = add_rn(rp[k], s);
      }
      store<kVec>(plus, rp, i0, stride, n);
      store<kVec>(minus, ru, i0, stride, n);
    });
  }
};

// Slots: 0 g₊, 1 g₋, 2 (g₊ − g₋) / 2e (all T).
template <typename T>
struct QuotientFunctor {
  using O = at::opmath_type<T>;
  StepSize two_e;

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    const T* a = slot_ptr<T>(m, 0, c);
    const T* b = slot_ptr<T>(m, 1, c);
    T* out = slot_ptr<T>(m, 2, c);
    const O d = two_e.get<O>();
    const int64_t n = c.n;
    const bool vec = is_aligned(a) && is_aligned(b) && is_aligned(out);
    walk_chunk(n, vec, [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O ra[kILP], rb[kILP];
      load<kVec>(ra, a, i0, stride, n);
      load<kVec>(rb, b, i0, stride, n);
#pragma unroll
      for (int k = 0; k < kILP; ++k) ra[k] = div_rn(sub_rn(ra[k], rb[k]), d);
      store<kVec>(out, ra, i0, stride, n);
    });
  }
};

StepSize make_step(const char* op, double eps, double factor, const at::Tensor& eps_scale,
                   const at::Device& device) {
  check_eps_scale(op, eps_scale);
  TORCH_CHECK_VALUE(eps != 0.0, op, ": eps must be non-zero, got ", eps);
  if (eps_scale.device().is_cpu()) return StepSize{factor * eps * read_cpu_scalar(eps_scale), nullptr, 0};  // no GPU sync
  TORCH_CHECK_VALUE(eps_scale.device() == device, op, ": eps_scale is on ", eps_scale.device(),
                    " but the tensors are on ", device);
  return StepSize{factor * eps, eps_scale.const_data_ptr(), static_cast<uint8_t>(eps_scale.scalar_type())};
}

// Checks a/b, then calls fill(entry, i) for every non-empty index of each dtype group and launches.
template <int D, template <typename> class Functor, typename Fill>
void run_grouped(const char* op, at::TensorList a, const StepSize& step, Fill fill) {
  std::vector<at::ScalarType> keys(a.size());
  for (size_t i = 0; i < a.size(); ++i) keys[i] = a[i].scalar_type();
  for (const auto& group : group_by(keys)) {
    std::vector<TensorEntry<D>> entries;
    entries.reserve(group.second.size());
    for (size_t i : group.second) {
      if (a[i].numel() == 0) continue;
      TensorEntry<D> e;
      e.numel = a[i].numel();
      fill(e, i);
      entries.push_back(e);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "pymaml_fd", [&] {
      multi_tensor_apply<D>(entries, Functor<scalar_t>{step});
    });
  }
}

at::Device check_two_lists(const char* op, const char* name_a, at::TensorList a, const char* name_b,
                           at::TensorList b) {
  check_pairs(op, {name_a, name_b}, {a, b});
  return kernel_device(op, name_a, a, at::kCUDA);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fd_perturb_cuda(at::TensorList params,
                                                                            at::TensorList direction, double eps,
                                                                            const at::Tensor& eps_scale) {
  const char* op = "fd_perturb";
  if (params.empty() || direction.empty()) {
    check_pairs(op, {"params", "direction"}, {params, direction});
    make_step(op, eps, 1.0, eps_scale, eps_scale.device());
    return {};
  }
  const at::Device device = check_two_lists(op, "params", params, "direction", direction);
  const c10::cuda::CUDAGuard guard(device);
  const StepSize step = make_step(op, eps, 1.0, eps_scale, device);
  const size_t n = params.size();
  std::vector<at::Tensor> p_c(n), u_c(n), plus(n), minus(n);
  for (size_t i = 0; i < n; ++i) {
    p_c[i] = params[i].contiguous();
    u_c[i] = direction[i].contiguous();
    plus[i] = at::empty(params[i].sizes(), params[i].options());
    minus[i] = at::empty(params[i].sizes(), params[i].options());
  }
  run_grouped<4, PerturbFunctor>(op, params, step, [&](TensorEntry<4>& e, size_t i) {
    e.addr = {address(p_c[i], device), address(u_c[i], device), address(plus[i], device), address(minus[i], device)};
  });
  return {plus, minus};
}

std::vector<at::Tensor> fd_quotient_cuda(at::TensorList grads_plus, at::TensorList grads_minus, double eps,
                                         const at::Tensor& eps_scale) {
  const char* op = "fd_quotient";
  if (grads_plus.empty() || grads_minus.empty()) {
    check_pairs(op, {"grads_plus", "grads_minus"}, {grads_plus, grads_minus});
    make_step(op, eps, 2.0, eps_scale, eps_scale.device());
    return {};
  }
  const at::Device device = check_two_lists(op, "grads_plus", grads_plus, "grads_minus", grads_minus);
  const c10::cuda::CUDAGuard guard(device);
  const StepSize two_e = make_step(op, eps, 2.0, eps_scale, device);
  const size_t n = grads_plus.size();
  std::vector<at::Tensor> a_c(n), b_c(n), out(n);
  for (size_t i = 0; i < n; ++i) {
    a_c[i] = grads_plus[i].contiguous();
    b_c[i] = grads_minus[i].contiguous();
    out[i] = at::empty(grads_plus[i].sizes(), grads_plus[i].options());
  }
  run_grouped<3, QuotientFunctor>(op, grads_plus, two_e, [&](TensorEntry<3>& e, size_t i) {
    e.addr = {address(a_c[i], device), address(b_c[i], device), address(out[i], device)};
  });
  return out;
}

}  // namespace
}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("fd_perturb", &pymaml::cuda::fd_perturb_cuda);
  m.impl("fd_quotient", &pymaml::cuda::fd_quotient_cuda);
}
