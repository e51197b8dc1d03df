// CUDA kernels of the fused inner update θ' = θ − α ⊙ (g + wd θ): sgd_update, sgd_update_lrs and
// their in-place forms (schemas in csrc/ops.cpp, maths in pymaml/reference.py).
//
// α forms, per tensor (a list may mix them; pymaml/ops.h: LrSpec): a float (functor argument), a
// one-element tensor read on the device (the shared `lrs[0]`, or one per tensor), or one value per
// element. A shared one-element α on the CPU is read on the host (no GPU sync). Arithmetic in
// at::opmath_type<T>; per-element α of a dtype other than the parameter's is converted to the
// opmath type first, as the reference does. Outputs are new contiguous tensors; the in-place forms
// write straight into contiguous parameters and through a contiguous copy + copy_ into the others.
// The host side (checks, operand preparation, write-back) is device_plan.h's run_sgd_update.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {
namespace {

// Slots: 0 θ (T), 1 g (T), 2 per-element α (LT, kElement only), 3 θ' (T; may equal slot 0).
// mode[0]: kArg (α = lr), kDevice (α = *scalar[0]) or kElement. flag: found_inf, set when a θ' (in
// opmath, before rounding) is NaN or ±Inf.
template <typename T, typename LT>
struct SgdFunctor {
  using O = at::opmath_type<T>;
  double lr;
  double weight_decay;

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    const T* p = slot_ptr<T>(m, 0, c);
    const T* g = slot_ptr<T>(m, 1, c);
    const LT* a = slot_ptr<LT>(m, 2, c);
    T* out = slot_ptr<T>(m, 3, c);
    const uint8_t mode = m.mode[0][c.t];
    const bool elem = mode == kElement;
    const O lr_s = mode == kDevice ? load_scalar<O>(m.scalar[0][c.t], m.scalar_dtype[0][c.t]) : static_cast<O>(lr);
    const O wd = static_cast<O>(weight_decay);
    const bool has_wd = weight_decay != 0.0;
    const bool vec = is_aligned(p) && is_aligned(g) && is_aligned(out) && (!elem || is_aligned(a));
    float* const flag = m.flag[c.t];
    bool bad = false;
    const int64_t n = c.n;
    walk_chunk(n, vec, [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O rp[kILP], rg[kILP], ra[kILP];
      load<kVec>(rp, p, i0, stride, n);
      load<kVec>(rg, g, i0, stride, n);
      if (elem) {
        load<kVec>(ra, a, i0, stride, n);
      } else {
#pragma unroll
        for (int k = 0; k < kILP; ++k) ra[k] = lr_s;
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const O d = has_wd ? add_rn(rg[k], mul_rn(wd, rp[k])) : rg[k];
        rp[k] = sub_rn(rp[k], mul_rn(ra[k], d));
      }
      store<kVec>(out, rp, i0, stride, n);
      if (flag != nullptr) bad |= any_nonfinite<kVec>(rp, i0, stride, n);
    });
    raise_flag(flag, bad);
  }
};

// Launches one dtype group of an update plan (device_plan.h: plan_sgd_update).
struct SgdLaunch {
  void sgd(const UpdateGroup& g, double lr, double weight_decay) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "sgd_update", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        multi_tensor_apply<4>(g.entries, SgdFunctor<scalar_t, scalar_t>{lr, weight_decay});
      } else if (g.lr_dtype == g.dtype) {
        multi_tensor_apply<4>(g.entries, SgdFunctor<scalar_t, scalar_t>{lr, weight_decay});
      } else {
        multi_tensor_apply<4>(g.entries, SgdFunctor<scalar_t, opmath_t>{lr, weight_decay});
      }
    });
  }
};

std::vector<at::Tensor> run(const char* op, at::TensorList params, at::TensorList grads, const double* lr,
                            at::TensorList lrs, double weight_decay, bool inplace,
                            const std::optional<at::Tensor>& found_inf = std::nullopt) {
  const auto guard = guard_for(params);
  SgdLaunch launch;
  return run_sgd_update(op, params, grads, lr, lrs, weight_decay, inplace, found_inf, at::kCUDA, launch);
}

std::vector<at::Tensor> sgd_update_cuda(at::TensorList params, at::TensorList grads, double lr,
                                        double weight_decay) {
  return run("sgd_update", params, grads, &lr, {}, weight_decay, false);
}

std::vector<at::Tensor> sgd_update_lrs_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                            double weight_decay) {
  return run("sgd_update_lrs", params, grads, nullptr, lrs, weight_decay, false);
}

std::vector<at::Tensor> sgd_update_flagged_cuda(at::TensorList params, at::TensorList grads, double lr,
                                                double weight_decay, const at::Tensor& found_inf) {
  return run("sgd_update", params, grads, &lr, {}, weight_decay, false, found_inf);
}

std::vector<at::Tensor> sgd_update_lrs_flagged_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                                    double weight_decay, const at::Tensor& found_inf) {
  return run("sgd_update_lrs", params, grads, nullptr, lrs, weight_decay, false, found_inf);
}

void sgd_update__cuda(at::TensorList params, at::TensorList grads, double lr, double weight_decay,
                      const std::optional<at::Tensor>& found_inf) {
  run("sgd_update_", params, grads, &lr, {}, weight_decay, true, found_inf);
}

void sgd_update_lrs__cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs, double weight_decay,
                          const std::optional<at::Tensor>& found_inf) {
  run("sgd_update_lrs_", params, grads, nullptr, lrs, weight_decay, true, found_inf);
}

}  // namespace
}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("sgd_update", &pymaml::cuda::sgd_update_cuda);
  m.impl("sgd_update_lrs", &pymaml::cuda::sgd_update_lrs_cuda);
  m.impl("sgd_update_", &pymaml::cuda::sgd_update__cuda);
  m.impl("sgd_update_lrs_", &pymaml::cuda::sgd_update_lrs__cuda);
  m.impl("sgd_update.found_inf", &pymaml::cuda::sgd_update_flagged_cuda);
  m.impl("sgd_update_lrs.found_inf", &pymaml::cuda::sgd_update_lrs_flagged_cuda);
}
