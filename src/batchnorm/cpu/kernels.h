// The shared pieces of the fused CPU kernels (float32 / float64): the geometry of a tensor,
// 32-byte vectors, the statistics' accumulator, the per-channel constants of the output passes,
// streaming stores, and the per-layout training kernels that train.cpp calls. No ATen tensors
// here: the kernel files include this and <ATen/Parallel.h> only (quick to compile).
//
// Two layouts, both read in place from the caller's tensor (no copies):
//   NCS: contiguous (N, C, S), S > 1: channel c is N runs of S contiguous values
//        (train_contiguous.cpp);
//   MC:  (M, C) rows (2-D input, or channels-last viewed as rows of C channels)
//        (train_channels_last.cpp, from the pieces in rows.h).
//
// Passes over memory. NCS works channel by channel (threads take blocks of channels, in one
// parallel region per direction): a channel's values are first reduced (statistics, or the
// backward's two sums, in one read), then the same values, now in the core's L2 cache, give y or
// dx. Memory sees one read of x and a write of y forward, one read of x and dy and a write of dx
// backward: the five tensor transfers a step cannot do without. MC cannot keep a channel in
// cache (its values span the whole tensor): one reading pass for the reductions, one for the
// output, per direction; threads take blocks of rows, both passes and the merge in between
// (threads take channels) in one parallel region. Eval (eval.cpp) is one pass,
// y = x * scale + shift, in either layout. Training outputs of 16 MB or more are written with
// streaming stores (see kStreamBytes).
//
// Sums are accumulated in double in an order fixed by the shape alone, so results are
// deterministic and do not depend on the number of threads (nor on the build: the AVX2 and the
// baseline build give the same bits). The formulas are in train.cpp.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace bncpu {

constexpr int64_t kGrainValues = 1 << 15;  // values per task below which threads do not pay

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of a view: for channel c, element (i, j) lies at base + i * outer + c * cstride + j.
struct Layout {
  int64_t C, rows, run, outer, cstride;  // NCS: rows=N, run=S, outer=C*S, cstride=S
  bool mc() const { return run == 1; }   // MC:  rows=M, run=1, outer=C,   cstride=1
  int64_t per_channel() const { return rows * run; }
};

// ---- vectors -------------------------------------------------------------------------------
// GCC/Clang vector extensions: 32-byte vectors of T, compiled to AVX2 where the build has it and
// to pairs of SSE registers otherwise. Lane sums are added in a fixed order, so the two builds
// give the same bits.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t lane_int;
  typedef int32_t mask __attribute__((vector_size(32)));
  static constexpr mask iota = {0, 1, 2, 3, 4, 5, 6, 7};
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t lane_int;
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr mask iota = {0, 1, 2, 3};
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kWidth = 32 / sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline Vec<T> broadcast(T a) {
  return Vec<T>{} + a;
}

// The last rem (1 <= rem < W) of n >= W values ending at end: the vector ending there, with the
// lanes before them (already counted) zeroed. No scalar tail: scalars written into a vector in
// memory and read back as a vector stall store forwarding.
template <typename T>
inline Vec<T> last_lanes(const T* end, int64_t rem, T shift) {
  const Vec<T> v = load(end - kWidth<T>) - shift;
  using M = VecOf<T>;
  return M::iota >= typename M::mask{} + typename M::lane_int(kWidth<T> - rem) ? v : Vec<T>{};
}

// The n < W values at p, less shift, in the first lanes (zeros after): through a local array,
// as a piece this short is rare.
template <typename T>
inline Vec<T> few_lanes(const T* p, int64_t n, T shift) {
  T tmp[kWidth<T>] = {};
  for (int64_t l = 0; l < n; ++l) tmp[l] = p[l] - shift;
  return load(tmp);
}

template <typename T>
inline double lane_total(const Vec<T>& v) {
  double s = 0.0;
  for (int l = 0; l < kWidth<T>; ++l) s += double(v[l]);
  return s;
}

// Per-channel statistics accumulated as (origin R, A = sum(x - R), B = sum((x - R)^2)).
struct Moments {
  double R = 0.0, A = 0.0, B = 0.0;
  // adds a group of n values summed as d = x - shift: s1 = sum(d), s2 = sum(d^2)
  void add(double shift, double n, double s1, double s2) {
    const double delta = shift - R;
    A += s1 + n * delta;
    B += s2 + delta * (2.0 * s1 + n * delta);
  }
  void finish(double m, double& mean, double& var) const {
    const double d = A / m;
    mean = R + d;
    var = std::max(0.0, B / m - d * d);  // biased
  }
};

// ---- streaming stores ----------------------------------------------------------------------
// Large outputs of a training step go to memory with streaming (non-temporal) stores: a step
// keeps four tensors of that size live (x, y, dy, dx), and from kStreamBytes each on, they
// outgrow the last-level cache share of a core, so the output's lines would be evicted before
// anything reads them; a streaming store skips reading each line in first (a third of the
// pass's memory traffic). Measured on the benchmark's machine, 1 thread, training step, over
// several runs: 25 MB tensors 15-40% faster, 6 MB tensors (whose step fits the cache) 1.3-1.7x
// slower, hence the threshold. Eval writes one output that the next layer reads at once: never
// streamed. The values are the same bits either way.
constexpr int64_t kStreamBytes = 16 << 20;

#if defined(__AVX__)
constexpr bool kCanStream = true;
template <typename T>
inline void stream_store(T* p, const Vec<T>& v) {
  if constexpr (std::is_same_v<T, float>)
    _mm256_stream_ps(p, reinterpret_cast<const __m256&>(v));
  else
    _mm256_stream_pd(p, reinterpret_cast<const __m256d&>(v));
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename T>
inline void stream_store(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }
inline void stream_fence() {}
#endif

// out[j] = scalar(j) for j < n, with streaming stores (then vec(j) gives values j..j+W-1, the
// same bits) from the first 32-byte boundary on.
template <typename T, typename S, typename V>
inline void stream_run(T* out, int64_t n, S&& scalar, V&& vec) {
  constexpr int W = kWidth<T>;
  int64_t j = 0;
  for (; j < n && (reinterpret_cast<uintptr_t>(out + j) & 31) != 0; ++j) out[j] = scalar(j);
  for (; j + W <= n; j += W) stream_store(out + j, vec(j));
  for (; j < n; ++j) out[j] = scalar(j);
}

// ---- software prefetch ---------------------------------------------------------------------
// One cache line, as volatile asm on x86: GCC silently dropped every __builtin_prefetch from a
// version of the NCS loops (contiguous.h), since they have no effect it must keep.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// ---- per-channel constants of the output passes --------------------------------------------
// Per-channel constants of y = (x - mu_T) scale + shift' from the double statistics: x - mu_T is
// exact for x near mu (Sterbenz), which keeps y accurate when the data has a large offset;
// shift' absorbs mu's rounding mu - mu_T.
template <typename T>
struct ForwardConstants {
  T mu_t, scale, shift;
  ForwardConstants() = default;  // filled by a caller with constants of its own (BN family)
  ForwardConstants(double mu, double invstd, const T* w, const T* b, int64_t c) {
    mu_t = T(mu);
    const double g = w ? double(w[c]) : 1.0, be = b ? double(b[c]) : 0.0;
    scale = T(g * invstd);
    shift = T(be - g * invstd * (mu - double(mu_t)));
  }
};

// Per-channel constants of dx = gain dy + slope (x - mu_T) + offset and the parameter gradients,
// from sum(dy) and sum(dy (x - mu_T)); sum(dy (x - mu)) = ... - (mu - mu_T) sum(dy), and
// k (x - mu) = k (x - mu_T) - k (mu - mu_T): the rounding of mu goes into the constant.
template <typename T>
struct BackwardConstants {
  T gain, slope, offset;
  BackwardConstants() = default;  // filled by a caller with constants of its own (BN family)
  BackwardConstants(double mu, T mu_t, double inv, const T* w, int64_t c, double m, double sdy,
                    double sdyxc, T* dgamma, T* dbeta) {
    const double rounding = mu - double(mu_t);
    const double g = (w ? double(w[c]) : 1.0) * inv;
    const double dgam = (sdyxc - rounding * sdy) * inv;
    dgamma[c] = T(dgam);
    dbeta[c] = T(sdy);
    gain = T(g);
    const double k = -g * inv * dgam / m;
    slope = T(k);
    offset = T(-g * sdy / m - k * rounding);
  }
};

// ---- the per-layout training kernels -------------------------------------------------------
// One direction of a training step over one tensor, as raw pointers (C values per channel
// array). ForwardPass: y and the per-channel mean, invstd and (biased) var from x;
// BackwardPass: dx (when dx is not null), dgamma and dbeta from x, dy and forward's statistics.
template <typename T>
struct ForwardPass {
  const T *x, *weight, *bias;  // weight, bias: null when absent
  T* y;
  bool stream;  // y written with streaming stores (kStreamBytes)
  double *mean, *invstd, *var;
  double eps;

  // Channel c's constants once its mean and var are known (sets invstd[c]).
  ForwardConstants<T> constants(int64_t c) const {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    return ForwardConstants<T>(mean[c], invstd[c], weight, bias, c);
  }
};

template <typename T>
struct BackwardPass {
  const T *x, *dy, *weight;
  const double *mean, *invstd;
  T* dx;  // null: no input gradient
  bool stream;  // dx written with streaming stores
  T *dgamma, *dbeta;

  // Channel c's constants (and its dgamma, dbeta) from its m values' two sums.
  BackwardConstants<T> constants(int64_t c, T mu_t, double m, double sdy, double sdyxc) const {
    return BackwardConstants<T>(mean[c], mu_t, invstd[c], weight, c, m, sdy, sdyxc, dgamma,
                                dbeta);
  }
};

// train_contiguous.cpp (NCS) and train_channels_last.cpp (MC), for float and double.
template <typename T>
void ncs_forward(const Layout& L, const ForwardPass<T>& p);
template <typename T>
void ncs_backward(const Layout& L, const BackwardPass<T>& p);
template <typename T>
void mc_forward(const Layout& L, const ForwardPass<T>& p);
template <typename T>
void mc_backward(const Layout& L, const BackwardPass<T>& p);

}  // namespace bncpu
