// The building blocks of the training kernels for (M, C) rows ("MC", see kernels.h): 2-D inputs,
// and channels-last inputs viewed as rows of C channels. A channel's values span the whole
// tensor, so each direction reads it twice: one pass for the reductions over blocks of rows, a
// merge of the blocks' sums by channel, and one pass for the output, all three in one parallel
// region (rows_forward, rows_backward). A Layout here may be any run of whole rows:
// train_channels_last.cpp passes the whole batch, the BN family's kernels (family_cpu.cpp) one
// group of samples (Ghost BN's virtual batches) with constants of their own (Batch Renorm's r, d).

#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <vector>

#include "kernels.h"

namespace bncpu {

// ---- reductions over rows ------------------------------------------------------------------
// Rows are split into at most kMaxRowBlocks blocks of whole chunks of kChunkRows rows, fixed by
// the shape; threads take blocks; each block keeps per-channel double sums, added in block
// order at the end. Within a chunk, each channel has its own partial sum in T (the channel index
// is the vector dimension), read in memory order so that the hardware prefetcher streams.
constexpr int64_t kChunkRows = 128;
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kOriginRows = 8;  // a block's origin is the mean of its first rows

// On tensors larger than the cache, the reduction passes prefetch the rows kRowPrefetchBytes
// ahead of the four they read: the hardware prefetcher alone left them well under the memory's
// rate (measured, 1 thread, median of 3 alternating runs: 25 MB channels-last step 8.4 vs 10.0
// ms). Below kRowPrefetchMinBytes the data is mostly cached and the extra instructions only cost
// (measured: (256, 1024) 5-10% slower).
constexpr int64_t kRowPrefetchBytes = 2048;
constexpr int64_t kRowPrefetchMinBytes = int64_t(4) << 20;

// How many rows ahead to prefetch; 0 for tensors too small to gain from it.
template <typename T>
inline int64_t prefetch_rows(const Layout& L) {
  if (L.rows * L.outer * int64_t(sizeof(T)) < kRowPrefetchMinBytes) return 0;
  return std::max<int64_t>(1, kRowPrefetchBytes / (L.outer * int64_t(sizeof(T))));
}

// Asks for the n values of a row at p, a cache line at a time (prefetches do not fault).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  for (int64_t k = 0; k < n * int64_t(sizeof(T)); k += 64) prefetch_line(b + k);
}

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
  const int64_t C = L.C, rows = L.rows, ahead = prefetch_rows<T>(L);
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
        if (ahead && r + ahead + 4 <= rows)
          for (int64_t k = 0; k < 4; ++k) prefetch_row(x0 + (ahead + k) * L.outer, C);
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
inline void mc_moments_merge(const Layout& L, const RowBlocks& blocks, const double* part, int64_t c0,
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
  const int64_t C = L.C, rows = L.rows, ahead = prefetch_rows<T>(L);
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
        if (ahead && r + ahead + 4 <= rows)
          for (int64_t k = 0; k < 4; ++k) {
            prefetch_row(x0 + (ahead + k) * L.outer, C);
            prefetch_row(g0 + (ahead + k) * L.outer, C);
          }
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

inline void mc_gradient_merge(const Layout& L, const RowBlocks& blocks, const double* part, int64_t c0,
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
inline int64_t phase_threads(int64_t n, int64_t grain) {
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

// ---- output pass ---------------------------------------------------------------------------
// Rows [r0, r1): out = (x - mu) * slope + offset, and with dy: out = gain * dy + slope * (x - mu)
// + offset, with per-channel constants.
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

// ---- the two directions, with the per-channel constants as a parameter --------------------
// Forward: mean[c], var[c] (biased) of each channel of the rows, then y = (x - mu_t) scale +
// shift with constants(c) -> ForwardConstants<T> (called once per channel, after its mean and
// var are written).
template <typename T, typename K>
void rows_forward(const Layout& L, const T* x, T* y, bool stream, double* mean, double* var,
                  K&& constants) {
  const RowBlocks blocks(L.rows);
  const int64_t grain = blocks.grain(L.C);
  std::vector<double> part(blocks.count * 3 * L.C);
  std::vector<T> mu_t(L.C), scale(L.C), shift(L.C);
  Scratch<T> scratch(phase_threads(blocks.count, grain), 3 * L.C);
  two_phases(
      blocks.count, grain, L.C,
      [&](int64_t t, int64_t b0, int64_t b1) {
        mc_moments_blocks<T>(L, x, blocks, b0, b1, part.data(), scratch.of(t));
      },
      [&](int64_t c0, int64_t c1) {
        mc_moments_merge(L, blocks, part.data(), c0, c1, mean, var);
        for (int64_t c = c0; c < c1; ++c) {
          const ForwardConstants<T> k = constants(c);
          mu_t[c] = k.mu_t, scale[c] = k.scale, shift[c] = k.shift;
        }
      },
      [&](int64_t b0, int64_t b1) {
        mc_affine_rows<T>(L, x, nullptr, mu_t.data(), nullptr, scale.data(), shift.data(), y,
                          stream, b0 * blocks.rows_per_block,
                          std::min(L.rows, b1 * blocks.rows_per_block));
      });
}

// Backward: sum(dy) and sum(dy (x - mu_t)) of each channel, mu_t = T(mean[c]), then (when dx is
// not null) dx = gain dy + slope (x - mu_t) + offset with constants(c, mu_t, m, sum_dy,
// sum_dy_xc) -> BackwardConstants<T>, called once per channel.
template <typename T, typename K>
void rows_backward(const Layout& L, const T* x, const T* dy, const double* mean, T* dx,
                   bool stream, K&& constants) {
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
          const BackwardConstants<T> k =
              constants(c, mu_t[c], double(L.per_channel()), sdy[c], sdyxc[c]);
          gain[c] = k.gain, slope[c] = k.slope, offset[c] = k.offset;
        }
      },
      [&](int64_t b0, int64_t b1) {
        if (dx)
          mc_affine_rows<T>(L, x, dy, mu_t.data(), gain.data(), slope.data(), offset.data(),
                            dx, stream, b0 * blocks.rows_per_block,
                            std::min(L.rows, b1 * blocks.rows_per_block));
      });
}

}  // namespace bncpu
