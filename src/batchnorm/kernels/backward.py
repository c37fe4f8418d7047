"""Backward kernels: the two per-channel reductions, then the elementwise input gradient.

With ``y = act(pre)``, ``pre = gamma xhat + beta + z`` and ``xhat = (x - mu) invstd``, per
channel over its ``m`` values::

    g      = dy * act'(pre)                       (= dz, the residual's gradient)
    dbeta  = sum_i g_i
    dgamma = sum_i g_i xhat_i
    dx_i   = gamma invstd (g_i - dbeta/m - xhat_i dgamma/m)     (training: mu, var depend on x)
    dx_i   = gamma invstd g_i                                    (eval: fixed running statistics)

``pre`` is recomputed from ``x`` (and ``z``) rather than saved by the forward: saving it would
cost one more full-tensor write in the forward and the same read in the backward that reading
``z`` costs now, and ``x`` must be read anyway for ``xhat``; for ``activation=None`` the
residual does not enter the backward at all.

Launch strategies mirror the forward: :func:`bn_bwd_fused_kernel` (one program per channel
block does both passes), or :func:`bn_bwd_reduce_kernel` (partial sums of ``P`` splits) ->
:func:`bn_bwd_finalize_kernel` -> :func:`bn_bwd_apply_kernel`. On the split path, when the
residual's gradient is wanted through an activation, the reduction also writes ``g`` into
``dz`` (``STORE_G``) and the elementwise pass reads it back (``G_IN``) instead of re-reading
``dy`` and ``z``: 7 tensor passes instead of 8, at the cost of computing ``dx`` from ``g``
rounded to the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.common import (
    activation_grad,
    channel_sum,
    channels,
    load_channel,
    load_stats,
    tile,
)


@triton.jit
def grad_tile(dy_ptr, x_ptr, z_ptr, offs, mask, mu, invstd, scale, beta,
              HAS_Z: tl.constexpr, ACT: tl.constexpr):
    """``(g, xhat)`` of one tile; ``pre`` is recomputed exactly as the forward computed it."""
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        pre = d * scale + beta
        if HAS_Z:
            pre += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = activation_grad(g, pre, ACT)
    return g, d * invstd


@triton.jit
def grad_sums_tiles(
    dy_ptr, x_ptr, z_ptr, g_out, cb, t_begin, t_end, mean, invstd, w, b, A, C, S, TS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CB: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, ACT: tl.constexpr, STORE_G: tl.constexpr,
):
    """``(sum g, sum g xhat)`` per channel lane over tiles ``[t_begin, t_end)``."""
    mu = mean[None, :]
    inv = invstd[None, :]
    scale = (w * invstd)[None, :]
    beta = b[None, :]
    sum_g = tl.zeros([CB], tl.float32)
    sum_gx = tl.zeros([CB], tl.float32)
    for t in range(t_begin, t_end):
        offs, mask = tile(t, cb, A, C, S, TS, BLOCK_A, BLOCK_B, ROWS)
        g, xhat = grad_tile(dy_ptr, x_ptr, z_ptr, offs, mask, mu, inv, scale, beta, HAS_Z, ACT)
        sum_g += channel_sum(g, ROWS)
        sum_gx += channel_sum(g * xhat, ROWS)
        if STORE_G:
            tl.store(g_out + offs, g.to(g_out.dtype.element_ty), mask=mask)
    return sum_g, sum_gx


@triton.jit
def grad_apply_tiles(
    dy_ptr, x_ptr, z_ptr, g_in, dx_ptr, dz_ptr, cb, t_begin, t_end,
    mean, invstd, w, b, mean_g, mean_gx, A, C, S, TS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr, G_IN: tl.constexpr,
    HAS_DX: tl.constexpr, STORE_DZ: tl.constexpr,
):
    """``dx = gamma invstd (g - mean(g) - xhat mean(g xhat))`` (eval: ``gamma invstd g``) and
    ``dz = g`` over tiles; ``mean_g``, ``mean_gx`` are the per-channel sums divided by ``m``."""
    mu = mean[None, :]
    inv = invstd[None, :]
    scale = (w * invstd)[None, :]
    beta = b[None, :]
    mg = mean_g[None, :]
    mgx = mean_gx[None, :]
    for t in range(t_begin, t_end):
        offs, mask = tile(t, cb, A, C, S, TS, BLOCK_A, BLOCK_B, ROWS)
        if G_IN:
            g = tl.load(g_in + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu) * inv
        else:
            g, xhat = grad_tile(dy_ptr, x_ptr, z_ptr, offs, mask, mu, inv, scale, beta, HAS_Z, ACT)
        if HAS_DX:
            if TRAINING:
                dx = scale * (g - mg - xhat * mgx)
            else:
                dx = scale * g
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DZ:
            tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_param_grads(sum_g, sum_gx, ch, cmask, dw_ptr, db_ptr,
                      STORE_DW: tl.constexpr, STORE_DB: tl.constexpr):
    """``dgamma = sum g xhat``, ``dbeta = sum g`` in the parameters' dtype."""
    if STORE_DW:
        tl.store(dw_ptr + ch, sum_gx.to(dw_ptr.dtype.element_ty), mask=cmask)
    if STORE_DB:
        tl.store(db_ptr + ch, sum_g.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def bn_bwd_fused_kernel(
    dy_ptr, x_ptr, z_ptr,  # output gradient, input x, residual z (read if HAS_Z and ACT)
    dx_ptr, dz_ptr,  # written if HAS_DX / STORE_DZ: gradients of x and of z; x's strides
    w_ptr, b_ptr,  # (C,) gamma and beta, read if HAS_W / HAS_B
    mean_ptr, var_ptr,  # (C,) the forward's statistics: the batch's, or the running ones
    dw_ptr, db_ptr,  # (C,) written if STORE_DW / STORE_DB: dgamma, dbeta
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    m, eps,  # values per channel (float); added to the variance
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,  # gamma, beta, z given
    ACT: tl.constexpr,  # activation code (batchnorm.activations.KERNEL_CODES)
    TRAINING: tl.constexpr,  # batch statistics (dx has the mean terms) or running ones
    HAS_DX: tl.constexpr, STORE_DZ: tl.constexpr,  # write dx; write dz
    STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,  # write dgamma; write dbeta
):
    """Backward in one launch; program ``cb`` owns ``CB`` channels and all ``T`` tiles:
    the two sums over every tile, then ``dx`` (and ``dz``) over every tile."""
    cb = tl.program_id(0)
    ch, cmask = channels(cb, C, CB)
    mean, invstd = load_stats(mean_ptr, var_ptr, ch, cmask, eps)
    w = load_channel(w_ptr, ch, cmask, 1.0, HAS_W)
    b = load_channel(b_ptr, ch, cmask, 0.0, HAS_B)
    sum_g, sum_gx = grad_sums_tiles(
        dy_ptr, x_ptr, z_ptr, dz_ptr, cb, 0, T, mean, invstd, w, b, A, C, S, TS,
        BLOCK_A, BLOCK_B, CB, ROWS, HAS_Z, ACT, False,
    )
    store_param_grads(sum_g, sum_gx, ch, cmask, dw_ptr, db_ptr, STORE_DW, STORE_DB)
    if HAS_DX or STORE_DZ:
        grad_apply_tiles(
            dy_ptr, x_ptr, z_ptr, dz_ptr, dx_ptr, dz_ptr, cb, 0, T,
            mean, invstd, w, b, sum_g / m, sum_gx / m, A, C, S, TS,
            BLOCK_A, BLOCK_B, ROWS, HAS_Z, ACT, TRAINING, False, HAS_DX, STORE_DZ,
        )


@triton.jit
def bn_bwd_reduce_kernel(
    dy_ptr, x_ptr, z_ptr,  # output gradient, input x, residual z (read if HAS_Z and ACT)
    g_out,  # written if STORE_G: g = dy * act'(pre), the residual's gradient; x's strides
    psum_g, psum_gx,  # (P, C) float32, written: sum g and sum g xhat of each split
    w_ptr, b_ptr,  # (C,) gamma and beta, read if HAS_W / HAS_B
    mean_ptr, var_ptr,  # (C,) the forward's statistics: the batch's, or the running ones
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    tiles_per_split, splits,  # tiles each split reduces; P, the splits per channel program
    eps,  # added to the variance
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,  # gamma, beta, z given
    ACT: tl.constexpr,  # activation code (batchnorm.activations.KERNEL_CODES)
    STORE_G: tl.constexpr,  # write g into g_out for the elementwise pass
):
    """Partial ``(sum g, sum g xhat)`` of split ``p`` of channel program ``cb`` into row ``p``
    of the ``(P, C)`` buffers; program id = ``cb * splits + p``."""
    pid = tl.program_id(0)
    cb = pid // splits
    p = pid % splits
    t_begin = p * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, T)
    ch, cmask = channels(cb, C, CB)
    mean, invstd = load_stats(mean_ptr, var_ptr, ch, cmask, eps)
    w = load_channel(w_ptr, ch, cmask, 1.0, HAS_W)
    b = load_channel(b_ptr, ch, cmask, 0.0, HAS_B)
    sum_g, sum_gx = grad_sums_tiles(
        dy_ptr, x_ptr, z_ptr, g_out, cb, t_begin, t_end, mean, invstd, w, b, A, C, S, TS,
        BLOCK_A, BLOCK_B, CB, ROWS, HAS_Z, ACT, STORE_G,
    )
    tl.store(psum_g + p * C + ch, sum_g, mask=cmask)
    tl.store(psum_gx + p * C + ch, sum_gx, mask=cmask)


@triton.jit
def bn_bwd_finalize_kernel(
    psum_g, psum_gx,  # (P, C) float32 partial sums of g and g xhat (reduce kernel)
    sums_out,  # (2C,) float32, written: [sum g, sum g xhat]
    dw_ptr, db_ptr,  # (C,) written if STORE_DW / STORE_DB: dgamma, dbeta
    P, C,  # partials per channel, channels
    BLOCK_P: tl.constexpr,  # partials added per loop iteration
    BLOCK_C: tl.constexpr,  # channels per program
    STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,  # write dgamma; write dbeta
):
    """Add the ``P`` partial sums: ``sums_out = [sum g (C values), sum g xhat (C values)]``
    in float32 for the elementwise pass, plus ``dgamma``, ``dbeta``."""
    ch, cmask = channels(tl.program_id(0), C, BLOCK_C)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p[:, None] * C + ch[None, :]
        mask = (p < P)[:, None] & cmask[None, :]
        sum_g += tl.sum(tl.load(psum_g + offs, mask=mask, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(psum_gx + offs, mask=mask, other=0.0), axis=0)
    tl.store(sums_out + ch, sum_g, mask=cmask)
    tl.store(sums_out + C + ch, sum_gx, mask=cmask)
    store_param_grads(sum_g, sum_gx, ch, cmask, dw_ptr, db_ptr, STORE_DW, STORE_DB)


@triton.jit
def bn_bwd_apply_kernel(
    dy_ptr, x_ptr, z_ptr,  # output gradient, input x, residual z (read if HAS_Z and ACT)
    g_in,  # read if G_IN: g as the reduce kernel wrote it
    dx_ptr, dz_ptr,  # written if HAS_DX / STORE_DZ: gradients of x and of z; x's strides
    w_ptr, b_ptr,  # (C,) gamma and beta, read if HAS_W / HAS_B
    mean_ptr, var_ptr,  # (C,) the forward's statistics: the batch's, or the running ones
    sums_ptr,  # (2C,) float32 [sum g, sum g xhat] (finalize kernel), read if TRAINING
    A, C, S, TS, T,  # sizes N or M, C, S; tiles along s; tiles per channel program
    m, eps,  # values per channel (float); added to the variance
    tiles_per_program, programs_per_channel,  # tiles of one program; programs per channel
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,  # tile: BLOCK_A rows x BLOCK_B columns
    CB: tl.constexpr, ROWS: tl.constexpr,  # channels per program; True: the (M, C) layout
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,  # gamma, beta, z given
    ACT: tl.constexpr,  # activation code (batchnorm.activations.KERNEL_CODES)
    TRAINING: tl.constexpr,  # batch statistics (dx has the mean terms) or running ones
    G_IN: tl.constexpr,  # read g from g_in instead of recomputing it from dy, x, z
    HAS_DX: tl.constexpr, STORE_DZ: tl.constexpr,  # write dx; write dz
):
    """Elementwise ``dx`` (and ``dz``) over ``tiles_per_program`` tiles, from the finalized sums
    (read only in training: the eval ``dx`` has no mean terms)."""
    pid = tl.program_id(0)
    cb = pid // programs_per_channel
    t_begin = (pid % programs_per_channel) * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, T)
    ch, cmask = channels(cb, C, CB)
    mean, invstd = load_stats(mean_ptr, var_ptr, ch, cmask, eps)
    w = load_channel(w_ptr, ch, cmask, 1.0, HAS_W)
    b = load_channel(b_ptr, ch, cmask, 0.0, HAS_B)
    mean_g = load_channel(sums_ptr, ch, cmask, 0.0, TRAINING) / m
    mean_gx = load_channel(sums_ptr + C, ch, cmask, 0.0, TRAINING) / m
    grad_apply_tiles(
        dy_ptr, x_ptr, z_ptr, g_in, dx_ptr, dz_ptr, cb, t_begin, t_end,
        mean, invstd, w, b, mean_g, mean_gx, A, C, S, TS,
        BLOCK_A, BLOCK_B, ROWS, HAS_Z, ACT, TRAINING, G_IN, HAS_DX, STORE_DZ,
    )
