"""Triton GPU kernels for batch normalization: the ``"triton"`` backend.

The backend seam (:mod:`batchnorm.backends`) imports this package on first use and registers
its :func:`batch_norm` and :func:`supports`; without Triton the import raises ``ImportError``,
which the seam records, and ``backend="auto"`` falls back to ``"torch"``. The package imports
nothing from the layers above it (only :mod:`batchnorm.activations`).

What the kernels do (math in :mod:`.forward` and :mod:`.backward`):

* training forward (statistics with Welford merges in float32, normalize, affine, running
  statistics with the unbiased variance, saved mean / inverse std), eval forward (one
  elementwise pass), backward (two per-channel reductions, then the elementwise ``dx``);
* fused epilogue ``y = act(BN(x) + z)``, ``act`` in relu, leaky_relu, sigmoid, tanh, silu,
  with its backward;
* float32 / float16 / bfloat16 inputs, NC(D)HW-contiguous or channels-last / 2-D layouts
  without layout copies (:mod:`.launch`);
* autograd in eager mode, and ``torch.library`` custom operators with fake implementations
  that ``torch.compile`` traces without graph breaks (:mod:`.ops`);
* :mod:`.compile_check` compiles every kernel variant for a GPU architecture without a GPU.

What they do not do, and the fallback: float64 inputs, non-CUDA tensors (unless
``TRITON_INTERPRET=1``) and double backward. ``supports()`` names the reason, ``backend="auto"``
then uses the ``"torch"`` backend, and an explicit ``backend="triton"`` raises with it.
"""

import triton  # noqa: F401  -- ImportError here is how the seam learns Triton is missing

from batchnorm.kernels.launch import KernelConfig, configure, get_config
from batchnorm.kernels.ops import INTERPRETED, batch_norm, supports

__all__ = ["INTERPRETED", "KernelConfig", "batch_norm", "configure", "get_config", "supports"]
