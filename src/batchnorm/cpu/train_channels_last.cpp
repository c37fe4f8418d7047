// Training kernels for (M, C) rows: 2-D inputs, and channels-last inputs viewed as rows of C
// channels ("MC", see kernels.h), built from rows.h with the plain BN's constants.

#include "rows.h"

namespace bncpu {

template <typename T>
void mc_forward(const Layout& L, const ForwardPass<T>& p) {
  rows_forward<T>(L, p.x, p.y, p.stream, p.mean, p.var,
                  [&](int64_t c) { return p.constants(c); });
}

template <typename T>
void mc_backward(const Layout& L, const BackwardPass<T>& p) {
  rows_backward<T>(L, p.x, p.dy, p.mean, p.dx, p.stream,
                   [&](int64_t c, T mu_t, double m, double sdy, double sdyxc) {
                     return p.constants(c, mu_t, m, sdy, sdyxc);
                   });
}

template void mc_forward<float>(const Layout&, const ForwardPass<float>&);
template void mc_forward<double>(const Layout&, const ForwardPass<double>&);
template void mc_backward<float>(const Layout&, const BackwardPass<float>&);
template void mc_backward<double>(const Layout&, const BackwardPass<double>&);

}  // namespace bncpu
