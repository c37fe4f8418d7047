"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

They subclass torch's classes, so constructor arguments, parameters (``weight``, ``bias``),
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), ``state_dict`` keys,
``reset_parameters`` and ``isinstance(m, torch.nn.BatchNorm2d)`` all stay as in torch; only the
computation is ours (:func:`batchnorm.functional.batch_norm`). Three keyword-only extras:
``activation`` fuses a nonlinearity (and ``forward(x, residual)`` a residual add) into BN,
``backend`` picks the implementation, ``ghost_batch_size`` normalizes virtual batches of that
many samples (Ghost BN, :mod:`batchnorm.ghost`). Those options, the input checks and the
running-average bookkeeping live in :class:`BatchNormBase`, which :class:`batchnorm.SyncBatchNorm`
derives from too.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional
from batchnorm.activations import check_activation, epilogue
from batchnorm.backends import composite
from batchnorm.ghost import check_ghost_batch_size, ghost_batch_sizes, ghost_forward


def statistics_arguments(
    training: bool, track_running_stats: bool, momentum: float | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """``(running_mean, running_var, use_batch_stats, factor)`` for one call, as torch's
    ``_BatchNorm.forward`` decides them; counts the batch in ``num_batches_tracked`` (an empty
    batch too, as torch does). TorchScript compiles it (the scripted layers use it).

    Batch statistics are used in training, or always when no running statistics are kept;
    the running ones are passed (to be updated or used) unless training without tracking.
    ``factor`` is the running-average weight of this batch (``momentum``, or ``1 / batches``
    for a cumulative average when ``momentum`` is None); 0 when nothing is updated.
    """
    factor = 0.0
    if training and track_running_stats:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            if num_batches_tracked is not None:
                factor = 1.0 / float(num_batches_tracked)
        else:
            factor = momentum
    use_batch_stats = training or (running_mean is None and running_var is None)
    if training and not track_running_stats:
        running_mean = None
        running_var = None
    return running_mean, running_var, use_batch_stats, factor


def check_input(input: torch.Tensor, num_features: int, expected_dims: list[int],
                who: str) -> None:
    """The layer's own checks (rank, channels), naming the layer; ``expected_dims`` (a list
    in TorchScript, any sequence in Python) empty: any rank >= 2. TorchScript compiles it."""
    if len(expected_dims) == 0:
        if input.dim() < 2:
            raise ValueError(f"{who}: expected input of rank >= 2 (N, C, ...), got shape "
                             f"{input.shape}")
    elif input.dim() not in expected_dims:
        raise ValueError(f"{who}: expected {' or '.join([f'{d}D' for d in expected_dims])} "
                         f"input, got {input.dim()}D input of shape {input.shape}")
    if input.shape[1] != num_features:
        raise ValueError(
            f"{who}({num_features}): input has {input.shape[1]} channels (dimension 1 of shape "
            f"{input.shape}), expected num_features={num_features}"
        )


class BatchNormBase(_BatchNorm):
    """What every BN layer of ours shares, :class:`batchnorm.SyncBatchNorm` included.

    On top of torch's ``_BatchNorm`` (parameters, buffers, ``state_dict``, every constructor
    argument of torch's): the keyword-only options (a fused ``activation``, the ``backend``,
    ``ghost_batch_size``), the input checks, the running-average factor and the choice of
    statistics, all as ``torch.nn.BatchNorm*d`` decides them. Its :meth:`forward` is the
    single-process computation; ``SyncBatchNorm`` overrides it to pool the statistics over
    processes.

    Tools that trace or compile: under ``torch.fx`` tracing the layer is recorded as one
    ``call_module`` (a leaf, as torch's BN layers are); ``torch.jit.script`` compiles
    :meth:`_scripted_forward`, the same computation in plain ATen operations
    (:mod:`batchnorm.backends.composite`).
    """

    #: the input ranks this layer accepts; empty: any rank >= 2 (a TorchScript constant)
    _expected_dims = ()
    __constants__ = [*_BatchNorm.__constants__, "_expected_dims"]

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
        bias: bool = True, activation: str | None = None, backend: str = "auto",
        ghost_batch_size: int | None = None,
    ):
        check_activation(activation, type(self).__name__)
        if ghost_batch_size is not None:
            check_ghost_batch_size(type(self).__name__, ghost_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.activation = activation
        self.backend = backend
        self.ghost_batch_size = ghost_batch_size

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if self.ghost_batch_size is not None:
            text += f", ghost_batch_size={self.ghost_batch_size}"
        return text

    def _check_input_dim(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a tensor, got "
                            f"{type(input).__name__}")
        check_input(input, self.num_features, self._expected_dims, type(self).__name__)

    def _statistics_arguments(self):
        """:func:`statistics_arguments` of this layer's mode, options and buffers."""
        # Buffers read from their dict once: Module.__getattr__ costs about a microsecond per
        # lookup, which shows next to a small layer's whole forward.
        buffers = self._buffers
        return statistics_arguments(self.training, self.track_running_stats, self.momentum,
                                    buffers["running_mean"], buffers["running_var"],
                                    buffers["num_batches_tracked"])

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
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual)
        return self._python_forward(input, residual)

    @torch.jit.unused
    def _python_forward(self, input, residual):
        if isinstance(input, torch.fx.Proxy):
            return record_as_fx_leaf(self, input, residual)
        if torch._C._get_tracing_state():
            functional.untraced(self._check_input_dim, input)
        else:
            self._check_input_dim(input)
        if self.ghost_batch_size is not None and self._uses_batch_statistics():
            return ghost_forward(self, input, residual)
        return self._local_batch_norm(input, residual, *self._statistics_arguments())

    def _uses_batch_statistics(self) -> bool:
        buffers = self._buffers
        return self.training or (buffers["running_mean"] is None
                                 and buffers["running_var"] is None)

    def _scripted_forward(self, input: torch.Tensor,
                          residual: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` in TorchScript: the same checks, statistics and running averages,
        computed by :func:`batchnorm.backends.composite.batch_norm` (``backend`` is ignored)."""
        check_input(input, self.num_features, list(self._expected_dims), "BatchNorm")
        ghost = self.ghost_batch_size
        if ghost is not None and input.numel() > 0 and (
                self.training or (self.running_mean is None and self.running_var is None)):
            # Ghost BN: each virtual batch counted and averaged in turn, as ghost_forward does
            outputs: list[torch.Tensor] = []
            for part in input.split(ghost_batch_sizes(input.shape[0], ghost)):
                running_mean, running_var, _, factor = statistics_arguments(
                    self.training, self.track_running_stats, self.momentum, self.running_mean,
                    self.running_var, self.num_batches_tracked)
                composite.check_values_per_channel(part, True)
                outputs.append(composite.batch_norm(part, running_mean, running_var, self.weight,
                                                    self.bias, True, factor, self.eps))
            return epilogue(torch.cat(outputs), self.activation, residual)
        running_mean, running_var, use_batch_stats, factor = statistics_arguments(
            self.training, self.track_running_stats, self.momentum, self.running_mean,
            self.running_var, self.num_batches_tracked)
        composite.check_values_per_channel(input, use_batch_stats)
        if input.numel() == 0:
            y = composite.empty_batch(input, self.weight, self.bias)
        else:
            y = composite.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     use_batch_stats, factor, self.eps)
        return epilogue(y, self.activation, residual)


def record_as_fx_leaf(module: nn.Module, input, residual):
    """Record ``module`` as one ``call_module`` node of the graph ``torch.fx`` is tracing (what
    fx does for torch.nn's BN layers): the traced graph then runs the layer itself, with its
    checks and running statistics."""
    tracer = input.tracer
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


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
        bias: with ``affine``, learn beta too; ``False`` keeps only gamma (``bias`` is None),
            as torch's ``bias=False``. Default True.
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
