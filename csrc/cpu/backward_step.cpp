// CPU kernel of one step of the adjoint recursion of the exact meta-gradient, in one pass:
//   v_out = v − hvp,  lr_grad = −g ⊙ v (reduced to the form of α),  u_next = α_next ⊙ v_out.
// Contract: csrc/include/pymaml/ops.h.
#include <pymaml/cpu_foreach.h>
#include <pymaml/ops.h>
#include <torch/library.h>

#include <tuple>

namespace pymaml {
namespace cpu {
namespace {

struct StepItem {
  at::ScalarType dtype;
  const void* v;
  const void* h;
  const void* g;
  void* v_out;
  void* u_next;          // nullptr: no u_next
  const void* next_lr;   // per-element α_next, or nullptr (then next_alpha)
  at::ScalarType next_dtype;
  double next_alpha;
  void* lr_grad;         // per-element −g ⊙ v, or nullptr
  at::ScalarType grad_dtype;
  bool reduce;           // accumulate Σ −g ⊙ v into the segment's partial
  float* flag;           // found_inf entry for this tensor, or nullptr
};

// Returns the segment's partial Σ −g ⊙ v (when it.reduce). With kCheck, sets *bad when some v_out,
// −g ⊙ v or u_next (in opmath, before rounding) is NaN or ±Inf.
template <typename T, typename NT, typename GT, bool kCheck>
double step_segment(const StepItem& it, int64_t lo, int64_t hi, bool* bad) {
  using opm = at::opmath_type<T>;
  using V = Vectorized<opm>;
  constexpr bool kStaged = !std::is_same_v<T, opm>;
  constexpr int64_t B = stage_block<opm, T>();
  constexpr int64_t S = kStaged ? kStage : 1;
  opm bv[S], bh[S], bg[S], bvo[S], bu[S];
  opm bn[std::is_same_v<NT, opm> ? 1 : kStage], bl[std::is_same_v<GT, opm> ? 1 : kStage];
  const T* v = static_cast<const T*>(it.v) + lo;
  const T* h = static_cast<const T*>(it.h) + lo;
  const T* g = static_cast<const T*>(it.g) + lo;
  T* vo = static_cast<T*>(it.v_out) + lo;
  T* u = it.u_next ? static_cast<T*>(it.u_next) + lo : nullptr;
  const NT* na = it.next_lr ? static_cast<const NT*>(it.next_lr) + lo : nullptr;
  GT* lg = it.lr_grad ? static_cast<GT*>(it.lr_grad) + lo : nullptr;
  const V a_s(static_cast<opm>(it.next_alpha));
  V acc(opm(0)), nf(opm(0));
  const int64_t n = hi - lo;
  for (int64_t b = 0; b < n; b += B) {
    const int64_t m = std::min(B, n - b);
    const opm* Vv = stage_in<opm>(v + b, bv, m);
    const opm* H = stage_in<opm>(h + b, bh, m);
    opm* VO = stage_out<opm>(vo + b, bvo);
    const opm* G = (lg || it.reduce) ? stage_in<opm>(g + b, bg, m) : nullptr;
    opm* U = u ? stage_out<opm>(u + b, bu) : nullptr;
    const opm* NA = na ? stage_in<opm>(na + b, bn, m) : nullptr;
    opm* LG = lg ? stage_out<opm>(lg + b, bl) : nullptr;
    if (LG && U && NA && !it.reduce) {
      // Per-element α and α_next (Meta-SGD), the common case: one branch-free loop.
      vec_loop<opm>(m, [&](int64_t i, int64_t c) {
        const V x = V::loadu(Vv + i, c);
        const V y = x - V::loadu(H + i, c);
        y.store(VO + i, c);
        const V d = V(opm(0)) - V::loadu(G + i, c) * x, un = V::loadu(NA + i, c) * y;
        d.store(LG + i, c);
        un.store(U + i, c);
        if constexpr (kCheck) nf = nf + (nonfinite_probe(y) + nonfinite_probe(d) + nonfinite_probe(un));
      });
    } else vec_loop<opm>(m, [&](int64_t i, int64_t c) {
      const V x = V::loadu(Vv + i, c);
      const V y = x - V::loadu(H + i, c);
      y.store(VO + i, c);
      if constexpr (kCheck) nf = nf + nonfinite_probe(y);
      if (G) {
        const V gv = V::loadu(G + i, c) * x;
        if (LG) (V(opm(0)) - gv).store(LG + i, c);
        if (it.reduce) acc = acc + gv;  // loadu zero-fills a partial tail
        if constexpr (kCheck) nf = nf + nonfinite_probe(gv);
      }
      if (U) {
        const V un = NA ? V::loadu(NA + i, c) * y : a_s * y;
        un.store(U + i, c);
        if constexpr (kCheck) nf = nf + nonfinite_probe(un);
      }
    });
    stage_store(vo + b, VO, m);
    if (U) stage_store(u + b, U, m);
    if (LG) stage_store(lg + b, LG, m);
  }
  if constexpr (kCheck) *bad = any_nonfinite(nf);
  if (!it.reduce) return 0.0;
  opm lanes[V::size()];
  acc.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(lanes[i]);
  return -s;
}

// α_next for parameter i: per element (returns the tensor) or one number (sets *alpha).
at::Tensor next_alpha(const LrSpec& spec, at::TensorList next_lrs, size_t i, double next_lr, const at::Tensor& ref,
                      double* alpha) {
  *alpha = spec.form == LrForm::kNone ? next_lr : spec.host_value;
  if (spec.form != LrForm::kPerParam) return at::Tensor();
  if (!spec.per_element(next_lrs, i)) {
    *alpha = read_scalar(next_lrs[i]);
    return at::Tensor();
  }
  return opmath_or_same(next_lrs[i], ref);
}

using StepOut = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

StepOut run_step(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                 at::TensorList next_lrs, double next_lr, bool has_next, const std::optional<at::Tensor>& found_inf) {
  const char* op = "backward_step";
  check_pairs(op, {"v", "hvp", "grads"}, {v, hvp, grads});
  check_cpu(op, "v", v);
  const FlagSpec flag = check_found_inf(op, "v", found_inf, v);
  const LrSpec spec = classify_lrs(op, "lr", lrs, v, /*allow_none=*/true);
  const LrSpec nspec = has_next ? classify_lrs(op, "next_lr", next_lrs, v, /*allow_none=*/true) : LrSpec{};
  for (auto [sp, list, name] : {std::make_tuple(spec, lrs, "lr"), std::make_tuple(nspec, next_lrs, "next_lr")}) {
    TORCH_CHECK_VALUE(!sp.shared_on_device(), op, ": ", name, " is on ", list[0].device(), " but v is on the CPU");
  }
  const LrForm kind = spec.form;
  const size_t n = v.size();
  std::vector<StepItem> items(n);
  std::vector<int64_t> numels(n);
  std::vector<at::Tensor> keep, v_out, lr_grad, u_next;
  std::vector<std::pair<size_t, at::Tensor>> grad_casts;  // per-element grads computed in opmath
  v_out.reserve(n);
  if (has_next) u_next.reserve(n);
  if (kind == LrForm::kPerParam) lr_grad.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    StepItem& it = items[i];
    it.dtype = v[i].scalar_type();
    numels[i] = v[i].numel();
    at::Tensor vc = dense_ref(v[i]), hc = as_layout(hvp[i], vc), gc = as_layout(grads[i], vc);
    it.v = vc.const_data_ptr();
    it.h = hc.const_data_ptr();
    it.g = gc.const_data_ptr();
    v_out.push_back(new_cpu_like(vc));
    it.v_out = v_out.back().mutable_data_ptr();
    it.u_next = nullptr;
    it.next_lr = nullptr;
    it.next_dtype = it.dtype;
    it.next_alpha = 0;
    if (has_next) {
      u_next.push_back(new_cpu_like(vc));
      it.u_next = u_next.back().mutable_data_ptr();
      at::Tensor na = next_alpha(nspec, next_lrs, i, next_lr, vc, &it.next_alpha);
      if (na.defined()) {
        it.next_lr = na.const_data_ptr();
        it.next_dtype = na.scalar_type();
        keep.push_back(std::move(na));
      }
    }
    it.flag = flag.at(i);
    it.lr_grad = nullptr;
    it.grad_dtype = it.dtype;
    it.reduce = kind == LrForm::kShared || (kind == LrForm::kPerParam && !spec.per_element(lrs, i));
    if (kind == LrForm::kPerParam && !it.reduce) {
      const at::Tensor& a = lrs[i];
      const auto want = a.scalar_type();
      const bool direct = want == it.dtype || want == opmath_dtype(it.dtype);
      at::Tensor lg = new_cpu_like(vc, direct ? want : opmath_dtype(it.dtype));
      it.lr_grad = lg.mutable_data_ptr();
      it.grad_dtype = lg.scalar_type();
      if (!direct) grad_casts.emplace_back(i, lg);
      lr_grad.push_back(std::move(lg));
    } else if (kind == LrForm::kPerParam) {
      lr_grad.push_back(new_cpu(lrs[i].sizes(), lrs[i].scalar_type()));
    }
    keep.push_back(std::move(vc));
    keep.push_back(std::move(hc));
    keep.push_back(std::move(gc));
  }
  FlatPlan plan(numels);
  std::vector<double> partial(plan.num_segments(), 0.0);
  plan.run([&](const Segment& s, int64_t si) {
    const StepItem& it = items[s.tensor];
    dispatch_t_lt(it.dtype, it.next_dtype, [&](auto* t_tag, auto* n_tag) {
      using T = std::remove_pointer_t<decltype(t_tag)>;
      using NT = std::remove_pointer_t<decltype(n_tag)>;
      dispatch_t_lt(it.dtype, it.grad_dtype, [&](auto*, auto* g_tag) {
        using GT = std::remove_pointer_t<decltype(g_tag)>;
        bool bad = false;
        partial[si] = it.flag != nullptr ? step_segment<T, NT, GT, true>(it, s.lo, s.hi, &bad)
                                         : step_segment<T, NT, GT, false>(it, s.lo, s.hi, &bad);
        if (bad) raise_flag(it.flag);
      });
    });
  });
  if (kind == LrForm::kShared) {
    double total = 0;
    for (double x : partial) total += x;
    lr_grad.push_back(new_cpu(lrs[0].sizes(), lrs[0].scalar_type()));
    write_scalar(lr_grad.back(), total);
  } else if (kind == LrForm::kPerParam) {
    const std::vector<double> sums = sum_by_tensor(plan, partial, n);
    for (size_t i = 0; i < n; ++i) {
      if (items[i].reduce) write_scalar(lr_grad[i], sums[i]);
    }
    for (auto& [i, lg] : grad_casts) lr_grad[i] = lg.to(lrs[i].scalar_type());
  }
  return {std::move(v_out), std::move(lr_grad), std::move(u_next)};
}

StepOut backward_step(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                      at::TensorList next_lrs, double next_lr, bool has_next) {
  return run_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, std::nullopt);
}

StepOut backward_step_flagged(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                              at::TensorList next_lrs, double next_lr, bool has_next, const at::Tensor& found_inf) {
  return run_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, found_inf);
}

}  // namespace
}  // namespace cpu
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("backward_step", &pymaml::cpu::backward_step);
  m.impl("backward_step.found_inf", &pymaml::cpu::backward_step_flagged);
}
