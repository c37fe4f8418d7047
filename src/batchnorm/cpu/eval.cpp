// Eval (inference) BN: y = x * scale + shift, one pass over memory in either layout (see
// kernels.h), with scale = gamma * rsqrt(running_var + eps) and shift = beta - running_mean *
// scale computed in x's dtype, as the ATen path does (the same bits). Never streamed: the next
// layer reads the output at once. affine() is the same pass with the constants given (frozen BN).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include "batchnorm_cpu.h"

namespace bncpu {
namespace {

// NCS in parallel over runs (memory order), MC over rows.
template <typename T>
void infer_impl(const at::Tensor& xr, const T* scale, const T* shift, T* y) {
  const Layout L = layout_of(xr);
  const T* x = xr.data_ptr<T>();
  if (L.mc()) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, L.C));
    at::parallel_for(0, L.rows, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* xr_ = x + i * L.outer;
        T* yr = y + i * L.outer;
#pragma omp simd
        for (int64_t c = 0; c < L.C; ++c) yr[c] = xr_[c] * scale[c] + shift[c];
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainValues / L.run);
  at::parallel_for(0, L.rows * L.C, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % L.C, base = r * L.run;  // runs are consecutive in memory
      const T a = scale[c], s = shift[c];
      const T* xr_ = x + base;
      T* yr = y + base;
#pragma omp simd
      for (int64_t j = 0; j < L.run; ++j) yr[j] = xr_[j] * a + s;
    }
  });
}

}  // namespace

at::Tensor infer(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                 const at::Tensor& running_var, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "batchnorm_cpu: input must be a CPU tensor "
              "of rank >= 2");
  const at::Tensor xr = readable(x);
  at::Tensor y = at::empty_like(xr);
  const int64_t C = xr.size(1);
  const auto dtype = x.scalar_type();
  const auto w = as_dtype(weight, dtype), b = as_dtype(bias, dtype);
  const auto rm = *as_dtype(running_mean, dtype), rv = *as_dtype(running_var, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "batchnorm_cpu_infer", [&] {
    using T = scalar_t;
    const T *wp = ptr_or_null<T>(w), *bp = ptr_or_null<T>(b);
    const T *mp = rm.data_ptr<T>(), *vp = rv.data_ptr<T>();
    std::vector<T> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const T invstd = T(1) / std::sqrt(vp[c] + T(eps));
      scale[c] = wp ? wp[c] * invstd : invstd;
      shift[c] = bp ? bp[c] - mp[c] * scale[c] : -(mp[c] * scale[c]);
    }
    infer_impl<T>(xr, scale.data(), shift.data(), y.data_ptr<T>());
  });
  return y;
}

at::Tensor affine(const at::Tensor& x, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& shift) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "batchnorm_cpu: input must be a CPU tensor "
              "of rank >= 2");
  const at::Tensor xr = readable(x);
  at::Tensor y = at::empty_like(xr);
  const auto dtype = x.scalar_type();
  const at::Tensor a = *as_dtype(scale, dtype);
  const auto b = as_dtype(shift, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "batchnorm_cpu_affine", [&] {
    using T = scalar_t;
    std::vector<T> zeros(b ? 0 : xr.size(1), T(0));
    infer_impl<T>(xr, a.data_ptr<T>(), b ? b->data_ptr<T>() : zeros.data(), y.data_ptr<T>());
  });
  return y;
}

}  // namespace bncpu
