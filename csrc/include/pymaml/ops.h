// Contracts of the pymaml ops (schemas in csrc/ops.cpp) and the input checks shared by the CPU
// (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels. Header-only; safe to include from nvcc.
//
// Every op, on every device:
// * Tensor lists: index i of every list agrees in shape, dtype and device (checked here, with the
//   messages of pymaml/_checks.py and the same Python exception types: ValueError / TypeError).
//   A list may mix dtypes (float16, bfloat16, float32, float64) across indices; kernels dispatch per
//   tensor. pymaml.ops groups lists that mix devices, so a kernel sees one device; a direct call with
//   two devices is rejected by check_one_device.
// * Arithmetic in at::opmath_type<T> (float for Half/BFloat16), rounded once to T on the way out.
//   Reductions (lr_grad of a per-tensor or shared α, global_norm) accumulate in opmath (double for
//   double) per fixed-size chunk and combine the chunks in double in a fixed order: results do not
//   depend on the number of threads (deterministic).
// * Layout (CPU kernels): index i of every list is walked in the memory order of its first operand
//   when that is dense (contiguous, channels_last, any dense permutation), else of its clone with
//   the strides torch.empty_like would give; operands with other strides are read through a copy
//   in that order; outputs of the out-of-place ops are new tensors with those strides (a
//   channels_last list stays channels_last); in-place ops write targets that are not dense back
//   with copy_. CUDA kernels read non-contiguous inputs through .contiguous() copies and return
//   contiguous outputs. No kernel reads data_ptr of a tensor that did not pass these checks.
// * Empty tensors are skipped (their outputs are empty tensors).
// * Step sizes `lrs` (Tensor[]): empty = "the float form is used" (only where the schema has a float);
//   one entry while params has n != 1 entries = shared by every parameter (must hold one number);
//   n entries = one per parameter, each either one number (per-tensor, LSLR) or of the parameter's
//   shape (per-element, Meta-SGD). An entry of another floating dtype than its parameter is read in
//   the parameter's opmath type. A shared one-number α may live on the CPU for a CUDA op.
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
//       eps_scale: one-element floating tensor on the op's device (or CPU), never read on the host
//       by CUDA kernels.
//   global_norm(tensors) -> 0-d norm on the tensors' device; float64 if any input is float64, else
//       float32. Requires a non-empty list.
//   clip_grad_norm_(tensors!, max_norm, eps) -> norm before clipping; tensors scaled in place by
//       min(1, max_norm / (norm + eps)) with no host sync.
#pragma once

#include <ATen/ATen.h>

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

enum class LrKind { kNone, kShared, kPerParam };

// Classifies and checks a Tensor[] step-size argument against `params` (see the contract above).
// A shared entry may be on the CPU when params are elsewhere (it is then read once on the host by
// CPU kernels, or copied by the caller for CUDA kernels).
inline LrKind check_lrs(const char* op, const char* name, at::TensorList lrs, at::TensorList params,
                        bool allow_none) {
  const size_t n = params.size();
  if (lrs.empty()) {
    TORCH_CHECK_VALUE(allow_none || n == 0, op, ": ", name, " has 0 entries but there are ", n, " params");
    return LrKind::kNone;
  }
  check_floating(op, name, lrs);
  if (lrs.size() == 1 && n != 1) {
    TORCH_CHECK_VALUE(lrs[0].numel() == 1, op, ": a single Tensor ", name,
                      " must hold one number, got shape ", py_shape(lrs[0].sizes()),
                      "; pass a list for per-tensor or per-element step sizes");
    TORCH_CHECK_VALUE(n == 0 || lrs[0].device() == params[0].device() || lrs[0].device().is_cpu(), op,
                      ": ", name, " is on ", lrs[0].device(), " but params[0] is on ", params[0].device());
    return LrKind::kShared;
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
  return LrKind::kPerParam;
}

inline void check_eps_scale(const char* op, const at::Tensor& s) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, op, ": eps_scale must hold one number, got shape ",
                    s.defined() ? py_shape(s.sizes()) : std::string("(undefined)"));
  TORCH_CHECK_TYPE(is_float_type(s.scalar_type()), op, ": eps_scale has dtype ", py_dtype(s.scalar_type()),
                   "; only floating-point tensors are supported");
}

// Output i of an out-of-place op: a new contiguous tensor like `like`.
inline at::Tensor new_like(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace pymaml
