"""Forward kernels: per-channel statistics (training) and the normalize-affine-activation pass.

Training forward over the ``m`` values of channel ``c`` (Algorithm 1 of the paper)::

    mu_c     = 1/m sum_i x_ic
    var_c    = 1/m sum_i (x_ic - mu_c)^2                 (biased: used to normalize, saved)
    invstd_c = 1 / sqrt(var_c + eps)
    y_ic     = act((x_ic - mu_c) * gamma_c * invstd_c + beta_c + z_ic)
    running_mean_c <- running_mean_c + momentum * (mu_c - running_mean_c)
    running_var_c  <- running_var_c + momentum * (m/(m-1) var_c - running_var_c)   (unbiased)

Eval forward is the ``y`` line with ``mu, var`` replaced by the running statistics. The
running-statistics update happens where the statistics are finished (``UPDATE_RUNNING``), or
in its own tiny kernel (:func:`bn_update_running_kernel`) on the ``torch.library`` path, which
only allows autograd on operators that mutate nothing.

Statistics and arithmetic are float32 whatever the input dtype. Two launch strategies:

* fused (:func:`bn_fwd_fused_kernel`): one program per channel block reads its channels twice
  (statistics, then normalize; the second read mostly hits L2) -- one launch, for small tensors
  or many channels.
* split: :func:`bn_fwd_stats_kernel` gives each of ``P`` programs per channel block a slice of
  the tiles and writes partial (count, mean, M2); :func:`bn_fwd_finalize_kernel` merges them and
  writes the statistics; :func:`bn_fwd_apply_kernel` normalizes every tile in parallel. For few
  channels with millions of values each, where one program per channel would idle the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.common import (
    activate,
    channel_sum,
    channels,
    load_channel,
    load_stats,
    tile,
    welford_merge,
)


@triton.jit
def welford_tiles(
    x_ptr, cb, t_begin, t_end, A, C, S, TS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CB: tl.constexpr, ROWS: tl.constexpr,
):
    """(count, mean, M2) per channel lane over tiles ``[t_begin, t_end)`` of channel program ``cb``.

    Each tile's own mean and M2 are exact two-pass values over registers,
    ``mean_t = sum(x) / n_t`` and ``M2_t = sum((x - mean_t)^2)``, merged into the running
    triple with :func:`welford_merge`.
    """
    n = tl.zeros([CB], tl.float32)
    mean = tl.zeros([CB], tl.float32)
    m2 = tl.zeros([CB], tl.float32)
    for t in range(t_begin, t_end):
        offs, mask = tile(t, cb, A, C, S, TS, BLOCK_A, BLOCK_B, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_t = channel_sum(mask.to(tl.float32), ROWS)
        mean_t = channel_sum(x, ROWS) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t[None, :], 0.0)
        n, mean, m2 = welford_merge(n, mean, m2, n_t, mean_t, channel_sum(d * d, ROWS))
    return n, mean, m2


@triton.jit
def update_running(rmean_ptr, rvar_ptr, ch, cmask, mean, var, m, momentum):
    """``running <- running + momentum * (batch - running)``, the variance unbiased by
    ``m/(m-1)``, read and written in the running buffers' own dtype."""
    rmean = tl.load(rmean_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    rvar = tl.load(rvar_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    unbiased = var * (m / tl.maximum(m - 1.0, 1.0))
    rmean = rmean + momentum * (mean - rmean)
    rvar = rvar + momentum * (unbiased - rvar)
    tl.store(rmean_ptr + ch, rmean.to(rmean_ptr.dtype.element_ty), mask=cmask)
    tl.store(rvar_ptr + ch, rvar.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def finish_statistics(
    mean, m2, ch, cmask, m, eps, momentum, mean_out, var_out, rmean_ptr, rvar_ptr,
    UPDATE_RUNNING: tl.constexpr,
):
    """Store ``mu`` and the biased ``var = M2/m`` (and update the running statistics);
    return ``invstd = 1/sqrt(var + eps)``. ``m`` is the exact per-channel count from the host.
    """
    var = m2 / m
    tl.store(mean_out + ch, mean, mask=cmask)
    tl.store(var_out + ch, var, mask=cmask)
    if UPDATE_RUNNING:
        update_running(rmean_ptr, rvar_ptr, ch, cmask, mean, var, m, momentum)
    return tl.rsqrt(var + eps)


@triton.jit
def apply_tiles(
    x_ptr, z_ptr, y_ptr, cb, t_begin, t_end, mean, invstd, w, b, A, C, S, TS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, ACT: tl.constexpr,
):
    """``y = act((x - mu) * scale + beta + z)`` with ``scale = gamma * invstd``, over tiles.

    ``x - mu`` first, then the scale: with a large offset (x ~ 1e4) this keeps y accurate to
    float32 resolution of the deviation, where ``x * scale + shift`` would lose ~1e-3.
    """
    scale = (w * invstd)[None, :]
    mu = mean[None, :]
    beta = b[None, :]
    for t in range(t_begin, t_end):
        offs, mask = tile(t, cb, A, C, S, TS, BLOCK_A, BLOCK_B, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mu) * scale + beta
        if HAS_Z:
            y += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = activate(y, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_fwd_fused_kernel(
    x_ptr, z_ptr, y_ptr,  # input x, residual z (read if HAS_Z), output y; x's strides
    w_ptr, b_ptr,  # (C,) gamma and beta, read if HAS_W / HAS_B
    mean_out, var_out,  # (C,) float32, written: batch mean and biased batch variance
    rmean_ptr, rvar_ptr,  # (C,) running mean and variance, updated if UPDATE_RUNNING
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    m, eps, momentum,  # values per channel (float); added to var; weight of this batch
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,  # gamma, beta, z given
    ACT: tl.constexpr,  # activation code (batchnorm.activations.KERNEL_CODES)
    UPDATE_RUNNING: tl.constexpr,  # update the running statistics in this launch
):
    """Training forward in one launch; program ``cb`` owns ``CB`` channels and all ``T`` tiles:
    Welford statistics over every tile, then ``y`` over every tile."""
    cb = tl.program_id(0)
    ch, cmask = channels(cb, C, CB)
    _, mean, m2 = welford_tiles(x_ptr, cb, 0, T, A, C, S, TS, BLOCK_A, BLOCK_B, CB, ROWS)
    invstd = finish_statistics(mean, m2, ch, cmask, m, eps, momentum, mean_out, var_out,
                               rmean_ptr, rvar_ptr, UPDATE_RUNNING)
    w = load_channel(w_ptr, ch, cmask, 1.0, HAS_W)
    b = load_channel(b_ptr, ch, cmask, 0.0, HAS_B)
    apply_tiles(
        x_ptr, z_ptr, y_ptr, cb, 0, T, mean, invstd, w, b, A, C, S, TS,
        BLOCK_A, BLOCK_B, ROWS, HAS_Z, ACT,
    )


@triton.jit
def bn_fwd_stats_kernel(
    x_ptr,  # input x
    pn_ptr, pmean_ptr, pm2_ptr,  # (P, C) float32, written: count, mean, M2 of each split
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    tiles_per_split, splits,  # tiles each split reduces; P, the splits per channel program
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
):
    """Partial (count, mean, M2) of split ``p`` of channel program ``cb`` into row ``p`` of the
    ``(P, C)`` partial buffers; program id = ``cb * splits + p``."""
    pid = tl.program_id(0)
    cb = pid // splits
    p = pid % splits
    t_begin = p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, T)
    n, mean, m2 = welford_tiles(x_ptr, cb, t_begin, t_end, A, C, S, TS, BLOCK_A, BLOCK_B, CB, ROWS)
    ch, cmask = channels(cb, C, CB)
    tl.store(pn_ptr + p * C + ch, n, mask=cmask)
    tl.store(pmean_ptr + p * C + ch, mean, mask=cmask)
    tl.store(pm2_ptr + p * C + ch, m2, mask=cmask)


@triton.jit
def bn_fwd_finalize_kernel(
    pn_ptr, pmean_ptr, pm2_ptr,  # (P, C) float32 partial count, mean, M2 (stats kernel)
    mean_out, var_out,  # (C,) float32, written: batch mean and biased batch variance
    rmean_ptr, rvar_ptr,  # (C,) running mean and variance, updated if UPDATE_RUNNING
    P, C,  # partials per channel, channels
    m, eps, momentum,  # values per channel (float); added to var; weight of this batch
    BLOCK_P: tl.constexpr,  # partials merged per loop iteration
    BLOCK_C: tl.constexpr,  # channels per program
    UPDATE_RUNNING: tl.constexpr,  # update the running statistics here
):
    """Merge the ``P`` partials of ``BLOCK_C`` channels, ``BLOCK_P`` partials at a time.

    A chunk of partials ``(n_p, mean_p, M2_p)`` is combined in two steps,
    ``mean = sum n_p mean_p / sum n_p`` and ``M2 = sum M2_p + n_p (mean_p - mean)^2``,
    and the chunk results are merged with :func:`welford_merge`.
    """
    ch, cmask = channels(tl.program_id(0), C, BLOCK_C)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p[:, None] * C + ch[None, :]
        mask = (p < P)[:, None] & cmask[None, :]
        n_p = tl.load(pn_ptr + offs, mask=mask, other=0.0)
        mean_p = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        n_c = tl.sum(n_p, axis=0)
        mean_c = tl.sum(n_p * mean_p, axis=0) / tl.maximum(n_c, 1.0)
        d = mean_p - mean_c[None, :]
        m2_c = tl.sum(tl.load(pm2_ptr + offs, mask=mask, other=0.0) + n_p * d * d, axis=0)
        n, mean, m2 = welford_merge(n, mean, m2, n_c, mean_c, m2_c)
    finish_statistics(mean, m2, ch, cmask, m, eps, momentum, mean_out, var_out, rmean_ptr,
                      rvar_ptr, UPDATE_RUNNING)


@triton.jit
def bn_fwd_apply_kernel(
    x_ptr, z_ptr, y_ptr,  # input x, residual z (read if HAS_Z), output y; x's strides
    w_ptr, b_ptr,  # (C,) gamma and beta, read if HAS_W / HAS_B
    mean_ptr, var_ptr,  # (C,) mean and biased variance: the batch's, or the running ones
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    eps,  # added to the variance
    tiles_per_program, programs_per_channel,  # tiles of one program; programs per channel
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,  # gamma, beta, z given
    ACT: tl.constexpr,  # activation code (batchnorm.activations.KERNEL_CODES)
):
    """Elementwise ``y = act((x - mu) gamma invstd + beta + z)`` over ``tiles_per_program`` tiles,
    ``(mu, var)`` being the batch statistics (training) or the running ones (eval)."""
    pid = tl.program_id(0)
    cb = pid // programs_per_channel
    t_begin = (pid % programs_per_channel) * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, T)
    ch, cmask = channels(cb, C, CB)
    mean, invstd = load_stats(mean_ptr, var_ptr, ch, cmask, eps)
    w = load_channel(w_ptr, ch, cmask, 1.0, HAS_W)
    b = load_channel(b_ptr, ch, cmask, 0.0, HAS_B)
    apply_tiles(
        x_ptr, z_ptr, y_ptr, cb, t_begin, t_end, mean, invstd, w, b, A, C, S, TS,
        BLOCK_A, BLOCK_B, ROWS, HAS_Z, ACT,
    )


@triton.jit
def bn_update_running_kernel(
    rmean_ptr, rvar_ptr,  # (C,) running mean and variance, updated in place
    mean_ptr, var_ptr,  # (C,) float32 batch mean and biased variance
    C,  # channels
    m, momentum,  # values per channel (float); weight of this batch
    BLOCK_C: tl.constexpr,  # channels per program
):
    """The running-statistics update alone (:func:`update_running`), for the custom-operator
    path where the forward may not mutate its inputs."""
    ch, cmask = channels(tl.program_id(0), C, BLOCK_C)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    var = tl.load(var_ptr + ch, mask=cmask, other=0.0)
    update_running(rmean_ptr, rvar_ptr, ch, cmask, mean, var, m, momentum)
