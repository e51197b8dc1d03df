// CUDA kernels of the fused inner update θ' = θ − α ⊙ (g + wd θ): sgd_update, sgd_update_lrs and
// their in-place forms (schemas in csrc/ops.cpp, maths in pymaml/reference.py).
//
// α forms, per tensor (a list may mix them): a float (functor argument), a one-element tensor read
// on the device (the shared `lrs[0]`, or one per tensor), or one value per element. A shared
// one-element α on the CPU is read on the host (no GPU sync). Arithmetic in at::opmath_type<T>;
// per-element α of a dtype other than the parameter's is converted to the opmath type first, as
// the reference does. Outputs are new contiguous tensors; the in-place forms write straight into
// contiguous parameters and through a contiguous copy + copy_ into the others.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {
namespace {

// Slots: 0 θ (T), 1 g (T), 2 per-element α (LT, kElement only), 3 θ' (T; may equal slot 0).
// mode[0]: kArg (α = lr), kDevice (α = *scalar[0]) or kElement.
template <typename T, typename LT>
struct SgdFunctor {
  using O = at::opmath_type<T>;
  double lr;
  double weight_decay;

  __device__ __forceinline__ void operator()(const TensorListMeta<4>& m) const {
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
    });
  }
};

struct LrSpec {
  enum Kind { kFloat, kShared, kList } kind = kFloat;
  double host_value = 0.0;  // kFloat, or a shared one-element lr on the CPU
  bool shared_on_device = false;
};

// Classifies lrs with the shared checks of pymaml/ops.h; reads a shared CPU α on the host.
LrSpec lr_spec(const char* op, at::TensorList params, at::TensorList lrs) {
  LrSpec spec;
  if (check_lrs(op, "lr", lrs, params, /*allow_none=*/false) == LrKind::kPerParam) {
    spec.kind = LrSpec::kList;
    return spec;
  }
  spec.kind = LrSpec::kShared;
  if (lrs[0].device().is_cpu()) {
    spec.host_value = lrs[0].item<double>();  // a CPU read: no GPU sync
  } else {
    spec.shared_on_device = true;  // check_lrs: on params[0]'s device
  }
  return spec;
}

// The shared implementation: out[i] receives the result (out[i] may be params_c[i] for in place).
void sgd_launch(const char* op, const std::vector<at::Tensor>& params_c, const std::vector<at::Tensor>& grads_c,
                const std::vector<at::Tensor>& outs, const LrSpec& spec, double lr, at::TensorList lrs,
                double weight_decay) {
  const size_t n = params_c.size();
  // Per-element α is used as stored when its dtype is the parameter's, else converted to opmath.
  std::vector<at::Tensor> lr_c(n);
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType t = params_c[i].scalar_type();
    at::ScalarType lt = t;
    if (spec.kind == LrSpec::kList && lrs[i].numel() != 1 && params_c[i].numel() > 0) {
      lt = lrs[i].scalar_type() == t ? t : at::toOpMathType(t);
      lr_c[i] = contiguous_as(lrs[i], lt);
    }
    keys[i] = {t, lt};
  }
  for (const auto& group : group_by(keys)) {
    const auto& key = group.first;
    const auto& idx = group.second;
    std::vector<TensorEntry<4>> entries;
    entries.reserve(idx.size());
    for (size_t i : idx) {
      TensorEntry<4> e;
      e.numel = params_c[i].numel();
      if (e.numel == 0) continue;
      e.addr = {address(params_c[i]), address(grads_c[i]), nullptr, address(outs[i])};
      if (spec.kind == LrSpec::kShared) {
        if (spec.shared_on_device) {
          e.mode[0] = kDevice;
          e.scalar[0] = lrs[0].const_data_ptr();
          e.scalar_dtype[0] = static_cast<uint8_t>(lrs[0].scalar_type());
        } else {
          e.mode[0] = kArg;
        }
      } else if (spec.kind == LrSpec::kList) {
        if (lrs[i].numel() == 1) {
          e.mode[0] = kDevice;
          e.scalar[0] = lrs[i].const_data_ptr();
          e.scalar_dtype[0] = static_cast<uint8_t>(lrs[i].scalar_type());
        } else {
          e.mode[0] = kElement;
          e.addr[2] = address(lr_c[i]);
        }
      } else {
        e.mode[0] = kArg;
      }
      entries.push_back(e);
    }
    const double lr_arg = spec.kind == LrSpec::kShared ? spec.host_value : lr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.first, "sgd_update", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        multi_tensor_apply<4>(entries, SgdFunctor<scalar_t, scalar_t>{lr_arg, weight_decay});
      } else if (key.second == key.first) {
        multi_tensor_apply<4>(entries, SgdFunctor<scalar_t, scalar_t>{lr_arg, weight_decay});
      } else {
        multi_tensor_apply<4>(entries, SgdFunctor<scalar_t, opmath_t>{lr_arg, weight_decay});
      }
    });
  }
}

void check_params_grads(const char* op, at::TensorList params, at::TensorList grads) {
  check_pairs(op, {"params", "grads"}, {params, grads});
  if (!params.empty()) cuda_device_of(op, "params", params);
}

std::vector<at::Tensor> sgd_out_of_place(const char* op, at::TensorList params, at::TensorList grads,
                                         const LrSpec& spec, double lr, at::TensorList lrs, double weight_decay) {
  std::vector<at::Tensor> params_c, grads_c, outs;
  params_c.reserve(params.size());
  grads_c.reserve(params.size());
  outs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    params_c.push_back(params[i].contiguous());
    grads_c.push_back(grads[i].contiguous());
    outs.push_back(at::empty(params[i].sizes(), params[i].options()));
  }
  sgd_launch(op, params_c, grads_c, outs, spec, lr, lrs, weight_decay);
  return outs;
}

void sgd_in_place(const char* op, at::TensorList params, at::TensorList grads, const LrSpec& spec, double lr,
                  at::TensorList lrs, double weight_decay) {
  std::vector<at::Tensor> params_c, grads_c;
  params_c.reserve(params.size());
  grads_c.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    params_c.push_back(params[i].contiguous());  // params[i] itself when contiguous: updated in place
    grads_c.push_back(grads[i].contiguous());
  }
  sgd_launch(op, params_c, grads_c, params_c, spec, lr, lrs, weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params_c[i].is_same(params[i])) params[i].copy_(params_c[i]);
  }
}

std::vector<at::Tensor> sgd_update_cuda(at::TensorList params, at::TensorList grads, double lr,
                                        double weight_decay) {
  const char* op = "sgd_update";
  check_params_grads(op, params, grads);
  if (params.empty()) return {};
  const c10::cuda::CUDAGuard guard(params[0].device());
  return sgd_out_of_place(op, params, grads, LrSpec{}, lr, {}, weight_decay);
}

std::vector<at::Tensor> sgd_update_lrs_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                            double weight_decay) {
  const char* op = "sgd_update_lrs";
  check_params_grads(op, params, grads);
  if (params.empty()) return {};
  const c10::cuda::CUDAGuard guard(params[0].device());
  const LrSpec spec = lr_spec(op, params, lrs);
  return sgd_out_of_place(op, params, grads, spec, 0.0, lrs, weight_decay);
}

void sgd_update__cuda(at::TensorList params, at::TensorList grads, double lr, double weight_decay) {
  const char* op = "sgd_update_";
  check_params_grads(op, params, grads);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  sgd_in_place(op, params, grads, LrSpec{}, lr, {}, weight_decay);
}

void sgd_update_lrs__cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs, double weight_decay) {
  const char* op = "sgd_update_lrs_";
  check_params_grads(op, params, grads);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const LrSpec spec = lr_spec(op, params, lrs);
  sgd_in_place(op, params, grads, spec, 0.0, lrs, weight_decay);
}

}  // namespace
}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("sgd_update", &pymaml::cuda::sgd_update_cuda);
  m.impl("sgd_update_lrs", &pymaml::cuda::sgd_update_lrs_cuda);
  m.impl("sgd_update_", &pymaml::cuda::sgd_update__cuda);
  m.impl("sgd_update_lrs_", &pymaml::cuda::sgd_update_lrs__cuda);
}
