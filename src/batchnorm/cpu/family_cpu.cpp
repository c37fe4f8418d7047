// CPU kernels of the BN family (batchnorm.variants), float32 and float64, with their autograd
// Functions in C++ (a Python Function costs about 8 us per call, which shows on small layers).
//
//   grouped_train: BN with statistics per group of samples (Ghost BN: groups are the virtual
//     batches) and per-channel constants r, d folded into the affine map (Batch Renormalization:
//     one group). Forward, per group g and channel c over its m values:
//       mu, var = mean and biased variance;   y = gamma (r (x - mu) / sqrt(var + eps) + d) + beta
//     Backward (r, d constants): with xhat = (x - mu) / sqrt(var + eps),
//       dbeta_g = sum dy,  A_g = sum dy xhat,  dx = gamma r invstd (dy - (dbeta_g + xhat A_g) / m)
//       dgamma = sum_g (r A_g + d dbeta_g),  dbeta = sum_g dbeta_g
//   abn_train: BN + invertible activation z = f(y) (in-place ABN). The backward reads z, not x:
//       u = f^-1(z) - beta  (= gamma xhat),   dy = dz f'(y) with f' written in z,
//       dbeta = sum dy,  dgamma = sum dy u / gamma,
//       dx = gamma invstd (dy - dbeta / m) - invstd dgamma u / m
//     and returns invstd as a second output so that a double backward can differentiate through it.
//
// Both backwards switch to differentiable ATen operations when a graph of the backward is being
// recorded (double backward).
//
// Memory. A tensor is read where it lies when it is contiguous ("planes": channel c of sample n
// is S contiguous values) or channels-last / 2-D ("rows": each position holds its C channels side
// by side); anything else is copied to contiguous first. Planes with S > 1 are read once per
// direction, as the core's kernels do (contiguous.h): threads take (group, channel) blocks (a
// group's samples' planes of one channel, tens of KB, for_blocks), each reduced, then rewritten
// from the core's cache as the output. Forward statistics are the core's (shifted sums re-based
// in double, see train.cpp); the backwards' sums are of dy and dy (x - mu) (in-place ABN: of
// dy and dy (y - beta), from z). Rows (2-D, channels-last) take one pass for the sums and one
// for the map: Ghost BN and Batch Renorm run the core's row kernels (rows.h) on each group with
// their own constants; in-place ABN has its own (group_sums, group_map): statistics as sums of
// x - K and (x - K)^2, K a value of the same group and channel, so no large offset cancels;
// short chunks summed in T, their totals in double. Sums run in an order fixed by the shape, so
// results do not depend on the number of threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "contiguous.h"
#include "rows.h"

namespace {

using at::Tensor;
using Opt = c10::optional<Tensor>;

constexpr int64_t kWork = 1 << 14;  // elements per parallel task below which threads do not pay
constexpr int kLanes = 16;           // planes: independent partial sums per run (vector registers)
constexpr int64_t kChunk = 256;      // planes: values summed in T before adding to a double
constexpr int64_t kChunkRows = 32;   // rows: rows summed in T before adding to a double
constexpr int64_t kBlockRows = 512;  // rows: rows per block of partial sums (a parallel task)

// Where the values of one tensor lie.
struct Shape {
  int64_t N, C, S;  // samples, channels, positions per sample
  bool rows;        // channels innermost: (n, c, s) at (n S + s) C + c; else at (n C + c) S + s
};

bool channels_innermost(const Tensor& x) {
  return x.dim() == 2 || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

Tensor in_place_order(const Tensor& x) {
  return (x.is_contiguous() || channels_innermost(x)) ? x : x.contiguous();
}

Shape shape_of(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C ? x.numel() / (N * C) : 0;
  return Shape{N, C, S, x.dim() == 2 || !x.is_contiguous()};
}

// The activations in-place ABN can invert, chosen at compile time (a run-time switch in the
// inner loops would keep them from vectorizing): forward z = f(y), inverse y = f^-1(z), and the
// derivative f'(y) written in z.
enum Act : int64_t { kIdentity = 0, kLeaky = 1, kElu = 2 };

// Leaky ReLU computes both sides and selects, so that the loops vectorize (blends).
template <typename T>
struct ActParams {
  T slope, inv_slope, alpha, floor;  // floor: the smallest z / alpha whose log1p is finite
};

// f (Inverse = false) or f^-1 (Inverse = true).
template <Act A, bool Inverse, typename T>
inline T act_apply(T v, const ActParams<T>& p) {
  if constexpr (A == kLeaky) {
    const T negative = v * (Inverse ? p.inv_slope : p.slope);
    return v >= T(0) ? v : negative;
  } else if constexpr (A == kElu) {
    if constexpr (Inverse) return v > T(0) ? v : std::log1p(std::max(v / p.alpha, p.floor));
    return v > T(0) ? v : p.alpha * std::expm1(v);
  } else {
    return v;
  }
}

template <Act A, typename T>
inline T act_derivative(T z, const ActParams<T>& p) {
  if constexpr (A == kLeaky) {
    return z >= T(0) ? T(1) : p.slope;
  } else if constexpr (A == kElu) {
    const T negative = z + p.alpha;
    return z > T(0) ? T(1) : negative;
  } else {
    return T(1);
  }
}

// The per-element formulas. u is x (or z), v is dy (or dz; u where unused); per (group, channel)
// constants: ctr, a, b, o.
//   sums:  Moments:  (u - ctr, (u - ctr)^2)               ctr a value of the group and channel
//          GradBN:   (v, v (u - ctr))                     ctr the mean
//          GradABN:  (d, d (f^-1(u) - ctr)), d = v f'(u)  ctr beta
//   maps:  Forward:  f((u - ctr) a + o)
//          GradBN:   a v + b (u - ctr) + o
//          GradABN:  a v f'(u) + b (f^-1(u) - ctr) + o
enum Formula { kMoments, kForward, kGradBN, kGradABN };

template <Formula F, Act A, typename T>
inline void pair_of(T u, T v, T ctr, const ActParams<T>& p, T& s1, T& s2) {
  if constexpr (F == kMoments) {
    s1 = u - ctr;
    s2 = s1 * s1;
  } else if constexpr (F == kGradBN) {
    s1 = v;
    s2 = v * (u - ctr);
  } else {
    s1 = v * act_derivative<A>(u, p);
    s2 = s1 * (act_apply<A, true>(u, p) - ctr);
  }
}

template <Formula F, Act A, typename T>
inline T map_of(T u, T v, T ctr, T a, T b, T o, const ActParams<T>& p) {
  if constexpr (F == kForward) {
    return act_apply<A, false>((u - ctr) * a + o, p);
  } else if constexpr (F == kGradBN) {
    return a * v + b * (u - ctr) + o;
  } else {
    return a * v * act_derivative<A>(u, p) + b * (act_apply<A, true>(u, p) - ctr) + o;
  }
}

// Both sums of pair_of over rows runs of S contiguous values, run i at u + i stride (and
// v + i stride), in double: summed in T over short chunks into independent partial sums, each
// chunk's total added in double. q by value: read through a reference, its fields would be
// reloaded after every store, which keeps the loops from vectorizing.
template <Formula F, Act A, typename T>
inline void block_sums(const T* u, const T* v, int64_t rows, int64_t stride, int64_t S, T k,
                       const ActParams<T> q, double& s1, double& s2) {
  s1 = 0.0, s2 = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* ur = u + i * stride;
    const T* vr = v + i * stride;
    for (int64_t j0 = 0; j0 < S; j0 += kChunk) {
      const int64_t j1 = std::min(S, j0 + kChunk);
      T l1[kLanes] = {}, l2[kLanes] = {};
      int64_t j = j0;
      for (; j + kLanes <= j1; j += kLanes) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          T a, b;
          pair_of<F, A>(ur[j + l], vr[j + l], k, q, a, b);
          l1[l] += a;
          l2[l] += b;
        }
      }
      for (int l = 0; j < j1; ++j, ++l) {
        T a, b;
        pair_of<F, A>(ur[j], vr[j], k, q, a, b);
        l1[l] += a;
        l2[l] += b;
      }
      T c1 = 0, c2 = 0;
      for (int l = 0; l < kLanes; ++l) {
        c1 += l1[l];
        c2 += l2[l];
      }
      s1 += double(c1);
      s2 += double(c2);
    }
  }
}

// res[j] = map_of(u[j], v[j], ...) for j < S.
template <Formula F, Act A, typename T>
inline void map_run(const T* ur, const T* vr, int64_t S, T ctr, T a, T b, T o,
                    const ActParams<T> q, T* res) {
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) res[j] = map_of<F, A>(ur[j], vr[j], ctr, a, b, o, q);
}

// Both sums of pair_of per (group, channel): out[(g 2 + q) C + c], in double. Values are summed
// in T over short chunks into independent partial sums, each chunk's total added in double.
template <Formula F, Act A, typename T>
void group_sums(const Shape& sh, const std::vector<int64_t>& bounds, const T* u, const T* v,
                const T* ctr, const ActParams<T> p, double* out) {
  const int64_t G = int64_t(bounds.size()) - 1, C = sh.C, S = sh.S;
  if (!sh.rows) {  // planes: a task per (group, channel), runs of S contiguous values
    const int64_t per_task = std::max<int64_t>(1, sh.N * S / std::max<int64_t>(1, G));
    at::parallel_for(0, G * C, std::max<int64_t>(1, kWork / per_task), [&](int64_t t0, int64_t t1) {
      const ActParams<T> q = p;  // a local copy (see block_sums)
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / C, c = t % C;
        double s1, s2;
        block_sums<F, A, T>(u + (bounds[g] * C + c) * S, v + (bounds[g] * C + c) * S,
                            bounds[g + 1] - bounds[g], C * S, S, ctr[t], q, s1, s2);
        out[(g * 2) * C + c] = s1;
        out[(g * 2 + 1) * C + c] = s2;
      }
    });
    return;
  }
  // rows: blocks of rows within one group, each summing all channels side by side
  std::vector<int64_t> block_group, block_start;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = bounds[g] * S; r < bounds[g + 1] * S; r += kBlockRows) {
      block_group.push_back(g);
      block_start.push_back(r);
    }
  const int64_t B = int64_t(block_group.size());
  std::vector<double> partial(B * 2 * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, kWork / (kBlockRows * C));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> chunk(2 * C);
    const ActParams<T> q = p;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t g = block_group[blk];
      const int64_t end = std::min(block_start[blk] + kBlockRows, bounds[g + 1] * S);
      const T* k = ctr + g * C;
      double* acc = partial.data() + blk * 2 * C;
      T* c1 = chunk.data();
      T* c2 = chunk.data() + C;
      for (int64_t r0 = block_start[blk]; r0 < end; r0 += kChunkRows) {
        std::fill(chunk.begin(), chunk.end(), T(0));
        for (int64_t r = r0; r < std::min(end, r0 + kChunkRows); ++r) {
          const T* ur = u + r * C;
          const T* vr = v + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            T a, b;
            pair_of<F, A>(ur[c], vr[c], k[c], q, a, b);
            c1[c] += a;
            c2[c] += b;
          }
        }
        for (int64_t q = 0; q < 2 * C; ++q) acc[q] += double(chunk[q]);
      }
    }
  });
  std::fill(out, out + G * 2 * C, 0.0);
  for (int64_t blk = 0; blk < B; ++blk)
    for (int64_t q = 0; q < 2 * C; ++q)
      out[block_group[blk] * 2 * C + q] += partial[blk * 2 * C + q];
}

// Per-(group, channel) constants of a map, (G, C) each.
template <typename T>
struct Coefs {
  std::vector<T> ctr, a, b, o;
  explicit Coefs(int64_t n) : ctr(n), a(n), b(n), o(n) {}
};

// out = map_of(u, v, ...) for every element, in memory order.
template <Formula F, Act A, typename T>
void group_map(const Shape& sh, const std::vector<int64_t>& group_of_sample, const T* u,
               const T* v, const Coefs<T>& k, const ActParams<T> p, T* out) {
  const int64_t C = sh.C, S = sh.S;
  if (!sh.rows) {
    at::parallel_for(0, sh.N * C, std::max<int64_t>(1, kWork / std::max<int64_t>(1, S)),
                     [&](int64_t t0, int64_t t1) {
      const ActParams<T> q = p;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t gc = group_of_sample[t / C] * C + t % C;
        const T ctr = k.ctr[gc], a = k.a[gc], b = k.b[gc], o = k.o[gc];  // locals: no reloads
        map_run<F, A, T>(u + t * S, v + t * S, S, ctr, a, b, o, q, out + t * S);
      }
    });
    return;
  }
  at::parallel_for(0, sh.N * S, std::max<int64_t>(1, kWork / std::max<int64_t>(1, C)),
                   [&](int64_t r0, int64_t r1) {
    const ActParams<T> q = p;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g0 = group_of_sample[r / S] * C;
      const T *ctr = k.ctr.data() + g0, *a = k.a.data() + g0, *b = k.b.data() + g0,
              *o = k.o.data() + g0;
      const T* ur = u + r * C;
      const T* vr = v + r * C;
      T* res = out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        res[c] = map_of<F, A>(ur[c], vr[c], ctr[c], a[c], b[c], o[c], q);
    }
  });
}

std::vector<int64_t> bounds_of(const std::vector<int64_t>& sizes, int64_t N) {
  std::vector<int64_t> bounds{0};
  for (int64_t s : sizes) bounds.push_back(bounds.back() + s);
  TORCH_CHECK(bounds.back() == N, "family_cpu: group sizes add up to ", bounds.back(),
              ", not the batch size ", N);
  return bounds;
}

std::vector<int64_t> group_of_samples(const std::vector<int64_t>& bounds) {
  std::vector<int64_t> group(bounds.back());
  for (size_t g = 0; g + 1 < bounds.size(); ++g)
    std::fill(group.begin() + bounds[g], group.begin() + bounds[g + 1], int64_t(g));
  return group;
}

// mean and biased variance per (group, channel) in double, from one pass over x: sums of x - K
// and (x - K)^2 with K the group's first value of the channel (no large offset cancels).
template <typename T>
void moments(const Shape& sh, const std::vector<int64_t>& bounds, const T* x, double* mean,
             double* var) {
  const int64_t G = int64_t(bounds.size()) - 1, C = sh.C;
  std::vector<T> first(G * C);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c)
      first[g * C + c] = x[sh.rows ? bounds[g] * sh.S * C + c : (bounds[g] * C + c) * sh.S];
  std::vector<double> sums(G * 2 * C);
  group_sums<kMoments, kIdentity, T>(sh, bounds, x, x, first.data(), ActParams<T>{}, sums.data());
  for (int64_t g = 0; g < G; ++g) {
    const double m = double((bounds[g + 1] - bounds[g]) * sh.S);
    for (int64_t c = 0; c < C; ++c) {
      const double d1 = sums[(g * 2) * C + c] / m, d2 = sums[(g * 2 + 1) * C + c] / m;
      mean[g * C + c] = double(first[g * C + c]) + d1;
      var[g * C + c] = std::max(0.0, d2 - d1 * d1);
    }
  }
}

template <typename T>
const T* ptr_or_null(const Opt& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

bool given(const Opt& t) { return t.has_value() && t->defined(); }

// Whether the kernels take x with these per-channel tensors: x a float32/float64 CPU tensor of
// rank >= 2, each given tensor C contiguous CPU values of x's dtype. (Checked here rather than
// in Python, where the same checks cost microseconds, which matter on small layers.)
bool takes(const Tensor& x, std::initializer_list<const Opt*> per_channel) {
  if (!x.device().is_cpu() || x.dim() < 2 ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble))
    return false;
  for (const Opt* t : per_channel)
    if (given(*t) && (!(*t)->device().is_cpu() || (*t)->scalar_type() != x.scalar_type() ||
                      !(*t)->is_contiguous() || (*t)->numel() != x.size(1)))
      return false;
  return true;
}

// ------------------------------------------------------------------------------------------
// grouped_train: Ghost BN and Batch Renormalization

struct GroupedOptions {
  std::vector<int64_t> sizes;    // samples per group, in order
  std::vector<double> factors;   // running-average weight of each group (0: no update)
  double eps;
  bool renorm;                   // one group: r, d from the running statistics
  double r_max, d_max;
  bool sigma_average;            // renorm: average sigma (the paper) instead of the variance
};

bool no_empty_group(const std::vector<int64_t>& sizes) {
  return std::all_of(sizes.begin(), sizes.end(), [](int64_t n) { return n > 0; });
}

// Whether grouped_train reads x a (group, channel) block at a time (contiguous.h): contiguous
// planes of S > 1 values, no empty group.
bool in_blocks(const Shape& sh, const std::vector<int64_t>& sizes) {
  return !sh.rows && sh.S > 1 && no_empty_group(sizes);
}

// Whether grouped_train takes x a group of rows at a time with the core's row kernels (rows.h):
// 2-D or channels-last, no empty group.
bool in_row_groups(const Shape& sh, const std::vector<int64_t>& sizes) {
  return sh.rows && sh.S > 0 && no_empty_group(sizes);
}

// Calls group(L, offset, g) for every group g of a rows tensor: L the group's rows (its samples'
// positions) as a layout of their own, starting offset values into the tensor. One group (Batch
// Renorm): the row kernels split it over the threads. Several (Ghost BN's virtual batches, often
// too few rows each to split): threads take whole groups, each run on one thread (the row
// kernels do not start threads inside a parallel region). Either way a group's sums run in an
// order fixed by its shape, so results do not depend on the number of threads.
template <typename F>
void for_row_groups(const Shape& sh, const std::vector<int64_t>& bounds, F&& group) {
  const int64_t G = int64_t(bounds.size()) - 1;
  const auto run = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rows = (bounds[g + 1] - bounds[g]) * sh.S;
      group(bncpu::Layout{sh.C, rows, 1, sh.C, 1}, bounds[g] * sh.S * sh.C, g);
    }
  };
  if (G == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, G, 1, run);
  }
}

// Calls block(L, offset, k, c, c_end) for every (group g, channel c), k = g C + c, of a contiguous
// tensor: L the group's samples as a layout of their own (rows = its samples), starting offset
// values into the tensor, c_end where the task's channels of that group end (prefetching stops
// there). Threads take ranges of k in order; every block's results are its own, so they do not
// depend on the number of threads. Streaming stores are fenced at the end of each task.
template <typename F>
void for_blocks(const Shape& sh, const std::vector<int64_t>& bounds, bool stream, F&& block) {
  const int64_t G = int64_t(bounds.size()) - 1, C = sh.C;
  const int64_t per_block = std::max<int64_t>(1, sh.N * sh.S / std::max<int64_t>(1, G));
  at::parallel_for(0, G * C, std::max<int64_t>(1, bncpu::kGrainValues / per_block),
                   [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t g = k / C, c = k % C;
      const bncpu::Layout L{C, bounds[g + 1] - bounds[g], sh.S, C * sh.S, sh.S};
      block(L, bounds[g] * C * sh.S, k, c, std::min(C, k1 - g * C));
    }
    if (stream) bncpu::stream_fence();
  });
}

// Outputs of 16 MB or more are written with streaming stores, as the core's (kernels.h).
bool streams(const Tensor& out) {
  return bncpu::kCanStream && out.nbytes() >= size_t(bncpu::kStreamBytes);
}

// Forward; returns y and fills coef (4, G, C) float64: mean, invstd, r, d. Updates the running
// statistics in place after r and d are taken from their old values. Contiguous planes: each
// (group, channel) block reduced, then mapped from the cache (for_blocks); otherwise statistics,
// then the map over the whole tensor.
template <typename T>
Tensor grouped_forward(const Tensor& xr, const Opt& weight, const Opt& bias, const Opt& rm,
                       const Opt& rv, const GroupedOptions& o, Tensor& coef) {
  const Shape sh = shape_of(xr);
  const auto bounds = bounds_of(o.sizes, sh.N);
  const int64_t G = int64_t(o.sizes.size()), C = sh.C;
  coef = at::empty({4, G, C}, xr.options().dtype(at::kDouble));
  double* mean = coef.data_ptr<double>();
  double *invstd = mean + G * C, *r = invstd + G * C, *d = r + G * C;
  std::vector<double> var(G * C);
  const T* x = xr.data_ptr<T>();
  const T *w = ptr_or_null<T>(weight), *b = ptr_or_null<T>(bias);
  T *run_mean = given(rm) ? rm->data_ptr<T>() : nullptr;
  T *run_var = given(rv) ? rv->data_ptr<T>() : nullptr;
  // (group, channel) k's constants from its mean and var (sets invstd, r, d):
  // y = (x - mu_T) a + o, mu_T = T(mu): exact near mu, rounding in o
  const auto constants = [&](int64_t k, int64_t c, T& ctr, T& a, T& off) {
    invstd[k] = 1.0 / std::sqrt(var[k] + o.eps);
    r[k] = 1.0;
    d[k] = 0.0;
    if (o.renorm) {  // Algorithm 1 with the moving averages before this step
      const double sigma = std::sqrt(double(run_var[c]) + o.eps);
      r[k] = std::clamp(std::sqrt(var[k] + o.eps) / sigma, 1.0 / o.r_max, o.r_max);
      d[k] = std::clamp((mean[k] - double(run_mean[c])) / sigma, -o.d_max, o.d_max);
    }
    const double gamma = w ? double(w[c]) : 1.0, beta = b ? double(b[c]) : 0.0;
    const double sc = gamma * r[k] * invstd[k];
    ctr = T(mean[k]);
    a = T(sc);
    off = T(gamma * d[k] + beta - (mean[k] - double(ctr)) * sc);
  };
  Tensor y = at::empty_like(xr);
  T* out = y.data_ptr<T>();
  const bool blocks = in_blocks(sh, o.sizes), row_groups = in_row_groups(sh, o.sizes);
  Coefs<T> map(blocks || row_groups ? 0 : G * C);
  if (row_groups) {
    const bool stream = streams(y);
    for_row_groups(sh, bounds, [&](const bncpu::Layout& L, int64_t base, int64_t g) {
      bncpu::rows_forward<T>(L, x + base, out + base, stream, mean + g * C, var.data() + g * C,
                             [&](int64_t c) {
                               bncpu::ForwardConstants<T> k;
                               constants(g * C + c, c, k.mu_t, k.scale, k.shift);
                               return k;
                             });
    });
  } else if (blocks) {
    const bool stream = streams(y);
    for_blocks(sh, bounds, stream, [&](const bncpu::Layout& L, int64_t base, int64_t k,
                                       int64_t c, int64_t c_end) {
      const bncpu::Prefetch<T> pf(L);
      bncpu::ncs_channel_moments<T>(L, x + base, c, c_end, pf, mean[k], var[k]);
      T ctr, a, off;
      constants(k, c, ctr, a, off);
      bncpu::ncs_affine_channel<T>(L, x + base, nullptr, c, pf, ctr, T(0), a, off,
                                   out + base, stream);
    });
  } else {
    moments<T>(sh, bounds, x, mean, var.data());
    for (int64_t k = 0; k < G * C; ++k) constants(k, k % C, map.ctr[k], map.a[k], map.o[k]);
  }
  if (run_mean) {
    for (int64_t g = 0; g < G; ++g) {
      const double f = o.factors[g], m = double(o.sizes[g] * sh.S);
      if (f == 0.0) continue;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = g * C + c;
        run_mean[c] = T(double(run_mean[c]) + f * (mean[k] - double(run_mean[c])));
        if (o.renorm && o.sigma_average) {
          double sigma = std::sqrt(double(run_var[c]) + o.eps);
          sigma += f * (std::sqrt(var[k] + o.eps) - sigma);
          run_var[c] = T(std::max(0.0, sigma * sigma - o.eps));
        } else {
          run_var[c] = T(double(run_var[c]) + f * (var[k] * m / (m - 1.0) - double(run_var[c])));
        }
      }
    }
  }
  if (!blocks && !row_groups)
    group_map<kForward, kIdentity, T>(sh, group_of_samples(bounds), x, x, map, ActParams<T>{},
                                      out);
  return y;
}

// Backward without a graph: (dx or undefined, dgamma, dbeta), x's dtype; passes as the forward's.
template <typename T>
std::vector<Tensor> grouped_backward(const Tensor& dyr, const Tensor& xr, const Opt& weight,
                                     const Tensor& coef, const std::vector<int64_t>& sizes,
                                     bool need_dx) {
  const Shape sh = shape_of(xr);
  const auto bounds = bounds_of(sizes, sh.N);
  const int64_t G = int64_t(sizes.size()), C = sh.C;
  const double* mean = coef.data_ptr<double>();
  const double *invstd = mean + G * C, *r = invstd + G * C, *d = r + G * C;
  const T *x = xr.data_ptr<T>(), *dy = dyr.data_ptr<T>(), *w = ptr_or_null<T>(weight);
  std::vector<double> sum_dy(G * C), sum_dyxhat(G * C);
  // (group, channel) k's constants of dx = a dy + b (x - mu_T) + o from its sums of dy and
  // dy (x - mu_T), mu_T = T(mean) (sets sum_dy, sum_dyxhat)
  const auto constants = [&](int64_t k, int64_t c, double m, T ctr, double s1, double s2, T& a,
                             T& slope, T& off) {
    const double rounding = mean[k] - double(ctr);
    sum_dy[k] = s1;
    sum_dyxhat[k] = invstd[k] * (s2 - rounding * s1);
    const double gn = (w ? double(w[c]) : 1.0) * r[k] * invstd[k];
    const double k1 = -gn * invstd[k] * sum_dyxhat[k] / m;
    a = T(gn);
    slope = T(k1);
    off = T(-gn * s1 / m - k1 * rounding);
  };
  Tensor dx;
  if (need_dx) dx = at::empty_like(xr);
  T* out = need_dx ? dx.data_ptr<T>() : nullptr;
  if (in_row_groups(sh, sizes)) {
    const bool stream = need_dx && streams(dx);
    for_row_groups(sh, bounds, [&](const bncpu::Layout& L, int64_t base, int64_t g) {
      bncpu::rows_backward<T>(L, x + base, dy + base, mean + g * C, out ? out + base : nullptr,
                              stream, [&](int64_t c, T ctr, double m, double s1, double s2) {
                                bncpu::BackwardConstants<T> k;
                                constants(g * C + c, c, m, ctr, s1, s2, k.gain, k.slope,
                                          k.offset);
                                return k;
                              });
    });
  } else if (in_blocks(sh, sizes)) {
    const bool stream = need_dx && streams(dx);
    for_blocks(sh, bounds, stream, [&](const bncpu::Layout& L, int64_t base, int64_t k,
                                       int64_t c, int64_t c_end) {
      const bncpu::Prefetch<T> pf(L);
      bncpu::GradientSums<T> sums;
      const T ctr = T(mean[k]);
      double s1, s2;
      bncpu::ncs_channel_gradient_sums<T>(L, x + base, dy + base, c, c_end, pf, ctr, sums, s1,
                                          s2);
      T a, slope, off;
      constants(k, c, double(L.per_channel()), ctr, s1, s2, a, slope, off);
      if (out)
        bncpu::ncs_affine_channel<T>(L, x + base, dy + base, c, pf, ctr, a, slope, off,
                                     out + base, stream);
    });
  } else {
    Coefs<T> map(G * C);
    for (int64_t k = 0; k < G * C; ++k) map.ctr[k] = T(mean[k]);
    std::vector<double> sums(G * 2 * C);  // sum dy, sum dy (x - mu_T)
    group_sums<kGradBN, kIdentity, T>(sh, bounds, x, dy, map.ctr.data(), ActParams<T>{},
                                      sums.data());
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = g * C + c;
        constants(k, c, double(sizes[g] * sh.S), map.ctr[k], sums[(g * 2) * C + c],
                  sums[(g * 2 + 1) * C + c], map.a[k], map.b[k], map.o[k]);
      }
    if (need_dx)
      group_map<kGradBN, kIdentity, T>(sh, group_of_samples(bounds), x, dy, map, ActParams<T>{},
                                       out);
  }
  Tensor dgamma = at::empty({C}, xr.options()), dbeta = at::empty({C}, xr.options());
  T *dg = dgamma.data_ptr<T>(), *db = dbeta.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {  // over the groups in order
    double sg = 0.0, sb = 0.0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k = g * C + c;
      sg += r[k] * sum_dyxhat[k] + d[k] * sum_dy[k];
      sb += sum_dy[k];
    }
    dg[c] = T(sg);
    db[c] = T(sb);
  }
  return {dx, dgamma, dbeta};
}

// The gradient in x's layout and dtype (an expanded gradient, e.g. of a sum, is materialized).
Tensor like(const Tensor& grad, const Tensor& xr) {
  if (grad.scalar_type() == xr.scalar_type() && grad.strides() == xr.strides() &&
      grad.is_non_overlapping_and_dense())
    return grad;
  return at::empty_like(xr).copy_(grad);
}

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t i = 2; i < x.dim(); ++i) dims.push_back(i);
  return dims;
}

std::vector<int64_t> channel_view(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

class GroupedTrain : public torch::autograd::Function<GroupedTrain> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Opt& weight,
                        const Opt& bias, const Opt& rm, const Opt& rv, std::vector<int64_t> sizes,
                        std::vector<double> factors, double eps, bool renorm, double r_max,
                        double d_max, bool sigma_average) {
    const GroupedOptions o{sizes, factors, eps, renorm, r_max, d_max, sigma_average};
    const Tensor xr = in_place_order(x);
    Tensor coef, y;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_forward", [&] {
      y = grouped_forward<scalar_t>(xr, weight, bias, rm, rv, o, coef);
    });
    ctx->save_for_backward({x, given(weight) ? *weight : Tensor(), coef});
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = given(bias);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &coef = saved[2];
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const bool has_weight = weight.defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_w = has_weight && ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["has_bias"].toBool() &&
                        ctx->needs_input_grad(has_weight ? 2 : 1);
    std::vector<Tensor> d;
    if (at::GradMode::is_enabled()) {
      d = differentiable(grads[0], x, weight, coef, sizes, ctx->saved_data["eps"].toDouble());
    } else {
      const Tensor xr = in_place_order(x);
      const Opt w = has_weight ? Opt(weight) : c10::nullopt;
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_backward", [&] {
        d = grouped_backward<scalar_t>(like(grads[0], xr), xr, w, coef, sizes, need_dx);
      });
    }
    const Tensor none;
    return {need_dx ? d[0] : none, need_w ? d[1] : none, need_b ? d[2] : none,
            none, none, none, none, none, none, none, none, none};
  }

 private:
  // The same gradients in ATen operations, the statistics recomputed from x inside the graph
  // (they depend on x); r and d are constants (stop_gradient).
  static std::vector<Tensor> differentiable(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                            const Tensor& coef, const std::vector<int64_t>& sizes,
                                            double eps) {
    const auto dims = reduce_dims(x);
    const auto view = channel_view(x);
    const auto xs = x.split_with_sizes(sizes), dys = dy.split_with_sizes(sizes);
    std::vector<Tensor> dxs;
    Tensor dgamma, dbeta;
    for (size_t g = 0; g < sizes.size(); ++g) {
      const double m = double(xs[g].numel() / x.size(1));
      const Tensor r = coef[2][g].to(x.scalar_type()), d = coef[3][g].to(x.scalar_type());
      const Tensor xc = xs[g] - xs[g].mean(dims, true);
      const Tensor invstd = ((xc * xc).mean(dims, true) + eps).rsqrt();
      const Tensor xhat = xc * invstd;
      const Tensor db = dys[g].sum(dims), a = (dys[g] * xhat).sum(dims);
      Tensor gain = invstd * r.view(view);
      if (weight.defined()) gain = gain * weight.view(view);
      dxs.push_back(gain * (dys[g] - (db.view(view) + xhat * a.view(view)) / m));
      const Tensor dg = r * a + d * db;
      dgamma = dgamma.defined() ? dgamma + dg : dg;
      dbeta = dbeta.defined() ? dbeta + db : db;
    }
    return {at::cat(dxs), dgamma, dbeta};
  }
};

// y, or None when the kernels do not take the call (see takes).
c10::optional<Tensor> grouped_train(const Tensor& x, const Opt& weight, const Opt& bias,
                                    const Opt& running_mean, const Opt& running_var,
                                    std::vector<int64_t> sizes, std::vector<double> factors,
                                    double eps, bool renorm, double r_max, double d_max,
                                    bool sigma_average) {
  if (!takes(x, {&weight, &bias, &running_mean, &running_var})) return c10::nullopt;
  TORCH_CHECK(factors.size() == sizes.size(), "family_cpu.grouped_train: one factor per group");
  TORCH_CHECK(!renorm || (sizes.size() == 1 && given(running_mean)),
              "family_cpu.grouped_train: renorm needs one group and the running statistics");
  return GroupedTrain::apply(x, weight, bias, running_mean, running_var, sizes, factors, eps,
                             renorm, r_max, d_max, sigma_average);
}

// ------------------------------------------------------------------------------------------
// abn_train: in-place activated BN

template <typename T>
ActParams<T> act_params(double slope, double alpha) {
  return ActParams<T>{T(slope), T(1.0 / slope), T(alpha),
                      std::numeric_limits<T>::epsilon() - T(1)};
}

// Calls body(std::integral_constant<Act, A>) for the activation code (compile-time A).
template <typename Body>
void with_activation(int64_t act, Body&& body) {
  switch (act) {
    case kLeaky: return body(std::integral_constant<Act, kLeaky>());
    case kElu: return body(std::integral_constant<Act, kElu>());
    case kIdentity: return body(std::integral_constant<Act, kIdentity>());
    default: TORCH_CHECK(false, "family_cpu: unknown activation code ", act);
  }
}

// |weight| + eps: gamma must not be 0 for y -> xhat to be invertible (as in the paper).
inline double positive_gamma(double w, double eps) { return std::abs(w) + eps; }

// Forward into out (x itself for in place); returns invstd (C,) in x's dtype. The weight is the
// raw gamma; the layer uses |gamma| + eps. Contiguous planes: channel by channel, reduced then
// mapped from the cache (for_blocks); otherwise statistics, then the map over the whole tensor.
template <Act A, typename T>
Tensor abn_forward(const Tensor& xr, const Opt& weight, const Opt& bias, const Opt& rm,
                   const Opt& rv, double momentum, double eps, const ActParams<T>& p,
                   Tensor& out) {
  const Shape sh = shape_of(xr);
  const std::vector<int64_t> bounds{0, sh.N};
  const int64_t C = sh.C, m = sh.N * sh.S;
  std::vector<double> mean(C), var(C);
  const T* x = xr.data_ptr<T>();
  T* z = out.data_ptr<T>();
  const T *w = ptr_or_null<T>(weight), *b = ptr_or_null<T>(bias);
  Tensor invstd = at::empty({C}, xr.options());
  T* is = invstd.data_ptr<T>();
  Coefs<T> map(C);  // z = f((x - mu_T) a + o)
  const auto constants = [&](int64_t c) {
    const double inv = 1.0 / std::sqrt(var[c] + eps);
    const double sc = (w ? positive_gamma(double(w[c]), eps) : 1.0) * inv;
    is[c] = T(inv);
    map.ctr[c] = T(mean[c]);
    map.a[c] = T(sc);
    map.o[c] = T((b ? double(b[c]) : 0.0) - (mean[c] - double(map.ctr[c])) * sc);
  };
  const bool blocks = in_blocks(sh, {sh.N});
  if (blocks) {
    for_blocks(sh, bounds, false, [&](const bncpu::Layout& L, int64_t, int64_t, int64_t c,
                                      int64_t c_end) {
      const bncpu::Prefetch<T> pf(L);
      bncpu::ncs_channel_moments<T>(L, x, c, c_end, pf, mean[c], var[c]);
      constants(c);
      for (int64_t n = 0; n < sh.N; ++n) {
        const int64_t base = (n * C + c) * sh.S;
        map_run<kForward, A, T>(x + base, x + base, sh.S, map.ctr[c], map.a[c], T(0), map.o[c],
                                p, z + base);
      }
    });
  } else {
    moments<T>(sh, bounds, x, mean.data(), var.data());
    for (int64_t c = 0; c < C; ++c) constants(c);
  }
  if (given(rm)) {
    T *run_mean = rm->data_ptr<T>(), *run_var = rv->data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      run_mean[c] = T(double(run_mean[c]) + momentum * (mean[c] - double(run_mean[c])));
      run_var[c] = T(double(run_var[c]) +
                     momentum * (var[c] * double(m) / double(m - 1) - double(run_var[c])));
    }
  }
  if (!blocks) group_map<kForward, A, T>(sh, std::vector<int64_t>(sh.N, 0), x, x, map, p, z);
  return invstd;
}

// Backward from z without a graph: (dx, dweight, dbeta), with dweight = sign(w) dL/dgamma
// (0 at w = 0, as torch's abs). dinvstd (or undefined) is the gradient reaching the returned
// invstd: dinvstd/dx = -invstd^2 xhat / m. Passes as the forward's.
template <Act A, typename T>
std::vector<Tensor> abn_backward(const Tensor& dzr, const Tensor& zr, const Opt& weight,
                                 const Opt& bias, const Tensor& invstd_t, const Tensor& dinvstd,
                                 double eps, const ActParams<T>& p) {
  const Shape sh = shape_of(zr);
  const std::vector<int64_t> bounds{0, sh.N};
  const int64_t C = sh.C;
  const double m = double(sh.N * sh.S);
  const T *z = zr.data_ptr<T>(), *dz = dzr.data_ptr<T>();
  const T *w = ptr_or_null<T>(weight), *b = ptr_or_null<T>(bias), *is = invstd_t.data_ptr<T>();
  Coefs<T> map(C);  // dx = a dz f'(z) + b (f^-1(z) - beta) + o
  for (int64_t c = 0; c < C; ++c) map.ctr[c] = b ? b[c] : T(0);
  std::vector<double> sums(2 * C);  // sum dy, sum dy (y - beta)
  Tensor dgamma = at::empty({C}, zr.options()), dbeta = at::empty({C}, zr.options());
  T *dg = dgamma.data_ptr<T>(), *db = dbeta.data_ptr<T>();
  const Tensor di = dinvstd.defined() ? dinvstd.to(at::kDouble).contiguous() : Tensor();
  const auto constants = [&](int64_t c) {
    const double g = w ? positive_gamma(double(w[c]), eps) : 1.0, inv = double(is[c]);
    const double dgam = sums[C + c] / g;  // sum dy xhat = dL/dgamma
    dg[c] = w ? T(w[c] > T(0) ? dgam : (w[c] < T(0) ? -dgam : 0.0)) : T(dgam);
    db[c] = T(sums[c]);
    double k1 = -inv * dgam / m;
    if (di.defined()) k1 -= di.data_ptr<double>()[c] * inv * inv / (m * g);
    map.a[c] = T(g * inv);
    map.b[c] = T(k1);
    map.o[c] = T(-g * inv * sums[c] / m);
  };
  Tensor dx = at::empty_like(zr);
  T* out = dx.data_ptr<T>();
  if (in_blocks(sh, {sh.N})) {
    const int64_t S = sh.S;
    for_blocks(sh, bounds, false, [&](const bncpu::Layout&, int64_t, int64_t, int64_t c,
                                      int64_t) {
      block_sums<kGradABN, A, T>(z + c * S, dz + c * S, sh.N, C * S, S, map.ctr[c], p, sums[c],
                                 sums[C + c]);
      constants(c);
      for (int64_t n = 0; n < sh.N; ++n) {
        const int64_t base = (n * C + c) * S;
        map_run<kGradABN, A, T>(z + base, dz + base, S, map.ctr[c], map.a[c], map.b[c],
                                map.o[c], p, out + base);
      }
    });
  } else {
    group_sums<kGradABN, A, T>(sh, bounds, z, dz, map.ctr.data(), p, sums.data());
    for (int64_t c = 0; c < C; ++c) constants(c);
    group_map<kGradABN, A, T>(sh, std::vector<int64_t>(sh.N, 0), z, dz, map, p, out);
  }
  return {dx, dgamma, dbeta};
}

class ABNTrain : public torch::autograd::Function<ABNTrain> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const Opt& weight, const Opt& bias,
      const Opt& rm, const Opt& rv, double momentum, double eps, int64_t act, double slope,
      double alpha, bool inplace) {
    const Tensor xr = in_place_order(x);
    const bool overwrite = inplace && xr.is_same(x);
    Tensor z = overwrite ? x : at::empty_like(xr), invstd;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "abn_forward", [&] {
      with_activation(act, [&](auto a) {
        invstd = abn_forward<decltype(a)::value, scalar_t>(
            xr, weight, bias, rm, rv, momentum, eps, act_params<scalar_t>(slope, alpha), z);
      });
    });
    if (overwrite) ctx->mark_dirty({x});
    ctx->save_for_backward({z, given(weight) ? *weight : Tensor(),
                            given(bias) ? *bias : Tensor(), invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["alpha"] = alpha;
    return {z, invstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &weight = saved[1], &bias = saved[2], &invstd = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const Tensor dz = grads[0].defined() ? grads[0] : at::zeros_like(z);
    std::vector<Tensor> d;
    if (at::GradMode::is_enabled()) {
      d = differentiable(dz, grads[1], z, weight, bias, invstd, eps, act, slope, alpha);
    } else {
      const Tensor zr = in_place_order(z);
      const Opt g = weight.defined() ? Opt(weight) : c10::nullopt;
      const Opt b = bias.defined() ? Opt(bias) : c10::nullopt;
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "abn_backward", [&] {
        with_activation(act, [&](auto a) {
          d = abn_backward<decltype(a)::value, scalar_t>(
              like(dz, zr), zr, g, b, invstd, grads[1], eps, act_params<scalar_t>(slope, alpha));
        });
      });
    }
    const bool has_gamma = weight.defined(), has_bias = bias.defined();
    const Tensor none;
    return {ctx->needs_input_grad(0) ? d[0] : none,
            has_gamma && ctx->needs_input_grad(1) ? d[1] : none,
            has_bias && ctx->needs_input_grad(has_gamma ? 2 : 1) ? d[2] : none,
            none, none, none, none, none, none, none, none};
  }

 private:
  // y = f^-1(z) and dy = dz f'(y) in differentiable operations of z (a saved output, so a double
  // backward reaches x through this Function again), then the closed form.
  static std::vector<Tensor> differentiable(const Tensor& dz, const Tensor& dinvstd,
                                            const Tensor& z, const Tensor& weight,
                                            const Tensor& bias, const Tensor& invstd, double eps,
                                            int64_t act, double slope, double alpha) {
    const auto dims = reduce_dims(z);
    const auto view = channel_view(z);
    const double m = double(z.numel() / z.size(1));
    Tensor y = z, dy = dz;
    if (act == kLeaky) {
      const Tensor positive = z >= 0;
      y = at::where(positive, z, z / slope);
      dy = at::where(positive, dz, dz * slope);
    } else if (act == kElu) {
      const Tensor positive = z > 0;
      const double floor = z.scalar_type() == at::kDouble
                               ? std::numeric_limits<double>::epsilon() - 1.0
                               : double(std::numeric_limits<float>::epsilon()) - 1.0;
      y = at::where(positive, z, at::log1p((z / alpha).clamp_min(floor)));
      dy = at::where(positive, dz, dz * (z + alpha));
    }
    const Tensor g = weight.defined() ? weight.abs() + eps : at::ones_like(invstd);
    const Tensor u = bias.defined() ? y - bias.view(view) : y;  // gamma xhat
    const Tensor dbeta = dy.sum(dims), dgamma = (dy * u).sum(dims) / g;
    const Tensor gain = (g * invstd).view(view);
    Tensor dx = gain * dy - (invstd * dgamma / m).view(view) * u - (gain * dbeta.view(view)) / m;
    if (dinvstd.defined()) dx = dx - (dinvstd * invstd * invstd / (g * m)).view(view) * u;
    return {dx, weight.defined() ? dgamma * weight.sign() : dgamma, dbeta};
  }
};

// z, or None when the kernels do not take the call (see takes).
c10::optional<Tensor> abn_train(const Tensor& x, const Opt& weight, const Opt& bias,
                                const Opt& running_mean, const Opt& running_var, double momentum,
                                double eps, int64_t act, double slope, double alpha, bool inplace) {
  if (!takes(x, {&weight, &bias, &running_mean, &running_var})) return c10::nullopt;
  return ABNTrain::apply(x, weight, bias, running_mean, running_var, momentum, eps, act, slope,
                         alpha, inplace)[0];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_train", &grouped_train,
        "Ghost BN / Batch Renormalization in training, with its backward (CPU)");
  m.def("abn_train", &abn_train, "In-place activated BN in training, with its backward (CPU)");
}
