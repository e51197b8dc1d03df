// CUDA kernel of one step of the adjoint recursion (schema in csrc/ops.cpp, maths in
// pymaml/reference.py backward_step):
//   v_out   = v − hvp
//   lr_grad = −g ⊙ v, reduced to the form of `lrs` (none / shared sum / per-tensor sum / per element)
//   u_next  = α_next ⊙ v_out  (α_next: next_lrs when given, else the float next_lr; none at step 0)
// in one pass over v, hvp and g. Sums are deterministic: each block writes the partial sum of its
// chunk (accumulated in opmath: float, double for double) to a float64 buffer, and a second small
// kernel adds each tensor's partials (or all of them for a shared α) in a fixed order. A shared α on
// the CPU gets its gradient on the CPU (one device-to-host copy, as the reference does).
#include <torch/library.h>

#include <algorithm>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {
namespace {

// Slots: 0 v, 1 hvp, 2 g (T; g unused when mode[0] is kNone), 3 per-element α_next (LT),
// 4 v_out (T), 5 per-element lr_grad (LT), 6 u_next (T).
// mode[0] (lr_grad): kNone, kReduce (partials[partial_base + chunk]) or kElement (slot 5).
// mode[1] (α_next): kNone (no u_next), kArg (next_lr), kDevice (*scalar[1]) or kElement (slot 3).
template <typename T, typename LT>
struct BackwardStepFunctor {
  using O = at::opmath_type<T>;
  double next_lr;
  double* partials;

  __device__ __forceinline__ void operator()(const TensorListMeta<7>& m) const {
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
      if (lr_mode != kNone) {
        O rg[kILP];
        load<kVec>(rg, g, i0, stride, n);
#pragma unroll
        for (int k = 0; k < kILP; ++k) rg[k] = -mul_rn(rg[k], rv[k]);
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
      }
    });
    if (lr_mode == kReduce) {  // uniform over the block, so every thread reaches block_sum
      const O s = block_sum(acc);
      if (threadIdx.x == 0) partials[m.partial_base[c.t] + c.chunk] = static_cast<double>(s);
    }
  }
};

// How a list of step sizes applies to the N tensors (see the contract in pymaml/ops.h).
struct LrForm {
  enum Kind { kAbsent, kShared, kList } kind = kAbsent;
  bool shared_on_device = false;
  double host_value = 0.0;  // a shared one-element α on the CPU, read on the host
};

LrForm classify(const char* op, const char* name, at::TensorList lrs, at::TensorList v, bool read_cpu_value) {
  LrForm f;
  switch (check_lrs(op, name, lrs, v, /*allow_none=*/true)) {
    case LrKind::kNone:
      return f;
    case LrKind::kPerParam:
      f.kind = LrForm::kList;  // check_lrs: each entry on its tensor's device
      return f;
    case LrKind::kShared:
      f.kind = LrForm::kShared;
      if (!lrs[0].device().is_cpu()) {
        f.shared_on_device = true;  // check_lrs: on v[0]'s device
      } else if (read_cpu_value) {
        f.host_value = lrs[0].item<double>();  // a CPU read: no GPU sync
      }
      return f;
  }
  return f;
}

bool per_element(const LrForm& f, at::TensorList lrs, size_t i) {
  return f.kind == LrForm::kList && lrs[i].numel() != 1;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> backward_step_cuda(
    at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs, at::TensorList next_lrs,
    double next_lr, bool has_next) {
  const char* op = "backward_step";
  check_pairs(op, {"v", "hvp", "grads"}, {v, hvp, grads});
  const size_t n = v.size();
  const bool make_next = has_next;
  if (n == 0) {
    // Nothing to walk; a shared α still gets its (zero) gradient.
    const LrForm lr_form = classify(op, "lr", lrs, v, false);
    if (has_next) classify(op, "next_lr", next_lrs, v, false);
    std::vector<at::Tensor> lr_grad;
    if (lr_form.kind == LrForm::kShared) lr_grad.push_back(at::zeros(lrs[0].sizes(), lrs[0].options()));
    return {std::vector<at::Tensor>{}, lr_grad, std::vector<at::Tensor>{}};
  }
  const at::Device device = cuda_device_of(op, "v", v);
  const c10::cuda::CUDAGuard guard(device);
  const LrForm lr_form = classify(op, "lr", lrs, v, /*read_cpu_value=*/false);
  // next_lrs matter only when there is a next step (u_next is [] otherwise).
  const LrForm next_form = has_next ? classify(op, "next_lr", next_lrs, v, /*read_cpu_value=*/true) : LrForm{};

  std::vector<at::Tensor> v_c(n), h_c(n), g_c(n), na_c(n), v_out(n), lg_buf(n), u_out;
  std::vector<at::Tensor> lr_grad;
  if (make_next) u_out.resize(n);
  // Per-element α_next / lr_grad are handled in the parameter's dtype when theirs matches, else in
  // its opmath type (the reference converts α to opmath and lr_grad from opmath).
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys(n);
  std::vector<int64_t> partial_base(n, 0);
  int64_t total_chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType t = v[i].scalar_type();
    const bool lg_elem = per_element(lr_form, lrs, i);
    const bool na_elem = per_element(next_form, next_lrs, i);
    at::ScalarType lt = t;
    if ((lg_elem && lrs[i].scalar_type() != t) || (na_elem && next_lrs[i].scalar_type() != t)) {
      lt = at::toOpMathType(t);
    }
    keys[i] = {t, lt};
    v_c[i] = v[i].contiguous();
    h_c[i] = hvp[i].contiguous();
    if (lr_form.kind != LrForm::kAbsent) g_c[i] = grads[i].contiguous();
    if (na_elem) na_c[i] = contiguous_as(next_lrs[i], lt);
    v_out[i] = at::empty(v[i].sizes(), v[i].options());
    if (lg_elem) lg_buf[i] = at::empty(v[i].sizes(), v[i].options().dtype(lt));
    if (make_next) u_out[i] = at::empty(v[i].sizes(), v[i].options());
    partial_base[i] = total_chunks;
    total_chunks += num_chunks(v[i].numel());
  }
  const bool any_reduce =
      lr_form.kind == LrForm::kShared ||
      (lr_form.kind == LrForm::kList && std::any_of(lrs.begin(), lrs.end(), [](const at::Tensor& a) {
         return a.numel() == 1;
       }));
  at::Tensor partials;
  if (any_reduce) partials = at::empty({total_chunks}, v[0].options().dtype(at::kDouble));
  TORCH_CHECK(total_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many chunks: ", total_chunks);

  for (const auto& group : group_by(keys)) {
    const auto& key = group.first;
    std::vector<TensorEntry<7>> entries;
    entries.reserve(group.second.size());
    for (size_t i : group.second) {
      TensorEntry<7> e;
      e.numel = v[i].numel();
      if (e.numel == 0) continue;
      e.addr[0] = address(v_c[i]);
      e.addr[1] = address(h_c[i]);
      e.addr[4] = address(v_out[i]);
      if (lr_form.kind != LrForm::kAbsent) {
        e.addr[2] = address(g_c[i]);
        if (per_element(lr_form, lrs, i)) {
          e.mode[0] = kElement;
          e.addr[5] = address(lg_buf[i]);
        } else {
          e.mode[0] = kReduce;
          e.partial_base = static_cast<int32_t>(partial_base[i]);
        }
      }
      if (make_next) {
        e.addr[6] = address(u_out[i]);
        if (next_form.kind == LrForm::kAbsent || (next_form.kind == LrForm::kShared && !next_form.shared_on_device)) {
          e.mode[1] = kArg;
        } else if (per_element(next_form, next_lrs, i)) {
          e.mode[1] = kElement;
          e.addr[3] = address(na_c[i]);
        } else {
          const at::Tensor& a = next_form.kind == LrForm::kShared ? next_lrs[0] : next_lrs[i];
          e.mode[1] = kDevice;
          e.scalar[1] = a.const_data_ptr();
          e.scalar_dtype[1] = static_cast<uint8_t>(a.scalar_type());
        }
      }
      entries.push_back(e);
    }
    const double next_arg = next_form.kind == LrForm::kShared ? next_form.host_value : next_lr;
    double* partials_ptr = any_reduce ? partials.data_ptr<double>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.first, "backward_step", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        multi_tensor_apply<7>(entries, BackwardStepFunctor<scalar_t, scalar_t>{next_arg, partials_ptr});
      } else if (key.second == key.first) {
        multi_tensor_apply<7>(entries, BackwardStepFunctor<scalar_t, scalar_t>{next_arg, partials_ptr});
      } else {
        multi_tensor_apply<7>(entries, BackwardStepFunctor<scalar_t, opmath_t>{next_arg, partials_ptr});
      }
    });
  }

  if (lr_form.kind == LrForm::kShared) {
    const at::Tensor& a = lrs[0];
    at::Tensor out = at::empty(a.sizes(), a.options().device(device));
    finalize_sums(partials, {SumTarget{out.data_ptr(), out.scalar_type(), 0, total_chunks}}, false);
    lr_grad.push_back(a.device() == device ? out : out.to(a.device()));
  } else if (lr_form.kind == LrForm::kList) {
    std::vector<SumTarget> targets;
    for (size_t i = 0; i < n; ++i) {
      if (per_element(lr_form, lrs, i)) {
        lr_grad.push_back(lg_buf[i].scalar_type() == lrs[i].scalar_type() ? lg_buf[i]
                                                                          : lg_buf[i].to(lrs[i].scalar_type()));
      } else {
        at::Tensor out = at::empty(lrs[i].sizes(), lrs[i].options());
        targets.push_back(SumTarget{out.data_ptr(), out.scalar_type(), partial_base[i], num_chunks(v[i].numel())});
        lr_grad.push_back(out);
      }
    }
    if (!targets.empty()) finalize_sums(partials, targets, false);
  }
  return {v_out, lr_grad, u_out};
}

}  // namespace
}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("backward_step", &pymaml::cuda::backward_step_cuda);
}
