// The gradients of small CPU convolutions as matrix products over an im2col buffer: contract and
// formulas in csrc/include/pymaml/conv_gemm.h.
#include <pymaml/conv_gemm.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>
#include <c10/util/env.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <string>

namespace pymaml {
namespace conv_gemm {
namespace {

struct Geom {
  int64_t N, C, H, W, O, KH, KW, SH, SW, PH, PW, OH, OW;
  int64_t K() const { return KH * KW * C; }
  int64_t rows() const { return N * OH * OW; }
};

bool geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding, Geom& g) {
  if (x.dim() != 4 || w.dim() != 4 || stride.size() != 2 || padding.size() != 2) return false;
  g = {x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3),
       stride[0], stride[1], padding[0], padding[1], 0, 0};
  if (w.size(1) != g.C || g.SH < 1 || g.SW < 1 || g.PH < 0 || g.PW < 0) return false;
  const int64_t eh = g.H + 2 * g.PH - g.KH, ew = g.W + 2 * g.PW - g.KW;
  if (eh < 0 || ew < 0) return false;
  g.OH = eh / g.SH + 1;
  g.OW = ew / g.SW + 1;
  return g.N > 0 && g.C > 0 && g.O > 0 && g.KH > 0 && g.KW > 0;
}

// The size rule of Mode::kAuto, from benchmarks/bench_conv_gemm.py (both gradients, 1 and 2
// threads): the buffer products were faster than oneDNN for every strided layer of the Omniglot nets
// (64 channels at 28×28 to 4×4, stride 2: 1.0–3.8×) and for the smallest MiniImageNet layer
// (5 images of 32 channels at 10×10, stride 1: 1.1–1.6×), and slower for the larger stride-1 layers
// (0.15–0.9×), where im2col copies every input nine times and oneDNN's per-call cost is amortised.
constexpr int64_t kAutoMaxBuffer = int64_t{1} << 20;  // elements of cols (4 MiB of float)
constexpr int64_t kAutoMaxUnstridedRows = 1024;      // output positions N·oH·oW of a stride-1 layer

bool selected(const Geom& g) {
  switch (mode()) {
    case Mode::kNever:
      return false;
    case Mode::kAlways:
      return true;
    case Mode::kAuto:
    default:
      return g.rows() * g.K() <= kAutoMaxBuffer && ((g.SH >= 2 && g.SW >= 2) || g.rows() <= kAutoMaxUnstridedRows);
  }
}

at::MemoryFormat out_format(const at::Tensor& a, const at::Tensor& b) {
  // as torch's CPU convolutions: channels-last when the input or the weight is
  const bool cl = a.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                  b.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// [N·oH·oW, K] buffer of x (any strides; channels read contiguously when x's channel stride is 1).
template <typename T>
void im2col_kernel(const at::Tensor& x, const Geom& g, T* cols) {
  const T* xp = x.const_data_ptr<T>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t K = g.K();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.OW * K));
  at::parallel_for(0, g.N * g.OH, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      T* dst = cols + r * g.OW * K;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = oh * g.SH - g.PH + kh;
          if (ih < 0 || ih >= g.H) {
            std::fill(dst, dst + g.KW * g.C, T(0));
            dst += g.KW * g.C;
            continue;
          }
          const T* line = xp + n * sN + ih * sH;
          for (int64_t kw = 0; kw < g.KW; ++kw, dst += g.C) {
            const int64_t iw = ow * g.SW - g.PW + kw;
            if (iw < 0 || iw >= g.W) {
              std::fill(dst, dst + g.C, T(0));
            } else if (sC == 1 && g.C >= 16) {
              std::memcpy(dst, line + iw * sW, sizeof(T) * g.C);
            } else {
              const T* src = line + iw * sW;
              for (int64_t c = 0; c < g.C; ++c) dst[c] = src[c * sC];
            }
          }
        }
      }
    }
  });
}

// A [rows, cols] matrix in a per-thread buffer that is kept between calls (grow-only, up to
// kScratchKeep elements). The buffers are megabytes: fresh allocations of that size are fresh pages
// from the system each time, and the page faults cost about as much as the matrix product (measured
// on the Omniglot net's 14×14 layer: both gradients in 1.8–2.0 ms with kept buffers, 2.5–4.1 ms
// without). A result in it is valid until the same thread asks again.
constexpr int64_t kScratchKeep = int64_t{1} << 22;

at::Tensor scratch(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  const int64_t n = rows * cols;
  if (n > kScratchKeep) return at::empty({rows, cols}, options);
  const int64_t bytes = n * static_cast<int64_t>(options.dtype().itemsize());
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({std::max<int64_t>(bytes, 1 << 16)}, at::kByte);
  return at::from_blob(buffer.data_ptr(), {rows, cols}, options);
}

at::Tensor im2col(const at::Tensor& x, const Geom& g) {
  const at::Tensor src = (x.stride(1) == 1 || g.C == 1) ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor cols = scratch(g.rows(), g.K(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymaml::conv_gemm::im2col",
                             [&] { im2col_kernel<scalar_t>(src, g, cols.mutable_data_ptr<scalar_t>()); });
  return cols;
}

// dx [N, H, W, C] (contiguous) = the sum of dcols' entries over the positions im2col read them from.
// One thread per image, each summing in the same order: the result does not depend on the threads.
template <typename T>
void col2im_kernel(const T* dcols, const Geom& g, T* dx) {
  const int64_t img = g.H * g.W * g.C, K = g.K(), per = g.OH * g.OW * K;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per));
  at::parallel_for(0, g.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* out = dx + n * img;
      std::fill(out, out + img, T(0));
      const T* src = dcols + n * per;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.SH - g.PH + kh;
            for (int64_t kw = 0; kw < g.KW; ++kw, src += g.C) {
              const int64_t iw = ow * g.SW - g.PW + kw;
              if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
              T* __restrict__ o = out + (ih * g.W + iw) * g.C;
              for (int64_t c = 0; c < g.C; ++c) o[c] += src[c];
            }
          }
        }
      }
    }
  });
}

// weight as [O, K] in (kh, kw, c) order (a view for a channels-last weight)
at::Tensor weight_matrix(const at::Tensor& w, const Geom& g) { return w.permute({0, 2, 3, 1}).reshape({g.O, g.K()}); }

// gy as [N·oH·oW, O] (a view for a channels-last gy)
at::Tensor grad_matrix(const at::Tensor& gy, const Geom& g) {
  return gy.permute({0, 2, 3, 1}).reshape({g.rows(), g.O});
}

at::Tensor nhwc_to(const at::Tensor& t, at::MemoryFormat fmt) {
  // t is [N, H, W, C] contiguous; the [N, C, H, W] tensor in fmt
  const at::Tensor v = t.permute({0, 3, 1, 2});
  return fmt == at::MemoryFormat::ChannelsLast ? v : v.contiguous();
}

bool same_cpu_float(const at::Tensor& a, const at::Tensor& ref) {
  return a.defined() && a.device().is_cpu() && a.scalar_type() == ref.scalar_type() && a.layout() == at::kStrided &&
         !a.is_conj() && !a.is_neg();
}

std::atomic<int> g_mode{-1};  // -1: not read from the environment yet

bool can_run_side_by_side() { return at::get_num_threads() >= 2 && !at::in_parallel_region(); }

Mode mode_from_env() {
  const auto v = c10::utils::get_env("PYMAML_CONV_GEMM");
  if (!v.has_value() || v->empty()) return Mode::kAuto;
  const auto m = parse_mode(*v);
  TORCH_CHECK_VALUE(m.has_value(), "PYMAML_CONV_GEMM must be 0, 1 or auto, got '", *v, "'");
  return *m;
}

}  // namespace

std::optional<Mode> parse_mode(const std::string& name) {
  for (int k = 0; k < 3; ++k)
    if (name == kModeNames[k]) return static_cast<Mode>(k);
  return std::nullopt;
}

Mode mode() {
  int m = g_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    m = static_cast<int>(mode_from_env());
    g_mode.store(m, std::memory_order_relaxed);
  }
  return static_cast<Mode>(m);
}

Mode set_mode(Mode m) {
  const Mode old = mode();
  g_mode.store(static_cast<int>(m), std::memory_order_relaxed);
  return old;
}

bool applies(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!x.defined() || !x.device().is_cpu() || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) ||
      !same_cpu_float(x, x) || !same_cpu_float(w, x) || !same_cpu_float(gy, x) || groups != 1 ||
      dilation.size() != 2 || dilation[0] != 1 || dilation[1] != 1)
    return false;
  Geom g;
  return geometry(x, w, stride, padding, g) && gy.dim() == 4 && gy.size(0) == g.N && gy.size(1) == g.O &&
         gy.size(2) == g.OH && gy.size(3) == g.OW && selected(g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x,
                                                        const at::Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, std::array<bool, 3> mask) {
  Geom g;
  TORCH_INTERNAL_ASSERT(geometry(x, w, stride, padding, g));
  const auto fmt = out_format(x, w);
  const at::Tensor gm = grad_matrix(gy, g);
  auto input_grad = [&] {
    at::Tensor dcols = scratch(g.rows(), g.K(), x.options());
    at::mm_out(dcols, gm, weight_matrix(w, g));
    at::Tensor dx = at::empty({g.N, g.H, g.W, g.C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymaml::conv_gemm::col2im", [&] {
      col2im_kernel<scalar_t>(dcols.const_data_ptr<scalar_t>(), g, dx.mutable_data_ptr<scalar_t>());
    });
    return nhwc_to(dx, fmt);
  };
  auto weight_grad = [&] {
    // [O, K] = gyᵀ · cols; for a thin buffer (K < O, a first layer's few input channels) MKL is
    // faster on the transposed product (colsᵀ · gy)ᵀ, which is then copied into place (O·K numbers)
    const at::Tensor cols = im2col(x, g);
    const at::Tensor gwm = g.K() < g.O ? at::mm(cols.t(), gm).t().contiguous() : at::mm(gm.t(), cols);
    return nhwc_to(gwm.view({g.O, g.KH, g.KW, g.C}), fmt);
  };
  at::Tensor gx, gw, gb;
  if (mask[0] && mask[1]) {
    // small products gain little from a second thread each, two independent ones nearly twice
    side_by_side([&] { gx = input_grad(); }, [&] { gw = weight_grad(); });
  } else {
    if (mask[0]) gx = input_grad();
    if (mask[1]) gw = weight_grad();
  }
  if (mask[2]) gb = gm.sum(0);
  return {gx, gw, gb};
}

void side_by_side(const std::function<void()>& a, const std::function<void()>& b) {
  if (!can_run_side_by_side()) {
    a();
    b();
    return;
  }
  const at::ThreadLocalState tls;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t i = begin; i < end; ++i) (i == 0 ? a : b)();
  });
}

}  // namespace conv_gemm
}  // namespace pymaml

namespace {
// Test and benchmark hook: returns the mode ("0", "1" or "auto") and, given one, sets it, so that one
// process can run both paths (tests/test_conv.py, benchmarks/bench_conv_gemm.py).
std::string conv_gemm_mode(const std::optional<std::string>& m) {
  using namespace pymaml::conv_gemm;
  if (!m.has_value()) return kModeNames[static_cast<int>(mode())];
  const auto next = parse_mode(*m);
  TORCH_CHECK_VALUE(next.has_value(), "conv_gemm_mode: mode must be '0', '1' or 'auto', got '", *m, "'");
  return kModeNames[static_cast<int>(set_mode(*next))];
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pymaml_testing, m) { m.def("conv_gemm_mode(str? mode=None) -> str", &conv_gemm_mode); }
