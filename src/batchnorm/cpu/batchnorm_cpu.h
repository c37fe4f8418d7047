// The tensor-level entry points of the fused CPU kernels, which the autograd glue and the
// bindings (batchnorm_cpu.cpp) call: training forward and backward (train.cpp) and the eval
// forward (eval.cpp), plain functions of tensors; and the helpers they share to read tensors in
// place. The kernels themselves work on raw pointers (kernels.h).

#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels.h"

namespace bncpu {

// The kernels read a tensor in place when it is contiguous (NCS) or channels-last (MC), which
// covers the layouts torch produces; anything else is copied to contiguous first.
inline bool channels_last(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

inline at::Tensor readable(const at::Tensor& x) {
  return x.is_contiguous() || channels_last(x) ? x : x.contiguous();
}

// The geometry of a readable tensor (computed from sizes: creating view tensors would cost
// microseconds each, which matter on small layers).
inline Layout layout_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  if (x.is_contiguous()) {
    const int64_t S = C == 0 || N == 0 ? 1 : x.numel() / (N * C);
    return Layout{C, N, S, C * S, S};
  }
  return Layout{C, x.numel() / C, 1, C, 1};  // channels-last: rows of C channels
}

inline bool streams(const at::Tensor& out) {
  return kCanStream && int64_t(out.nbytes()) >= kStreamBytes;
}

// weight, bias or a running statistic in dtype, contiguous; nullopt when absent.
inline c10::optional<at::Tensor> as_dtype(const c10::optional<at::Tensor>& t,
                                          at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  if (t->scalar_type() == dtype && t->is_contiguous()) return t;  // no dispatcher round trip
  return t->to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Training forward: (y in x's layout, stats (2, C) float64: row 0 the batch mean, row 1 the
// inverse standard deviation 1 / sqrt(var + eps)). Updates running_mean / running_var in place
// when given.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                c10::optional<at::Tensor> running_mean,
                                c10::optional<at::Tensor> running_var, double momentum,
                                double eps);

// Training backward: (dx in x's layout, or undefined when need_dx is false; dgamma; dbeta), in
// x's dtype; stats is forward's.
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 bool need_dx);

// Eval forward: y = x * scale + shift in x's layout, with scale = gamma * rsqrt(running_var +
// eps) and shift = beta - running_mean * scale computed in x's dtype, as the ATen path does
// (the same bits).
at::Tensor infer(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                 const at::Tensor& running_var, double eps);

// A fixed per-channel affine map in one pass of the eval kernel: y = x * scale + shift in x's
// layout (no shift: y = x * scale), scale and shift (C,) tensors cast to x's dtype. Frozen BN's
// forward, and its backward dx = dy * scale.
at::Tensor affine(const at::Tensor& x, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& shift);

}  // namespace bncpu
