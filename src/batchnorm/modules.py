"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

They subclass torch's classes, so constructor arguments, parameters (``weight``, ``bias``),
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), ``state_dict`` keys,
``reset_parameters`` and ``isinstance(m, torch.nn.BatchNorm2d)`` all stay as in torch; only the
computation is ours (:func:`batchnorm.functional.batch_norm`). Two keyword-only extras:
``activation`` fuses a nonlinearity (and ``forward(x, residual)`` a residual add) into BN,
``backend`` picks the implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm import functional
from batchnorm.autograd import ACTIVATIONS


class _EpilogueOptions:
    """Our modules' two extras over torch's: a fused ``activation`` and the ``backend``."""

    def _set_epilogue(self, activation: str | None, backend: str) -> None:
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: activation must be None or one of "
                f"{sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = activation
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text


class _BatchNormMixin(_EpilogueOptions):
    """The forward shared by all of our BN modules (mirrors torch's ``_BatchNorm.forward``)."""

    _expected_dims: tuple[int, ...]

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
        activation: str | None = None, backend: str = "auto",
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_epilogue(activation, backend)

    def _check_input_dim(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a tensor, got "
                            f"{type(input).__name__}")
        if input.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {wanted} input, got {input.dim()}D input of "
                f"shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): input has {input.shape[1]} "
                f"channels (dimension 1 of shape {tuple(input.shape)}), expected "
                f"num_features={self.num_features}"
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

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        # Buffers and parameters read from their dicts once: Module.__getattr__ costs about a
        # microsecond per lookup, which shows next to a small layer's whole forward.
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        factor = self._averaging_factor(buffers["num_batches_tracked"])
        # Batch statistics in training, or always when no running statistics are kept.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        update_running = not self.training or self.track_running_stats
        return functional.batch_norm(
            input,
            running_mean if update_running else None,
            running_var if update_running else None,
            params["weight"],
            params["bias"],
            use_batch_stats,
            factor,
            self.eps,
            activation=self.activation,
            residual=residual,
            backend=self.backend,
        )

class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
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


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """BN over a 4D ``(N, C, H, W)`` input, statistics per channel over N, H and W (the paper's
    convolutional case); drop-in for ``torch.nn.BatchNorm2d``. Arguments as :class:`BatchNorm1d`.
    """

    _expected_dims = (4,)


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """BN over a 5D ``(N, C, D, H, W)`` input, statistics per channel over N, D, H and W;
    drop-in for ``torch.nn.BatchNorm3d``. Arguments as :class:`BatchNorm1d`.
    """

    _expected_dims = (5,)


TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
