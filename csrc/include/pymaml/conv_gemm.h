// The gradients of small CPU convolutions as matrix products over an im2col buffer
// (csrc/cpu/conv_gemm.cpp).
//
// A few-shot conv net runs many convolutions on small feature maps (an Omniglot 20-way task: 20
// images of 64 channels at 14×14, 7×7, 4×4), and a second-order meta-step runs six gradient
// kernels (weight or input) for each convolution of an inner step's forward pass: two in the inner
// backward, two in the outer backward of that convolution and two in its second derivative.
// oneDNN's gradient kernels pay a fixed cost per call that is large next to such a layer's work.
// Here, for a non-grouped, non-dilated 2-D convolution, with K = kH·kW·C and the buffer
//
//   cols[(n, oh, ow), (kh, kw, c)] = x[n, c, oh·sH − pH + kh, ow·sW − pW + kw]   (0 outside),
//
//   weight gradient: grad_W = gyᵀ · cols            gy as [N·oH·oW, O] in NHWC order,
//                                                    grad_W as [O, K] in (kh, kw, c) order
//   bias gradient:   grad_b = the column sums of gy
//   input gradient:  grad_x = col2im(gy · W)        W = the weight as [O, K]; col2im sums each
//                                                    entry back where im2col read it, one image per
//                                                    thread in a fixed order (independent of the
//                                                    number of threads)
//
// Channels-last (NHWC) inputs, gradients and weights are read in place; others are copied to that
// order first. Outputs are laid out as torch lays out the same gradients (channels-last when the
// input or the weight is). They agree with torch's kernels to floating-point rounding (the sums run
// in another order). The value of a convolution is always torch's.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <tuple>

namespace pymaml {
namespace conv_gemm {

// Which convolutions take this path, from PYMAML_CONV_GEMM (read at the first call): "0" none, "1"
// every one it can compute, unset or "auto" the measured size rule in conv_gemm.cpp. set_mode (and
// the test op torch.ops.pymaml_testing.conv_gemm_mode) changes it and returns the previous mode.
enum class Mode { kNever = 0, kAlways = 1, kAuto = 2 };
inline constexpr const char* kModeNames[] = {"0", "1", "auto"};  // indexed by Mode
std::optional<Mode> parse_mode(const std::string& name);          // nullopt for other names
Mode mode();
Mode set_mode(Mode m);

// True when (gy, x, w, stride, padding, dilation, groups) is a CPU float32/float64 2-D convolution's
// backward that this path computes (gy of x's dtype, shaped as the output) and the mode selects it.
bool applies(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// at::convolution_backward's outputs (grad_x, grad_w, grad_b) for the outputs in mask; the others
// undefined. Not differentiable: called from the op's CPU kernel only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x,
                                                        const at::Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, std::array<bool, 3> mask);

// Runs a() and b() side by side, each on one thread of torch's intra-op pool with the caller's
// thread-local state (grad mode, dispatch keys, profiler), when the pool has two threads and the
// caller is not already in a parallel region; else a() then b(). For pairs of independent small
// kernels, which gain little from a second thread each. The first exception either throws is
// rethrown.
void side_by_side(const std::function<void()>& a, const std::function<void()>& b);

}  // namespace conv_gemm
}  // namespace pymaml
