// Fused CPU kernels for the "torch" backend's training-mode BN (float32 / float64).
//
// Two layouts, both read in place from the caller's tensor (no copies):
//   NCS: contiguous (N, C, S): channel c is N runs of S contiguous values;
//   MC:  (M, C) rows (2-D input, or channels-last viewed as rows of C channels).
// Work is split over threads (at::parallel_for, torch's thread pool) by channels (NCS) or
// blocks of rows (MC); sums are accumulated in double in an order fixed by the shape alone, so
// results are deterministic and do not depend on the number of threads.
//
// Forward, per channel over its m values (paper, Algorithm 1):
//   mu = sum(x) / m;  var = sum((x - mu)^2) / m          (two passes, never E[x^2] - mu^2)
//   y  = scale * x + shift,  scale = gamma / sqrt(var + eps),  shift = beta - scale * mu
//   running statistics updated in place from mu and the unbiased m/(m-1) var
// Backward, with xc = x - mu:
//   dbeta = sum(dy);  dgamma = invstd * sum(dy * xc)
//   dx = gain * dy + k * xc + c0,  gain = gamma invstd,  k = -gain invstd dgamma / m,
//   c0 = -gain dbeta / m

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
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

// The kernels read a tensor in place when it is contiguous (NCS) or channels-last (MC), which
// covers the layouts torch produces; anything else is copied to contiguous first.
bool channels_last(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

at::Tensor readable(const at::Tensor& x) {
  return x.is_contiguous() || channels_last(x) ? x : x.contiguous();
}

// The geometry of a readable tensor (computed from sizes: creating view tensors would cost
// microseconds each, which matter on small layers).
Layout layout_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  if (x.is_contiguous()) {
    const int64_t S = x.numel() / (N * C);
    return Layout{C, N, S, C * S, S};
  }
  return Layout{C, x.numel() / C, 1, C, 1};  // channels-last: rows of C channels
}

// Per-channel sums, written to acc[q][c] (double). Values are summed in T over short chunks
// and each chunk's sum is added in double: accurate for millions of values. Within a chunk the
// additions go to independent partial sums (one per channel for MC, kLanes per channel for
// NCS): without -ffast-math the compiler may not reorder a single running sum, which would
// leave one scalar add per value in a serial dependency chain. Memory is read in its own order
// (row by row) so that the hardware prefetcher streams. The order of additions depends only on
// the shape, never on the number of threads: results are deterministic.
constexpr int64_t kChunkRows = 64;     // MC: rows per chunk
constexpr int64_t kMaxRowBlocks = 64;  // MC: rows are split into at most this many blocks
constexpr int64_t kChunkValues = 256;  // NCS: values of a run per chunk
constexpr int kLanes = 16;             // NCS: partial sums per chunk (vector registers)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// K (1 or 2) sums at once, so the backward's two can take one pass: term(k, c) returns the K
// terms of value k, which belongs to channel c.
template <typename T, int K, typename F>
void channel_sums(const Layout& L, std::array<double*, K> acc, F&& term) {
  const int64_t C = L.C;
  if (L.run == 1) {
    // MC: in parallel over blocks of rows, each with a partial sum per channel; the blocks'
    // sums are then added in block order.
    const int64_t chunks = ceil_div(L.rows, kChunkRows);
    const int64_t chunks_per_block = ceil_div(chunks, std::min(kMaxRowBlocks, chunks));
    const int64_t blocks = ceil_div(chunks, chunks_per_block);
    const int64_t rows_per_block = chunks_per_block * kChunkRows;
    std::vector<double> block_sums(blocks * K * C, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrainValues / (rows_per_block * C));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<T> part(K * C);
      T* p0 = part.data();
      T* p1 = part.data() + (K > 1 ? C : 0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        double* sums = block_sums.data() + blk * K * C;
        const int64_t end = std::min(L.rows, (blk + 1) * rows_per_block);
        for (int64_t i0 = blk * rows_per_block; i0 < end; i0 += kChunkRows) {
          std::fill(part.begin(), part.end(), T(0));
          for (int64_t i = i0; i < std::min(end, i0 + kChunkRows); ++i) {
            const int64_t row = i * L.outer;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const std::array<T, K> v = term(row + c, c);
              p0[c] += v[0];
              if constexpr (K > 1) p1[c] += v[1];
            }
          }
          for (int64_t q = 0; q < K * C; ++q) sums[q] += double(part[q]);
        }
      }
    });
    for (int q = 0; q < K; ++q)
      for (int64_t c = 0; c < C; ++c) {
        double total = 0.0;
        for (int64_t blk = 0; blk < blocks; ++blk) total += block_sums[(blk * K + q) * C + c];
        acc[q][c] = total;
      }
    return;
  }
  // NCS: each channel is `rows` contiguous runs; in parallel over blocks of channels.
  at::parallel_for(0, C, grain_for(L.rows * L.run), [&](int64_t c0, int64_t c1) {
    // per channel and sum, kLanes partial sums in double: folding a chunk is vector adds
    std::vector<double> s((c1 - c0) * K * kLanes, 0.0);
    for (int64_t i = 0; i < L.rows; ++i)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t base = i * L.outer + c * L.cstride;
        double* sc = s.data() + (c - c0) * K * kLanes;
        for (int64_t j0 = 0; j0 < L.run; j0 += kChunkValues) {
          const int64_t j1 = std::min(L.run, j0 + kChunkValues);
          T lane[K][kLanes] = {};
          int64_t j = j0;
          for (; j + kLanes <= j1; j += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const std::array<T, K> v = term(base + j + l, c);
              for (int q = 0; q < K; ++q) lane[q][l] += v[q];
            }
          for (int l = 0; j < j1; ++j, ++l) {  // the last < kLanes values, a lane each
            const std::array<T, K> v = term(base + j, c);
            for (int q = 0; q < K; ++q) lane[q][l] += v[q];
          }
          for (int q = 0; q < K; ++q)
            for (int l = 0; l < kLanes; ++l) sc[q * kLanes + l] += double(lane[q][l]);
        }
      }
    for (int64_t c = c0; c < c1; ++c)
      for (int q = 0; q < K; ++q) {
        double total = 0.0;
        for (int l = 0; l < kLanes; ++l) total += s[((c - c0) * K + q) * kLanes + l];
        acc[q][c] = total;
      }
  });
}

// The elementwise pass of both directions, per channel c with constants from (C,) arrays:
//   out = slope_c (x - mu_c) + offset_c            (forward: y; slope = scale, offset = shift)
//   out = gain_c dy + slope_c (x - mu_c) + offset_c (backward: dx), when dy is given.
// In parallel over regions of memory: channels for NCS, rows for MC. Rows, not channel blocks,
// for MC so that each thread first-touches its own pages of the new output (threads faulting
// in the same pages serialize in the kernel). NCS copies a channel's constants into locals:
// read through pointers, the compiler would reload them after every store to out.
template <typename T>
void channel_affine(const Layout& L, const T* x, const T* dy, const T* mu, const T* gain,
                    const T* slope, const T* offset, T* out) {
  if (L.run == 1) {
    at::parallel_for(0, L.rows, grain_for(L.C), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* xr = x + i * L.outer;
        T* outr = out + i * L.outer;
        if (dy) {
          const T* dyr = dy + i * L.outer;
#pragma omp simd
          for (int64_t c = 0; c < L.C; ++c)
            outr[c] = gain[c] * dyr[c] + slope[c] * (xr[c] - mu[c]) + offset[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < L.C; ++c) outr[c] = (xr[c] - mu[c]) * slope[c] + offset[c];
        }
      }
    });
  } else {
    at::parallel_for(0, L.C, grain_for(L.rows * L.run), [&](int64_t c0, int64_t c1) {
      for (int64_t i = 0; i < L.rows; ++i)  // memory order, as in channel_sums
        for (int64_t c = c0; c < c1; ++c) {
          const T mu_c = mu[c], slope_c = slope[c], offset_c = offset[c];
          const T gain_c = dy ? gain[c] : T(0);
          const int64_t base = i * L.outer + c * L.cstride;
          const T* xr = x + base;
          T* outr = out + base;
          if (dy) {
            const T* dyr = dy + base;
#pragma omp simd
            for (int64_t j = 0; j < L.run; ++j)
              outr[j] = gain_c * dyr[j] + slope_c * (xr[j] - mu_c) + offset_c;
          } else {
#pragma omp simd
            for (int64_t j = 0; j < L.run; ++j) outr[j] = (xr[j] - mu_c) * slope_c + offset_c;
          }
        }
    });
  }
}

template <typename T>
void forward_impl(const at::Tensor& xr, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y, at::Tensor& mean,
                  at::Tensor& invstd, at::Tensor& var, double eps) {
  const Layout L = layout_of(xr);
  const int64_t C = L.C, m = L.rows * L.run;
  const T* x = xr.data_ptr<T>();
  const T* w = weight.has_value() ? weight->data_ptr<T>() : nullptr;
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  // Pass 1, shifted by each channel's first value K: sum(x - K) has no large offset to lose
  // digits to, so float chunks stay accurate; mu = K + sum(x - K) / m.
  std::vector<T> first(C), mu_t(C), scale(C), shift(C);
  std::vector<double> sum(C), sq(C), mu(C);
  for (int64_t c = 0; c < C; ++c) first[c] = x[c * L.cstride];
  channel_sums<T, 1>(L, {sum.data()},
                     [&](int64_t k, int64_t c) { return std::array<T, 1>{x[k] - first[c]}; });
  for (int64_t c = 0; c < C; ++c) {
    mu[c] = double(first[c]) + sum[c] / double(m);
    mu_t[c] = T(mu[c]);
  }
  // Pass 2: sum((x - mu)^2) = sum((x - mu_T)^2) - m (mu - mu_T)^2
  channel_sums<T, 1>(L, {sq.data()}, [&](int64_t k, int64_t c) {
    const T d = x[k] - mu_t[c];
    return std::array<T, 1>{d * d};
  });
  double* mu_out = mean.data_ptr<double>();
  T* invstd_out = invstd.data_ptr<T>();
  T* var_out = var.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    const double rounding = mu[c] - double(mu_t[c]);
    const double v = std::max(0.0, sq[c] / double(m) - rounding * rounding);  // biased
    const double is = 1.0 / std::sqrt(v + eps);
    const double g = w ? double(w[c]) : 1.0;
    const double be = b ? double(b[c]) : 0.0;
    // y = (x - mu_T) scale + shift: x - mu_T is exact for x near mu (Sterbenz), which keeps
    // y accurate when the data has a large offset; shift absorbs mu's rounding mu - mu_T.
    scale[c] = T(g * is);
    shift[c] = T(be - g * is * rounding);
    mu_out[c] = mu[c];
    invstd_out[c] = T(is);
    var_out[c] = T(v);
  }
  // Pass 3
  channel_affine<T>(L, x, nullptr, mu_t.data(), nullptr, scale.data(), shift.data(),
                    y.data_ptr<T>());
}

template <typename T>
void backward_impl(const at::Tensor& dyr, const at::Tensor& xr,
                   const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                   const at::Tensor& invstd, at::Tensor& dx, at::Tensor& dgamma,
                   at::Tensor& dbeta, bool need_dx) {
  const Layout L = layout_of(xr);
  const int64_t C = L.C, m = L.rows * L.run;
  const T* x = xr.data_ptr<T>();
  const T* dy = dyr.data_ptr<T>();
  const T* w = weight.has_value() ? weight->data_ptr<T>() : nullptr;
  const double* mu = mean.data_ptr<double>();
  const T* is = invstd.data_ptr<T>();
  std::vector<T> mu_t(C), gain(C), slope(C), offset(C);
  for (int64_t c = 0; c < C; ++c) mu_t[c] = T(mu[c]);
  // Pass 1, both sums: sum(dy), sum(dy (x - mu_T)); sum(dy (x - mu)) = ... - (mu - mu_T) sum(dy)
  std::vector<double> sdy(C), sdyxc(C);
  if (L.run == 1) {  // rows: two narrow passes vectorize better than one wide one
    channel_sums<T, 1>(L, {sdy.data()},
                       [&](int64_t k, int64_t) { return std::array<T, 1>{dy[k]}; });
    channel_sums<T, 1>(L, {sdyxc.data()}, [&](int64_t k, int64_t c) {
      return std::array<T, 1>{dy[k] * (x[k] - mu_t[c])};
    });
  } else {
    channel_sums<T, 2>(L, {sdy.data(), sdyxc.data()}, [&](int64_t k, int64_t c) {
      return std::array<T, 2>{dy[k], dy[k] * (x[k] - mu_t[c])};
    });
  }
  T* dg = dgamma.data_ptr<T>();
  T* db = dbeta.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    const double rounding = mu[c] - double(mu_t[c]);
    const double inv = double(is[c]);
    const double g = (w ? double(w[c]) : 1.0) * inv;
    const double dgam = (sdyxc[c] - rounding * sdy[c]) * inv;
    dg[c] = T(dgam);
    db[c] = T(sdy[c]);
    gain[c] = T(g);
    const double k = -g * inv * dgam / double(m);
    slope[c] = T(k);
    // k (x - mu) = k (x - mu_T) - k (mu - mu_T): the rounding of mu goes into the constant
    offset[c] = T(-g * sdy[c] / double(m) - k * rounding);
  }
  if (!need_dx) return;
  // Pass 2
  channel_affine<T>(L, x, dy, mu_t.data(), gain.data(), slope.data(), offset.data(),
                    dx.data_ptr<T>());
}

c10::optional<at::Tensor> as_dtype(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  if (t->scalar_type() == dtype && t->is_contiguous()) return t;  // no dispatcher round trip
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
  const at::Tensor xr = readable(x);
  at::Tensor y = at::empty_like(xr);  // xr's strides: the same layout
  const int64_t C = xr.size(1);
  auto mean = at::empty({C}, x.options().dtype(at::kDouble));
  auto invstd = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  const auto w = as_dtype(weight, x.scalar_type());
  const auto b = as_dtype(bias, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_forward", [&] {
    forward_impl<scalar_t>(xr, w, b, y, mean, invstd, var, eps);
  });
  if (running_mean.has_value() && running_mean->defined()) {
    const int64_t m = x.numel() / C;
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_cpu_backward", [&] {
    backward_impl<scalar_t>(dyr, xr, w, mean, invstd, dx, dgamma, dbeta, need_dx);
  });
  return {dx, dgamma, dbeta};
}

// Training BN as a C++ autograd Function around the kernels above. The same Function in Python
// costs tens of microseconds per call in the autograd machinery, more than the kernels take on
// small layers (the MNIST network's 60 x 100).
class TrainingBatchNorm : public torch::autograd::Function<TrainingBatchNorm> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            c10::optional<at::Tensor> running_mean,
                            c10::optional<at::Tensor> running_var, double momentum, double eps) {
    auto out = ::forward(x, weight, bias, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor(), out[1], out[2]});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    // needs_input_grad counts only the tensor arguments that were given
    const bool has_weight = weight.defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dgamma = has_weight && ctx->needs_input_grad(1);
    const bool need_dbeta =
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 2 : 1);
    std::vector<at::Tensor> d;  // dx, dgamma, dbeta
    // The differentiable ATen form when create_graph=True (the backward must be
    // differentiable), and when the gradient has no storage to read: a functorch BatchedTensor
    // (is_grads_batched=True, jacobian(vectorize=True), gradcheck's batched checks) or another
    // wrapper tensor; vmap batches the ATen operations.
    if (at::GradMode::is_enabled() || !grads[0].has_storage()) {
      d = differentiable_backward(grads[0], x, weight, ctx->saved_data["eps"].toDouble());
    } else {
      const c10::optional<at::Tensor> w =
          weight.defined() ? c10::optional<at::Tensor>(weight) : c10::nullopt;
      d = ::backward(grads[0], x, w, saved[2], saved[3], need_dx);
    }
    const at::Tensor none;
    return {need_dx ? d[0] : none, need_dgamma ? d[1] : none, need_dbeta ? d[2] : none,
            none, none, none, none};
  }

 private:
  // The closed form in differentiable ATen operations, with the statistics recomputed from x
  // inside the graph (they depend on x):
  //   dx = gamma invstd (dy - (dbeta + xhat dgamma) / m),  dgamma = sum(dy xhat),  dbeta = sum(dy)
  static std::vector<at::Tensor> differentiable_backward(const at::Tensor& dy,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
    std::vector<int64_t> dims{0}, shape(x.dim(), 1);
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    shape[1] = x.size(1);
    const double m = double(x.numel() / x.size(1));
    const at::Tensor xc = x - x.mean(dims, /*keepdim=*/true);
    const at::Tensor invstd = ((xc * xc).mean(dims, /*keepdim=*/true) + eps).rsqrt();
    const at::Tensor xhat = xc * invstd;
    const at::Tensor dbeta = dy.sum(dims);
    const at::Tensor dgamma = (dy * xhat).sum(dims);
    const at::Tensor gain = weight.defined() ? weight.view(shape) * invstd : invstd;
    const at::Tensor dx = gain * (dy - (dbeta.view(shape) + xhat * dgamma.view(shape)) / m);
    return {dx, dgamma, dbeta};
  }
};

// Whether the kernels may take this call: plain CPU float32/float64 strided tensors in plain
// eager mode. Not under a functorch transform (grad, vmap, jvp), a forward-mode AD tangent, a
// Python dispatch mode or tensor subclass (FakeTensor, FunctionalTensor, ...), or
// torch.jit.trace: each of those must see the operations, which the kernels hide.
bool plain(const c10::optional<at::Tensor>& t) {
  constexpr c10::DispatchKeySet kWrapped({c10::DispatchKey::Python,
                                          c10::DispatchKey::PythonTLSSnapshot,
                                          c10::DispatchKey::FuncTorchBatched,
                                          c10::DispatchKey::FuncTorchGradWrapper,
                                          c10::DispatchKey::Functionalize});
  if (!t.has_value() || !t->defined()) return true;
  return !t->key_set().has_any(kWrapped) && !t->_fw_grad(/*level=*/0).defined();
}

bool plain_eager(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias) {
  return x.is_cpu() && x.layout() == at::kStrided &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && plain(x) &&
         plain(weight) && plain(bias) &&
         // a torch.func transform is active: functorch includes its dynamic-layer keys
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !torch::jit::tracer::isTracing();
}

// Training BN through the kernels, or None when they cannot take the call (see plain_eager):
// the caller then uses an ATen form.
py::object train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, c10::optional<at::Tensor> running_mean,
                 c10::optional<at::Tensor> running_var, double momentum, double eps) {
  if (!plain_eager(x, weight, bias)) return py::none();
  return py::cast(
      TrainingBatchNorm::apply(x, weight, bias, running_mean, running_var, momentum, eps));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "BN in training mode with its closed-form backward (fused, CPU)");
}
