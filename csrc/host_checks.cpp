// Test-only ops (namespace pymaml_testing) that run the host side of the CUDA kernels on CPU
// tensors, so that tests/test_host_prep.py checks it on machines without a GPU: the step-size
// classification, the operand preparation of run_sgd_update / run_backward_step with each kernel
// replaced by a plain loop that reads the same table entries, the kernel-argument tables and the
// rule that picks their size. Not part of the public API.
#include <ATen/OpMathType.h>
#include <pymaml/device_plan.h>
#include <pymaml/ops.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pymaml::device {
namespace {

double load_host(const void* p, uint8_t dtype) {
  switch (static_cast<at::ScalarType>(dtype)) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kHalf: return static_cast<float>(*static_cast<const at::Half*>(p));
    case at::kBFloat16: return static_cast<float>(*static_cast<const at::BFloat16*>(p));
    default: return *static_cast<const float*>(p);
  }
}

void store_host(void* p, at::ScalarType dtype, double x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pymaml_store_host",
                                  [&] { *static_cast<scalar_t*>(p) = static_cast<scalar_t>(x); });
}

// Calls f(T*, LT*) for a group's element dtype and its companion dtype (T or opmath(T)).
template <typename F>
void dispatch_group(at::ScalarType t, at::ScalarType lt, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "pymaml_host_group", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (lt == t) {
      f(static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
    } else {
      TORCH_INTERNAL_ASSERT(lt == c10::CppTypeToScalarType<opmath_t>::value);
      f(static_cast<scalar_t*>(nullptr), static_cast<opmath_t*>(nullptr));
    }
  });
}

// The kernels of csrc/cuda/update.cu and backward_step.cu as host loops over the same entries, in
// the same opmath arithmetic and the same per-chunk partial sums.
struct HostLaunch {
  void sgd(const UpdateGroup& g, double lr, double weight_decay) const {
    dispatch_group(g.dtype, g.lr_dtype, [&](auto* t_tag, auto* lt_tag) {
      using T = std::remove_pointer_t<decltype(t_tag)>;
      using LT = std::remove_pointer_t<decltype(lt_tag)>;
      using O = at::opmath_type<T>;
      for (const auto& e : g.entries) {
        const T* p = static_cast<const T*>(e.addr[0]);
        const T* gr = static_cast<const T*>(e.addr[1]);
        const LT* a = static_cast<const LT*>(e.addr[2]);
        T* out = static_cast<T*>(e.addr[3]);
        const O a_s = static_cast<O>(e.mode[0] == kDevice ? load_host(e.scalar[0], e.scalar_dtype[0]) : lr);
        const O wd = static_cast<O>(weight_decay);
        for (int64_t i = 0; i < e.numel; ++i) {
          const O pv = static_cast<O>(p[i]);
          const O d = weight_decay != 0.0 ? static_cast<O>(gr[i]) + wd * pv : static_cast<O>(gr[i]);
          const O av = e.mode[0] == kElement ? static_cast<O>(a[i]) : a_s;
          const O o = pv - av * d;
          out[i] = static_cast<T>(o);
          if (!std::isfinite(o) && e.flag != nullptr) *e.flag = 1.0f;
        }
      }
    });
  }

  void step(const StepGroup& g, double next_lr, double* partials) const {
    dispatch_group(g.dtype, g.lr_dtype, [&](auto* t_tag, auto* lt_tag) {
      using T = std::remove_pointer_t<decltype(t_tag)>;
      using LT = std::remove_pointer_t<decltype(lt_tag)>;
      using O = at::opmath_type<T>;
      for (const auto& e : g.entries) {
        const T* v = static_cast<const T*>(e.addr[0]);
        const T* h = static_cast<const T*>(e.addr[1]);
        const T* gr = static_cast<const T*>(e.addr[2]);
        const LT* na = static_cast<const LT*>(e.addr[3]);
        T* vo = static_cast<T*>(e.addr[4]);
        LT* lg = static_cast<LT*>(e.addr[5]);
        T* u = static_cast<T*>(e.addr[6]);
        const O a_s = static_cast<O>(e.mode[1] == kDevice ? load_host(e.scalar[1], e.scalar_dtype[1]) : next_lr);
        for (int64_t c = 0; c < num_chunks(e.numel); ++c) {
          O acc = O(0);
          const int64_t end = std::min(e.numel, (c + 1) * kChunkSize);
          for (int64_t i = c * kChunkSize; i < end; ++i) {
            const O x = static_cast<O>(v[i]);
            const O y = x - static_cast<O>(h[i]);
            vo[i] = static_cast<T>(y);
            bool bad = !std::isfinite(y);
            if (e.mode[0] != kNone) {
              const O d = -(static_cast<O>(gr[i]) * x);
              bad = bad || !std::isfinite(d);
              if (e.mode[0] == kElement) lg[i] = static_cast<LT>(d);
              else acc += d;
            }
            if (e.mode[1] != kNone) {
              const O a = e.mode[1] == kElement ? static_cast<O>(na[i]) : a_s;
              u[i] = static_cast<T>(a * y);
              bad = bad || !std::isfinite(a * y);
            }
            if (bad && e.flag != nullptr) *e.flag = 1.0f;
          }
          if (e.mode[0] == kReduce) partials[e.partial_base + c] = static_cast<double>(acc);
        }
      }
    });
  }

  void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>& targets) const {
    const double* p = partials.defined() ? partials.const_data_ptr<double>() : nullptr;
    for (const SumTarget& t : targets) {
      double s = 0.0;
      for (int64_t j = 0; j < t.count; ++j) s += p[t.begin + j];
      store_host(t.out, t.dtype, s);
    }
  }

  void check_copy_to_host(const char*, const char*, at::Device) const {}
};

std::vector<at::Tensor> host_sgd_update(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                        std::optional<double> lr, double weight_decay, bool inplace,
                                        const std::optional<at::Tensor>& found_inf) {
  const char* op = lr ? (inplace ? "sgd_update_" : "sgd_update") : (inplace ? "sgd_update_lrs_" : "sgd_update_lrs");
  HostLaunch launch;
  const double lr_value = lr.value_or(0.0);
  return run_sgd_update(op, params, grads, lr ? &lr_value : nullptr, lrs, weight_decay, inplace, found_inf, at::kCPU,
                        launch);
}

StepResult host_backward_step(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                              at::TensorList next_lrs, double next_lr, bool has_next,
                              const std::optional<at::Tensor>& found_inf) {
  HostLaunch launch;
  return run_backward_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next, found_inf, at::kCPU, launch);
}

std::string lr_form(c10::string_view op, at::TensorList lrs, at::TensorList params, bool allow_none) {
  const std::string name(op);
  const LrSpec spec = classify_lrs(name.c_str(), "lr", lrs, params, allow_none);
  switch (spec.form) {
    case LrForm::kNone: return "none";
    case LrForm::kShared: return spec.on_host ? "shared_host" : "shared_device";
    case LrForm::kPerParam: return "per_param";
  }
  return "";
}

// The tables for tensors of the given sizes: one row (launch, tensor, chunk, slot) per block.
template <int D, bool kLarge>
at::Tensor tables_for(const std::vector<int64_t>& numels) {
  using Meta = TensorListMeta<D, kLarge>;
  static_assert(sizeof(Meta) + kFunctorBytes <= Meta::kParamBytes, "table exceeds the kernel-argument limit");
  std::vector<TensorEntry<D>> entries(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    entries[i].numel = numels[i];
    entries[i].addr[0] = reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1));  // the index, as an address
  }
  std::vector<int64_t> rows;
  int64_t launch = 0;
  for_each_table<Meta>(entries, [&](const Meta& m, int n_blocks) {
    TORCH_CHECK(n_blocks > 0 && n_blocks <= Meta::kMaxBlocks, "bad block count ", n_blocks);
    for (int b = 0; b < n_blocks; ++b) {
      const int slot = m.block_to_tensor[b];
      TORCH_CHECK(slot < Meta::kMaxTensors, "slot ", slot, " out of range");
      const auto index = static_cast<int64_t>(reinterpret_cast<uintptr_t>(m.addr[0][slot])) - 1;
      TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(numels.size()) && m.numel[slot] == numels[index],
                  "slot ", slot, " holds a wrong entry");
      rows.insert(rows.end(), {launch, index, m.block_to_chunk[b], slot});
    }
    ++launch;
  });
  const int64_t n = static_cast<int64_t>(rows.size()) / 4;
  return at::tensor(rows, at::kLong).reshape({n, 4});
}

template <bool kLarge>
at::Tensor tables_depth(const std::vector<int64_t>& numels, int64_t depth) {
  switch (depth) {
    case 1: return tables_for<1, kLarge>(numels);
    case 3: return tables_for<3, kLarge>(numels);
    case 4: return tables_for<4, kLarge>(numels);
    case 7: return tables_for<7, kLarge>(numels);
    default: TORCH_CHECK_VALUE(false, "tables: depth must be 1, 3, 4 or 7 (the kernels' depths), got ", depth);
  }
  return {};
}

at::Tensor tables(at::IntArrayRef numels, int64_t depth, bool large) {
  const std::vector<int64_t> n(numels.begin(), numels.end());
  return large ? tables_depth<true>(n, depth) : tables_depth<false>(n, depth);
}

// (max tensors, max blocks) of a table.
std::vector<int64_t> table_limits(int64_t depth, bool large) {
  auto limits = [](auto meta) -> std::vector<int64_t> {
    using Meta = decltype(meta);
    return {Meta::kMaxTensors, Meta::kMaxBlocks};
  };
  switch (depth * 2 + (large ? 1 : 0)) {
    case 2: return limits(TensorListMeta<1, false>{});
    case 3: return limits(TensorListMeta<1, true>{});
    case 6: return limits(TensorListMeta<3, false>{});
    case 7: return limits(TensorListMeta<3, true>{});
    case 8: return limits(TensorListMeta<4, false>{});
    case 9: return limits(TensorListMeta<4, true>{});
    case 14: return limits(TensorListMeta<7, false>{});
    case 15: return limits(TensorListMeta<7, true>{});
    default: TORCH_CHECK_VALUE(false, "table_limits: depth must be 1, 3, 4 or 7, got ", depth);
  }
  return {};
}

bool large_kernel_args(int64_t runtime_version, int64_t driver_version, int64_t major, bool capturing) {
  return use_large_kernel_args(static_cast<int>(runtime_version), static_cast<int>(driver_version),
                               static_cast<int>(major), capturing);
}

}  // namespace
}  // namespace pymaml::device

TORCH_LIBRARY(pymaml_testing, m) {
  m.def("sgd_update(Tensor[] params, Tensor[] grads, Tensor[] lrs, float? lr, float weight_decay, bool inplace, "
        "Tensor(a!)? found_inf=None) -> Tensor[]",
        &pymaml::device::host_sgd_update);
  m.def("backward_step(Tensor[] v, Tensor[] hvp, Tensor[] grads, Tensor[] lrs, Tensor[] next_lrs, float next_lr, "
        "bool has_next, Tensor(a!)? found_inf=None) -> (Tensor[], Tensor[], Tensor[])",
        &pymaml::device::host_backward_step);
  m.def("lr_form(str op, Tensor[] lrs, Tensor[] params, bool allow_none) -> str", &pymaml::device::lr_form);
  m.def("tables(int[] numels, int depth, bool large) -> Tensor", &pymaml::device::tables);
  m.def("table_limits(int depth, bool large) -> int[]", &pymaml::device::table_limits);
  m.def("large_kernel_args(int runtime_version, int driver_version, int major, bool capturing) -> bool",
        &pymaml::device::large_kernel_args);
}
