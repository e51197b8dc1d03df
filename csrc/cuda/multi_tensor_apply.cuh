// Multi-tensor apply for pymaml's CUDA kernels: the device side, and the launch.
//
// One launch walks a table of (tensor, chunk) pairs that is passed by value as the kernel argument,
// so a list of many small tensors costs one launch instead of one per tensor (the scheme of
// PyTorch's ATen/native/cuda/MultiTensorApply.cuh and apex). Each block handles one chunk of
// kChunkSize elements of one tensor, 512 threads, kILP = 4 elements a thread per step; it loads
// those 4 elements as one vector (16 bytes for float, 32 for double, 8 for half and bfloat16) when
// every pointer it touches is aligned to that size, and takes a bounds-checked scalar path for the
// rest (unaligned views, and the < kILP elements at the end of a tensor). The table is refilled
// and the kernel launched again whenever it runs out of tensor or block slots. The tables, their
// two sizes and the operand preparation are host code shared with the CPU build:
// csrc/include/pymaml/device_plan.h.
//
// Contract for callers (the host side of every op in this directory):
//   * every address put into a TensorEntry belongs to a contiguous tensor on the current device
//     whose element type is the one the functor is instantiated for, checked before data_ptr() is
//     read (device_plan.h: address);
//   * entries with numel 0 are skipped here, so ops must still produce their (empty) outputs;
//   * launches go to c10::cuda::getCurrentCUDAStream() under the caller's CUDAGuard and are checked
//     with C10_CUDA_KERNEL_LAUNCH_CHECK(); nothing here synchronises with the host, so the ops can be
//     captured into CUDA graphs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/CallOnce.h>
#include <cuda_runtime_api.h>
#include <pymaml/device_plan.h>
#include <pymaml/ops.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace pymaml::cuda {

using namespace pymaml::device;  // NOLINT: the shared host side, used throughout this directory

// Whether launches on the current device and stream may use the 32764-byte argument tables
// (device_plan.h: use_large_kernel_args). The driver and the devices' compute capabilities are read
// once; the capture status is asked per launch (a host query, no sync).
inline bool large_kernel_args() {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  static c10::once_flag once;
  static int driver = 0;
  static std::vector<int> major;
  c10::call_once(once, [] {
    C10_CUDA_CHECK(cudaDriverGetVersion(&driver));
    const int n = c10::cuda::device_count();
    major.resize(n);
    for (int d = 0; d < n; ++d) C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[d], cudaDevAttrComputeCapabilityMajor, d));
  });
  const int d = c10::cuda::current_device();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  return d < static_cast<int>(major.size()) && use_large_kernel_args(CUDART_VERSION, driver, major[d], capturing);
#else
  return false;
#endif
}

template <class Meta, typename F>
C10_LAUNCH_BOUNDS_1(kBlockSize)
__global__ void multi_tensor_kernel(Meta meta, F functor) {
  functor(meta);
}

template <class Meta, int D, typename F>
void launch_tables(const std::vector<TensorEntry<D>>& entries, const F& functor) {
  static_assert(sizeof(Meta) + sizeof(F) <= Meta::kParamBytes, "kernel arguments exceed the launch limit");
  static_assert(sizeof(F) <= kFunctorBytes, "functor too large for the reserved argument space");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_table<Meta>(entries, [&](const Meta& meta, int n_blocks) {
    multi_tensor_kernel<Meta, F><<<n_blocks, kBlockSize, 0, stream>>>(meta, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Launches `functor` over every chunk of every non-empty entry, as few times as the table allows,
// with the large tables where the driver and device allow them (chosen at run time).
template <int D, typename F>
void multi_tensor_apply(const std::vector<TensorEntry<D>>& entries, const F& functor) {
  if (entries.empty()) return;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  if (large_kernel_args()) {
    launch_tables<TensorListMeta<D, true>>(entries, functor);
    return;
  }
#endif
  launch_tables<TensorListMeta<D, false>>(entries, functor);
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

struct ChunkRef {
  int t;           // slot in the table
  int32_t chunk;   // chunk index within the tensor
  int64_t offset;  // first element of the chunk
  int64_t n;       // elements in the chunk (<= kChunkSize)
};

template <class Meta>
__device__ __forceinline__ ChunkRef locate(const Meta& m) {
  const int t = m.block_to_tensor[blockIdx.x];
  const int32_t chunk = m.block_to_chunk[blockIdx.x];
  const int64_t offset = static_cast<int64_t>(chunk) * kChunkSize;
  const int64_t left = m.numel[t] - offset;
  return {t, chunk, offset, left < kChunkSize ? left : kChunkSize};
}

// Pointer of slot d for the chunk, or nullptr when the slot is unused.
template <typename T, class Meta>
__device__ __forceinline__ T* slot_ptr(const Meta& m, int d, const ChunkRef& c) {
  T* base = static_cast<T*>(m.addr[d][c.t]);
  return base == nullptr ? nullptr : base + c.offset;
}

template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

// nullptr counts as aligned: unused slots never block the vector path.
template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

// Loads kILP values as O: with kVec, elements i0 .. i0+kILP-1 in one vector load (caller checked
// alignment and that they exist); otherwise elements i0 + k*stride, zero where >= n.
template <bool kVec, typename O, typename T>
__device__ __forceinline__ void load(O (&r)[kILP], const T* p, int64_t i0, int64_t stride, int64_t n) {
  if constexpr (kVec) {
    const Vec<T> x = *reinterpret_cast<const Vec<T>*>(p + i0);
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = static_cast<O>(x.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = i0 + k * stride;
      r[k] = i < n ? static_cast<O>(p[i]) : O(0);
    }
  }
}

template <bool kVec, typename T, typename O>
__device__ __forceinline__ void store(T* p, const O (&r)[kILP], int64_t i0, int64_t stride, int64_t n) {
  if constexpr (kVec) {
    Vec<T> x;
#pragma unroll
    for (int k = 0; k < kILP; ++k) x.v[k] = static_cast<T>(r[k]);
    *reinterpret_cast<Vec<T>*>(p + i0) = x;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = i0 + k * stride;
      if (i < n) p[i] = static_cast<T>(r[k]);
    }
  }
}

// Walks the n elements of a chunk: step(std::bool_constant<kVec>, i0, stride) is called with the
// arguments load/store expect. The vector path covers floor(n / kILP) * kILP elements and hands the
// rest (fewer than kILP) to threads 0.. one element each (stride n puts lanes 1.. out of range).
template <typename Step>
__device__ __forceinline__ void walk_chunk(int64_t n, bool vec, Step&& step) {
  if (vec) {
    const int64_t nv = n / kILP;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) step(std::true_type{}, v * kILP, int64_t{1});
    const int64_t i = nv * kILP + threadIdx.x;
    if (i < n) step(std::false_type{}, i, n);
  } else {
    const int64_t stride = blockDim.x;
    for (int64_t i0 = threadIdx.x; i0 < n; i0 += stride * kILP) step(std::false_type{}, i0, stride);
  }
}

// The non-finite flag (ops.h: found_inf). Whether one of the kILP values that exist (on the vector
// path, all of them) is NaN or ±Inf.
template <bool kVec, typename O>
__device__ __forceinline__ bool any_nonfinite(const O (&r)[kILP], int64_t i0, int64_t stride, int64_t n) {
  bool bad = false;
#pragma unroll
  for (int k = 0; k < kILP; ++k) bad |= (kVec || i0 + k * stride < n) && !isfinite(r[k]);
  return bad;
}

// Sets the flag (nullptr: none). A plain, relaxed store: every writer stores the same value, nothing
// orders it against other memory, and the host reads it only after the stream has passed the kernel.
__device__ __forceinline__ void raise_flag(float* flag, bool bad) {
  if (bad && flag != nullptr) *flag = 1.0f;
}

// Separately rounded arithmetic. nvcc contracts a * b + c into one FMA by default; the reference
// rounds every operation, so the element-wise results here are bitwise those of pymaml.reference
// for every dtype. (The build does not use --use_fast_math: it would flush subnormals to zero.)
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Reads a one-element tensor of dtype `dtype` (one of the four float types) as O.
template <typename O>
__device__ __forceinline__ O load_scalar(const void* p, uint8_t dtype) {
  switch (dtype) {
    case static_cast<uint8_t>(at::ScalarType::Double):
      return static_cast<O>(*static_cast<const double*>(p));
    case static_cast<uint8_t>(at::ScalarType::Half):
      return static_cast<O>(static_cast<float>(*static_cast<const at::Half*>(p)));
    case static_cast<uint8_t>(at::ScalarType::BFloat16):
      return static_cast<O>(static_cast<float>(*static_cast<const at::BFloat16*>(p)));
    default:
      return static_cast<O>(*static_cast<const float*>(p));
  }
}

// Sum over the block, valid in thread 0. blockDim.x must be a multiple of 32; every thread of the
// block must call it (it synchronises). The order is fixed, so the result is deterministic.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Host helpers shared by the ops.

// A CUDA guard on the device of ts[0] when that is a CUDA tensor (otherwise the op's checks reject
// the call with a message naming the device).
inline c10::cuda::OptionalCUDAGuard guard_for(at::TensorList ts) {
  return c10::cuda::OptionalCUDAGuard(!ts.empty() && ts[0].is_cuda() ? std::optional<at::Device>(ts[0].device())
                                                                     : std::nullopt);
}

// Per-chunk partial sums (float64) reduced into one-element outputs (device_plan.h: SumTarget), on
// the current stream. Deterministic: a fixed-order strided sum per thread, then a fixed tree. With take_sqrt the square
// root of the sum is written. Defined in norm.cu.
void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>& targets, bool take_sqrt);

}  // namespace pymaml::cuda
