// CUDA kernel of one step of the adjoint recursion (schema in csrc/ops.cpp, maths in
// pymaml/reference.py backward_step):
//   v_out   = v − hvp
//   lr_grad = −g ⊙ v, reduced to the form of `lrs` (none / shared sum / per-tensor sum / per element)
//   u_next  = α_next ⊙ v_out  (α_next: next_lrs when given, else the float next_lr; none at step 0)
// in one pass over v, hvp and g. Sums are deterministic: each block writes the partial sum of its
// chunk (accumulated in opmath: float, double for double) to a float64 buffer, and a second small
// kernel adds each tensor's partials (or all of them for a shared α) in a fixed order. A shared α on
// the CPU gets its gradient on the CPU (one synchronising device-to-host copy, as the reference
// does; refused during CUDA graph capture). The host side (checks, operand preparation) is
// device_plan.h's run_backward_step.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {
namespace {

// Slots: 0 v, 1 hvp, 2 g (T; g unused when mode[0] is kNone), 3 per-element α_next (LT),
// 4 v_out (T), 5 per-element lr_grad (LT), 6 u_next (T).
// mode[0] (lr_grad): kNone, kReduce (partials[partial_base + chunk]) or kElement (slot 5).
// mode[1] (α_next): kNone (no u_next), kArg (next_lr), kDevice (*scalar[1]) or kElement (slot 3).
// flag: found_inf, set when a v_out, −g ⊙ v (when lr_grad is computed) or u_next (in opmath, before
// rounding) is NaN or ±Inf.
template <typename T, typename LT>
struct BackwardStepFunctor {
  using O = at::opmath_type<T>;
  double next_lr;
  double* partials;

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    const T* v = slot_ptr<T>(m, 0, c);
    const T* h = slot_ptr<T>(m, 1, c);
    const T* g = slot_ptr<T>(m, 2, c);
    const LT* na = slot_ptr<LT>(m, 3, c);
    T* vo = slot_ptr<T>(m, 4, c);
    LT* lg = slot_ptr<LT>(m, 5, c);
    T* u = slot_ptr<T>(m, 6, c);
    const uint8_t lr_mode = m.mode[0][c.t];
    const uint8_t next_mode = m.mode[1][c.t];
    const O a_s = next_mode == kDevice ? load_scalar<O>(m.scalar[1][c.t], m.scalar_dtype[1][c.t])
                                       : static_cast<O>(next_lr);
    const bool vec = is_aligned(v) && is_aligned(h) && is_aligned(g) && is_aligned(na) && is_aligned(vo) &&
                     is_aligned(lg) && is_aligned(u);
    float* const flag = m.flag[c.t];
    bool bad = false;
    const int64_t n = c.n;
    O acc = O(0);
    walk_chunk(n, vec, [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O rv[kILP], rh[kILP];
      load<kVec>(rv, v, i0, stride, n);
      load<kVec>(rh, h, i0, stride, n);
#pragma unroll
      for (int k = 0; k < kILP; ++k) rh[k] = sub_rn(rv[k], rh[k]);  // rh is now v_out
      store<kVec>(vo, rh, i0, stride, n);
      if (flag != nullptr) bad |= any_nonfinite<kVec>(rh, i0, stride, n);
      if (lr_mode != kNone) {
        O rg[kILP];
        load<kVec>(rg, g, i0, stride, n);
#pragma unroll
        for (int k = 0; k < kILP; ++k) rg[k] = -mul_rn(rg[k], rv[k]);
        if (flag != nullptr) bad |= any_nonfinite<kVec>(rg, i0, stride, n);
        if (lr_mode == kElement) {
          store<kVec>(lg, rg, i0, stride, n);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) acc += rg[k];  // lanes past n loaded 0: they add 0
        }
      }
      if (next_mode != kNone) {
        O ra[kILP];
        if (next_mode == kElement) {
          load<kVec>(ra, na, i0, stride, n);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) ra[k] = a_s;
        }
#pragma unroll
        for (int k = 0; k < kILP; ++k) ra[k] = mul_rn(ra[k], rh[k]);
        store<kVec>(u, ra, i0, stride, n);
        if (flag != nullptr) bad |= any_nonfinite<kVec>(ra, i0, stride, n);
      }
    });
    raise_flag(flag, bad);
    if (lr_mode == kReduce) {  // uniform over the block, so every thread reaches block_sum
      const O s = block_sum(acc);
      if (threadIdx.x == 0) partials[m.partial_base[c.t] + c.chunk] = static_cast<double>(s);
    }
  }
};

// The device side of device_plan.h's run_backward_step.
struct StepLaunch {
  void step(const StepGroup& g, double next_lr, double* partials) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "backward_step", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        multi_tensor_apply<7>(g.entries, BackwardStepFunctor<scalar_t, scalar_t>{next_lr, partials});
      } else if (g.lr_dtype == g.dtype) {
        multi_tensor_apply<7>(g.entries, BackwardStepFunctor<scalar_t, scalar_t>{next_lr, partials});
      } else {
        multi_tensor_apply<7>(g.entries, BackwardStepFunctor<scalar_t, opmath_t>{next_lr, partials});
      }
    });
  }
  void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>& targets) const {
    pymaml::cuda::finalize_sums(partials, targets, /*take_sqrt=*/false);
  }
  // The gradient of a shared α on the CPU is copied to the CPU: a host sync, which a CUDA graph
  // cannot record. Refused during capture rather than failing inside the copy.
  void check_copy_to_host(const char* op, const char* name, at::Device device) const {
    TORCH_CHECK_VALUE(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, op,
                      ": ", name, " is a shared step size on the CPU, so its gradient would be copied to the CPU, "
                      "which synchronises with the GPU and cannot be captured into a CUDA graph; put ", name,
                      " on ", device);
  }
};

StepResult run_step(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                    at::TensorList next_lrs, double next_lr, bool has_next, const std::optional<at::Tensor>& found_inf) {
  const auto guard = guard_for(v);
  StepLaunch launch;
  return run_backward_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, found_inf, at::kCUDA, launch);
}

StepResult backward_step_cuda(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                              at::TensorList next_lrs, double next_lr, bool has_next) {
  return run_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, std::nullopt);
}

StepResult backward_step_flagged_cuda(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                                      at::TensorList next_lrs, double next_lr, bool has_next,
                                      const at::Tensor& found_inf) {
  return run_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, found_inf);
}

}  // namespace
}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("backward_step", &pymaml::cuda::backward_step_cuda);
  m.impl("backward_step.found_inf", &pymaml::cuda::backward_step_flagged_cuda);
}
