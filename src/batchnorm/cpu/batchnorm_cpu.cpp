// Fused CPU kernels for the "torch" backend's BN (float32 / float64): training forward and
// backward, and the eval (inference) forward.
//
// Two layouts, both read in place from the caller's tensor (no copies):
//   NCS: contiguous (N, C, S), S > 1: channel c is N runs of S contiguous values;
//   MC:  (M, C) rows (2-D input, or channels-last viewed as rows of C channels).
//
// Passes over memory. NCS works channel by channel (threads take blocks of channels, in one
// parallel region per direction): a channel's values are first reduced (statistics, or the
// backward's two sums, in one read), then the same values, now in the core's L2 cache, give y or
// dx. Memory sees one read of x and a write of y forward, one read of x and dy and a write of dx
// backward: the five tensor transfers a step cannot do without. MC cannot keep a channel in
// cache (its values span the whole tensor): one reading pass for the reductions, one for the
// output, per direction; threads take blocks of rows, both passes and the merge in between
// (threads take channels) in one parallel region. Eval is one pass, y = x * scale + shift, in
// either layout. Training outputs of 16 MB or more are written with streaming stores (see
// kStreamBytes).
//
// Sums are accumulated in double in an order fixed by the shape alone, so results are
// deterministic and do not depend on the number of threads (nor on the build: the AVX2 and the
// baseline build give the same bits).
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
// Eval: y = x * scale + shift with scale = gamma * rsqrt(running_var + eps) and
// shift = beta - running_mean * scale, each rounded in x's dtype as the ATen path does.
//
// Layout of this file: the kernels (namespace-local), the kernel entry points `forward`,
// `backward`, `infer` (plain functions of tensors), then the autograd glue and the bindings.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <omp.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <algorithm>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGrainValues = 1 << 15;  // values per task below which threads do not pay

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of a view: for channel c, element (i, j) lies at base + i * outer + c * cstride + j.
struct Layout {
  int64_t C, rows, run, outer, cstride;  // NCS: rows=N, run=S, outer=C*S, cstride=S
  bool mc() const { return run == 1; }   // MC:  rows=M, run=1, outer=C,   cstride=1
  int64_t per_channel() const { return rows * run; }
};

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
    const int64_t S = C == 0 || N == 0 ? 1 : x.numel() / (N * C);
    return Layout{C, N, S, C * S, S};
  }
  return Layout{C, x.numel() / C, 1, C, 1};  // channels-last: rows of C channels
}

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

// ---- NCS reductions over runs ----------------------------------------------------------------
// Lane sums over contiguous pieces: four vector accumulators per sum (independent add chains);
// a piece's last values (fewer than a vector) go in a fifth, masked. take() folds them in a
// fixed order into double and restarts. (All in registers: a vector written lane by lane in
// memory and read back whole stalls store forwarding.)
constexpr int64_t kGroup = 512;  // NCS: values summed in T before their sums go to double
constexpr int64_t kOriginValues = 64;  // NCS: a channel's origin is the mean of its first values

template <typename T>
struct CenteredSums {  // sum(d), sum(d^2) with d = x - shift
  using V = Vec<T>;
  static constexpr int W = kWidth<T>;
  V a0{}, a1{}, a2{}, a3{}, q0{}, q1{}, q2{}, q3{}, ta{}, tq{};

  void add(const T* x, int64_t n, T shift) {
    const V s = broadcast(shift);
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
      const V d0 = load(x + j) - s, d1 = load(x + j + W) - s;
      const V d2 = load(x + j + 2 * W) - s, d3 = load(x + j + 3 * W) - s;
      a0 += d0, a1 += d1, a2 += d2, a3 += d3;
      q0 += d0 * d0, q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3;
    }
    for (; j + W <= n; j += W) {
      const V d = load(x + j) - s;
      a1 += d, q1 += d * d;
    }
    if (j == n) return;
    const V d = n >= W ? last_lanes(x + n, n - j, shift) : few_lanes(x, n, shift);
    ta += d, tq += d * d;
  }

  void take(double& s1, double& s2) {
    s1 = lane_total<T>(((a0 + a1) + (a2 + a3)) + ta);
    s2 = lane_total<T>(((q0 + q1) + (q2 + q3)) + tq);
    a0 = a1 = a2 = a3 = q0 = q1 = q2 = q3 = ta = tq = V{};
  }
};

template <typename T>
struct GradientSums {  // sum(dy), sum(dy (x - mu))
  using V = Vec<T>;
  static constexpr int W = kWidth<T>;
  V a0{}, a1{}, a2{}, a3{}, q0{}, q1{}, q2{}, q3{}, ta{}, tq{};

  void add(const T* x, const T* dy, int64_t n, T mu) {
    const V s = broadcast(mu);
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
      const V g0 = load(dy + j), g1 = load(dy + j + W);
      const V g2 = load(dy + j + 2 * W), g3 = load(dy + j + 3 * W);
      a0 += g0, a1 += g1, a2 += g2, a3 += g3;
      q0 += g0 * (load(x + j) - s), q1 += g1 * (load(x + j + W) - s);
      q2 += g2 * (load(x + j + 2 * W) - s), q3 += g3 * (load(x + j + 3 * W) - s);
    }
    for (; j + W <= n; j += W) {
      const V g = load(dy + j);
      a1 += g, q1 += g * (load(x + j) - s);
    }
    if (j == n) return;
    if (n >= W) {
      const V g = last_lanes(dy + n, n - j, T(0));
      ta += g, tq += g * (load(x + n - W) - s);
    } else {
      const V g = few_lanes(dy, n, T(0));
      ta += g, tq += g * few_lanes(x, n, mu);
    }
  }

  void take(double& s1, double& s2) {
    s1 = lane_total<T>(((a0 + a1) + (a2 + a3)) + ta);
    s2 = lane_total<T>(((q0 + q1) + (q2 + q3)) + tq);
    a0 = a1 = a2 = a3 = q0 = q1 = q2 = q3 = ta = tq = V{};
  }
};

// Software prefetch, NCS: a channel's runs lie C * S values apart, and short runs (7 x 7 maps)
// are too short for the hardware prefetcher to follow, which leaves every run waiting for
// memory. Before each run, the first lines of the run a few places later in the thread's
// sequence (its channels one after the other, each run by run) are requested; for the output,
// for writing, within the channel. (Requesting the whole next channel into L2 meanwhile, or
// going through runs or channels in descending order to start where the caches are warm,
// measured no faster.)
constexpr int64_t kPrefetchBytes = 1024;  // per run: longer runs are streamed by the hardware

// One line, as volatile asm on x86: GCC dropped every __builtin_prefetch from a version of these
// loops (they have no effect it must keep), silently.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
struct Prefetch {
  const Layout& L;
  int64_t lines, ahead;
  explicit Prefetch(const Layout& L_) : L(L_) {
    const int64_t bytes = L.run * int64_t(sizeof(T));
    lines = std::min(bytes, kPrefetchBytes) / 64 + 1;
    ahead = std::max<int64_t>(1, std::min<int64_t>(8, 2048 / bytes));  // runs, about 2 KB
  }
  // Before run i of channel c, in a sequence whose channels end before c_end: the lines of the
  // run `ahead` places later in each tensor of ts.
  template <typename... P>
  void before(int64_t c, int64_t i, int64_t c_end, const P*... ts) const {
    int64_t ii = i + ahead, cc = c;
    while (ii >= L.rows && cc < c_end) ii -= L.rows, ++cc;
    if (cc >= c_end) return;
    const int64_t offset = ii * L.outer + cc * L.cstride;
    for (const char* t : {reinterpret_cast<const char*>(ts + offset)...})
      for (int64_t k = 0; k < lines; ++k) prefetch_line(t + 64 * k);
  }
};

// Calls f(offset, n) for channel c's values in memory order, in pieces of at most kGroup (a run,
// or part of one), and flush(n) after every kGroup values or more and at the end; prefetches
// the inputs ts ahead, through channels before c_end.
template <typename T, typename F, typename G, typename... P>
inline void for_pieces(const Layout& L, int64_t c, int64_t c_end, const Prefetch<T>& pf, F&& f,
                       G&& flush, const P*... ts) {
  int64_t pending = 0;
  for (int64_t i = 0; i < L.rows; ++i) {
    pf.before(c, i, c_end, ts...);
    const int64_t base = i * L.outer + c * L.cstride;
    for (int64_t j0 = 0; j0 < L.run; j0 += kGroup) {
      const int64_t n = std::min(kGroup, L.run - j0);
      f(base + j0, n);
      pending += n;
      if (pending >= kGroup) {
        flush(pending);
        pending = 0;
      }
    }
  }
  if (pending > 0) flush(pending);
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

// Channel c's mean and biased variance (NCS), in one read of its values.
template <typename T>
void ncs_channel_moments(const Layout& L, const T* x, int64_t c, int64_t c_end,
                         const Prefetch<T>& pf, double& mean, double& var) {
  CenteredSums<T> sums;
  double s1, s2;
  // origin: the mean of the channel's first few values (read again just below, from L1)
  const T* first = x + c * L.cstride;
  const int64_t n0 = std::min(kOriginValues, L.run);
  sums.add(first, n0, first[0]);
  sums.take(s1, s2);
  Moments mo;
  mo.R = double(first[0]) + s1 / double(n0);
  T shift = T(mo.R);
  for_pieces(
      L, c, c_end, pf, [&](int64_t k, int64_t n) { sums.add(x + k, n, shift); },
      [&](int64_t n) {
        sums.take(s1, s2);
        mo.add(double(shift), double(n), s1, s2);
        shift = T(double(shift) + s1 / double(n));  // the next group's shift: this one's mean
      },
      x);
  mo.finish(double(L.per_channel()), mean, var);
}

// ---- MC reductions over rows ---------------------------------------------------------------
// Rows are split into at most kMaxRowBlocks blocks of whole chunks of kChunkRows rows, fixed by
// the shape; threads take blocks; each block keeps per-channel double sums, added in block
// order at the end. Within a chunk, each channel has its own partial sum in T (the channel index
// is the vector dimension), read in memory order so that the hardware prefetcher streams.
constexpr int64_t kChunkRows = 128;
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kOriginRows = 8;  // a block's origin is the mean of its first rows

struct RowBlocks {
  int64_t count, rows_per_block;
  explicit RowBlocks(int64_t rows) {
    const int64_t chunks = std::max<int64_t>(1, ceil_div(rows, kChunkRows));
    const int64_t chunks_per_block = ceil_div(chunks, std::min(kMaxRowBlocks, chunks));
    count = ceil_div(chunks, chunks_per_block);
    rows_per_block = chunks_per_block * kChunkRows;
  }
  int64_t grain(int64_t C) const {
    return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, rows_per_block * C));
  }
  int64_t rows_in(int64_t blk, int64_t rows) const {
    return std::min(rows, (blk + 1) * rows_per_block) - blk * rows_per_block;
  }
};

// Blocks [b0, b1) of MC rows: per block and channel, the origin R (the mean of the block's
// first rows), A = sum(x - R) and B = sum((x - R)^2), into part (3 C doubles per block);
// scratch holds 3 C values.
template <typename T>
void mc_moments_blocks(const Layout& L, const T* x, const RowBlocks& blocks, int64_t b0,
                       int64_t b1, double* part, T* scratch) {
  const int64_t C = L.C, rows = L.rows;
  T *shift = scratch, *s1 = shift + C, *s2 = s1 + C;
  for (int64_t blk = b0; blk < b1; ++blk) {
    double *R = part + blk * 3 * C, *A = R + C, *B = A + C;
    const int64_t r0 = blk * blocks.rows_per_block;
    const int64_t r1 = std::min(rows, r0 + blocks.rows_per_block);
    // origin: each channel's mean over the block's first rows (read again just below)
    const T* first = x + r0 * L.outer;
    const int64_t n0 = std::min(kOriginRows, r1 - r0);
    std::fill(s1, s1 + C, T(0));
    for (int64_t r = r0; r < r0 + n0; ++r) {
      const T* xr = x + r * L.outer;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s1[c] += xr[c] - first[c];
    }
    for (int64_t c = 0; c < C; ++c) {
      R[c] = double(first[c]) + double(s1[c]) / double(n0);
      shift[c] = T(R[c]);
      A[c] = B[c] = 0.0;
    }
    for (int64_t i0 = r0; i0 < r1; i0 += kChunkRows) {
      const int64_t i1 = std::min(r1, i0 + kChunkRows);
      std::fill(s1, s1 + 2 * C, T(0));
      int64_t r = i0;
      for (; r + 4 <= i1; r += 4) {  // four rows at a time: fewer loads and stores of the sums
        const T *x0 = x + r * L.outer, *x1 = x0 + L.outer, *x2 = x1 + L.outer,
                *x3 = x2 + L.outer;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T sh = shift[c];
          const T d0 = x0[c] - sh, d1 = x1[c] - sh, d2 = x2[c] - sh, d3 = x3[c] - sh;
          s1[c] += (d0 + d1) + (d2 + d3);
          s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
      }
      for (; r < i1; ++r) {
        const T* xr = x + r * L.outer;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T d = xr[c] - shift[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
      const double n = double(i1 - i0);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double sh = double(shift[c]), delta = sh - R[c];
        A[c] += double(s1[c]) + n * delta;
        B[c] += double(s2[c]) + delta * (2.0 * double(s1[c]) + n * delta);
        shift[c] = T(sh + double(s1[c]) / n);
      }
    }
  }
}

// The blocks' sums in block order, re-based on block 0's origin: mean and biased variance of
// channels [c0, c1).
void mc_moments_merge(const Layout& L, const RowBlocks& blocks, const double* part, int64_t c0,
                      int64_t c1, double* mean, double* var) {
  const int64_t C = L.C;
  for (int64_t c = c0; c < c1; ++c) {
    Moments mo;
    mo.R = part[c];
    for (int64_t blk = 0; blk < blocks.count; ++blk) {
      const double* p = part + blk * 3 * C;
      // a block is a group whose shift is its origin R_b, with sums A_b and B_b
      mo.add(p[c], double(blocks.rows_in(blk, L.rows)), p[C + c], p[2 * C + c]);
    }
    mo.finish(double(L.rows), mean[c], var[c]);
  }
}

// Blocks [b0, b1) of MC rows: per block and channel, sum(dy) and sum(dy (x - mu_t)), into part
// (2 C doubles per block); scratch holds 2 C values.
template <typename T>
void mc_gradient_blocks(const Layout& L, const T* x, const T* dy, const T* mu_t,
                        const RowBlocks& blocks, int64_t b0, int64_t b1, double* part,
                        T* scratch) {
  const int64_t C = L.C, rows = L.rows;
  T *s1 = scratch, *s2 = s1 + C;
  for (int64_t blk = b0; blk < b1; ++blk) {
    double *P1 = part + blk * 2 * C, *P2 = P1 + C;
    std::fill(P1, P1 + 2 * C, 0.0);
    const int64_t r0 = blk * blocks.rows_per_block;
    const int64_t r1 = std::min(rows, r0 + blocks.rows_per_block);
    for (int64_t i0 = r0; i0 < r1; i0 += kChunkRows) {
      std::fill(s1, s1 + 2 * C, T(0));
      const int64_t i1 = std::min(r1, i0 + kChunkRows);
      int64_t r = i0;
      for (; r + 4 <= i1; r += 4) {
        const T *x0 = x + r * L.outer, *x1 = x0 + L.outer, *x2 = x1 + L.outer,
                *x3 = x2 + L.outer;
        const T *g0 = dy + r * L.outer, *g1 = g0 + L.outer, *g2 = g1 + L.outer,
                *g3 = g2 + L.outer;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T mu = mu_t[c];
          s1[c] += (g0[c] + g1[c]) + (g2[c] + g3[c]);
          s2[c] += (g0[c] * (x0[c] - mu) + g1[c] * (x1[c] - mu)) +
                   (g2[c] * (x2[c] - mu) + g3[c] * (x3[c] - mu));
        }
      }
      for (; r < i1; ++r) {
        const T *xr = x + r * L.outer, *gr = dy + r * L.outer;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += gr[c];
          s2[c] += gr[c] * (xr[c] - mu_t[c]);
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        P1[c] += double(s1[c]);
        P2[c] += double(s2[c]);
      }
    }
  }
}

void mc_gradient_merge(const Layout& L, const RowBlocks& blocks, const double* part, int64_t c0,
                       int64_t c1, double* sdy, double* sdyxc) {
  const int64_t C = L.C;
  for (int64_t c = c0; c < c1; ++c) {
    double t1 = 0.0, t2 = 0.0;
    for (int64_t blk = 0; blk < blocks.count; ++blk) {
      t1 += part[blk * 2 * C + c];
      t2 += part[blk * 2 * C + C + c];
    }
    sdy[c] = t1;
    sdyxc[c] = t2;
  }
}

// Per-thread scratch of `values` values each, a cache line apart at least: the threads update
// theirs every row, and two threads writing the same line would pass it to and fro.
template <typename T>
struct Scratch {
  int64_t stride;
  std::vector<T> data;
  Scratch(int64_t threads, int64_t values)
      : stride((values + 63) / 64 * 64 + 64 / int64_t(sizeof(T))), data(threads * stride + 64) {}
  T* of(int64_t t) {  // line-aligned
    const auto base = reinterpret_cast<uintptr_t>(data.data());
    return data.data() + ((64 - base % 64) % 64) / sizeof(T) + t * stride;
  }
};

// The number of threads two_phases uses for n blocks.
int64_t phase_threads(int64_t n, int64_t grain) {
  return at::in_parallel_region() ? 1
                                  : std::min<int64_t>(at::get_num_threads(), ceil_div(n, grain));
}

// MC work in one parallel region of phase_threads(n, grain) threads: first(t, b0, b1) on each
// thread t's blocks, then between(c0, c1) on each thread's share of the C channels, then
// second(b0, b1) on the thread's blocks again (it rewrites the rows it has just reduced). One
// region instead of two: on a shared machine every region waits for its slowest thread to get
// a core. Nothing in it may throw.
template <typename F1, typename F0, typename F2>
void two_phases(int64_t n, int64_t grain, int64_t C, F1&& first, F0&& between, F2&& second) {
  const int64_t threads = phase_threads(n, grain);
  if (threads <= 1) {
    first(0, 0, n);
    between(0, C);
    second(0, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t chunk = ceil_div(n, team), b0 = std::min(n, t * chunk);
    const int64_t b1 = std::min(n, b0 + chunk);
    if (b0 < b1) first(t, b0, b1);
#pragma omp barrier
    const int64_t c_chunk = ceil_div(C, team), c0 = std::min(C, t * c_chunk);
    if (c0 < std::min(C, c0 + c_chunk)) between(c0, std::min(C, c0 + c_chunk));
#pragma omp barrier
    if (b0 < b1) second(b0, b1);
  }
}

// ---- elementwise passes --------------------------------------------------------------------
// out = (x - mu) * slope + offset, and with dy: out = gain * dy + slope * (x - mu) + offset.
//
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

bool streams(const at::Tensor& out) {
  return kCanStream && int64_t(out.nbytes()) >= kStreamBytes;
}

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

template <typename T>
inline void affine_run(const T* x, const T* dy, int64_t n, T mu, T gain, T slope, T offset,
                       T* out, bool stream) {
  if (stream) {
    const Vec<T> vm = broadcast(mu), vg = broadcast(gain), vs = broadcast(slope),
                 vo = broadcast(offset);
    if (dy)
      stream_run(
          out, n, [&](int64_t j) { return gain * dy[j] + slope * (x[j] - mu) + offset; },
          [&](int64_t j) { return vg * load(dy + j) + vs * (load(x + j) - vm) + vo; });
    else
      stream_run(
          out, n, [&](int64_t j) { return (x[j] - mu) * slope + offset; },
          [&](int64_t j) { return (load(x + j) - vm) * vs + vo; });
    return;
  }
  if (dy) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = gain * dy[j] + slope * (x[j] - mu) + offset;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = (x[j] - mu) * slope + offset;
  }
}

// MC rows [r0, r1): the same with per-channel constants.
template <typename T>
void mc_affine_rows(const Layout& L, const T* x, const T* dy, const T* mu, const T* gain,
                    const T* slope, const T* offset, T* out, bool stream, int64_t r0,
                    int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* xr = x + i * L.outer;
    T* outr = out + i * L.outer;
    const T* dyr = dy ? dy + i * L.outer : nullptr;
    if (stream && dy) {
      stream_run(
          outr, L.C,
          [&](int64_t c) { return gain[c] * dyr[c] + slope[c] * (xr[c] - mu[c]) + offset[c]; },
          [&](int64_t c) {
            return load(gain + c) * load(dyr + c) +
                   load(slope + c) * (load(xr + c) - load(mu + c)) + load(offset + c);
          });
    } else if (stream) {
      stream_run(
          outr, L.C, [&](int64_t c) { return (xr[c] - mu[c]) * slope[c] + offset[c]; },
          [&](int64_t c) {
            return (load(xr + c) - load(mu + c)) * load(slope + c) + load(offset + c);
          });
    } else if (dy) {
#pragma omp simd
      for (int64_t c = 0; c < L.C; ++c)
        outr[c] = gain[c] * dyr[c] + slope[c] * (xr[c] - mu[c]) + offset[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < L.C; ++c) outr[c] = (xr[c] - mu[c]) * slope[c] + offset[c];
    }
  }
  if (stream) stream_fence();
}

// Channel c's output (NCS): its values were just reduced, so they come from the cache.
template <typename T>
void ncs_affine_channel(const Layout& L, const T* x, const T* dy, int64_t c,
                        const Prefetch<T>& pf, T mu, T gain, T slope, T offset, T* out,
                        bool stream) {
  for (int64_t i = 0; i < L.rows; ++i) {
    if (!stream) pf.before(c, i, c + 1, out);
    const int64_t base = i * L.outer + c * L.cstride;
    affine_run<T>(x + base, dy ? dy + base : nullptr, L.run, mu, gain, slope, offset,
                  out + base, stream);
  }
}

int64_t channel_grain(const Layout& L) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, L.per_channel()));
}

// ---- training forward ----------------------------------------------------------------------
// Per-channel constants of y = (x - mu_T) scale + shift' from the double statistics: x - mu_T is
// exact for x near mu (Sterbenz), which keeps y accurate when the data has a large offset;
// shift' absorbs mu's rounding mu - mu_T.
template <typename T>
struct ForwardConstants {
  T mu_t, scale, shift;
  ForwardConstants(double mu, double invstd, const T* w, const T* b, int64_t c) {
    mu_t = T(mu);
    const double g = w ? double(w[c]) : 1.0, be = b ? double(b[c]) : 0.0;
    scale = T(g * invstd);
    shift = T(be - g * invstd * (mu - double(mu_t)));
  }
};

template <typename T>
void forward_impl(const at::Tensor& xr, const T* w, const T* b, at::Tensor& y, double* mean,
                  double* invstd, double* var, double eps) {
  const Layout L = layout_of(xr);
  const T* x = xr.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  if (L.mc()) {  // statistics of each thread's row blocks, merged, then y of the same rows
    const RowBlocks blocks(L.rows);
    const int64_t grain = blocks.grain(L.C);
    std::vector<double> part(blocks.count * 3 * L.C);
    std::vector<T> mu_t(L.C), scale(L.C), shift(L.C);
    Scratch<T> scratch(phase_threads(blocks.count, grain), 3 * L.C);
    const bool stream = streams(y);
    two_phases(
        blocks.count, grain, L.C,
        [&](int64_t t, int64_t b0, int64_t b1) {
          mc_moments_blocks<T>(L, x, blocks, b0, b1, part.data(), scratch.of(t));
        },
        [&](int64_t c0, int64_t c1) {
          mc_moments_merge(L, blocks, part.data(), c0, c1, mean, var);
          for (int64_t c = c0; c < c1; ++c) {
            invstd[c] = 1.0 / std::sqrt(var[c] + eps);
            const ForwardConstants<T> k(mean[c], invstd[c], w, b, c);
            mu_t[c] = k.mu_t, scale[c] = k.scale, shift[c] = k.shift;
          }
        },
        [&](int64_t b0, int64_t b1) {
          mc_affine_rows<T>(L, x, nullptr, mu_t.data(), nullptr, scale.data(), shift.data(), yp,
                            stream, b0 * blocks.rows_per_block,
                            std::min(L.rows, b1 * blocks.rows_per_block));
        });
    return;
  }
  const Prefetch<T> pf(L);
  const bool stream = streams(y);
  at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      ncs_channel_moments<T>(L, x, c, c1, pf, mean[c], var[c]);
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
      const ForwardConstants<T> k(mean[c], invstd[c], w, b, c);
      ncs_affine_channel<T>(L, x, nullptr, c, pf, k.mu_t, T(0), k.scale, k.shift, yp, stream);
    }
    if (stream) stream_fence();
  });
}

// ---- training backward ---------------------------------------------------------------------
// Per-channel constants of dx = gain dy + slope (x - mu_T) + offset and the parameter gradients,
// from sum(dy) and sum(dy (x - mu_T)); sum(dy (x - mu)) = ... - (mu - mu_T) sum(dy), and
// k (x - mu) = k (x - mu_T) - k (mu - mu_T): the rounding of mu goes into the constant.
template <typename T>
struct BackwardConstants {
  T gain, slope, offset;
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

template <typename T>
void backward_impl(const at::Tensor& dyr, const at::Tensor& xr, const T* w, const double* mean,
                   const double* invstd, T* dx, bool stream, T* dgamma, T* dbeta) {
  const Layout L = layout_of(xr);
  const double m = double(L.per_channel());
  const T* x = xr.data_ptr<T>();
  const T* dy = dyr.data_ptr<T>();
  if (L.mc()) {  // the two sums of each thread's row blocks, merged, then dx of the same rows
    const RowBlocks blocks(L.rows);
    const int64_t grain = blocks.grain(L.C);
    std::vector<double> part(blocks.count * 2 * L.C), sdy(L.C), sdyxc(L.C);
    std::vector<T> mu_t(L.C), gain(L.C), slope(L.C), offset(L.C);
    Scratch<T> scratch(phase_threads(blocks.count, grain), 2 * L.C);
    for (int64_t c = 0; c < L.C; ++c) mu_t[c] = T(mean[c]);
    two_phases(
        blocks.count, grain, L.C,
        [&](int64_t t, int64_t b0, int64_t b1) {
          mc_gradient_blocks<T>(L, x, dy, mu_t.data(), blocks, b0, b1, part.data(),
                                scratch.of(t));
        },
        [&](int64_t c0, int64_t c1) {
          mc_gradient_merge(L, blocks, part.data(), c0, c1, sdy.data(), sdyxc.data());
          for (int64_t c = c0; c < c1; ++c) {
            const BackwardConstants<T> k(mean[c], mu_t[c], invstd[c], w, c, m, sdy[c],
                                         sdyxc[c], dgamma, dbeta);
            gain[c] = k.gain, slope[c] = k.slope, offset[c] = k.offset;
          }
        },
        [&](int64_t b0, int64_t b1) {
          if (dx)
            mc_affine_rows<T>(L, x, dy, mu_t.data(), gain.data(), slope.data(), offset.data(),
                              dx, stream, b0 * blocks.rows_per_block,
                              std::min(L.rows, b1 * blocks.rows_per_block));
        });
    return;
  }
  const Prefetch<T> pf(L);
  at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
    GradientSums<T> sums;
    for (int64_t c = c0; c < c1; ++c) {
      const T mu_t = T(mean[c]);
      double sdy = 0.0, sdyxc = 0.0, s1, s2;
      for_pieces(
          L, c, c1, pf, [&](int64_t k, int64_t n) { sums.add(x + k, dy + k, n, mu_t); },
          [&](int64_t) {
            sums.take(s1, s2);
            sdy += s1, sdyxc += s2;
          },
          x, dy);
      const BackwardConstants<T> k(mean[c], mu_t, invstd[c], w, c, m, sdy, sdyxc, dgamma,
                                   dbeta);
      if (dx)
        ncs_affine_channel<T>(L, x, dy, c, pf, mu_t, k.gain, k.slope, k.offset, dx, stream);
    }
    if (stream) stream_fence();
  });
}

// ---- eval forward --------------------------------------------------------------------------
// y = x * scale + shift, one pass; NCS in parallel over runs (memory order), MC over rows.
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

// ---- small helpers -------------------------------------------------------------------------
c10::optional<at::Tensor> as_dtype(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  if (t->scalar_type() == dtype && t->is_contiguous()) return t;  // no dispatcher round trip
  return t->to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

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

}  // namespace

// ---- kernel entry points -------------------------------------------------------------------

// Training forward: (y in x's layout, stats (2, C) float64: row 0 the batch mean, row 1 the
// inverse standard deviation 1 / sqrt(var + eps)). Updates running_mean / running_var in place
// when given.
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
    forward_impl<scalar_t>(xr, ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), y, mean,
                           mean + C, var.data(), eps);
  });
  if (running_mean.has_value() && running_mean->defined()) {
    const double m = double(x.numel() / std::max<int64_t>(1, C));
    update_running(*running_mean, mean, momentum, 1.0);
    update_running(*running_var, var.data(), momentum, m / std::max(1.0, m - 1.0));
  }
  return {y, stats};
}

// Training backward: (dx in x's layout, or undefined when need_dx is false; dgamma; dbeta), in
// x's dtype; stats is forward's.
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
    backward_impl<scalar_t>(dyr, xr, ptr_or_null<scalar_t>(w), mean, mean + C,
                            need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_dx && streams(dx),
                            dgamma.data_ptr<scalar_t>(), dbeta.data_ptr<scalar_t>());
  });
  return {dx, dgamma, dbeta};
}

// Eval forward: y = x * scale + shift in x's layout, with scale = gamma * rsqrt(running_var +
// eps) and shift = beta - running_mean * scale computed in x's dtype, as the ATen path does
// (the same bits).
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

// ---- autograd glue -------------------------------------------------------------------------

namespace {

std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

}  // namespace

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
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor(), out[1]});
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
      d = ::backward(grads[0], x, w, saved[2], need_dx);
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
    const auto dims = reduce_dims(x), shape = channel_shape(x);
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

// Eval BN when x, weight or bias requires a gradient: the kernel forward, and the backward of
// the affine map in ATen operations (differentiable, so double backward works too):
//   dx = dy scale,  dgamma = invstd sum(dy (x - running_mean)),  dbeta = sum(dy).
class InferenceBatchNorm : public torch::autograd::Function<InferenceBatchNorm> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            double eps) {
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["mean"] = running_mean.detach().clone();
    ctx->saved_data["var"] = running_var.detach().clone();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return ::infer(x, weight, bias, running_mean, running_var, eps);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &dy = grads[0];
    const bool has_weight = weight.defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dgamma = has_weight && ctx->needs_input_grad(1);
    const bool need_dbeta =
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 2 : 1);
    const auto dtype = at::kDouble == x.scalar_type() ? at::kDouble : at::kFloat;
    const auto dims = reduce_dims(x), shape = channel_shape(x);
    const at::Tensor mean = ctx->saved_data["mean"].toTensor().to(dtype);
    const at::Tensor invstd =
        (ctx->saved_data["var"].toTensor().to(dtype) + ctx->saved_data["eps"].toDouble()).rsqrt();
    const at::Tensor none;
    at::Tensor dx, dgamma, dbeta;
    if (need_dx) dx = dy * (has_weight ? weight.to(dtype) * invstd : invstd).view(shape);
    if (need_dgamma)
      dgamma = ((dy * (x - mean.view(shape))).sum(dims) * invstd).to(weight.scalar_type());
    if (need_dbeta) dbeta = dy.sum(dims);
    return {dx, dgamma, dbeta, none, none, none};
  }
};

// Training BN through the kernels, or None when they cannot take the call (see plain_eager):
// the caller then uses an ATen form.
py::object train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, c10::optional<at::Tensor> running_mean,
                 c10::optional<at::Tensor> running_var, double momentum, double eps) {
  if (!plain_eager(x, weight, bias)) return py::none();
  return py::cast(
      TrainingBatchNorm::apply(x, weight, bias, running_mean, running_var, momentum, eps));
}

// Eval BN through the kernel, or None when it cannot take the call: outside plain eager mode
// (see plain_eager; the running statistics are read through raw pointers too), or when the
// running statistics require a gradient (the caller's ATen path differentiates through them).
py::object infer_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double eps) {
  if (!plain_eager(x, weight, bias) || !plain(running_mean) || !plain(running_var))
    return py::none();
  if (!at::GradMode::is_enabled())
    return py::cast(::infer(x, weight, bias, running_mean, running_var, eps));
  if (running_mean.requires_grad() || running_var.requires_grad()) return py::none();
  const bool needs_graph = x.requires_grad() || (weight.has_value() && weight->requires_grad()) ||
                           (bias.has_value() && bias->requires_grad());
  if (!needs_graph) return py::cast(::infer(x, weight, bias, running_mean, running_var, eps));
  return py::cast(InferenceBatchNorm::apply(x, weight, bias, running_mean, running_var, eps));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "BN in training mode with its closed-form backward (fused, CPU)");
  m.def("infer", &infer_autograd, "BN in eval mode: one pass y = x * scale + shift (CPU)");
}
