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
#include <array>
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

// K (1 or 2) sums at once, so the backward's two take one pass: term(k, c) returns value k's
// K terms.
template <typename T, int K, typename F>
void channel_sums(const Layout& L, int64_t c0, int64_t c1, std::array<double*, K> acc,
                  F&& term) {
  const int64_t n = c1 - c0;
  if (L.run == 1) {  // MC: rows outside, contiguous channels inside
    std::vector<T> part(K * n);
    T* p0 = part.data();
    T* p1 = part.data() + (K > 1 ? n : 0);
    for (int64_t i0 = 0; i0 < L.rows; i0 += kChunk) {
      std::fill(part.begin(), part.end(), T(0));
      const int64_t i1 = std::min(L.rows, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = i * L.outer;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          const std::array<T, K> v = term(row + c0 + c, c);
          p0[c] += v[0];
          if constexpr (K > 1) p1[c] += v[1];
        }
      }
      for (int q = 0; q < K; ++q)
        for (int64_t c = 0; c < n; ++c) acc[q][c] += double(part[q * n + c]);
    }
  } else {  // NCS: each channel is `rows` contiguous runs
    for (int64_t c = c0; c < c1; ++c) {
      double s[K] = {};
      for (int64_t i = 0; i < L.rows; ++i) {
        const int64_t base = i * L.outer + c * L.cstride;
        for (int64_t j0 = 0; j0 < L.run; j0 += kChunk) {
          const int64_t j1 = std::min(L.run, j0 + kChunk);
          T part[K] = {};
#pragma omp simd reduction(+ : part[:K])
          for (int64_t j = j0; j < j1; ++j) {
            const std::array<T, K> v = term(base + j, c - c0);
            for (int q = 0; q < K; ++q) part[q] += v[q];
          }
          for (int q = 0; q < K; ++q) s[q] += double(part[q]);
        }
      }
      for (int q = 0; q < K; ++q) acc[q][c - c0] += s[q];
    }
  }
}

// body(k, c) for every value k of channel c, in parallel over regions of memory: channels for
// NCS, rows for MC. Rows, not channel blocks, for MC so that each thread first-touches its own
// pages of a new output (threads faulting in the same pages serialize in the kernel).
template <typename F>
void apply_values(const Layout& L, F&& body) {
  if (L.run == 1) {
    at::parallel_for(0, L.rows, grain_for(L.C), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = i * L.outer;
#pragma omp simd
        for (int64_t c = 0; c < L.C; ++c) body(row + c, c);
      }
    });
  } else {
    at::parallel_for(0, L.C, grain_for(L.rows * L.run), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = 0; i < L.rows; ++i) {
          const int64_t base = i * L.outer + c * L.cstride;
#pragma omp simd
          for (int64_t j = 0; j < L.run; ++j) body(base + j, c);
        }
    });
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
  std::vector<T> mu_all(L.C), scale_all(L.C), shift_all(L.C);
  at::parallel_for(0, L.C, grain_for(m), [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    // Pass 1, shifted by each channel's first value K: sum(x - K) has no large offset to
    // lose digits to, so float chunks stay accurate; mu = K + sum(x - K) / m.
    std::vector<T> shift0(n);
    for (int64_t c = 0; c < n; ++c) shift0[c] = x[(c0 + c) * L.cstride];
    std::vector<double> sum(n, 0.0), sq(n, 0.0), mu(n);
    channel_sums<T, 1>(L, c0, c1, {sum.data()},
                       [&](int64_t k, int64_t c) { return std::array<T, 1>{x[k] - shift0[c]}; });
    // y = (x - mu_T) scale + shift: x - mu_T is exact for x near mu (Sterbenz), which keeps
    // y accurate when the data has a large offset; shift absorbs mu's rounding mu - mu_T.
    std::vector<T> mu_t(n);
    for (int64_t c = 0; c < n; ++c) {
      mu[c] = double(shift0[c]) + sum[c] / double(m);
      mu_t[c] = T(mu[c]);
    }
    // Pass 2: sum((x - mu)^2) = sum((x - mu_T)^2) - m (mu - mu_T)^2
    channel_sums<T, 1>(L, c0, c1, {sq.data()}, [&](int64_t k, int64_t c) {
      const T d = x[k] - mu_t[c];
      return std::array<T, 1>{d * d};
    });
    for (int64_t c = 0; c < n; ++c) {
      const double rounding = mu[c] - double(mu_t[c]);
      const double v = std::max(0.0, sq[c] / double(m) - rounding * rounding);  // biased
      const double is = 1.0 / std::sqrt(v + eps);
      const double g = w ? double(w[c0 + c]) : 1.0;
      const double be = b ? double(b[c0 + c]) : 0.0;
      mu_all[c0 + c] = mu_t[c];
      scale_all[c0 + c] = T(g * is);
      shift_all[c0 + c] = T(be - g * is * rounding);
      mu_out[c0 + c] = mu[c];
      is_out[c0 + c] = T(is);
      var_out[c0 + c] = T(v);
    }
  });
  // Pass 3
  const T *mu_p = mu_all.data(), *scale_p = scale_all.data(), *shift_p = shift_all.data();
  apply_values(L, [&](int64_t k, int64_t c) {
    y[k] = (x[k] - mu_p[c]) * scale_p[c] + shift_p[c];
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
  std::vector<T> gain(L.C), slope(L.C), offset(L.C), mu_all(L.C);
  at::parallel_for(0, L.C, grain_for(m), [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    std::vector<T> mu_t(n);
    for (int64_t c = 0; c < n; ++c) mu_t[c] = T(mu[c0 + c]);
    // Pass 1, both sums: sum(dy), sum(dy (x - mu_T)); sum(dy (x - mu)) = ... - (mu - mu_T) sum(dy)
    std::vector<double> sdy(n, 0.0), sdyxc(n, 0.0);
    if (L.run == 1) {  // rows: two narrow passes vectorize better than one wide one
      channel_sums<T, 1>(L, c0, c1, {sdy.data()},
                         [&](int64_t k, int64_t) { return std::array<T, 1>{dy[k]}; });
      channel_sums<T, 1>(L, c0, c1, {sdyxc.data()}, [&](int64_t k, int64_t c) {
        return std::array<T, 1>{dy[k] * (x[k] - mu_t[c])};
      });
    } else {
      channel_sums<T, 2>(L, c0, c1, {sdy.data(), sdyxc.data()}, [&](int64_t k, int64_t c) {
        return std::array<T, 2>{dy[k], dy[k] * (x[k] - mu_t[c])};
      });
    }
    for (int64_t c = 0; c < n; ++c) {
      const double rounding = mu[c0 + c] - double(mu_t[c]);
      const double inv = double(is[c0 + c]);
      const double g = (w ? double(w[c0 + c]) : 1.0) * inv;
      const double dgam = (sdyxc[c] - rounding * sdy[c]) * inv;
      dg[c0 + c] = T(dgam);
      db[c0 + c] = T(sdy[c]);
      gain[c0 + c] = T(g);
      const double k = -g * inv * dgam / double(m);
      slope[c0 + c] = T(k);
      // k (x - mu) = k (x - mu_T) - k (mu - mu_T): the rounding of mu goes into the constant
      offset[c0 + c] = T(-g * sdy[c] / double(m) - k * rounding);
      mu_all[c0 + c] = mu_t[c];
    }
  });
  if (!need_dx) return;
  // Pass 2
  const T *gain_p = gain.data(), *slope_p = slope.data(), *offset_p = offset.data(),
          *mu_p = mu_all.data();
  apply_values(L, [&](int64_t i, int64_t c) {
    dx[i] = gain_p[c] * dy[i] + slope_p[c] * (x[i] - mu_p[c]) + offset_p[c];
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

// running = (1 - momentum) running + momentum scale batch (scale m/(m-1) makes the variance
// unbiased).
// A direct loop for the usual case (contiguous, x's dtype): a dispatched op costs microseconds,
// which matter next to small tensors.
template <typename T>
void update_running(at::Tensor& running, const at::Tensor& batch, double momentum, double scale) {
  if (running.scalar_type() != c10::CppTypeToScalarType<T>::value || !running.is_contiguous()) {
    running.lerp_(batch.to(running.scalar_type()).mul(scale), momentum);
    return;
  }
  T* r = running.data_ptr<T>();
  const auto b = batch.to(at::kDouble).contiguous();
  const double* v = b.data_ptr<double>();
  for (int64_t c = 0; c < running.numel(); ++c)
    r[c] = T(double(r[c]) + momentum * (v[c] * scale - double(r[c])));
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
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_running", [&] {
      update_running<scalar_t>(*running_mean, mean, momentum, 1.0);
      update_running<scalar_t>(*running_var, var, momentum, double(m) / double(m - 1));
    });
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
