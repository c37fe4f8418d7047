r"""Synchronized Batch Renormalization: Algorithm 1 of Ioffe (2017) over a mini-batch sharded
across the processes of a ``torch.distributed`` group.

Per step (training), with the moving averages mu, sigma identical on every process:

1. ``(mu_B, sigma_B)`` of the *global* batch: each process's per-channel count, mean and biased
   variance are merged with :func:`batchnorm.distributed.merge_across_processes` (one
   ``all_gather``; every process gets the same bits).
2. ``r``, ``d`` from them and the moving averages (:func:`~batchnorm.variants.renorm.
   renorm_corrections`); then the moving averages are updated from the global statistics, the
   same way on every process.
3. ``y = gamma (r xhat_B + d) + beta`` is synchronized BN with weight ``gamma r`` and bias
   ``gamma d + beta`` (:class:`batchnorm.distributed.SyncBatchNormFunction`: the same global
   statistics, one more ``all_gather``; its backward all-reduces the two per-channel sums), so
   the gradients are exactly the single-process ones on the concatenated batch, r and d being
   constants, and each process's ``weight``/``bias`` gradient is its share of the total (as for
   :class:`~batchnorm.distributed.SyncBatchNorm`; DistributedDataParallel averages them).

Evaluation is BN's affine map with the running statistics and makes no collective call. A group
of one process runs :func:`~batchnorm.variants.renorm.batch_renorm` locally. Double backward is
not supported (as for SyncBatchNorm).
"""

from __future__ import annotations

import torch

from batchnorm.distributed import (
    SyncBatchNorm,
    SyncBatchNormFunction,
    merge_across_processes,
    process_group_size,
)
from batchnorm.variants._core import averaging_factor, batch_statistics, epilogue
from batchnorm.variants._core import rebuild as _rebuild_layer
from batchnorm.variants.renorm import (
    _BY_RANK,
    PAPER_SCHEDULE,
    RENORM_MOMENTUM,
    Bound,
    _RenormMixin,
    batch_renorm,
    effective_affine,
    renorm_corrections,
    update_moving_averages,
)


class SyncBatchRenorm(_RenormMixin, SyncBatchNorm):
    """Batch Renormalization whose batch statistics cover every process in ``process_group``.

    Arguments as :class:`batchnorm.distributed.SyncBatchNorm` plus the keyword-only ``r_max``,
    ``d_max`` and ``running_average`` of :class:`~batchnorm.variants.BatchRenorm2d` (default
    momentum 0.01, the paper's). Any input of rank >= 2; every process of the group must call
    forward and backward in training (a process may hold 0 samples).
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = RENORM_MOMENTUM,
        affine: bool = True, track_running_stats: bool = True, process_group=None, device=None,
        dtype=None, *, r_max: Bound = PAPER_SCHEDULE["r_max"],
        d_max: Bound = PAPER_SCHEDULE["d_max"], running_average: str = "sigma",
        activation: str | None = None, backend: str = "auto",
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         r_max=r_max, d_max=d_max, running_average=running_average,
                         activation=activation, backend=backend)
        self.process_group = process_group

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:  # BN's inference map, no collective call
            return SyncBatchNorm.forward(self, input, residual)
        self._check_input_dim(input)
        world = process_group_size(self.process_group, who=type(self).__name__)
        tracked = self.num_batches_tracked
        r_max, d_max = self.bounds(int(tracked))
        factor = averaging_factor(self)
        running_mean, running_var = self.running_mean, self.running_var
        if world == 1:
            return batch_renorm(input, running_mean, running_var, self.weight, self.bias, True,
                                factor, self.eps, r_max=r_max, d_max=d_max,
                                running_average=self.running_average,
                                activation=self.activation, residual=residual,
                                backend=self.backend)
        count = input.numel() // input.shape[1]
        if count:
            mean, var = batch_statistics(input.detach())
        else:  # an empty shard: weight 0 in the merge
            mean = var = input.new_zeros(input.shape[1], dtype=running_mean.dtype)
        mean, var, total = merge_across_processes(mean, var, count, self.process_group)
        r, d = renorm_corrections(mean, var, running_mean, running_var, r_max, d_max, self.eps)
        if factor:
            update_moving_averages(running_mean, running_var, mean, var, total, factor, self.eps,
                                   self.running_average)
        weight_r, bias_d = effective_affine(self.weight, self.bias, r, d)
        y = SyncBatchNormFunction.apply(input, weight_r, bias_d, None, None, 0.0, self.eps,
                                        self.process_group, world)
        return epilogue(y, self.activation, residual)

    @classmethod
    def from_batchnorm(cls, module, process_group=None, **bounds) -> SyncBatchRenorm:
        """A SyncBatchRenorm sharing ``module``'s parameters and buffers (same objects), mode,
        fused activation and backend. A BatchRenorm layer keeps its bounds; for another BN
        layer they are ``bounds`` (``r_max=``, ``d_max=``, ``running_average=``) or the
        defaults. :meth:`to_batchnorm` goes back to BatchRenorm of the layer's rank."""
        extra = module.variant_kwargs() if isinstance(module, _RenormMixin) else {}
        new = _rebuild_layer(module, cls, process_group=process_group,
                             activation=getattr(module, "activation", None),
                             backend=getattr(module, "backend", "auto"), **{**extra, **bounds})
        origin = getattr(module, "_batchnorm_class", None) or type(module)
        new._batchnorm_class = next(
            (renorm for base, renorm in _BY_RANK.items() if issubclass(origin, base)), None)
        return new

    def to_batchnorm(self, cls: type | None = None):
        """An unsynchronized layer (default: BatchRenorm of the original rank) sharing this
        one's parameters, buffers, mode, bounds, activation and backend."""
        cls = cls or self._batchnorm_class
        if cls is None:
            raise ValueError("SyncBatchRenorm.to_batchnorm: the input rank is unknown (the "
                             "layer was not made from a BatchNorm1d/2d/3d); pass cls, e.g. "
                             "batchnorm.variants.BatchRenorm2d")
        return _rebuild_layer(self, cls, activation=self.activation, backend=self.backend,
                              **self.variant_kwargs())
