// Host side of pymaml's multi-tensor CUDA kernels, written without CUDA so that the CPU build
// compiles it too and tests/test_host_prep.py runs it on CPU tensors (through the test-only ops of
// csrc/host_checks.cpp): the kernel-argument tables and the rule that sizes them, the operand
// preparation (every copy made and every address taken before the first launch, so an input that
// preparation rejects never leaves an in-place list half written), and the dtype grouping. The
// device code that reads these tables is csrc/cuda/multi_tensor_apply.cuh.
#pragma once

#include <ATen/ATen.h>
#include <pymaml/ops.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace pymaml::device {

constexpr int kILP = 4;              // elements a thread handles per step (one vector of 4 elements)
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;

// Per-tensor modes for the two scalar slots of an entry (what each op makes of them is documented
// in its functor).
enum Mode : uint8_t {
  kNone = 0,     // slot unused
  kArg = 1,      // the value is a functor argument (a Python float, or a CPU tensor read on the host)
  kDevice = 2,   // a one-element tensor read on the device: entry.scalar[slot] (dtype scalar_dtype)
  kElement = 3,  // one value per element: a tensor in one of the address slots
  kReduce = 4,   // a per-chunk partial sum is written to partials[partial_base + chunk]
};

// The two kernel-argument limits: 4096 bytes everywhere, 32764 bytes when the toolkit the kernels
// were built with is CUDA >= 12.1, the driver supports CUDA >= 12.1, the GPU is Volta (sm_70) or
// newer, and the stream is not being captured into a CUDA graph (PyTorch's rule for its own
// multi-tensor kernels, at::native::supports_large_kernel_arg). Only the first condition is known
// at compile time, so both table sizes are built and one is chosen per launch.
inline bool use_large_kernel_args(int runtime_version, int driver_version, int major, bool capturing) {
  return runtime_version >= 12010 && driver_version >= 12010 && major >= 7 && !capturing;
}

template <bool kLarge>
struct ArgLimits {
  static constexpr int kParamBytes = kLarge ? 32764 : 4096;
  static constexpr int kMaxBlocks = kLarge ? 2240 : 320;
  using block_index_t = std::conditional_t<kLarge, uint16_t, uint8_t>;
};
// Room left in the argument buffer for the functor (scalars and a few pointers).
constexpr int kFunctorBytes = 256;

template <int D, bool kLarge>
constexpr int max_tensors_for() {
  using L = ArgLimits<kLarge>;
  // addresses + numel + 2 scalar pointers + flag pointer + partial base + 2 dtypes + 2 modes
  const int per_tensor = D * 8 + 8 + 2 * 8 + 8 + 4 + 2 + 2;
  const int fixed = L::kMaxBlocks * static_cast<int>(sizeof(typename L::block_index_t) + sizeof(int32_t)) + 64;
  const int n = (L::kParamBytes - kFunctorBytes - fixed) / per_tensor;
  const int cap = static_cast<int>(std::numeric_limits<typename L::block_index_t>::max()) + 1;
  return n < cap ? n : cap;
}

// The table passed by value as the kernel argument: kMaxTensors tensor slots and kMaxBlocks blocks,
// block b working on chunk block_to_chunk[b] of the tensor in slot block_to_tensor[b].
template <int D, bool kLarge_>
struct TensorListMeta {
  static constexpr int kDepth = D;
  using block_index_t = typename ArgLimits<kLarge_>::block_index_t;
  static constexpr int kMaxTensors = max_tensors_for<D, kLarge_>();
  static constexpr int kMaxBlocks = ArgLimits<kLarge_>::kMaxBlocks;
  static constexpr int kParamBytes = ArgLimits<kLarge_>::kParamBytes;
  void* addr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  const void* scalar[2][kMaxTensors];
  float* flag[kMaxTensors];  // found_inf entry of the tensor (ops.h), or nullptr
  int32_t partial_base[kMaxTensors];
  uint8_t scalar_dtype[2][kMaxTensors];
  uint8_t mode[2][kMaxTensors];
  block_index_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// What the host side fills in per tensor; unused address slots stay nullptr.
template <int D>
struct TensorEntry {
  std::array<void*, D> addr{};
  int64_t numel = 0;
  std::array<const void*, 2> scalar{nullptr, nullptr};
  std::array<uint8_t, 2> scalar_dtype{0, 0};
  std::array<uint8_t, 2> mode{kNone, kNone};
  float* flag = nullptr;
  int32_t partial_base = 0;
};

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Fills tables with every chunk of every non-empty entry, as few as the table allows, and calls
// launch(meta, n_blocks) for each. A tensor whose chunks do not fit goes on in the next table, as
// its slot 0.
template <class Meta, int D, class Launch>
void for_each_table(const std::vector<TensorEntry<D>>& entries, const Launch& launch) {
  static_assert(Meta::kDepth == D, "table depth differs from the entries'");
  Meta meta{};
  int n_tensors = 0;
  int n_blocks = 0;
  auto put = [&meta](int slot, const TensorEntry<D>& e) {
    for (int d = 0; d < D; ++d) meta.addr[d][slot] = e.addr[d];
    meta.numel[slot] = e.numel;
    meta.flag[slot] = e.flag;
    meta.partial_base[slot] = e.partial_base;
    for (int s = 0; s < 2; ++s) {
      meta.scalar[s][slot] = e.scalar[s];
      meta.scalar_dtype[s][slot] = e.scalar_dtype[s];
      meta.mode[s][slot] = e.mode[s];
    }
  };
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    put(n_tensors++, e);
    const int64_t chunks = num_chunks(e.numel);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<typename Meta::block_index_t>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      if (n_blocks == Meta::kMaxBlocks || (last_chunk && n_tensors == Meta::kMaxTensors)) {
        launch(meta, n_blocks);
        n_blocks = 0;
        if (last_chunk) {
          n_tensors = 0;
        } else {
          put(0, e);
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch(meta, n_blocks);
}

// ---------------------------------------------------------------------------------------------
// Operand preparation.

// A contiguous tensor of dtype `dtype` with t's values: t itself when it already is one. (Tensor::to
// alone is not enough: with the dtype unchanged it returns t as it is, transposed or sliced.)
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.contiguous();
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// The address a kernel reads: only of a contiguous tensor on the kernel's device.
inline void* address(const at::Tensor& t, at::Device device) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.device() == device, "pymaml: a kernel operand is not contiguous on ",
                        device, " (", t.device(), ", strides ", t.strides(), ")");
  return t.numel() == 0 ? nullptr : t.data_ptr();
}

// Groups indices by key, keys in order of first appearance (so launches are deterministic).
template <typename Key>
std::vector<std::pair<Key, std::vector<size_t>>> group_by(const std::vector<Key>& keys) {
  std::vector<std::pair<Key, std::vector<size_t>>> groups;
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = groups.begin();
    for (; it != groups.end(); ++it)
      if (it->first == keys[i]) break;
    if (it == groups.end()) {
      groups.emplace_back(keys[i], std::vector<size_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

// The device of a list given to a kernel of device type `type`: ts[0]'s, which must hold every
// tensor of ts (check_pairs then ties the other lists to it). ts must not be empty.
inline at::Device kernel_device(const char* op, const char* name, at::TensorList ts, at::DeviceType type) {
  const at::Device device = ts[0].device();
  TORCH_CHECK_VALUE(device.type() == type, op, ": ", name, "[0] is on ", device, " but the ", c10::DeviceTypeName(type),
                    " kernel was called; call through pymaml.ops, which groups tensors by device");
  check_one_device(op, name, ts, device);
  return device;
}

// A one-element partial sum target of the second phase of a reduction.
struct SumTarget {
  void* out;             // one element of dtype `dtype` (a supported float type), on the device
  at::ScalarType dtype;
  int64_t begin;         // partials[begin, begin + count)
  int64_t count;
};

// ---------------------------------------------------------------------------------------------
// Plans: every operand of one op call, prepared before the first launch.

// sgd_update and friends. Slots: 0 θ, 1 g, 2 per-element α, 3 θ' (may be slot 0's tensor).
struct UpdateGroup {
  at::ScalarType dtype;     // of θ
  at::ScalarType lr_dtype;  // of per-element α: dtype, or its opmath type when α's dtype differs
  std::vector<TensorEntry<4>> entries;
};
struct UpdatePlan {
  std::vector<at::Tensor> outs;  // results; for in place, the tensors written (params or their copies)
  std::vector<at::Tensor> keep;  // copies the kernels read
  std::vector<UpdateGroup> groups;
  double lr_arg = 0.0;           // the α of kArg entries
};
UpdatePlan plan_sgd_update(at::TensorList params, at::TensorList grads, const LrSpec& spec, double lr,
                           at::TensorList lrs, bool inplace, const FlagSpec& flag, at::Device device);

// backward_step. Slots: 0 v, 1 hvp, 2 g, 3 per-element α_next, 4 v_out, 5 per-element lr_grad,
// 6 u_next. mode[0]: lr_grad (kNone, kReduce, kElement); mode[1]: α_next (kNone, kArg, kDevice,
// kElement).
struct StepGroup {
  at::ScalarType dtype;      // of v
  at::ScalarType lr_dtype;   // of per-element α_next and lr_grad buffers (dtype or its opmath type)
  std::vector<TensorEntry<7>> entries;
};
struct StepPlan {
  std::vector<at::Tensor> v_out, u_next, lg_buf, keep;
  std::vector<StepGroup> groups;
  std::vector<int64_t> partial_base;
  int64_t total_chunks = 0;
  at::Tensor partials;       // float64 per-chunk sums, when some lr_grad is reduced
  double next_arg = 0.0;     // the α_next of kArg entries
};
StepPlan plan_backward_step(const char* op, at::TensorList v, at::TensorList hvp, at::TensorList grads,
                            const LrSpec& lr_spec, at::TensorList lrs, const LrSpec& next_spec,
                            at::TensorList next_lrs, double next_lr, bool has_next, const FlagSpec& flag,
                            at::Device device);

// The host side of the device ops, with the launches supplied by the caller: the CUDA kernels in
// csrc/cuda/, a host loop in the test-only ops. Hooks provides
//   void sgd(const UpdateGroup&, double lr, double weight_decay)
//   void step(const StepGroup&, double next_lr, double* partials)
//   void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>&)
//   void check_copy_to_host(const char* op, const char* name, at::Device)   (before a copy to the CPU)
// found_inf: the optional non-finite flag (ops.h), checked here, written by the launches.
template <class Hooks>
std::vector<at::Tensor> run_sgd_update(const char* op, at::TensorList params, at::TensorList grads, const double* lr,
                                       at::TensorList lrs, double weight_decay, bool inplace,
                                       const std::optional<at::Tensor>& found_inf, at::DeviceType type, Hooks& hooks) {
  check_pairs(op, {"params", "grads"}, {params, grads});
  const at::Device device = params.empty() ? at::Device(type) : kernel_device(op, "params", params, type);
  const LrSpec spec = lr ? LrSpec{} : classify_lrs(op, "lr", lrs, params, /*allow_none=*/false);
  const FlagSpec flag = check_found_inf(op, "params", found_inf, params);
  if (params.empty()) return {};
  UpdatePlan plan = plan_sgd_update(params, grads, spec, lr ? *lr : 0.0, lrs, inplace, flag, device);
  for (const UpdateGroup& g : plan.groups) hooks.sgd(g, plan.lr_arg, weight_decay);
  if (inplace) {
    for (size_t i = 0; i < params.size(); ++i) {
      if (!plan.outs[i].is_same(params[i])) params[i].copy_(plan.outs[i]);
    }
    return {};
  }
  return std::move(plan.outs);
}

using StepResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

template <class Hooks>
StepResult run_backward_step(at::TensorList v, at::TensorList hvp, at::TensorList grads, at::TensorList lrs,
                             at::TensorList next_lrs, double next_lr, bool has_next,
                             const std::optional<at::Tensor>& found_inf, at::DeviceType type, Hooks& hooks) {
  const char* op = "backward_step";
  check_pairs(op, {"v", "hvp", "grads"}, {v, hvp, grads});
  const at::Device device = v.empty() ? at::Device(type) : kernel_device(op, "v", v, type);
  const FlagSpec flag = check_found_inf(op, "v", found_inf, v);
  const LrSpec lr_spec = classify_lrs(op, "lr", lrs, v, /*allow_none=*/true);
  // next_lrs matter only when there is a next step (u_next is [] otherwise).
  const LrSpec next_spec = has_next ? classify_lrs(op, "next_lr", next_lrs, v, /*allow_none=*/true) : LrSpec{};
  std::vector<at::Tensor> lr_grad;
  if (v.empty()) {  // nothing to walk; a shared α still gets its (zero) gradient
    if (lr_spec.form == LrForm::kShared) lr_grad.push_back(at::zeros(lrs[0].sizes(), lrs[0].options()));
    return {std::vector<at::Tensor>{}, lr_grad, std::vector<at::Tensor>{}};
  }
  const bool grad_to_host = lr_spec.form == LrForm::kShared && lrs[0].device() != device;
  if (grad_to_host) hooks.check_copy_to_host(op, "lr", device);
  StepPlan plan =
      plan_backward_step(op, v, hvp, grads, lr_spec, lrs, next_spec, next_lrs, next_lr, has_next, flag, device);
  double* partials = plan.partials.defined() ? plan.partials.data_ptr<double>() : nullptr;
  for (const StepGroup& g : plan.groups) hooks.step(g, plan.next_arg, partials);
  if (lr_spec.form == LrForm::kShared) {
    const at::Tensor& a = lrs[0];
    at::Tensor out = at::empty(a.sizes(), a.options().device(device));
    hooks.finalize_sums(plan.partials, {SumTarget{out.data_ptr(), out.scalar_type(), 0, plan.total_chunks}});
    lr_grad.push_back(grad_to_host ? out.to(a.device()) : out);  // a synchronising copy, checked above
  } else if (lr_spec.form == LrForm::kPerParam) {
    std::vector<SumTarget> targets;
    for (size_t i = 0; i < v.size(); ++i) {
      if (lr_spec.per_element(lrs, i)) {
        const at::Tensor& b = plan.lg_buf[i];
        lr_grad.push_back(b.scalar_type() == lrs[i].scalar_type() ? b : b.to(lrs[i].scalar_type()));
      } else {
        at::Tensor out = at::empty(lrs[i].sizes(), lrs[i].options());
        targets.push_back(SumTarget{out.data_ptr(), out.scalar_type(), plan.partial_base[i], num_chunks(v[i].numel())});
        lr_grad.push_back(out);
      }
    }
    if (!targets.empty()) hooks.finalize_sums(plan.partials, targets);
  }
  return {std::move(plan.v_out), std::move(lr_grad), std::move(plan.u_next)};
}

}  // namespace pymaml::device
