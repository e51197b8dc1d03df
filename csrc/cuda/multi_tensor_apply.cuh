// Multi-tensor apply for pymaml's CUDA kernels.
//
// One launch walks a table of (tensor, chunk) pairs that is passed by value as the kernel argument,
// so a list of many small tensors costs one launch instead of one per tensor (the scheme of
// PyTorch's ATen/native/cuda/MultiTensorApply.cuh and apex). Each block handles one chunk of
// kChunkSize elements of one tensor, 512 threads, kILP elements a thread per step; it uses 16-byte
// class vector loads when every pointer it touches is aligned, and a bounds-checked scalar path for
// the rest (unaligned views, and the < kILP elements at the end of a tensor). The table is refilled
// and the kernel launched again whenever it runs out of tensor or block slots.
//
// Contract for callers (the host side of every op in this directory):
//   * every address put into a TensorEntry belongs to a contiguous tensor on the current device
//     whose element type is the one the functor is instantiated for, checked before data_ptr() is
//     read;
//   * entries with numel 0 are skipped here, so ops must still produce their (empty) outputs;
//   * launches go to c10::cuda::getCurrentCUDAStream() under the caller's CUDAGuard and are checked
//     with C10_CUDA_KERNEL_LAUNCH_CHECK(); nothing here synchronises with the host, so the ops can be
//     captured into CUDA graphs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <pymaml/ops.h>

#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace pymaml::cuda {

constexpr int kILP = 4;
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;

// The kernel-argument limit: 32764 bytes with CUDA >= 12.1 on Volta and newer; PyTorch relies on it
// from CUDA 13 on, and so do we (older toolkits get the classic 4096 bytes).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000
constexpr int kParamBytes = 32764;
constexpr int kMaxBlocks = 2240;
using block_index_t = uint16_t;
#else
constexpr int kParamBytes = 4096;
constexpr int kMaxBlocks = 320;
using block_index_t = uint8_t;
#endif
// Room left in the argument buffer for the functor (scalars and a few pointers).
constexpr int kFunctorBytes = 256;

// Per-tensor modes for the two scalar slots of an entry (what each op makes of them is documented
// in its functor).
enum Mode : uint8_t {
  kNone = 0,     // slot unused
  kArg = 1,      // the value is a functor argument (a Python float, or a CPU tensor read on the host)
  kDevice = 2,   // a one-element tensor read on the device: entry.scalar[slot] (dtype scalar_dtype)
  kElement = 3,  // one value per element: a tensor in one of the address slots
  kReduce = 4,   // a per-chunk partial sum is written to partials[partial_base + chunk]
};

constexpr int max_tensors_for(int depth) {
  // addresses + numel + 2 scalar pointers + partial base + 2 dtypes + 2 modes
  const int per_tensor = depth * 8 + 8 + 2 * 8 + 4 + 2 + 2;
  const int fixed = kMaxBlocks * static_cast<int>(sizeof(block_index_t) + sizeof(int32_t)) + 64;
  const int n = (kParamBytes - kFunctorBytes - fixed) / per_tensor;
  const int cap = static_cast<int>(std::numeric_limits<block_index_t>::max()) + 1;
  return n < cap ? n : cap;
}

template <int D>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_for(D);
  void* addr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  const void* scalar[2][kMaxTensors];
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
  int32_t partial_base = 0;
};

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

template <int D, typename F>
C10_LAUNCH_BOUNDS_1(kBlockSize)
__global__ void multi_tensor_kernel(TensorListMeta<D> meta, F functor) {
  functor(meta);
}

// Launches `functor` over every chunk of every non-empty entry, as few times as the table allows.
template <int D, typename F>
void multi_tensor_apply(const std::vector<TensorEntry<D>>& entries, const F& functor) {
  using Meta = TensorListMeta<D>;
  static_assert(sizeof(Meta) + sizeof(F) <= kParamBytes, "kernel arguments exceed the launch limit");
  static_assert(sizeof(F) <= kFunctorBytes, "functor too large for the reserved argument space");
  if (entries.empty()) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Meta meta{};
  int n_tensors = 0;
  int n_blocks = 0;
  auto put = [&meta](int slot, const TensorEntry<D>& e) {
    for (int d = 0; d < D; ++d) meta.addr[d][slot] = e.addr[d];
    meta.numel[slot] = e.numel;
    meta.partial_base[slot] = e.partial_base;
    for (int s = 0; s < 2; ++s) {
      meta.scalar[s][slot] = e.scalar[s];
      meta.scalar_dtype[s][slot] = e.scalar_dtype[s];
      meta.mode[s][slot] = e.mode[s];
    }
  };
  auto launch = [&] {
    multi_tensor_kernel<D, F><<<n_blocks, kBlockSize, 0, stream>>>(meta, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    put(n_tensors++, e);
    const int64_t chunks = num_chunks(e.numel);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<block_index_t>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      if (n_blocks == kMaxBlocks || (last_chunk && n_tensors == Meta::kMaxTensors)) {
        launch();
        n_blocks = 0;
        if (last_chunk) {
          n_tensors = 0;
        } else {  // the tensor goes on in the next launch, as its slot 0
          put(0, e);
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch();
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

struct ChunkRef {
  int t;           // slot in the table
  int32_t chunk;   // chunk index within the tensor
  int64_t offset;  // first element of the chunk
  int64_t n;       // elements in the chunk (<= kChunkSize)
};

template <int D>
__device__ __forceinline__ ChunkRef locate(const TensorListMeta<D>& m) {
  const int t = m.block_to_tensor[blockIdx.x];
  const int32_t chunk = m.block_to_chunk[blockIdx.x];
  const int64_t offset = static_cast<int64_t>(chunk) * kChunkSize;
  const int64_t left = m.numel[t] - offset;
  return {t, chunk, offset, left < kChunkSize ? left : kChunkSize};
}

// Pointer of slot d for the chunk, or nullptr when the slot is unused.
template <typename T, int D>
__device__ __forceinline__ T* slot_ptr(const TensorListMeta<D>& m, int d, const ChunkRef& c) {
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

// Separately rounded arithmetic. nvcc contracts a * b + c into one FMA by default (and
// --use_fast_math approximates float division); the reference rounds every operation, so the
// element-wise results here are bitwise those of pymaml.reference for every dtype.
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

// The device of a CUDA op's list: ts[0]'s, which must be a CUDA device holding every tensor of ts
// (the per-index checks of pymaml/ops.h then tie the other lists to it). ts must not be empty.
inline at::Device cuda_device_of(const char* op, const char* name, at::TensorList ts) {
  const at::Device device = ts[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": ", name, "[0] is on ", device,
                    " but the CUDA kernel was called; call through pymaml.ops, which groups tensors by device");
  check_one_device(op, name, ts, device);
  return device;
}

// A contiguous tensor of dtype `dtype` with t's values: t itself when it already is one.
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

inline void* address(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.is_cuda());
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

// Per-chunk partial sums (float64) reduced into one-element outputs, on the current stream.
struct SumTarget {
  void* out;             // one element of dtype `dtype` (a supported float type), on the device
  at::ScalarType dtype;
  int64_t begin;         // partials[begin, begin + count)
  int64_t count;
};
// Deterministic: a fixed-order strided sum per thread, then a fixed tree. With take_sqrt the square
// root of the sum is written. Defined in norm.cu.
void finalize_sums(const at::Tensor& partials, const std::vector<SumTarget>& targets, bool take_sqrt);

}  // namespace pymaml::cuda
