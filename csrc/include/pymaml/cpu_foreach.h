// CPU multi-tensor driver: the whole tensor list is one flat index space cut into fixed-size chunks,
// and one at::parallel_for walks the chunks, so a list of many small tensors costs one parallel
// region, not one per tensor. A chunk may span several tensors; each (chunk, tensor) piece is a
// "segment" with a stable index, which is where per-tensor reductions store their partial sums, so
// reductions are deterministic (independent of the thread count).
//
// Kernels are written once for the opmath types (float, double) on raw contiguous pointers;
// float16/bfloat16 tensors are staged through float buffers in blocks (at::vec::convert), so their
// arithmetic is done in float and rounded once on the way out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <pymaml/ops.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace pymaml {
namespace cpu {

using at::vec::Vectorized;

// 16384 elements (64 KiB of float) per chunk; a parallel region needs at least kGrainChunks chunks
// per thread, so lists below ~64k elements run on the calling thread (a fork/join costs more).
constexpr int64_t kChunk = 16384;
constexpr int64_t kGrainChunks = 4;
// Lists with fewer elements than this run on the calling thread: for L2-sized memory-bound work the
// fork/join of a parallel region (waking a pool thread, which on a loaded machine may wait for a
// time slice) costs more than the second core saves. Measured on the 2-core dev machine: the
// 113k-element conv-net update took 130 µs on one thread and 0.9–8 ms with 2 threads under load.
constexpr int64_t kSerialElems = int64_t{1} << 18;
// Half/BFloat16 elements converted to float per staging block.
constexpr int64_t kStage = 1024;

struct Segment {
  int64_t tensor;  // index into the list
  int64_t lo, hi;  // element range inside that tensor
};

class FlatPlan {
 public:
  explicit FlatPlan(const std::vector<int64_t>& numels) {
    int64_t total = 0;
    for (int64_t n : numels) total += n;
    total_ = total;
    const int64_t nchunks = (total + kChunk - 1) / kChunk;
    chunk_first_.reserve(nchunks + 1);
    int64_t t = 0, start = 0;  // start = global offset of tensor t
    const int64_t ntensors = static_cast<int64_t>(numels.size());
    for (int64_t c = 0; c < nchunks; ++c) {
      chunk_first_.push_back(static_cast<int64_t>(segs_.size()));
      const int64_t lo = c * kChunk, hi = std::min(total, lo + kChunk);
      int64_t pos = lo;
      while (pos < hi) {
        while (t < ntensors && start + numels[t] <= pos) start += numels[t++];  // skips empties
        const int64_t end = std::min(hi, start + numels[t]);
        segs_.push_back({t, pos - start, end - start});
        pos = end;
      }
    }
    chunk_first_.push_back(static_cast<int64_t>(segs_.size()));
  }

  int64_t num_segments() const { return static_cast<int64_t>(segs_.size()); }
  const std::vector<Segment>& segments() const { return segs_; }

  // f(const Segment&, int64_t segment_index), called once per segment, in parallel across chunks.
  template <typename F>
  void run(const F& f) const {
    const int64_t nchunks = static_cast<int64_t>(chunk_first_.size()) - 1;
    if (nchunks <= 0) return;
    if (total_ < kSerialElems || at::in_parallel_region()) {
      for (int64_t s = 0; s < chunk_first_[nchunks]; ++s) f(segs_[s], s);
      return;
    }
    at::parallel_for(0, nchunks, kGrainChunks, [&](int64_t cb, int64_t ce) {
      for (int64_t s = chunk_first_[cb]; s < chunk_first_[ce]; ++s) f(segs_[s], s);
    });
  }

 private:
  std::vector<Segment> segs_;
  std::vector<int64_t> chunk_first_;
  int64_t total_ = 0;
};

// Element order. The kernels walk every tensor of index i of a list as one flat array, in the
// memory order of a reference: the list's first operand when it is dense (non-overlapping, no gaps:
// contiguous, channels_last or any other dense permutation), else its clone with the strides torch
// infers for it (`dense_ref`; the rule of torch.empty_like). Other operands with other strides are
// read through a copy in that order (`as_layout`), and outputs are allocated with the reference's
// strides (`new_cpu_like`), so a channels_last list stays channels_last and nothing is copied when
// all operands agree.
inline at::Tensor dense_ref(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.clone(at::MemoryFormat::Preserve);
}

// A new CPU tensor with the sizes and strides of `like` (a dense tensor), allocated without going
// through the dispatcher (at::empty costs a dispatcher round trip per output; lists have ~20 outputs).
inline at::Tensor new_cpu_like(const at::Tensor& like, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_strided_cpu(like.sizes(), like.strides(), dtype, /*pin_memory=*/false));
}
inline at::Tensor new_cpu_like(const at::Tensor& like) { return new_cpu_like(like, like.scalar_type()); }
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, at::MemoryFormat::Contiguous));
}

// `t` (same sizes as `ref`, any dtype) with the strides of the dense `ref`: itself when they
// already agree, else a copy.
inline at::Tensor as_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  at::Tensor out = new_cpu_like(ref, t.scalar_type());
  out.copy_(t);
  return out;
}

// Staging helpers: for T == opmath they are pass-through pointers.
template <typename opm, typename T>
inline const opm* stage_in(const T* src, opm* buf, int64_t n) {
  if constexpr (std::is_same_v<T, opm>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}
template <typename opm, typename T>
inline opm* stage_out(T* dst, opm* buf) {
  if constexpr (std::is_same_v<T, opm>) {
    return dst;
  } else {
    return buf;
  }
}
template <typename opm, typename T>
inline void stage_store(T* dst, const opm* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, opm>) at::vec::convert(buf, dst, n);
}
// Block length for staging: the whole range for float/double, kStage elements otherwise.
template <typename opm, typename T>
constexpr int64_t stage_block() {
  return std::is_same_v<T, opm> ? (int64_t{1} << 62) : kStage;
}

// Calls f(i, count) over [0, n) in steps of Vectorized<opm>::size(); the last call may be partial.
// Inside f, use Vectorized<opm>::loadu(p + i, count) and v.store(q + i, count).
template <typename opm, typename F>
inline void vec_loop(int64_t n, const F& f) {
  constexpr int64_t W = Vectorized<opm>::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, W);
  if (i < n) f(i, n - i);
}

// Reads a one-element floating tensor (any dtype, on the CPU) as double without the dispatcher.
inline double read_scalar(const at::Tensor& t) { return read_cpu_scalar(t); }

// Writes one number into a one-element tensor (any floating dtype, contiguous, on the CPU).
inline void write_scalar(const at::Tensor& t, double v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "pymaml_write_scalar",
                                  [&] { *t.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(v); });
}

// Sums per-segment partials into one value per tensor, in segment order (deterministic).
inline std::vector<double> sum_by_tensor(const FlatPlan& plan, const std::vector<double>& partial,
                                         size_t ntensors) {
  std::vector<double> out(ntensors, 0.0);
  const auto& segs = plan.segments();
  for (size_t s = 0; s < segs.size(); ++s) out[segs[s].tensor] += partial[s];
  return out;
}

// Non-finite check (the found_inf flag of ops.h). A kernel adds (x − x) into a vector accumulator for
// every value it checks: 0 for a finite x, NaN for NaN or ±Inf, and a NaN stays NaN, so the check is
// two vector operations per value and one test per segment.
template <typename opm>
inline Vectorized<opm> nonfinite_probe(const Vectorized<opm>& x) {
  return x - x;
}
template <typename opm>
inline bool any_nonfinite(const Vectorized<opm>& acc) {
  opm lanes[Vectorized<opm>::size()];
  acc.store(lanes);
  for (int64_t i = 0; i < Vectorized<opm>::size(); ++i)
    if (lanes[i] != lanes[i]) return true;
  return false;
}
// Segments of one tensor may run on several threads: a relaxed atomic store of the same value. The
// GCC/Clang builtin rather than C++20's std::atomic_ref: torch releases before 2.13 build extensions
// as C++17.
inline void raise_flag(float* flag) {
  if (flag != nullptr) {
    const float one = 1.0f;
    __atomic_store(flag, &one, __ATOMIC_RELAXED);
  }
}

inline void check_cpu(const char* op, const char* name, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_VALUE(ts[i].device().is_cpu(), op, ": ", name, "[", i, "] is on ", ts[i].device(),
                      " but the CPU kernel was called; call through pymaml.ops, which groups tensors by device");
  }
}

}  // namespace cpu
}  // namespace pymaml

namespace pymaml {
namespace cpu {

// Calls f(static_cast<T*>(nullptr)) for the floating dtype t.
template <typename F>
inline void dispatch_t(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    case at::kHalf: return f(static_cast<at::Half*>(nullptr));
    case at::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, "pymaml: unsupported dtype ", t);
  }
}

// Calls f(T*, LT*) where T is the tensor dtype t and LT the dtype lt of a companion tensor (a
// per-element step size or its gradient), which must be T or opmath(T) (see opmath_or_same).
template <typename F>
inline void dispatch_t_lt(at::ScalarType t, at::ScalarType lt, const F& f) {
  dispatch_t(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using opm = at::opmath_type<T>;
    if (lt == t) return f(static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    if constexpr (!std::is_same_v<T, opm>) {
      if (lt == c10::CppTypeToScalarType<opm>::value)
        return f(static_cast<T*>(nullptr), static_cast<opm*>(nullptr));
    }
    TORCH_CHECK(false, "pymaml: internal error: companion dtype ", lt, " for a ", t, " tensor");
  });
}

inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// A companion tensor (per-element α) the kernels can read next to `ref` (dense, dtype t): laid out
// like ref, of dtype t or opmath(t); other dtypes are converted to opmath(t) (a copy).
inline at::Tensor opmath_or_same(const at::Tensor& a, const at::Tensor& ref) {
  const auto t = ref.scalar_type(), at_ = a.scalar_type();
  if (at_ == t || at_ == opmath_dtype(t)) return as_layout(a, ref);
  return as_layout(a.to(opmath_dtype(t)), ref);
}

}  // namespace cpu
}  // namespace pymaml
