// CUDA kernel of pymaml::linear_head_hvp (contract: csrc/include/pymaml/head_hvp.h).
// The GEMMs go to at::mm (cuBLAS, current stream); this file holds the fused row pass that turns
// the logits (Z_v | Z) into (G | R): for cross-entropy one warp per row (shuffle reductions for the
// max, the softmax denominator and ⟨p, z_v⟩, so any number of classes works), for MSE one thread
// per element. Launched on the current stream under a device guard, checked after each launch.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "pymaml/head_hvp.h"

namespace pymaml {
namespace heads {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = ::max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// zz rows are (z_v | z), gr rows (g | r), both [n, 2c] contiguous. p is staged in g; each lane
// reads back only the entries it wrote, so no synchronisation is needed inside the row.
template <typename T>
__global__ void ce_rows_kernel(const T* __restrict__ zz, const int64_t* __restrict__ target, int64_t t_stride,
                               T* __restrict__ gr, int64_t n, int64_t c, T inv_n) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;  // whole warps leave together: row is uniform across a warp
  const T* zv = zz + row * 2 * c;
  const T* z = zv + c;
  T* g = gr + row * 2 * c;
  T* r = g + c;

  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = lane; k < c; k += kWarp) mx = ::max(mx, z[k]);
  mx = warp_max(mx);
  T sum = 0;
  for (int64_t k = lane; k < c; k += kWarp) {
    const T e = ::exp(z[k] - mx);
    g[k] = e;
    sum += e;
  }
  const T inv = T(1) / warp_sum(sum);
  T d = 0;
  for (int64_t k = lane; k < c; k += kWarp) {
    const T p = g[k] * inv;
    g[k] = p;
    d += p * zv[k];
  }
  d = warp_sum(d);
  const int64_t y = target[row * t_stride];
  CUDA_KERNEL_ASSERT(y >= 0 && y < c && "linear_head_hvp: target class out of range");
  for (int64_t k = lane; k < c; k += kWarp) {
    const T p = g[k];
    r[k] = p * (zv[k] - d) * inv_n;
    g[k] = (p - (k == y ? T(1) : T(0))) * inv_n;
  }
}

template <typename T>
__global__ void mse_rows_kernel(const T* __restrict__ zz, const T* __restrict__ target, int64_t ts0, int64_t ts1,
                                T* __restrict__ gr, int64_t n, int64_t c, T scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * c; idx += stride) {
    const int64_t i = idx / c, k = idx - i * c;
    const T* zv = zz + i * 2 * c;
    T* g = gr + i * 2 * c;
    g[k] = (zv[c + k] - target[i * ts0 + k * ts1]) * scale;
    g[c + k] = zv[k] * scale;
  }
}

void row_pass_cuda(const at::Tensor& zz, const at::Tensor& target, Loss loss, at::Tensor& gr) {
  const int64_t n = zz.size(0), c = zz.size(1) / 2;
  if (n == 0 || c == 0) return;
  const c10::cuda::CUDAGuard guard(zz.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(zz.scalar_type(), "linear_head_hvp_cuda", [&] {
    if (loss == Loss::CrossEntropy) {
      const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "linear_head_hvp: batch too large for one launch, N = ", n);
      ce_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          zz.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), target.stride(0),
          gr.mutable_data_ptr<scalar_t>(), n, c, scalar_t(1) / scalar_t(n));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t want = (n * c + kThreads - 1) / kThreads;
      const int64_t blocks = std::min<int64_t>(want, 65535);
      mse_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          zz.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), target.stride(0), target.stride(1),
          gr.mutable_data_ptr<scalar_t>(), n, c, scalar_t(2) / (scalar_t(n) * scalar_t(c)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_head_hvp_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& v_weight, const c10::optional<at::Tensor>& v_bias, c10::string_view loss) {
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_head_hvp_impl(x, weight, bias, target, v_weight, v_bias, loss, &row_pass_cuda);
}

}  // namespace
}  // namespace heads
}  // namespace pymaml

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("linear_head_hvp", &pymaml::heads::linear_head_hvp_cuda);
}
