// CUDA kernels of global_norm and clip_grad_norm_ (schemas in csrc/ops.cpp, maths in
// pymaml/reference.py), and finalize_sums, the second phase of every deterministic reduction here.
//
// global_norm: each block writes the sum of squares of its chunk (accumulated in float, or in
// double when the list holds a float64 tensor, as the reference does) to a
// float64 partials buffer; one block then adds them in a fixed order and writes the square root as
// a 0-d tensor (float64 if any input is float64, else float32) on the device: no host sync.
// clip_grad_norm_: the norm as above, then every tensor is scaled in place by
// min(1, max_norm / (norm + eps)), computed on the device by each block from the norm tensor.
#include <torch/library.h>

#include <cmath>

#include "multi_tensor_apply.cuh"

namespace pymaml::cuda {

namespace {

constexpr int kSumThreads = 256;

// One block per target; targets beyond one table go to the next launch. Two sizes, for the two
// kernel-argument limits (device_plan.h: use_large_kernel_args).
template <bool kLarge>
struct SumTable {
  static constexpr int kMax = (ArgLimits<kLarge>::kParamBytes - 64) / (8 + 8 + 8 + 1);
  void* out[kMax];
  int64_t begin[kMax];
  int64_t count[kMax];
  uint8_t dtype[kMax];
};
static_assert(sizeof(SumTable<false>) + 16 <= ArgLimits<false>::kParamBytes, "finalize_sums table too large");
static_assert(sizeof(SumTable<true>) + 16 <= ArgLimits<true>::kParamBytes, "finalize_sums table too large");

__device__ __forceinline__ void store_scalar(void* p, uint8_t dtype, double x) {
  switch (dtype) {
    case static_cast<uint8_t>(at::ScalarType::Double):
      *static_cast<double*>(p) = x;
      break;
    case static_cast<uint8_t>(at::ScalarType::Half):
      *static_cast<at::Half*>(p) = static_cast<at::Half>(static_cast<float>(x));
      break;
    case static_cast<uint8_t>(at::ScalarType::BFloat16):
      *static_cast<at::BFloat16*>(p) = static_cast<at::BFloat16>(static_cast<float>(x));
      break;
    default:
      *static_cast<float*>(p) = static_cast<float>(x);
  }
}

template <class Table>
C10_LAUNCH_BOUNDS_1(kSumThreads)
__global__ void finalize_sums_kernel(const double* partials, Table table, bool take_sqrt) {
  const int b = blockIdx.x;
  const int64_t begin = table.begin[b];
  const int64_t count = table.count[b];
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) s += partials[begin + j];
  s = block_sum(s);
  if (threadIdx.x == 0) store_scalar(table.out[b], table.dtype[b], take_sqrt ? ::sqrt(s) : s);
}

// Slot 0: the tensor (T). mode[0] is kReduce for every entry. Squares and sums in A: opmath(T), or
// double when the list holds a float64 tensor (pymaml/ops.h: norm_accumulates_in_double).
template <typename T, typename A>
struct SquareSumFunctor {
  using O = A;
  double* partials;

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    const T* x = slot_ptr<T>(m, 0, c);
    const int64_t n = c.n;
    O acc = O(0);
    walk_chunk(n, is_aligned(x), [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O r[kILP];
      load<kVec>(r, x, i0, stride, n);
#pragma unroll
      for (int k = 0; k < kILP; ++k) acc += r[k] * r[k];  // lanes past n loaded 0
    });
    const O s = block_sum(acc);
    if (threadIdx.x == 0) partials[m.partial_base[c.t] + c.chunk] = static_cast<double>(s);
  }
};

// Slot 0: the tensor (T), scaled in place by min(1, max_norm / (norm + eps)). The scale is computed
// in the norm's dtype (float or double), as the reference does, then used in opmath. A NaN norm
// gives a NaN scale (torch.clamp propagates NaN).
template <typename T>
struct ScaleByNormFunctor {
  using O = at::opmath_type<T>;
  const void* norm;
  bool norm_is_double;
  double max_norm;
  double eps;

  __device__ __forceinline__ O scale() const {
    if (norm_is_double) {
      const double q = div_rn(max_norm, add_rn(*static_cast<const double*>(norm), eps));
      return static_cast<O>(q > 1.0 ? 1.0 : q);
    }
    const float q = div_rn(static_cast<float>(max_norm), add_rn(*static_cast<const float*>(norm), static_cast<float>(eps)));
    return static_cast<O>(q > 1.0f ? 1.0f : q);
  }

  template <class Meta>
  __device__ __forceinline__ void operator()(const Meta& m) const {
    const ChunkRef c = locate(m);
    T* x = slot_ptr<T>(m, 0, c);
    const O s = scale();
    const int64_t n = c.n;
    walk_chunk(n, is_aligned(x), [&](auto vec_tag, int64_t i0, int64_t stride) {
      constexpr bool kVec = decltype(vec_tag)::value;
      O r[kILP];
      load<kVec>(r, x, i0, stride, n);
#pragma unroll
      for (int k = 0; k < kILP; ++k) r[k] = mul_rn(r[k], s);
      store<kVec>(x, r, i0, stride, n);
    });
  }
};

void check_tensors(const char* op, at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": tensors is empty");
  check_floating(op, "tensors", tensors);
  kernel_device(op, "tensors", tensors, at::kCUDA);
}

// The norm of `contig` (contiguous views of the caller's tensors) as a 0-d tensor on the device.
at::Tensor norm_of(const char* op, const std::vector<at::Tensor>& contig) {
  const size_t n = contig.size();
  const bool any_double = norm_accumulates_in_double(contig);
  const at::Device device = contig[0].device();
  std::vector<at::ScalarType> keys(n);
  std::vector<int64_t> base(n, 0);
  int64_t total_chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    keys[i] = contig[i].scalar_type();
    base[i] = total_chunks;
    total_chunks += num_chunks(contig[i].numel());
  }
  TORCH_CHECK(total_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many chunks: ", total_chunks);
  const auto options = contig[0].options();
  at::Tensor partials = at::empty({total_chunks}, options.dtype(at::kDouble));
  at::Tensor norm = at::empty({}, options.dtype(any_double ? at::kDouble : at::kFloat));
  double* partials_ptr = partials.data_ptr<double>();
  for (const auto& group : group_by(keys)) {
    std::vector<TensorEntry<1>> entries;
    for (size_t i : group.second) {
      TensorEntry<1> e;
      e.numel = contig[i].numel();
      if (e.numel == 0) continue;
      e.addr[0] = address(contig[i], device);
      e.mode[0] = kReduce;
      e.partial_base = static_cast<int32_t>(base[i]);
      entries.push_back(e);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "global_norm", [&] {
      if (any_double) {
        multi_tensor_apply<1>(entries, SquareSumFunctor<scalar_t, double>{partials_ptr});
      } else {
        multi_tensor_apply<1>(entries, SquareSumFunctor<scalar_t, at::opmath_type<scalar_t>>{partials_ptr});
      }
    });
  }
  finalize_sums(partials, {SumTarget{norm.data_ptr(), norm.scalar_type(), 0, total_chunks}}, /*take_sqrt=*/true);
  return norm;
}

at::Tensor global_norm_cuda(at::TensorList tensors) {
  const char* op = "global_norm";
  check_tensors(op, tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> contig;
  contig.reserve(tensors.size());
  for (const auto& t : tensors) contig.push_back(t.contiguous());
  return norm_of(op, contig);
}

at::Tensor clip_grad_norm__cuda(at::TensorList tensors, double max_norm, double eps) {
  const char* op = "clip_grad_norm_";
  TORCH_CHECK_VALUE(max_norm > 0, op, ": max_norm must be positive, got ", max_norm);
  check_tensors(op, tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> contig;
  contig.reserve(tensors.size());
  for (const auto& t : tensors) contig.push_back(t.contiguous());  // t itself when contiguous
  at::Tensor norm = norm_of(op, contig);
  const bool norm_is_double = norm.scalar_type() == at::kDouble;
  std::vector<at::ScalarType> keys(contig.size());
  for (size_t i = 0; i < contig.size(); ++i) keys[i] = contig[i].scalar_type();
  for (const auto& group : group_by(keys)) {
    std::vector<TensorEntry<1>> entries;
    for (size_t i : group.second) {
      TensorEntry<1> e;
      e.numel = contig[i].numel();
      if (e.numel == 0) continue;
      e.addr[0] = address(contig[i], contig[i].device());
      entries.push_back(e);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "clip_grad_norm_", [&] {
      multi_tensor_apply<1>(entries,
                            ScaleByNormFunctor<scalar_t>{norm.const_data_ptr(), norm_is_double, max_norm, eps});
    });
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!contig[i].is_same(tensors[i])) tensors[i].copy_(contig[i]);
  }
  return norm;
}

}  // namespace

namespace {

template <class Table>
void launch_finalize(const double* p, int64_t n_partials, const std::vector<SumTarget>& targets, bool take_sqrt) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Table table{};
  int k = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const SumTarget& t = targets[i];
    TORCH_INTERNAL_ASSERT(t.begin >= 0 && t.count >= 0 && t.begin + t.count <= n_partials);
    table.out[k] = t.out;
    table.begin[k] = t.begin;
    table.count[k] = t.count;
    table.dtype[k] = static_cast<uint8_t>(t.dtype);
    if (++k == Table::kMax || i + 1 == targets.size()) {
      finalize_sums_kernel<Table><<<k, kSumThreads, 0, stream>>>(p, table, take_sqrt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      k = 0;
    }
  }
}

}  // namespace

void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>& targets, bool take_sqrt) {
  TORCH_INTERNAL_ASSERT(partials.is_cuda() && partials.scalar_type() == at::kDouble && partials.is_contiguous());
  if (targets.empty()) return;
  const double* p = partials.numel() == 0 ? nullptr : partials.const_data_ptr<double>();
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  if (large_kernel_args()) return launch_finalize<SumTable<true>>(p, partials.numel(), targets, take_sqrt);
#endif
  launch_finalize<SumTable<false>>(p, partials.numel(), targets, take_sqrt);
}

}  // namespace pymaml::cuda

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("global_norm", &pymaml::cuda::global_norm_cuda);
  m.impl("clip_grad_norm_", &pymaml::cuda::clip_grad_norm__cuda);
}
