"""Host side of the Triton kernels: layout detection, launch planning and the launches.

Layouts (no copy of the input is ever made for these two):

* contiguous NC(D)HW, viewed as ``(N, C, S)`` with ``S = prod(spatial)``;
* channels_last / channels_last_3d / 2-D ``(N, C)`` / any input whose channel dimension is the
  innermost one, viewed as ``(M, C)`` with ``M = N * prod(spatial)``.

Anything else (e.g. a sliced or transposed view) is copied once to contiguous NC(D)HW; that is
the documented fallback, and the outputs are then contiguous. ``dy`` and the residual are
brought to the input's strides when theirs differ (one copy), so every tensor of a launch
shares one indexing formula. Outputs keep the input's strides, hence its memory format.

Launch plan. A *channel program* owns one channel (NCS) or ``BLOCK_B`` adjacent channels
(rows); its data is cut into tiles of about ``KernelConfig.tile`` elements. When there are too
few channel programs to fill the GPU and each has many tiles, the reductions are split ``P``
ways (``P`` programs per channel program writing partial results, then a tiny finalize
kernel, then an elementwise kernel over all tiles); otherwise one fused kernel per direction
does everything in a single launch. :class:`KernelConfig` holds the knobs (they are
heuristics, not autotuned); :func:`configure` changes them temporarily, e.g. in tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator

import torch

from batchnorm.activations import KERNEL_CODES, check_activation
from batchnorm.kernels.backward import (
    bn_bwd_apply_kernel,
    bn_bwd_finalize_kernel,
    bn_bwd_fused_kernel,
    bn_bwd_reduce_kernel,
)
from batchnorm.kernels.forward import (
    bn_fwd_apply_kernel,
    bn_fwd_finalize_kernel,
    bn_fwd_fused_kernel,
    bn_fwd_stats_kernel,
    bn_update_running_kernel,
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch heuristics. Defaults aim at a recent NVIDIA GPU and are not autotuned."""

    tile: int = 4096  # elements per tile (per loop iteration of a program)
    max_block_c: int = 64  # channels per tile in the (M, C) layout
    max_block_s: int = 1024  # spatial positions per tile row in the (N, C, S) layout
    programs_per_sm: int = 4  # split reductions until about this many programs per SM
    min_tiles_per_split: int = 4  # ...but give each split at least this many tiles
    fused_max_tiles: int = 8  # channel programs with at most this many tiles: one launch
    apply_tiles_per_program: int = 1  # tiles per program of the elementwise kernels
    finalize_block_c: int = 64  # channels per program of the finalize kernels
    finalize_block_p: int = 64  # partials per loop iteration of the finalize kernels
    num_warps: int | None = None  # None: 4 for tiles up to 2048 elements, else 8
    num_sms: int | None = None  # None: the device's multiprocessor count
    splits: int | None = None  # force the splits per channel program (1 = fused path)


_config = KernelConfig()


def get_config() -> KernelConfig:
    return _config


@contextlib.contextmanager
def configure(**changes) -> Iterator[KernelConfig]:
    """Temporarily replace fields of the launch configuration: ``with configure(splits=3): ...``."""
    global _config
    previous = _config
    _config = dataclasses.replace(previous, **changes)
    try:
        yield _config
    finally:
        _config = previous


@dataclasses.dataclass(frozen=True)
class Layout:
    """``rows``: ``(A=M, C)`` with channels innermost; else ``(A=N, C, S)`` contiguous."""

    rows: bool  # the kernels' ROWS: channels innermost
    A: int  # the first dimension of the view: N, or M = N * prod(spatial) for rows
    C: int  # channels
    S: int  # prod(spatial) for (N, C, S); 1 for rows

    @property
    def count(self) -> int:
        """Values per channel, the ``m`` of the paper."""
        return self.A * self.S


def layout_of(x: torch.Tensor) -> Layout | None:
    """The kernel view of ``x``, or None when its strides need a copy first."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if x.is_contiguous():
        # with one spatial position (or a 2-D input) NC(D)HW is also the (M, C) layout
        return Layout(True, n, c, 1) if s == 1 else Layout(False, n, c, s)
    channels_innermost = (
        x.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4
        else x.is_contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5
        else x.dim() > 2 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()
    )
    return Layout(True, n * s, c, 1) if channels_innermost else None


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def output_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of the outputs for input ``x``: its own, unless it needs the contiguous copy."""
    return tuple(x.stride()) if layout_of(x) is not None else contiguous_strides(x.shape)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call is launched; each field is passed as the kernel parameter in brackets."""

    rows: bool  # [ROWS] the (M, C) layout
    A: int  # [A] the first dimension of the view, N or M
    C: int  # [C] channels
    S: int  # [S] prod(spatial), 1 for rows
    block_a: int  # [BLOCK_A] tile extent along A
    block_b: int  # [BLOCK_B] tile extent along s (N, C, S) or along the channels (rows)
    cb: int  # [CB] channels per channel program
    ts: int  # [TS] tiles along s (NCS layout), 1 for rows
    tiles: int  # [T] tiles per channel program
    channel_programs: int  # programs of a fused launch: cdiv(C, cb)
    splits: int  # [splits, P] programs per channel program reducing; 1: fused path
    tiles_per_split: int  # [tiles_per_split] tiles each split reduces
    num_warps: int  # warps per program

    def dims(self) -> tuple[int, int, int, int, int]:
        """The kernels' ``A, C, S, TS, T``, in their order."""
        return self.A, self.C, self.S, self.ts, self.tiles

    @functools.cached_property
    def _meta(self) -> dict:
        return dict(BLOCK_A=self.block_a, BLOCK_B=self.block_b, CB=self.cb, ROWS=self.rows,
                    num_warps=self.num_warps)

    def meta(self) -> dict:
        """The compile-time parameters of every tile kernel launch (a fresh dict)."""
        return dict(self._meta)


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv called from the host goes through the JIT wrapper (~8 us)
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _block_s(s: int, cap: int) -> int:
    """Power-of-two tile width along s that pads ``s`` least (ties: the widest)."""
    widest = min(_pow2(s), cap)
    narrowest = min(64, widest)  # keep rows at least a 128-byte line of bf16 wide
    candidates = [b for b in (widest >> k for k in range(widest.bit_length())) if b >= narrowest]
    return min(candidates, key=lambda b: (_cdiv(s, b) * b, -b))


@functools.lru_cache(maxsize=1024)
def make_plan(layout: Layout, num_sms: int, config: KernelConfig) -> Plan:
    A, C, S = layout.A, layout.C, layout.S
    if layout.rows:
        block_b = min(_pow2(C), config.max_block_c)
        cb, channel_programs, ts = block_b, _cdiv(C, block_b), 1
    else:
        block_b = _block_s(S, min(config.max_block_s, config.tile))
        cb, channel_programs, ts = 1, C, _cdiv(S, block_b)
    block_a = max(1, min(_pow2(A), config.tile // block_b))
    tiles = _cdiv(A, block_a) * ts
    target = config.programs_per_sm * num_sms
    if config.splits is not None:
        splits = config.splits
    elif tiles <= config.fused_max_tiles or channel_programs >= target:
        splits = 1
    else:
        splits = min(_cdiv(target, channel_programs),
                     _cdiv(tiles, config.min_tiles_per_split))
    splits = max(1, min(splits, tiles))
    tiles_per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, tiles_per_split)  # no empty split
    num_warps = config.num_warps or (4 if block_a * block_b <= 2048 else 8)
    return Plan(layout.rows, A, C, S, block_a, block_b, cb, ts, tiles, channel_programs,
                splits, tiles_per_split, num_warps)


@functools.lru_cache(maxsize=16)
def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the Triton interpreter on CPU: any small number


def plan_for(layout: Layout, device: torch.device) -> Plan:
    config = get_config()
    return make_plan(layout, config.num_sms or _device_sms(device), config)


# --- allocation (a single seam, so tests can poison every output) ---------------------------

def empty_strided(shape, stride, dtype, device) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty_strided(x.shape, x.stride(), dtype or x.dtype, x.device)


def _buffer(*shape: int, device, dtype=torch.float32) -> torch.Tensor:
    return empty_strided(shape, contiguous_strides(shape), dtype, device)


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    layout = layout_of(x)
    if layout is None:  # the documented fallback: one copy to contiguous NC(D)HW
        x = x.contiguous()
        layout = layout_of(x)
    return x, layout


def _match(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` with ``x``'s strides (one copy if they differ), keeping ``t``'s dtype."""
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the input's shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if all(a == b for size, a, b in zip(x.shape, t.stride(), x.stride(), strict=True)
           if size > 1):
        return t
    out = _like(x, t.dtype)
    out.copy_(t)
    return out


def _act(activation: str | None) -> int:
    """The kernels' ``ACT`` code of ``activation``."""
    check_activation(activation, "batchnorm.kernels")
    return KERNEL_CODES[activation]


def _apply_grid(plan: Plan) -> tuple[tuple[int], int, int]:
    per_program = get_config().apply_tiles_per_program
    programs_per_channel = _cdiv(plan.tiles, per_program)
    return (plan.channel_programs * programs_per_channel,), per_program, programs_per_channel


# --- forward ---------------------------------------------------------------------------------

def _flags(weight, bias, z, activation) -> dict:
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_Z=z is not None,
                ACT=_act(activation))


def _or(t, default):
    """Absent optional tensors are passed as any valid pointer; the kernels never touch it."""
    return default if t is None else t


def forward_train(x, weight, bias, residual, eps, activation, running_mean=None,
                  running_var=None, momentum=0.0):
    """Training forward: returns ``(y, mean, var)``, float32 batch statistics, biased variance.

    With ``running_mean``/``running_var`` they are updated in place by the kernel that finishes
    the statistics (no extra launch).
    """
    x, layout = _prepare(x)
    z = None if residual is None else _match(residual, x, "residual")
    plan = plan_for(layout, x.device)
    C, m = layout.C, float(layout.count)
    y = _like(x)
    mean = _buffer(C, device=x.device)
    var = _buffer(C, device=x.device)
    flags = _flags(weight, bias, z, activation)
    update = running_mean is not None
    running = (_or(running_mean, mean), _or(running_var, var))
    if plan.splits == 1:
        bn_fwd_fused_kernel[(plan.channel_programs,)](
            x, _or(z, x), y, _or(weight, mean), _or(bias, mean), mean, var, *running,
            *plan.dims(), m, eps, momentum, **plan.meta(), **flags, UPDATE_RUNNING=update,
        )
        return y, mean, var
    P = plan.splits
    partials = _buffer(3, P, C, device=x.device)  # count, mean, M2 of each split
    bn_fwd_stats_kernel[(plan.channel_programs * P,)](
        x, partials[0], partials[1], partials[2], *plan.dims(), plan.tiles_per_split, P,
        **plan.meta(),
    )
    config = get_config()
    bn_fwd_finalize_kernel[(_cdiv(C, config.finalize_block_c),)](
        partials[0], partials[1], partials[2], mean, var, *running, P, C, m, eps, momentum,
        BLOCK_P=min(_pow2(P), config.finalize_block_p),
        BLOCK_C=config.finalize_block_c, UPDATE_RUNNING=update,
    )
    _forward_apply(x, z, y, weight, bias, mean, var, eps, plan, flags)
    return y, mean, var


def forward_eval(x, running_mean, running_var, weight, bias, residual, eps, activation):
    """Eval forward, one elementwise pass with the running statistics."""
    x, layout = _prepare(x)
    z = None if residual is None else _match(residual, x, "residual")
    y = _like(x)
    _forward_apply(x, z, y, weight, bias, running_mean, running_var, eps,
                   plan_for(layout, x.device), _flags(weight, bias, z, activation))
    return y


def _forward_apply(x, z, y, weight, bias, mean, var, eps, plan, flags):
    grid, per_program, programs_per_channel = _apply_grid(plan)
    bn_fwd_apply_kernel[grid](
        x, _or(z, x), y, _or(weight, mean), _or(bias, mean), mean, var,
        *plan.dims(), eps, per_program, programs_per_channel, **plan.meta(), **flags,
    )


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """In place: ``running += momentum * (batch - running)``, variance unbiased by m/(m-1)."""
    C = mean.shape[0]
    block = min(_pow2(C), 1024)
    bn_update_running_kernel[(_cdiv(C, block),)](
        running_mean, running_var, mean, var, C, float(count), momentum, BLOCK_C=block,
    )


# --- backward --------------------------------------------------------------------------------

def backward(dy, x, weight, bias, residual, mean, var, training, eps, activation,
             need_dx=True, need_dweight=False, need_dbias=False, need_dresidual=False):
    """``(dx, dweight, dbias, dresidual)``, each None when not requested.

    ``(mean, var)`` are the batch statistics saved by the training forward, or the running
    ones in eval. Without an activation the residual's gradient is ``dy`` itself: it is returned as
    None here and the caller reuses ``dy`` (no copy).
    """
    x, layout = _prepare(x)
    dy = _match(dy, x, "grad_output")
    act = _act(activation)
    # without an activation the residual does not enter the backward at all
    z = None if residual is None or act == 0 else _match(residual, x, "residual")
    store_dz = need_dresidual and act != 0
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    need_sums = training or need_dweight or need_dbias
    plan = plan_for(layout, x.device)
    C = layout.C
    dx = _like(x) if need_dx else None
    dz = _like(x, residual.dtype) if store_dz else None
    dw = _buffer(C, device=x.device, dtype=weight.dtype) if need_dweight else None
    db = _buffer(C, device=x.device, dtype=bias.dtype) if need_dbias else None
    if not (need_dx or store_dz or need_sums):
        return dx, dw, db, dz
    m = float(layout.count)
    ptrs = dict(z=_or(z, x), dx=_or(dx, x), dz=_or(dz, x), w=_or(weight, mean), b=_or(bias, mean))
    flags = _flags(weight, bias, z, activation)
    if need_sums and plan.splits == 1:
        bn_bwd_fused_kernel[(plan.channel_programs,)](
            dy, x, ptrs["z"], ptrs["dx"], ptrs["dz"], ptrs["w"], ptrs["b"], mean, var,
            _or(dw, mean), _or(db, mean), *plan.dims(), m, eps, **plan.meta(), **flags,
            TRAINING=training, HAS_DX=need_dx, STORE_DZ=store_dz, STORE_DW=need_dweight,
            STORE_DB=need_dbias,
        )
        return dx, dw, db, dz
    sums = mean  # placeholder pointer when the elementwise pass needs no sums (eval)
    g_in = False
    if need_sums:
        P = plan.splits
        partials = _buffer(2, P, C, device=x.device)  # sum g, sum g xhat of each split
        bn_bwd_reduce_kernel[(plan.channel_programs * P,)](
            dy, x, ptrs["z"], ptrs["dz"], partials[0], partials[1], ptrs["w"], ptrs["b"], mean,
            var, *plan.dims(), plan.tiles_per_split, P, eps, **plan.meta(), **flags,
            STORE_G=store_dz,
        )
        g_in = store_dz  # the reduction already wrote g = dz: the elementwise pass reads it
        sums = _buffer(2 * C, device=x.device)
        config = get_config()
        bn_bwd_finalize_kernel[(_cdiv(C, config.finalize_block_c),)](
            partials[0], partials[1], sums, _or(dw, mean), _or(db, mean), P, C,
            BLOCK_P=min(_pow2(P), config.finalize_block_p),
            BLOCK_C=config.finalize_block_c, STORE_DW=need_dweight, STORE_DB=need_dbias,
        )
    if need_dx or (store_dz and not g_in):
        grid, per_program, programs_per_channel = _apply_grid(plan)
        bn_bwd_apply_kernel[grid](
            dy, x, ptrs["z"], ptrs["dz"], ptrs["dx"], ptrs["dz"], ptrs["w"], ptrs["b"], mean,
            var, sums, *plan.dims(), m, eps, per_program, programs_per_channel,
            **plan.meta(), **flags, TRAINING=training, G_IN=g_in, HAS_DX=need_dx,
            STORE_DZ=store_dz and not g_in,
        )
    return dx, dw, db, dz
