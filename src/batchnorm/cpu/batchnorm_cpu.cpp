// Fused CPU kernels for the "torch" backend's training-mode BN (float32 / float64).
//
// Two layouts, both views of the caller's tensor (no copies):
//   NCS: contiguous (N, C, S): channel c is N runs of S contiguous values;
//   MC:  (M, C) rows (2-D input, or channels-last viewed as rows of C channels).
// Work is split over channels (at::parallel_for, torch's thread pool), so each channel's
// sums are accumulated by one thread, in double, in a fixed order: results are deterministic.
//
// Forward, per channel over its m values (paper, Algorithm 1):
//   mu = sum(x) / m;  var = sum((x - mu)^2) / m          (two passes, never E[x^2] - mu^2)
//   y  = scale * x + shift,  scale = gamma / sqrt(var + eps),  shift = beta - scale * mu
//   (the caller updates the running statistics from mu and var)
// Backward, with xc = x - mu:
//   dbeta = sum(dy);  dgamma = invstd * sum(dy * xc)
//   dx = gain * dy + k * xc + c0,  gain = gamma invstd,  k = -gain invstd dgamma / m,
//   c0 = -gain dbeta / m

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainValues = 1 << 15;  // values per task below which threads do not pay

int64_t grain_for(int64_t values_per_channel) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_channel));
}

// Geometry of a view: for channel c, element (i, j) lies at base + i * outer + c * cstride + j.
struct Layout {
  int64_t C, rows, run, outer, cstride;  // NCS: rows=N, run=S, outer=C*S, cstride=S
};                                        // MC:  rows=M, run=1, outer=C,   cstride=1

Layout layout_of(const at::Tensor& x3) {
  // x3 is (N, C, S) contiguous, or (M, C, 1) standing for (M, C) rows.
  const int64_t N = x3.size(0), C = x3.size(1), S = x3.size(2);
  return Layout{C, N, S, C * S, S};
}

// Per-channel sums over a block of channels [c0, c1), added to acc (double). Values are summed
// in T over short chunks (kChunk values of a run, or kChunk rows), which the compiler
// vectorizes, and each chunk's sum is added in double: accurate for millions of values.
constexpr int64_t kChunk = 64;

template <typename T, typename F>
void channel_sums(const Layout& L, int64_t c0, int64_t c1, double* acc, F&& term) {
  if (L.run == 1) {  // MC: rows outside, contiguous channels inside
    std::vector<T> part(c1 - c0);
    for (int64_t i0 = 0; i0 < L.rows; i0 += kChunk) {
      std::fill(part.begin(), part.end(), T(0));
      const int64_t i1 = std::min(L.rows, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = i * L.outer;
        T* p = part.data();
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) p[c - c0] += term(row + c, c - c0);
      }
      for (int64_t c = 0; c < c1 - c0; ++c) acc[c] += double(part[c]);
    }
  } else {  // NCS: each channel is `rows` contiguous runs
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      for (int64_t i = 0; i < L.rows; ++i) {
        const int64_t base = i * L.outer + c * L.cstride;
        for (int64_t j0 = 0; j0 < L.run; j0 += kChunk) {
          const int64_t j1 = std::min(L.run, j0 + kChunk);
          T part = 0;
#pragma omp simd reduction(+ : part)
          for (int64_t j = j0; j < j1; ++j) part += term(base + j, c - c0);
          s += double(part);
        }
      }
      acc[c - c0] += s;
    }
  }
}

template <typename F>
void for_each_value(const Layout& L, int64_t c0, int64_t c1, F&& body) {
  if (L.run == 1) {
    for (int64_t i = 0; i < L.rows; ++i) {
      const int64_t row = i * L.outer;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) body(row + c, c - c0);
    }
  } else {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = 0; i < L.rows; ++i) {
        const int64_t base = i * L.outer + c * L.cstride;
#pragma omp simd
        for (int64_t j = 0; j < L.run; ++j) body(base + j, c - c0);
      }
  }
}

template <typename T>
void forward_impl(const at::Tensor& x3, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y3, at::Tensor& mean,
                  at::Tensor& invstd, at::Tensor& var, double eps) {
  const Layout L = layout_of(x3);
  const int64_t m = L.rows * L.run;
  const T* x = x3.data_ptr<T>();
  T* y = y3.data_ptr<T>();
  double* mu_out = mean.data_ptr<double>();
  T* is_out = invstd.data_ptr<T>();
  T* var_out = var.data_ptr<T>();
  const T* w = weight.has_value() ? weight->data_ptr<T>() : nullptr;
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  at::parallel_for(0, L.C, grain_for(m), [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    // Pass 1, shifted by each channel's first value K: sum(x - K) has no large offset to
    // lose digits to, so float chunks stay accurate; mu = K + sum(x - K) / m.
    std::vector<T> shift0(n);
    for (int64_t c = 0; c < n; ++c) shift0[c] = x[(c0 + c) * L.cstride];
    std::vector<double> sum(n, 0.0), sq(n, 0.0), mu(n);
    channel_sums<T>(L, c0, c1, sum.data(), [&](int64_t k, int64_t c) { return x[k] - shift0[c]; });
    // y = (x - mu_T) scale + shift: x - mu_T is exact for x near mu (Sterbenz), which keeps
    // y accurate when the data has a large offset; shift absorbs mu's rounding mu - mu_T.
    std::vector<T> mu_t(n), scale(n), shift(n);
    for (int64_t c = 0; c < n; ++c) {
      mu[c] = double(shift0[c]) + sum[c] / double(m);
      mu_t[c] = T(mu[c]);
    }
    // Pass 2: sum((x - mu)^2) = sum((x - mu_T)^2) - m (mu - mu_T)^2
    channel_sums<T>(L, c0, c1, sq.data(), [&](int64_t k, int64_t c) {
      const T d = x[k] - mu_t[c];
      return d * d;
    });
    for (int64_t c = 0; c < n; ++c) {
      const double rounding = mu[c] - double(mu_t[c]);
      const double v = std::max(0.0, sq[c] / double(m) - rounding * rounding);  // biased
      const double is = 1.0 / std::sqrt(v + eps);
      const double g = w ? double(w[c0 + c]) : 1.0;
      const double be = b ? double(b[c0 + c]) : 0.0;
      scale[c] = T(g * is);
      shift[c] = T(be - g * is * rounding);
      mu_out[c0 + c] = mu[c];
      is_out[c0 + c] = T(is);
      var_out[c0 + c] = T(v);
    }
    // Pass 3
    for_each_value(L, c0, c1, [&](int64_t k, int64_t c) {
      y[k] = (x[k] - mu_t[c]) * scale[c] + shift[c];
    });
  });
}

template <typename T>
void backward_impl(const at::Tensor& dy3, const at::Tensor& x3,
                   const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                   const at::Tensor& invstd, at::Tensor& dx3, at::Tensor& dgamma,
                   at::Tensor& dbeta, bool need_dx) {
  const Layout L = layout_of(x3);
  const int64_t m = L.rows * L.run;
  const T* x = x3.data_ptr<T>();
  const T* dy = dy3.data_ptr<T>();
  T* dx = need_dx ? dx3.data_ptr<T>() : nullptr;
  const T* w = weight.has_value() ? weight->data_ptr<T>() : nullptr;
  const double* mu = mean.data_ptr<double>();
  const T* is = invstd.data_ptr<T>();
  T* dg = dgamma.data_ptr<T>();
  T* db = dbeta.data_ptr<T>();
  at::parallel_for(0, L.C, grain_for(m), [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    std::vector<T> mu_t(n);
    for (int64_t c = 0; c < n; ++c) mu_t[c] = T(mu[c0 + c]);
    // Pass 1 (two sums): sum(dy), sum(dy (x - mu_T)); sum(dy (x - mu)) subtracts (mu - mu_T) sum(dy)
    std::vector<double> sdy(n, 0.0), sdyxc(n, 0.0);
    channel_sums<T>(L, c0, c1, sdy.data(), [&](int64_t k, int64_t) { return dy[k]; });
    channel_sums<T>(L, c0, c1, sdyxc.data(), [&](int64_t k, int64_t c) {
      return dy[k] * (x[k] - mu_t[c]);
    });
    std::vector<T> gain(n), slope(n), offset(n);
    for (int64_t c = 0; c < n; ++c) {
      const double rounding = mu[c0 + c] - double(mu_t[c]);
      const double inv = double(is[c0 + c]);
      const double g = (w ? double(w[c0 + c]) : 1.0) * inv;
      const double dgam = (sdyxc[c] - rounding * sdy[c]) * inv;
      dg[c0 + c] = T(dgam);
      db[c0 + c] = T(sdy[c]);
      gain[c] = T(g);
      const double k = -g * inv * dgam / double(m);
      slope[c] = T(k);
      // k (x - mu) = k (x - mu_T) - k (mu - mu_T): the rounding of mu goes into the constant
      offset[c] = T(-g * sdy[c] / double(m) - k * rounding);
    }
    if (!need_dx) return;
    // Pass 2
    for_each_value(L, c0, c1, [&](int64_t i, int64_t c) {
      dx[i] = gain[c] * dy[i] + slope[c] * (x[i] - mu_t[c]) + offset[c];
    });
  });
}

// x as a contiguous (N, C, S) view, or (M, C, 1) rows for channels-last: no copy for the
// layouts torch produces (anything else is made contiguous first).
at::Tensor view3(const at::Tensor& x) {
  if (x.is_contiguous()) return x.view({x.size(0), x.size(1), -1});
  const auto fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  if ((x.dim() == 4 || x.dim() == 5) && x.is_contiguous(fmt))
    return x.movedim(1, -1).view({-1, x.size(1), 1});
  return x.contiguous().view({x.size(0), x.size(1), -1});
}

// A new tensor laid out like view3(x), and the view3 of it.
std::pair<at::Tensor, at::Tensor> like(const at::Tensor& x) {
  at::Tensor out = x.is_contiguous() ? at::empty_like(x) : at::empty_like(x, x.suggest_memory_format());
  return {out, view3(out)};
}

c10::optional<at::Tensor> as_dtype(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->to(dtype).contiguous();
}

// running = (1 - momentum) running + momentum batch (the variance made unbiased with m/(m-1)).
void update_running(at::Tensor& running, const at::Tensor& batch, double momentum) {
  running.lerp_(batch.to(running.scalar_type()), momentum);
}

}  // namespace

// Training forward: (y, mean (float64, so backward re-centers exactly), invstd (x's dtype)).
// Updates running_mean / running_var in place when given.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                c10::optional<at::Tensor> running_mean,
                                c10::optional<at::Tensor> running_var, double momentum,
                                double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "batchnorm_cpu: input must be a CPU tensor "
              "of rank >= 2");
  const at::Tensor x3 = view3(x);
  auto [y, y3] = like(x);
  const int64_t C = x3.size(1);
  auto mean = at::empty({C}, x.options().dtype(at::kDouble));
  auto invstd = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  const auto w = as_dtype(weight, x.scalar_type());
  const auto b = as_dtype(bias, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_forward", [&] {
    forward_impl<scalar_t>(x3, w, b, y3, mean, invstd, var, eps);
  });
  if (running_mean.has_value() && running_mean->defined()) {
    const int64_t m = x3.size(0) * x3.size(2);
    update_running(*running_mean, mean, momentum);
    update_running(*running_var, var.mul_(double(m) / double(m - 1)), momentum);
  }
  return {y, mean, invstd};
}

// Backward: (dx, or undefined when need_dx is false; dgamma; dbeta), in x's dtype.
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, bool need_dx) {
  TORCH_CHECK(mean.scalar_type() == at::kDouble, "batchnorm_cpu: mean must be float64");
  const at::Tensor x3 = view3(x);
  // the gradient in x's layout (an expanded gradient, e.g. of a sum, is materialized)
  at::Tensor dyx = dy.to(x.scalar_type());
  if (!(dyx.is_contiguous() && x.is_contiguous()) &&
      !(dyx.strides() == x.strides() && dyx.is_non_overlapping_and_dense()))
    dyx = at::empty_like(x, x.is_contiguous() ? at::MemoryFormat::Contiguous
                                              : x.suggest_memory_format()).copy_(dy);
  const at::Tensor dy3 = view3(dyx);
  at::Tensor dx, dx3;
  if (need_dx) std::tie(dx, dx3) = like(x);
  const int64_t C = x3.size(1);
  auto dgamma = at::empty({C}, x.options());
  auto dbeta = at::empty({C}, x.options());
  const auto w = as_dtype(weight, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_backward", [&] {
    backward_impl<scalar_t>(dy3, x3, w, mean, invstd, dx3, dgamma, dbeta, need_dx);
  });
  return {dx, dgamma, dbeta};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "BN training forward (fused, CPU)");
  m.def("backward", &backward, "BN backward (fused, CPU)");
}
