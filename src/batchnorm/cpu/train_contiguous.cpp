// Training kernels for contiguous (N, C, S) inputs, S > 1 ("NCS", see kernels.h): channel by
// channel, threads taking blocks of channels; each channel's values are reduced in one read
// (the statistics forward, sum(dy) and sum(dy (x - mu)) backward), then rewritten as y or dx
// from the core's cache (the pieces: contiguous.h).

#include <ATen/Parallel.h>

#include "contiguous.h"

namespace bncpu {

template <typename T>
void ncs_forward(const Layout& L, const ForwardPass<T>& p) {
  const Prefetch<T> pf(L);
  at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      ncs_channel_moments<T>(L, p.x, c, c1, pf, p.mean[c], p.var[c]);
      const ForwardConstants<T> k = p.constants(c);
      ncs_affine_channel<T>(L, p.x, nullptr, c, pf, k.mu_t, T(0), k.scale, k.shift, p.y,
                            p.stream);
    }
    if (p.stream) stream_fence();
  });
}

template <typename T>
void ncs_backward(const Layout& L, const BackwardPass<T>& p) {
  const double m = double(L.per_channel());
  const Prefetch<T> pf(L);
  at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
    GradientSums<T> sums;
    for (int64_t c = c0; c < c1; ++c) {
      const T mu_t = T(p.mean[c]);
      double sdy, sdyxc;
      ncs_channel_gradient_sums<T>(L, p.x, p.dy, c, c1, pf, mu_t, sums, sdy, sdyxc);
      const BackwardConstants<T> k = p.constants(c, mu_t, m, sdy, sdyxc);
      if (p.dx)
        ncs_affine_channel<T>(L, p.x, p.dy, c, pf, mu_t, k.gain, k.slope, k.offset, p.dx,
                              p.stream);
    }
    if (p.stream) stream_fence();
  });
}

template void ncs_forward<float>(const Layout&, const ForwardPass<float>&);
template void ncs_forward<double>(const Layout&, const ForwardPass<double>&);
template void ncs_backward<float>(const Layout&, const BackwardPass<float>&);
template void ncs_backward<double>(const Layout&, const BackwardPass<double>&);

}  // namespace bncpu
