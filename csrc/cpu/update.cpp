// CPU kernels of the fused inner update θ' = θ − α ⊙ (g + wd·θ) over a list of tensors:
// sgd_update / sgd_update_lrs (out of place) and sgd_update_ / sgd_update_lrs_ (in place).
// Contract: csrc/include/pymaml/ops.h.
#include <pymaml/cpu_foreach.h>
#include <pymaml/ops.h>
#include <torch/library.h>

namespace pymaml {
namespace cpu {
namespace {

struct UpdateItem {
  at::ScalarType dtype;
  const void* p;
  const void* g;
  void* out;            // may equal p (in place)
  const void* lr;       // per-element α, or nullptr
  at::ScalarType lr_dtype;
  double alpha;         // scalar α when lr == nullptr
  float* flag;          // found_inf entry for this tensor, or nullptr
};

// Returns whether some θ' (in opmath, before rounding) is NaN or ±Inf; checked only with kCheck.
template <typename T, typename LT, bool kDecay, bool kCheck>
bool update_segment(const UpdateItem& it, int64_t lo, int64_t hi, double wd_) {
  using opm = at::opmath_type<T>;
  using V = Vectorized<opm>;
  constexpr bool kStaged = !std::is_same_v<T, opm>;
  constexpr int64_t B = stage_block<opm, T>();
  opm bp[kStaged ? kStage : 1], bg[kStaged ? kStage : 1], bo[kStaged ? kStage : 1];
  opm ba[std::is_same_v<LT, opm> ? 1 : kStage];
  const T* p = static_cast<const T*>(it.p) + lo;
  const T* g = static_cast<const T*>(it.g) + lo;
  T* out = static_cast<T*>(it.out) + lo;
  const LT* lr = it.lr ? static_cast<const LT*>(it.lr) + lo : nullptr;
  const V wd(static_cast<opm>(wd_));
  const V a_s(static_cast<opm>(it.alpha));
  V nf(opm(0));
  const int64_t n = hi - lo;
  for (int64_t b = 0; b < n; b += B) {
    const int64_t m = std::min(B, n - b);
    const opm* P = stage_in<opm>(p + b, bp, m);
    const opm* G = stage_in<opm>(g + b, bg, m);
    opm* O = stage_out<opm>(out + b, bo);
    if (lr) {
      const opm* A = stage_in<opm>(lr + b, ba, m);
      vec_loop<opm>(m, [&](int64_t i, int64_t c) {
        V pv = V::loadu(P + i, c), gv = V::loadu(G + i, c), av = V::loadu(A + i, c);
        if constexpr (kDecay) gv = gv + wd * pv;
        const V o = pv - av * gv;
        o.store(O + i, c);
        if constexpr (kCheck) nf = nf + nonfinite_probe(o);
      });
    } else {
      vec_loop<opm>(m, [&](int64_t i, int64_t c) {
        V pv = V::loadu(P + i, c), gv = V::loadu(G + i, c);
        if constexpr (kDecay) gv = gv + wd * pv;
        const V o = pv - a_s * gv;
        o.store(O + i, c);
        if constexpr (kCheck) nf = nf + nonfinite_probe(o);
      });
    }
    stage_store(out + b, O, m);
  }
  return kCheck && any_nonfinite(nf);
}

// Shared body. `outs` receives the targets (new tensors laid out like the params, or the params
// for in place; a param that is not dense is updated through a dense clone that is written back).
void run_update(const char* op, at::TensorList params, at::TensorList grads, const double* lr,
                at::TensorList lrs, double wd, bool inplace, const std::optional<at::Tensor>& found_inf,
                std::vector<at::Tensor>* outs) {
  check_pairs(op, {"params", "grads"}, {params, grads});
  check_cpu(op, "params", params);
  const FlagSpec flag = check_found_inf(op, "params", found_inf, params);
  const LrSpec spec = lr ? LrSpec{} : classify_lrs(op, "lr", lrs, params, /*allow_none=*/false);
  TORCH_CHECK_VALUE(spec.form != LrForm::kShared || spec.on_host, op, ": lr is on ", lrs[0].device(),
                    " but params are on the CPU");
  const size_t n = params.size();
  const double shared = lr ? *lr : spec.host_value;
  std::vector<UpdateItem> items(n);
  std::vector<at::Tensor> keep;  // copies that must outlive the kernel
  std::vector<int64_t> numels(n);
  std::vector<std::pair<size_t, at::Tensor>> writeback;
  outs->reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    UpdateItem& it = items[i];
    it.dtype = p.scalar_type();
    numels[i] = p.numel();
    at::Tensor pc = dense_ref(p), gc = as_layout(grads[i], pc);
    at::Tensor out;
    if (inplace) {
      out = pc;
      if (!pc.is_same(p)) writeback.emplace_back(i, pc);
    } else {
      out = new_cpu_like(pc);
    }
    it.p = pc.const_data_ptr();
    it.g = gc.const_data_ptr();
    it.out = out.mutable_data_ptr();
    it.lr = nullptr;
    it.alpha = shared;
    it.flag = flag.at(i);
    if (spec.form == LrForm::kPerParam) {
      const at::Tensor& a = lrs[i];
      if (!spec.per_element(lrs, i)) {
        it.alpha = read_scalar(a);
      } else {
        at::Tensor ac = opmath_or_same(a, pc);
        it.lr = ac.const_data_ptr();
        it.lr_dtype = ac.scalar_type();
        if (!ac.is_same(a)) keep.push_back(std::move(ac));
      }
    }
    if (!pc.is_same(p)) keep.push_back(pc);
    if (!gc.is_same(grads[i])) keep.push_back(std::move(gc));
    outs->push_back(std::move(out));
  }
  FlatPlan plan(numels);
  plan.run([&](const Segment& s, int64_t) {
    const UpdateItem& it = items[s.tensor];
    const auto lt = it.lr ? it.lr_dtype : it.dtype;
    dispatch_t_lt(it.dtype, lt, [&](auto* t_tag, auto* lt_tag) {
      using T = std::remove_pointer_t<decltype(t_tag)>;
      using LT = std::remove_pointer_t<decltype(lt_tag)>;
      bool bad;
      if (it.flag != nullptr) {
        bad = wd != 0.0 ? update_segment<T, LT, true, true>(it, s.lo, s.hi, wd)
                        : update_segment<T, LT, false, true>(it, s.lo, s.hi, wd);
      } else {
        bad = wd != 0.0 ? update_segment<T, LT, true, false>(it, s.lo, s.hi, wd)
                        : update_segment<T, LT, false, false>(it, s.lo, s.hi, wd);
      }
      if (bad) raise_flag(it.flag);
    });
  });
  for (auto& [i, pc] : writeback) params[i].copy_(pc);
}

std::vector<at::Tensor> sgd_update(at::TensorList params, at::TensorList grads, double lr, double wd) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update", params, grads, &lr, {}, wd, false, std::nullopt, &outs);
  return outs;
}

std::vector<at::Tensor> sgd_update_flagged(at::TensorList params, at::TensorList grads, double lr, double wd,
                                           const at::Tensor& found_inf) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update", params, grads, &lr, {}, wd, false, found_inf, &outs);
  return outs;
}

std::vector<at::Tensor> sgd_update_lrs(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                       double wd) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update_lrs", params, grads, nullptr, lrs, wd, false, std::nullopt, &outs);
  return outs;
}

std::vector<at::Tensor> sgd_update_lrs_flagged(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                               double wd, const at::Tensor& found_inf) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update_lrs", params, grads, nullptr, lrs, wd, false, found_inf, &outs);
  return outs;
}

void sgd_update_(at::TensorList params, at::TensorList grads, double lr, double wd,
                 const std::optional<at::Tensor>& found_inf) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update_", params, grads, &lr, {}, wd, true, found_inf, &outs);
}

void sgd_update_lrs_(at::TensorList params, at::TensorList grads, at::TensorList lrs, double wd,
                     const std::optional<at::Tensor>& found_inf) {
  std::vector<at::Tensor> outs;
  run_update("sgd_update_lrs_", params, grads, nullptr, lrs, wd, true, found_inf, &outs);
}

}  // namespace
}  // namespace cpu
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("sgd_update", &pymaml::cpu::sgd_update);
  m.impl("sgd_update_lrs", &pymaml::cpu::sgd_update_lrs);
  m.impl("sgd_update_", &pymaml::cpu::sgd_update_);
  m.impl("sgd_update_lrs_", &pymaml::cpu::sgd_update_lrs_);
  m.impl("sgd_update.found_inf", &pymaml::cpu::sgd_update_flagged);
  m.impl("sgd_update_lrs.found_inf", &pymaml::cpu::sgd_update_lrs_flagged);
}
