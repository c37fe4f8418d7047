// The building blocks of the training kernels for contiguous (N, C, S) inputs ("NCS", see
// kernels.h): a channel's values reduced in one read (its statistics; or sum(dy) and
// sum(dy (x - mu))), then rewritten from the core's cache (y or dx). A Layout here may be any
// set of rows of the tensor: train_contiguous.cpp passes the whole batch, the BN family's
// kernels (family_cpu.cpp) one group of samples (Ghost BN's virtual batches).

#pragma once

#include "kernels.h"

namespace bncpu {

// ---- reductions over runs ------------------------------------------------------------------
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

// Channel c's mean and biased variance (NCS), in one read of its values.
template <typename T>
inline void ncs_channel_moments(const Layout& L, const T* x, int64_t c, int64_t c_end,
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

// Channel c's sum(dy) and sum(dy (x - mu_t)) (NCS), in one read of x and dy: sums is the
// caller's (restarted by every take), so a thread's accumulators are set up once.
template <typename T>
inline void ncs_channel_gradient_sums(const Layout& L, const T* x, const T* dy, int64_t c,
                                      int64_t c_end, const Prefetch<T>& pf, T mu_t,
                                      GradientSums<T>& sums, double& sdy, double& sdyxc) {
  double s1, s2;
  sdy = 0.0, sdyxc = 0.0;
  for_pieces(
      L, c, c_end, pf, [&](int64_t k, int64_t n) { sums.add(x + k, dy + k, n, mu_t); },
      [&](int64_t) {
        sums.take(s1, s2);
        sdy += s1, sdyxc += s2;
      },
      x, dy);
}

// ---- output pass ---------------------------------------------------------------------------
// out = (x - mu) * slope + offset, and with dy: out = gain * dy + slope * (x - mu) + offset.
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

// Channel c's output (NCS): its values were just reduced, so they come from the cache.
template <typename T>
inline void ncs_affine_channel(const Layout& L, const T* x, const T* dy, int64_t c,
                        const Prefetch<T>& pf, T mu, T gain, T slope, T offset, T* out,
                        bool stream) {
  for (int64_t i = 0; i < L.rows; ++i) {
    if (!stream) pf.before(c, i, c + 1, out);
    const int64_t base = i * L.outer + c * L.cstride;
    affine_run<T>(x + base, dy ? dy + base : nullptr, L.run, mu, gain, slope, offset,
                  out + base, stream);
  }
}

inline int64_t channel_grain(const Layout& L) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, L.per_channel()));
}

}  // namespace bncpu
