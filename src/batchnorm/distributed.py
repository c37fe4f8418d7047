r"""Synchronized Batch Normalization: one mini-batch sharded over several processes.

When a mini-batch is split over the processes of a ``torch.distributed`` group (data-parallel
training), :class:`SyncBatchNorm` normalizes with the statistics of the *whole* mini-batch, as
the paper's Algorithm 1 assumes, instead of each shard's own. Communication goes through
``torch.distributed`` collectives (gloo on the CPU, NCCL on CUDA).

Forward (training). Process ``p`` holds ``n_p`` values of channel ``c`` (``n_p`` may be 0) with
mean ``mu_p`` and ``M2_p = sum (x - mu_p)^2``. One ``all_gather`` gives every process every
``(n_p, mu_p, M2_p)``, which are merged in rank order, in float64, with Chan, Golub and LeVeque's
parallel-variance formula for k groups::

    N   = sum_p n_p
    mu  = sum_p (n_p / N) mu_p
    M2  = sum_p M2_p + sum_p n_p (mu_p - mu)^2          # pairwise: M2_a + M2_b + d^2 n_a n_b / N
    var = M2 / N                                          # biased, used to normalize

Deviations are taken from means, never from raw sums of squares, so a large offset costs no
accuracy; an empty shard has weight 0 and changes nothing. Every process merges the same
gathered numbers with the same operations, so all get bit-identical statistics, and so
bit-identical running statistics, updated with the unbiased ``M2 / (N - 1)``.

Backward. With ``xhat = (x - mu) / sqrt(var + eps)`` the two per-channel sums of Algorithm 1's
chain rule are all-reduced and divided by the global count::

    dbeta  = sum_all dy,   dgamma = sum_all dy * xhat
    dx     = gamma / sqrt(var + eps) * (dy - dbeta / N - xhat * dgamma / N)

The gradients of this process's ``weight`` and ``bias`` are the *local* parts of ``dgamma`` and
``dbeta``: what the objective summed over processes contributes through this process's copy.
DistributedDataParallel then averages them, as it averages every other gradient, so training
with per-process loss ``L_p`` is exactly single-process training with loss ``mean_p L_p``
(for equal shards with mean losses: the mean loss over the full batch).

Evaluation uses the running statistics and makes no collective call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional
from batchnorm.activations import epilogue
from batchnorm.modules import TORCH_TO_OURS, BatchNormBase, record_as_fx_leaf
from batchnorm.process_group import is_initialized
from batchnorm.statistics import (
    cast,
    centered_statistics,
    compute_dtype,
    per_channel,
    reduce_dims,
)
from batchnorm.swap import rebuild

__all__ = ["SyncBatchNorm", "merge_across_processes", "merge_statistics", "record_traffic"]

# Counts travel in the statistics' dtype as two integers below 2^24 (exact even in float32):
# count = high * 2^24 + low, so a shard may hold up to 2^48 values per channel.
_COUNT_SPLIT = 2**24
_HEADER = 2  # (high, low) in front of the C means and C M2s


# --------------------------------------------------------------------------------------------
# process groups and collectives


def process_group_size(process_group=None, *, who: str = "SyncBatchNorm") -> int:
    """World size of ``process_group`` (default: the whole world), after checking that
    ``torch.distributed`` is initialized and that this process is a member."""
    if not is_initialized():
        raise RuntimeError(
            f"{who}: training needs an initialized torch.distributed process group (call "
            "torch.distributed.init_process_group, or start with torchrun), because the batch "
            "statistics are shared across processes. For single-process training use "
            "batchnorm.BatchNorm1d/2d/3d (batchnorm.convert(model, to='batchnorm')); in eval "
            "mode SyncBatchNorm needs no process group."
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(
            f"{who}: process_group does not contain this process (global rank "
            f"{dist.get_rank()}); every process that runs a synchronized BN layer in training "
            "must be a member of that layer's process_group"
        )
    return dist.get_world_size(process_group)


_traffic: list[tuple[str, int]] | None = None


@contextlib.contextmanager
def record_traffic() -> Iterator[list[tuple[str, int]]]:
    """Collect ``(collective, bytes this process contributes)`` for each collective call that
    synchronized BN makes inside the ``with`` block (for benchmarks and tests)."""
    global _traffic
    previous, _traffic = _traffic, []
    try:
        yield _traffic
    finally:
        _traffic = previous


def _log(collective: str, tensor: torch.Tensor) -> None:
    if _traffic is not None:
        _traffic.append((collective, tensor.numel() * tensor.element_size()))


# torch >= 2.13 renamed all_gather_into_tensor (the old name warns)
_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(payload: torch.Tensor, group, world: int) -> torch.Tensor:
    """``(world, len(payload))``: every process's payload, row ``r`` from group rank ``r``."""
    _log("all_gather", payload)
    # The flat (concatenated) output form: gloo accepts it, unlike the stacked one.
    gathered = payload.new_empty(world * payload.numel())
    _GATHER_SINGLE(gathered, payload, group=group)
    return gathered.view(world, payload.numel())


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    _log("all_reduce", tensor)
    dist.all_reduce(tensor, group=group)
    return tensor


# --------------------------------------------------------------------------------------------
# statistics


def local_statistics(x: torch.Tensor):
    """``(count, mean, M2, x - mean)`` per channel over every dimension but 1, in float32 or
    higher; ``x - mean`` is a new tensor. An empty ``x`` gives zero statistics."""
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count == 0:
        zeros = x.new_zeros(x.shape[1], dtype=compute_dtype(x))
        return 0, zeros, zeros.clone(), x.new_empty(x.shape, dtype=zeros.dtype)
    mean, var, centered = centered_statistics(x)
    return count, mean, var.mul_(count), centered


def merge_statistics(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Merge per-group ``(count, mean, M2)`` into the statistics of their union (Chan et al.).

    ``counts`` is ``(k,)``, ``means`` and ``m2s`` are ``(k, C)``; groups with count 0 must carry
    finite values (they get weight 0). Returns ``(N, mean, M2)`` in the inputs' dtype, with
    ``mean = sum_g (n_g / N) mu_g`` and ``M2 = sum_g M2_g + sum_g n_g (mu_g - mu)^2``: the
    k-group form of the pairwise update ``M2 = M2_a + M2_b + (mu_b - mu_a)^2 n_a n_b / N``.
    The sums run over the groups in their given order, so equal inputs give equal bits.
    """
    total = counts.sum()
    weights = (counts / total.clamp_min(1)).unsqueeze(1)  # all-empty: weights 0, result 0
    mean = (weights * means).sum(0)
    between = (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return total, mean, m2s.sum(0) + between


def _exchange(count: int, mean: torch.Tensor, m2: torch.Tensor, group, world: int):
    """``(N, mean, M2)`` of the global batch from this process's part; float64 results."""
    dtype = mean.dtype
    header = torch.tensor(divmod(count, _COUNT_SPLIT), dtype=dtype, device=mean.device)
    payload = torch.cat([header, mean, m2])
    gathered = payload.unsqueeze(0) if world == 1 else _all_gather(payload, group, world)
    gathered = gathered.double()  # exact counts (up to 2^48); the merge runs in float64
    counts = gathered[:, 0] * _COUNT_SPLIT + gathered[:, 1]
    channels = mean.numel()
    return merge_statistics(counts, gathered[:, _HEADER:_HEADER + channels],
                            gathered[:, _HEADER + channels:])


def merge_across_processes(mean: torch.Tensor, var: torch.Tensor, count: int,
                           process_group=None):
    """Statistics of a mini-batch sharded over ``process_group`` (default: the world).

    Each process passes its shard's per-channel ``mean`` and *biased* ``var`` and its number of
    values per channel ``count`` (0 for an empty shard: ``mean`` and ``var`` are then ignored).
    Every process gets the same ``(mean, biased var, count)`` of the union, ``mean`` and
    ``var`` in float32 or higher (float64 inputs stay float64). A collective call: every
    process of the group must make it. Used by :func:`batchnorm.recalibrate`.
    """
    world = process_group_size(process_group, who="merge_across_processes")
    dtype = torch.float64 if mean.dtype == torch.float64 else torch.float32
    mean = cast(mean.detach(), dtype)
    if count == 0:
        mean = torch.zeros_like(mean)
        m2 = torch.zeros_like(mean)
    else:
        m2 = cast(var.detach(), dtype) * count
    total, mean, m2 = _exchange(int(count), mean, m2, process_group, world)
    return cast(mean, dtype), cast(m2 / total.clamp_min(1), dtype), int(total)


# --------------------------------------------------------------------------------------------
# autograd


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the union of the shards of ``process_group``; updates the running
    statistics in place (from the global statistics) when they are given."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, world):
        count, local_mean, local_m2, centered = local_statistics(x)
        total, mean64, m2 = _exchange(count, local_mean, local_m2, group, world)
        if count < 2 and total.item() < 2:  # every process reaches this check when it fails
            raise ValueError(
                f"SyncBatchNorm: expected more than 1 value per channel in the global batch "
                f"when training, got {int(total.item())} (this process's input has shape "
                f"{tuple(x.shape)}); batch statistics need at least 2 values per channel"
            )
        dtype = local_mean.dtype
        mean = cast(mean64, dtype)
        invstd = cast(m2 / total, dtype).add_(eps).rsqrt_()
        scale = invstd if weight is None else cast(weight, dtype) * invstd
        # y = scale * (x - mu) + beta, computed from the locally centered copy:
        # x - mu = (x - mu_p) + (mu_p - mu)
        shift = scale * (local_mean - mean) if count else torch.zeros_like(scale)
        if bias is not None:
            shift = shift.add_(cast(bias, dtype))
        y = centered.mul_(per_channel(scale, centered)).add_(per_channel(shift, centered))
        if running_mean is not None:
            running_mean.lerp_(cast(mean64, running_mean.dtype), momentum)
            unbiased = m2 / (total - 1)
            running_var.lerp_(cast(unbiased, running_var.dtype), momentum)
        ctx.group = group
        ctx.inv_total = cast(1.0 / total, dtype)
        # x, not x - mu, is saved (as torch's BN does); backward re-centers it.
        ctx.save_for_backward(x, weight, mean, invstd)
        return cast(y, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = reduce_dims(x)
        dyc = cast(dy, invstd.dtype)
        xhat = (cast(x, invstd.dtype) - per_channel(mean, x)).mul_(per_channel(invstd, x))
        sum_dy = dyc.sum(dims)
        sum_dy_xhat = (dyc * xhat).sum(dims)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        if need_x:
            totals = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            global_dy, global_dy_xhat = totals.chunk(2)
            gain = invstd if weight is None else cast(weight, invstd.dtype) * invstd
            # dx = gain * dy - gain * xhat * sum(dy xhat) / N - gain * sum(dy) / N
            k = (gain * global_dy_xhat).mul_(-ctx.inv_total)
            c = (gain * global_dy).mul_(-ctx.inv_total)
            dx = xhat.mul_(per_channel(k, xhat)).addcmul_(dyc, per_channel(gain, dyc))
            dx = cast(dx.add_(per_channel(c, dx)), dy.dtype)
        param_dtype = weight.dtype if weight is not None else invstd.dtype
        return (
            dx,
            cast(sum_dy_xhat, param_dtype) if need_w else None,
            cast(sum_dy, param_dtype) if need_b else None,
            None, None, None, None, None, None,
        )


# --------------------------------------------------------------------------------------------
# module


class SyncBatchNorm(BatchNormBase):
    r"""BN whose training statistics cover the mini-batch of every process in ``process_group``.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with ``E[x]`` and the biased ``Var[x]`` taken per channel over dimension 0 and all
    dimensions after 1 of the *concatenation* of all processes' inputs (see the module
    docstring for the exchange). Any input of rank >= 2 ``(N, C, *)``; a process may hold 0
    samples but must still call forward and backward, because both are collective.
    Parameters, buffers and ``state_dict`` keys are those of ``torch.nn.BatchNorm*d``.

    Args:
        num_features: C, the size of dimension 1 of the input.
        eps: added to the variance, > 0. Default 1e-5.
        momentum: weight of the newest batch in the running averages, or ``None`` for a
            cumulative average. Default 0.1.
        affine: learn gamma (``weight``) and beta (``bias``). Default True.
        bias: with ``affine``, learn beta too; ``False`` keeps only gamma (``bias`` is None),
            as torch's ``bias=False``. Default True.
        track_running_stats: keep running estimates (updated from the global statistics,
            identically on every process). Default True.
        process_group: the processes whose shards form the mini-batch; default the world.
        activation: optional nonlinearity after BN and the residual (as in
            :class:`batchnorm.BatchNorm2d`).
        backend: the backend of the computations that need no communication (evaluation, or
            a group of one process); see :mod:`batchnorm.backends`.

    In training with ``torch.distributed`` initialized, this process must belong to
    ``process_group``; with a group of one process, or no process group at all (as
    ``torch.nn.SyncBatchNorm``), BN runs locally as :class:`batchnorm.BatchNorm2d` would.
    Evaluation uses the running statistics (or, with ``track_running_stats=False``, this
    process's batch statistics, as ``torch.nn.SyncBatchNorm`` does) and makes no collective
    call. Double backward across processes is not supported, nor ``torch.jit.script`` (convert
    to :class:`batchnorm.BatchNorm2d` first; see :meth:`to_batchnorm`).

    ``forward(input, residual=None)`` returns ``activation(BN(input) + residual)``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, process_group=None,
        device=None, dtype=None, *, bias: bool = True, activation: str | None = None,
        backend: str = "auto",
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation, backend=backend)
        self.process_group = process_group
        # The BatchNorm1d/2d/3d class that to_batchnorm() returns; known after from_batchnorm.
        self._batchnorm_class: type | None = None

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "SyncBatchNorm cannot be compiled by torch.jit.script: its statistics exchange is "
            "Python (torch.nn.SyncBatchNorm cannot be scripted either). Script the model after "
            "batchnorm.convert(model, to='batchnorm') (or layer.to_batchnorm()), which keeps "
            "the parameters and statistics, or use torch.compile."
        )

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return record_as_fx_leaf(self, input, residual)
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = self._statistics_arguments()
        # Without a process group there is nothing to synchronize with: plain BN, as torch's
        world = process_group_size(self.process_group) if (
            self.training and is_initialized()) else 1
        if world == 1:  # nothing to exchange: the ordinary computation (checks every argument)
            return self._local_batch_norm(input, residual, running_mean, running_var,
                                          use_batch_stats, factor)
        # The same checks, but the count per channel is checked on the global batch.
        functional.check_arguments(input, running_mean, running_var, self.weight, self.bias,
                                   use_batch_stats, factor, self.eps, self.activation, residual,
                                   sharded=True)
        y = SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                        factor, self.eps, self.process_group, world)
        return epilogue(y, self.activation, residual)

    @classmethod
    def from_batchnorm(cls, module: _BatchNorm, process_group=None) -> SyncBatchNorm:
        """A SyncBatchNorm over ``process_group`` that shares ``module``'s parameters and buffers
        (the same objects, so an optimizer built before still updates them), mode and device.

        ``module`` is any BN layer: ``torch.nn.BatchNorm1d/2d/3d``, ours, or a synchronized one.
        Our fused ``activation`` and ``backend`` carry over.
        """
        if not isinstance(module, _BatchNorm):
            raise TypeError(f"SyncBatchNorm.from_batchnorm: module must be a BatchNorm layer "
                            f"(torch.nn.modules.batchnorm._BatchNorm), got "
                            f"{type(module).__name__}")
        ghost = getattr(module, "ghost_batch_size", None)
        if ghost is not None:
            raise ValueError(
                f"SyncBatchNorm.from_batchnorm: the layer normalizes ghost batches of {ghost} "
                "samples, which SyncBatchNorm (statistics of the whole batch over all processes) "
                "would drop; keep it unsynchronized (each process's ghost batches are its own) "
                "or set ghost_batch_size=None first")
        new = rebuild(module, cls, process_group=process_group,
                      activation=getattr(module, "activation", None),
                      backend=getattr(module, "backend", "auto"))
        if isinstance(module, SyncBatchNorm):
            new._batchnorm_class = module._batchnorm_class
        elif isinstance(module, BatchNormBase):
            new._batchnorm_class = type(module)
        else:
            new._batchnorm_class = TORCH_TO_OURS.get(type(module))
        return new

    def to_batchnorm(self, cls: type | None = None) -> _BatchNorm:
        """An unsynchronized BN layer sharing this one's parameters, buffers and mode.

        ``cls`` defaults to ours of the layer this one was made from (``batchnorm.BatchNorm2d``
        for a ``torch.nn.BatchNorm2d``); a SyncBatchNorm built directly needs ``cls``.
        """
        cls = cls or self._batchnorm_class
        if cls is None:
            raise ValueError(
                "SyncBatchNorm.to_batchnorm: this layer was not made from a BatchNorm1d/2d/3d, "
                "so the input rank is unknown; pass cls (e.g. batchnorm.BatchNorm2d)"
            )
        if issubclass(cls, BatchNormBase):
            return rebuild(self, cls, activation=self.activation, backend=self.backend)
        if self.activation is not None:
            raise ValueError(f"SyncBatchNorm.to_batchnorm: {cls.__name__} has no fused "
                             f"activation; this layer has activation={self.activation!r}")
        return rebuild(self, cls)
