// Contracts of the pymaml ops (schemas in csrc/ops.cpp) and the input checks shared by the CPU
// (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels. Header-only; safe to include from nvcc.
//
// Every op, on every device:
// * Tensor lists: index i of every list agrees in shape, dtype and device (checked here, with the
//   messages of pymaml/_checks.py and the same Python exception types: ValueError / TypeError).
//   A kernel names itself by its schema name (sgd_update_lrs, sgd_update_, ...), so an op raises the
//   same message on every device.
//   A list may mix dtypes (float16, bfloat16, float32, float64) across indices; kernels dispatch per
//   tensor. pymaml.ops groups lists that mix devices, so a kernel sees one device; a direct call with
//   two devices is rejected by check_one_device.
// * Arithmetic in at::opmath_type<T> (float for Half/BFloat16), rounded once to T on the way out.
//   Reductions accumulate per fixed-size chunk and combine the chunks in double in a fixed order:
//   results do not depend on the number of threads (deterministic). lr_grad of a per-tensor or
//   shared α accumulates each tensor's chunks in its opmath type; global_norm and clip_grad_norm_
//   accumulate every tensor in double when any tensor of the list is float64, else in float (as
//   pymaml/reference.py does).
// * Layout (CPU kernels): index i of every list is walked in the memory order of its first operand
//   when that is dense (contiguous, channels_last, any dense permutation), else of its clone with
//   the strides torch.empty_like would give; operands with other strides are read through a copy
//   in that order; outputs of the out-of-place ops are new tensors with those strides (a
//   channels_last list stays channels_last); in-place ops write targets that are not dense back
//   with copy_. Nothing is copied when all operands of an index are dense with the same strides.
//   CUDA kernels read non-contiguous inputs through .contiguous() copies and return contiguous
//   outputs; every check is done and every copy made before the first launch, so an in-place op
//   whose input is rejected has written nothing. No kernel reads data_ptr of a tensor that did not
//   pass these checks.
// * Empty tensors are skipped (their outputs are empty tensors).
// * Step sizes `lrs` (Tensor[]): empty = "the float form is used" (only where the schema has a float);
//   one entry holding one number = shared by every parameter, whatever the number of params (with
//   one param, shared and per-tensor agree), and it may then live on the CPU for a CUDA op (read
//   once on the host); otherwise one entry per parameter, on its parameter's device, each either one
//   number (per-tensor, LSLR) or of the parameter's shape (per-element, Meta-SGD). An entry of
//   another floating dtype than its parameter is read in the parameter's opmath type. The forms are
//   described once, by LrSpec / classify_lrs below.
//
// Ops (what is mutated; outputs):
//   sgd_update(params, grads, lr, wd) -> out           out_i = p_i − lr (g_i + wd p_i)      pure
//   sgd_update_lrs(params, grads, lrs, wd) -> out      out_i = p_i − α_i ⊙ (g_i + wd p_i)    pure
//   sgd_update_(params!, grads, lr, wd)                params mutated in place (no-grad use)
//   sgd_update_lrs_(params!, grads, lrs, wd)           params mutated in place (no-grad use)
//   backward_step(v, hvp, grads, lrs, next_lrs, next_lr, has_next) -> (v_out, lr_grad, u_next)  pure
//       v_out_i = v_i − hvp_i                                   (dtype of v_i)
//       lr_grad = reduce(−g ⊙ v) to the form of lrs: [] if lrs is empty; one tensor shaped like lrs[0]
//                 if shared (sum over all elements of all tensors); else per entry, the sum (one
//                 number) or the element-wise product, in the dtype and shape of lrs[i]
//       u_next_i = α_next,i ⊙ v_out_i (dtype of v_i); α_next from next_lrs when non-empty (same forms
//                  as lrs), else the float next_lr; u_next = [] when !has_next
//   fd_perturb(params, direction, eps, eps_scale) -> (plus, minus)   p ± (eps·s) u, s = eps_scale
//   fd_quotient(grads_plus, grads_minus, eps, eps_scale) -> out      (g₊ − g₋) / (2·eps·s)
//       eps_scale: one-element floating tensor on the op's device, read there by the kernels (no
//       host sync), or on the CPU, read once on the host.
//   global_norm(tensors) -> 0-d norm on the tensors' device; float64 if any input is float64, else
//       float32. Requires a non-empty list.
//   clip_grad_norm_(tensors!, max_norm, eps) -> norm before clipping; tensors scaled in place by
//       min(1, max_norm / (norm + eps)) with no host sync.
//   backward_step with a shared α on the CPU and v on a GPU returns lr_grad on the CPU: a
//       synchronising copy, refused while the stream is captured into a CUDA graph.
//
// Non-finite flag (found_inf): sgd_update.found_inf, sgd_update_lrs.found_inf and
// backward_step.found_inf (overloads, since an op that mutates an argument cannot carry the
// autograd formula of the default overload), and the optional found_inf of sgd_update_ and
// sgd_update_lrs_. found_inf is a float32 tensor on the op's device holding one number, or one per
// tensor of the list (shape (n,), any stride). In the same pass as the op, the kernels write 1 into
// it (into entry i for tensor i in the second form) when a value they compute per element is NaN or
// ±Inf: θ' for the update; v_out, −g ⊙ v (when lr_grad is computed) and u_next for backward_step,
// in the opmath type before rounding. Since every non-finite input reaches one of those values
// (0·Inf is NaN), this is also the check of every element the op reads. The flag is never cleared
// and never read on the host; CUDA kernels store it with a plain (relaxed) write, CPU kernels with a
// relaxed atomic store.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace pymaml {

// Python spellings, so C++ and Python checks raise identical messages.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const char* op, const char* name, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_TYPE(is_float_type(ts[i].scalar_type()), op, ": ", name, "[", i, "] has dtype ",
                     py_dtype(ts[i].scalar_type()), "; only floating-point tensors are supported");
  }
}

// Same rules and messages as pymaml/_checks.py:check_pairs: same length, and per index the same
// shape, device and dtype as the first list, which must be floating point.
inline void check_pairs(const char* op, std::initializer_list<const char*> names,
                        std::initializer_list<at::TensorList> lists) {
  auto name = names.begin();
  auto list = lists.begin();
  const char* ref_name = *name;
  at::TensorList ref = *list;
  auto n = name + 1;
  for (auto l = list + 1; l != lists.end(); ++n, ++l) {
    TORCH_CHECK_VALUE(l->size() == ref.size(), op, ": ", ref_name, " and ", *n, " differ in length: ",
                      ref.size(), " vs ", l->size());
  }
  check_floating(op, ref_name, ref);
  n = name + 1;
  for (auto l = list + 1; l != lists.end(); ++n, ++l) {
    for (size_t i = 0; i < ref.size(); ++i) {
      const at::Tensor& a = ref[i];
      const at::Tensor& b = (*l)[i];
      TORCH_CHECK_VALUE(a.sizes().equals(b.sizes()), op, ": ", ref_name, "[", i, "] and ", *n, "[", i,
                        "] differ in shape: ", py_shape(a.sizes()), " vs ", py_shape(b.sizes()));
      TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", ref_name, "[", i, "] is on ", a.device(),
                        " but ", *n, "[", i, "] is on ", b.device());
      TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", ref_name, "[", i, "] has dtype ",
                       py_dtype(a.scalar_type()), " but ", *n, "[", i, "] has dtype ",
                       py_dtype(b.scalar_type()));
    }
  }
}

// Every tensor of `ts` on `device` (a kernel sees one device; pymaml.ops groups mixed lists).
inline void check_one_device(const char* op, const char* name, at::TensorList ts, at::Device device) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_VALUE(ts[i].device() == device, op, ": ", name, "[", i, "] is on ", ts[i].device(),
                      " but ", name, "[0] is on ", device,
                      "; call through pymaml.ops, which groups tensors by device");
  }
}

// Reads a one-element floating tensor on the CPU (any of the four float dtypes) as double, without
// a dispatcher round trip.
inline double read_cpu_scalar(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu() && t.numel() == 1);
  double out = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "pymaml_read_scalar",
                                  [&] { out = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return out;
}

// The forms of a Tensor[] step-size argument (see the contract above), one description for the CPU
// and CUDA kernels.
enum class LrForm {
  kNone,      // empty: the float form of the schema is used
  kShared,    // one entry holding one number, shared by every parameter
  kPerParam,  // one entry per parameter: one number (per tensor) or the parameter's shape (per element)
};

struct LrSpec {
  LrForm form = LrForm::kNone;
  bool on_host = false;     // kShared: the number lives on the CPU and was read on the host
  double host_value = 0.0;  // kShared and on_host: that number

  // Entry i holds one value per element (otherwise one number for its parameter or all of them).
  bool per_element(at::TensorList lrs, size_t i) const {
    return form == LrForm::kPerParam && lrs[i].numel() != 1;
  }
  // kShared and read by the kernel from the device (a pointer, never a host read).
  bool shared_on_device() const { return form == LrForm::kShared && !on_host; }
};

// Classifies and checks a Tensor[] step-size argument against `params`. One entry holding one
// number is the shared form for any number of params (for one param, shared and per-tensor mean
// the same), so it may live on the CPU, where it is read once on the host: no device sync.
inline LrSpec classify_lrs(const char* op, const char* name, at::TensorList lrs, at::TensorList params,
                           bool allow_none) {
  const size_t n = params.size();
  LrSpec spec;
  if (lrs.empty()) {
    TORCH_CHECK_VALUE(allow_none || n == 0, op, ": ", name, " has 0 entries but there are ", n, " params");
    return spec;
  }
  check_floating(op, name, lrs);
  if (lrs.size() == 1 && (n != 1 || lrs[0].numel() == 1)) {
    TORCH_CHECK_VALUE(lrs[0].numel() == 1, op, ": a single Tensor ", name,
                      " must hold one number, got shape ", py_shape(lrs[0].sizes()),
                      "; pass a list for per-tensor or per-element step sizes");
    TORCH_CHECK_VALUE(n == 0 || lrs[0].device() == params[0].device() || lrs[0].device().is_cpu(), op,
                      ": ", name, " is on ", lrs[0].device(), " but params[0] is on ", params[0].device());
    spec.form = LrForm::kShared;
    if (lrs[0].device().is_cpu()) {
      spec.on_host = true;
      spec.host_value = read_cpu_scalar(lrs[0]);
    }
    return spec;
  }
  TORCH_CHECK_VALUE(lrs.size() == n, op, ": ", name, " has ", lrs.size(), " entries but there are ", n,
                    " params");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& a = lrs[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(a.numel() == 1 || a.sizes().equals(p.sizes()), op, ": ", name, "[", i,
                      "] has shape ", py_shape(a.sizes()), "; expected one number or the shape of params[",
                      i, "], ", py_shape(p.sizes()));
    TORCH_CHECK_VALUE(a.device() == p.device(), op, ": ", name, "[", i, "] is on ", a.device(),
                      " but params[", i, "] is on ", p.device());
  }
  spec.form = LrForm::kPerParam;
  return spec;
}

// global_norm / clip_grad_norm_ (every device): every tensor's sum of squares accumulates in double
// when any tensor of the list is float64, else in the tensor's opmath type (float).
inline bool norm_accumulates_in_double(at::TensorList ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return true;
  return false;
}

inline void check_eps_scale(const char* op, const at::Tensor& s) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, op, ": eps_scale must hold one number, got shape ",
                    s.defined() ? py_shape(s.sizes()) : std::string("(undefined)"));
  TORCH_CHECK_TYPE(is_float_type(s.scalar_type()), op, ": eps_scale has dtype ", py_dtype(s.scalar_type()),
                   "; only floating-point tensors are supported");
}

// The found_inf flag (see the contract above) after its checks: entry i of the list writes to at(i).
struct FlagSpec {
  float* base = nullptr;  // nullptr: no flag
  int64_t stride = 0;     // 0: one number for every tensor; else the stride between the entries
  float* at(size_t i) const { return base == nullptr ? nullptr : base + stride * static_cast<int64_t>(i); }
};

// Same rules and messages as pymaml/_checks.py:check_found_inf. `name` is the list the flag serves
// (params or v); its device is the op's.
inline FlagSpec check_found_inf(const char* op, const char* name, const std::optional<at::Tensor>& flag,
                                at::TensorList ts) {
  if (!flag.has_value() || !flag->defined()) return {};
  const at::Tensor& f = *flag;
  TORCH_CHECK_TYPE(f.scalar_type() == at::kFloat, op, ": found_inf has dtype ", py_dtype(f.scalar_type()),
                   "; it must be torch.float32");
  const int64_t n = static_cast<int64_t>(ts.size());
  const bool one = f.numel() == 1;
  TORCH_CHECK_VALUE(one || (f.dim() == 1 && f.numel() == n), op, ": found_inf has shape ", py_shape(f.sizes()),
                    "; it must hold one number, or one per tensor of ", name, " (shape (", n, ",))");
  if (n > 0) {
    TORCH_CHECK_VALUE(f.device() == ts[0].device(), op, ": found_inf is on ", f.device(), " but ", name,
                      "[0] is on ", ts[0].device());
  }
  FlagSpec spec;
  spec.base = f.mutable_data_ptr<float>();
  spec.stride = one ? 0 : f.stride(0);
  return spec;
}

}  // namespace pymaml
