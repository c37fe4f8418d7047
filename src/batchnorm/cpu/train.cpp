// Training BN's forward and backward on tensors: the layout decides the kernels
// (train_contiguous.cpp or train_channels_last.cpp, see kernels.h), the running statistics are
// updated here.
//
// Forward statistics, per channel over its m values (paper, Algorithm 1), in one read: values
// are summed in T over groups of a few hundred, as d = x - shift with the shift the previous
// group's mean, then added to double sums re-based on the channel's origin R (the mean of its
// first values; MC: each row block's own, the blocks' sums re-based in turn on the first's):
//   A = sum(x - R) = sum_groups [sum(d) + n delta],
//   B = sum((x - R)^2) = sum_groups [sum(d^2) + delta (2 sum(d) + n delta)], delta = shift - R,
//   mu = R + A / m,  var = B / m - (A / m)^2.
// Each group's float sums are of values centred near the group's own mean (the first group is
// centred on the origin), so they are accurate whatever the data's offset (the large-offset
// test) or order (an outlying first value, sorted data: tested); the re-basing is exact but for
// double rounding. Never E[x^2] - mu^2 in the data's precision.
//   y  = scale * (x - mu) + beta,  scale = gamma / sqrt(var + eps)
//   running statistics updated in place from mu and the unbiased m/(m-1) var
// Backward, with xc = x - mu:
//   dbeta = sum(dy);  dgamma = invstd * sum(dy * xc)
//   dx = gain * dy + k * xc + c0,  gain = gamma invstd,  k = -gain invstd dgamma / m,
//   c0 = -gain dbeta / m

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "batchnorm_cpu.h"

namespace bncpu {
namespace {

// running = (1 - momentum) running + momentum scale batch (scale m/(m-1) makes the variance
// unbiased), from the double statistics. A direct loop for contiguous buffers: a dispatched op
// costs microseconds, which matter next to small tensors.
void update_running(at::Tensor& running, const double* batch, double momentum, double scale) {
  const int64_t C = running.numel();
  if (!running.is_contiguous()) {
    auto b = at::empty({C}, running.options().dtype(at::kDouble));
    std::copy(batch, batch + C, b.data_ptr<double>());
    running.lerp_(b.mul_(scale).to(running.scalar_type()), momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(),
                                  "batchnorm_cpu_running", [&] {
    scalar_t* r = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      r[c] = scalar_t(double(r[c]) + momentum * (batch[c] * scale - double(r[c])));
  });
}

template <typename T>
void forward_kernel(const Layout& L, const ForwardPass<T>& p) {
  L.mc() ? mc_forward<T>(L, p) : ncs_forward<T>(L, p);
}

template <typename T>
void backward_kernel(const Layout& L, const BackwardPass<T>& p) {
  L.mc() ? mc_backward<T>(L, p) : ncs_backward<T>(L, p);
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                c10::optional<at::Tensor> running_mean,
                                c10::optional<at::Tensor> running_var, double momentum,
                                double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "batchnorm_cpu: input must be a CPU tensor "
              "of rank >= 2");
  const at::Tensor xr = readable(x);
  at::Tensor y = at::empty_like(xr);  // xr's strides: the same layout
  const int64_t C = xr.size(1);
  auto stats = at::empty({2, C}, x.options().dtype(at::kDouble));
  double* mean = stats.data_ptr<double>();
  std::vector<double> var(C);
  const auto w = as_dtype(weight, x.scalar_type());
  const auto b = as_dtype(bias, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_forward", [&] {
    using T = scalar_t;
    forward_kernel<T>(layout_of(xr), {xr.data_ptr<T>(), ptr_or_null<T>(w), ptr_or_null<T>(b),
                                      y.data_ptr<T>(), streams(y), mean, mean + C, var.data(),
                                      eps});
  });
  if (running_mean.has_value() && running_mean->defined()) {
    const double m = double(x.numel() / std::max<int64_t>(1, C));
    update_running(*running_mean, mean, momentum, 1.0);
    update_running(*running_var, var.data(), momentum, m / std::max(1.0, m - 1.0));
  }
  return {y, stats};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 bool need_dx) {
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous(),
              "batchnorm_cpu: stats must be forward's contiguous float64 (2, C)");
  const at::Tensor xr = readable(x);
  // the gradient in xr's layout and dtype (an expanded gradient, e.g. of a sum, is materialized)
  at::Tensor dyr = dy;
  if (dy.scalar_type() != xr.scalar_type() || dy.strides() != xr.strides() ||
      !dy.is_non_overlapping_and_dense())
    dyr = at::empty_like(xr).copy_(dy);
  at::Tensor dx = need_dx ? at::empty_like(xr) : at::Tensor();
  const int64_t C = xr.size(1);
  auto dgamma = at::empty({C}, x.options());
  auto dbeta = at::empty({C}, x.options());
  const auto w = as_dtype(weight, x.scalar_type());
  const double* mean = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_backward", [&] {
    using T = scalar_t;
    backward_kernel<T>(layout_of(xr), {xr.data_ptr<T>(), dyr.data_ptr<T>(), ptr_or_null<T>(w),
                                       mean, mean + C, need_dx ? dx.data_ptr<T>() : nullptr,
                                       need_dx && streams(dx), dgamma.data_ptr<T>(),
                                       dbeta.data_ptr<T>()});
  });
  return {dx, dgamma, dbeta};
}

}  // namespace bncpu
