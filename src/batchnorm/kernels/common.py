"""Triton building blocks shared by the forward and backward kernels.

Two memory layouts, one addressing scheme. Every kernel sees the input as one of

``ROWS=False``: ``(N, C, S)``, contiguous NC(D)HW with ``S = prod(spatial)``;
    element ``(n, c, s)`` lives at ``n*C*S + c*S + s``. A *channel program* owns one channel
    (``CB = 1``) and its tiles are ``BLOCK_A x BLOCK_B`` blocks of ``(n, s)``, tile ``t`` being
    ``(t // TS, t % TS)`` with ``TS = cdiv(S, BLOCK_B)`` tiles along ``s``.
``ROWS=True``: ``(M, C)``, channels_last / 2-D with ``M = N * prod(spatial)``;
    element ``(i, c)`` lives at ``i*C + c``. A channel program owns ``CB = BLOCK_B`` adjacent
    channels and its tiles are ``BLOCK_A`` consecutive rows of them.

Per-channel quantities are vectors of ``CB`` lanes in both cases, so the statistics code is
written once: :func:`channel_sum` reduces a tile to those ``CB`` lanes and ``v[None, :]``
broadcasts them back over a tile.

Parameter names shared by every kernel (each entry point comments its own where declared):
``A`` the first dimension of the view (``N`` or ``M``), ``C`` channels, ``S`` values per
sample and channel (1 for ``ROWS``), ``TS`` tiles along ``s``, ``T`` tiles per channel
program, ``m = A * S`` values per channel; ``*_ptr`` arguments are pointers, ``UPPER_CASE``
ones compile-time constants (``HAS_*``: an optional tensor is present, ``ACT``: the
activation's code from :data:`batchnorm.activations.KERNEL_CODES`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def channels(cb, C, CB: tl.constexpr):
    """Channel indices ``cb*CB + [0, CB)`` owned by channel program ``cb``, and their mask."""
    ch = cb * CB + tl.arange(0, CB)
    return ch, ch < C


@triton.jit
def tile(
    t, cb,  # tile index within the channel program, channel program index
    A, C, S, TS,  # sizes N or M, C, S; tiles along s
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    ROWS: tl.constexpr,  # True: the (M, C) layout
):
    """Element offsets and mask of tile ``t`` of channel program ``cb`` (see module docstring).

    Row offsets are 64-bit so tensors beyond 2**31 elements address correctly.
    """
    if ROWS:
        rows = t * BLOCK_A + tl.arange(0, BLOCK_A)
        cols = cb * BLOCK_B + tl.arange(0, BLOCK_B)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mask = (rows < A)[:, None] & (cols < C)[None, :]
    else:
        n = (t // TS) * BLOCK_A + tl.arange(0, BLOCK_A)
        s = (t % TS) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs = n.to(tl.int64)[:, None] * C * S + cb.to(tl.int64) * S + s[None, :]
        mask = (n < A)[:, None] & (s < S)[None, :]
    return offs, mask


@triton.jit
def channel_sum(v, ROWS: tl.constexpr):
    """Sum a ``BLOCK_A x BLOCK_B`` tile into its ``CB`` channel lanes."""
    if ROWS:
        return tl.sum(v, axis=0)  # (M, C): the channels are the columns
    else:
        # (N, C, S): the whole tile is one channel; keep a lane dimension of size 1
        return tl.sum(tl.sum(v, axis=1, keep_dims=True), axis=0)


@triton.jit
def load_channel(ptr, ch, cmask, default, PRESENT: tl.constexpr):
    """``ptr[ch]`` in float32, or ``default`` when the tensor is absent (e.g. no weight)."""
    if PRESENT:
        return tl.load(ptr + ch, mask=cmask, other=default).to(tl.float32)
    else:
        return tl.full(ch.shape, default, tl.float32)


@triton.jit
def load_stats(mean_ptr, var_ptr, ch, cmask, eps):
    """Per-channel ``(mu, invstd = 1/sqrt(var + eps))`` from a mean and a biased variance:
    the batch statistics saved by the training forward, or the running ones in eval."""
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    return mean, tl.rsqrt(var + eps)


@triton.jit
def _sigmoid(v):
    # sigma(v) = 1 / (1 + e^-v); saturates cleanly to 0 or 1 when e^-v overflows
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def activate(v, ACT: tl.constexpr):
    """``act(v)`` for the activation code ``ACT`` (``batchnorm.activations.KERNEL_CODES``:
    0 is the identity); NaN propagates like in torch."""
    if ACT == 1:  # relu
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:  # leaky_relu, torch's default negative slope 0.01
        v = tl.where(v < 0.0, v * 0.01, v)
    elif ACT == 3:  # sigmoid
        v = _sigmoid(v)
    elif ACT == 4:  # tanh(v) = 2 sigma(2v) - 1
        v = 2.0 * _sigmoid(2.0 * v) - 1.0
    elif ACT == 5:  # silu(v) = v sigma(v)
        v = v * _sigmoid(v)
    return v


@triton.jit
def activation_grad(dy, pre, ACT: tl.constexpr):
    """``dy * act'(pre)``: the gradient arriving at the pre-activation ``pre = BN(x) + z``."""
    if ACT == 1:  # relu' = [pre > 0]
        dy = tl.where(pre > 0.0, dy, 0.0)
    elif ACT == 2:  # leaky_relu' = 1 if pre > 0 else 0.01
        dy = tl.where(pre > 0.0, dy, dy * 0.01)
    elif ACT == 3:  # sigma' = sigma (1 - sigma)
        sig = _sigmoid(pre)
        dy = dy * sig * (1.0 - sig)
    elif ACT == 4:  # tanh' = 1 - tanh^2
        th = 2.0 * _sigmoid(2.0 * pre) - 1.0
        dy = dy * (1.0 - th * th)
    elif ACT == 5:  # silu' = sigma (1 + pre (1 - sigma))
        sig = _sigmoid(pre)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


@triton.jit
def welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge the (count, mean, M2 = sum of squared deviations) of two disjoint sets (Chan et al.)::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + delta^2 * n_a * n_b / n

    Every term is a deviation from a mean, never a raw second moment, so a large common offset
    (e.g. 1e4 + N(0, 1)) does not cancel catastrophically the way E[x^2] - E[x]^2 does.
    """
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac
