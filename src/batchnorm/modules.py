"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

They subclass torch's classes, so constructor arguments, parameters (``weight``, ``bias``),
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), ``state_dict`` keys,
``reset_parameters`` and ``isinstance(m, torch.nn.BatchNorm2d)`` all stay as in torch; only the
computation is ours (:func:`batchnorm.functional.batch_norm`). Two keyword-only extras:
``activation`` fuses a nonlinearity (and ``forward(x, residual)`` a residual add) into BN,
``backend`` picks the implementation. Those options, the input checks and the running-average
bookkeeping live in :class:`BatchNormBase`, which :class:`batchnorm.SyncBatchNorm` derives from
too.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional
from batchnorm.activations import check_activation


class BatchNormBase(_BatchNorm):
    """What every BN layer of ours shares, :class:`batchnorm.SyncBatchNorm` included.

    On top of torch's ``_BatchNorm`` (parameters, buffers, ``state_dict``): the two keyword-only
    options (a fused ``activation``, the ``backend``), the input checks, the running-average
    factor and the choice of statistics, all as ``torch.nn.BatchNorm*d`` decides them. Its
    :meth:`forward` is the single-process computation; ``SyncBatchNorm`` overrides it to pool
    the statistics over processes.
    """

    #: the input ranks this layer accepts; ``None``: any rank >= 2
    _expected_dims: tuple[int, ...] | None = None

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
        activation: str | None = None, backend: str = "auto",
    ):
        check_activation(activation, type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text

    def _check_input_dim(self, input):
        who = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{who}: input must be a tensor, got {type(input).__name__}")
        if self._expected_dims is None:
            if input.dim() < 2:
                raise ValueError(f"{who}: expected input of rank >= 2 (N, C, ...), got shape "
                                 f"{tuple(input.shape)}")
        elif input.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"{who}: expected {wanted} input, got {input.dim()}D input of "
                             f"shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{who}({self.num_features}): input has {input.shape[1]} channels (dimension 1 "
                f"of shape {tuple(input.shape)}), expected num_features={self.num_features}"
            )

    def _averaging_factor(self, num_batches_tracked) -> float:
        """The running-average weight of this batch; counts batches (torch's convention)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(num_batches_tracked)
        return self.momentum

    def _statistics_arguments(self):
        """``(running_mean, running_var, use_batch_stats, momentum)`` for this call, as torch's
        ``_BatchNorm.forward`` decides them; counts the batch in ``num_batches_tracked``.

        Batch statistics are used in training, or always when no running statistics are kept;
        the running ones are passed (to be updated or used) unless training without tracking.
        """
        # Buffers read from their dict once: Module.__getattr__ costs about a microsecond per
        # lookup, which shows next to a small layer's whole forward.
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        factor = self._averaging_factor(buffers["num_batches_tracked"])
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        return running_mean, running_var, use_batch_stats, factor

    def _local_batch_norm(self, input, residual, running_mean, running_var, use_batch_stats,
                          factor) -> torch.Tensor:
        """BN of this process's ``input`` alone through :func:`batchnorm.functional.batch_norm`
        (which checks every argument)."""
        params = self._parameters
        return functional.batch_norm(
            input, running_mean, running_var, params["weight"], params["bias"], use_batch_stats,
            factor, self.eps, activation=self.activation, residual=residual,
            backend=self.backend,
        )

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        return self._local_batch_norm(input, residual, *self._statistics_arguments())


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):
    r"""BN over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    In training, mean and biased variance are taken per channel over the mini-batch (and L)
    (Algorithm 1) and the running estimates are updated with the unbiased variance; in
    evaluation the running estimates make BN a fixed affine map (Algorithm 2).

    Args:
        num_features: C, the size of dimension 1 of the input.
        eps: added to the variance, > 0. Default 1e-5.
        momentum: weight of the newest batch in the running averages, in [0, 1], or ``None``
            for a cumulative average. Default 0.1.
        affine: learn gamma (``weight``) and beta (``bias``). Default True.
        track_running_stats: keep running estimates; if False, evaluation also uses batch
            statistics. Default True.
        activation: optional fused nonlinearity after BN and the residual: ``"relu"``,
            ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"`` or ``"silu"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`batchnorm.backends`).

    ``forward(input, residual=None)`` returns ``activation(BN(input) + residual)``.
    """

    _expected_dims = (2, 3)


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):
    """BN over a 4D ``(N, C, H, W)`` input, statistics per channel over N, H and W (the paper's
    convolutional case); drop-in for ``torch.nn.BatchNorm2d``. Arguments as :class:`BatchNorm1d`.
    """

    _expected_dims = (4,)


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):
    """BN over a 5D ``(N, C, D, H, W)`` input, statistics per channel over N, D, H and W;
    drop-in for ``torch.nn.BatchNorm3d``. Arguments as :class:`BatchNorm1d`.
    """

    _expected_dims = (5,)


TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: torch's BN class -> ours, for :func:`batchnorm.convert` and ``SyncBatchNorm.to_batchnorm``
TORCH_TO_OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}


def __getattr__(name):
    if name == "OURS":  # the old name of TORCH_TO_OURS
        warnings.warn("batchnorm.modules.OURS is deprecated; use TORCH_TO_OURS",
                      DeprecationWarning, stacklevel=2)
        return TORCH_TO_OURS
    raise AttributeError(f"module 'batchnorm.modules' has no attribute {name!r}")
