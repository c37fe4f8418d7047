r"""The "noisy BN" intervention: BN followed by time-varying, non-zero-mean, non-unit-variance
noise.

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018, arXiv 1805.11604), section 2, the experiment "Does BatchNorm's performance
stem from controlling internal covariate shift?" (their Figure 2), perturb every activation
of every example after each BN layer with i.i.d. noise from a distribution of non-zero mean
and non-unit variance, and this distribution changes at every training step. The inputs of
the following layers then shift in mean and scale from step to step, by construction, yet
the network trains about as fast as with plain BN: BN's benefit does not come from stable
input distributions.

The noise here. At training step :math:`t`, for each channel (feature) :math:`c`, the
distribution's parameters are drawn afresh,

.. math::
    \mu_{t,c} \sim U(-a, a), \qquad \sigma_{t,c} \sim U(b_0, b_1),

and every element of that channel (each example and, for convolutional maps, each position)
gets its own independent draw :math:`z \sim \mathcal{N}(\mu_{t,c}, \sigma_{t,c}^2)`, added to
BN's output: :math:`y' = \mathrm{BN}(x) + z`. With BN's :math:`\gamma = 1, \beta = 0`, the
channel's input to the next layer then has mean :math:`\mu_{t,c}` and variance
:math:`1 + \sigma_{t,c}^2`, both different at every step. ``mean_range`` is :math:`a`
(default 0.5) and ``std_range`` is :math:`(b_0, b_1)` (default (1, 1.25)); the paper's
appendix gives the ranges it used per experiment, check them there when reproducing a figure
exactly. The noise is applied in training mode only (``eval_noise=True`` keeps it at
evaluation).

Randomness. Each noise module owns a ``seed`` and a step counter ``step`` (both buffers, so
they are in ``state_dict``, and deep copies carry them). The noise of step ``t`` is drawn from
a fresh ``torch.Generator`` seeded by ``(seed, t)``: it is the same whenever step ``t`` is
replayed (on a probe's copy, after resuming from a checkpoint), it never consumes the global
RNG, and every training-mode forward call advances ``step`` by one. Draws differ between CPU
and CUDA generators.

Cost: per forward, two draws of C parameters and one normal draw the size of the activation.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_MASK = (1 << 63) - 1


def _generator_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


class TimeVaryingNoise(nn.Module):
    """Adds :math:`z \\sim \\mathcal{N}(\\mu_{t,c}, \\sigma_{t,c}^2)` per element, with
    :math:`\\mu_{t,c}, \\sigma_{t,c}` redrawn per channel (dimension 1) at every step (module
    doc).

    Args:
        mean_range: a, the means are uniform on (-a, a); a > 0.
        std_range: (b0, b1), the standard deviations are uniform on it; 0 <= b0 <= b1, b1 > 0.
        seed: the noise's own seed (int).
        eval_noise: also add noise in evaluation mode (without advancing ``step``).
    """

    def __init__(self, mean_range: float = 0.5, std_range: tuple[float, float] = (1.0, 1.25),
                 *, seed: int = 0, eval_noise: bool = False):
        super().__init__()
        low, high = (float(v) for v in std_range)
        if not mean_range > 0:
            raise ValueError(f"mean_range must be > 0 (non-zero means), got {mean_range!r}")
        if not (0 <= low <= high and high > 0):
            raise ValueError(f"std_range must be (b0, b1) with 0 <= b0 <= b1 and b1 > 0, got "
                             f"{std_range!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.mean_range = float(mean_range)
        self.std_range = (low, high)
        self.eval_noise = bool(eval_noise)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    def generator(self, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator of ``step``'s noise (fresh, seeded by ``(seed, step)``)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(_generator_seed(int(self.seed), int(step)))
        return generator

    def distribution(self, step: int, channels: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, *,
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)``, each ``(channels,)``: step ``step``'s noise parameters."""
        generator = self.generator(step, device) if generator is None else generator
        u = torch.rand(2, channels, generator=generator, device=device, dtype=dtype)
        low, high = self.std_range
        return self.mean_range * (2 * u[0] - 1), low + (high - low) * u[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.eval_noise):
            return x
        if x.dim() < 2:
            raise ValueError(f"TimeVaryingNoise: input must have a channel dimension 1, got "
                             f"shape {tuple(x.shape)}")
        step = int(self.step)
        generator = self.generator(step, x.device)
        mu, sigma = self.distribution(step, x.shape[1], x.device, x.dtype, generator=generator)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.training:
            self.step.add_(1)
        return x + mu.view(shape) + sigma.view(shape) * z

    def extra_repr(self) -> str:
        return (f"mean_range={self.mean_range}, std_range={self.std_range}, "
                f"seed={int(self.seed)}, eval_noise={self.eval_noise}")


class NoisyBN(nn.Module):
    """``noise(bn(x))``: a BN module followed by :class:`TimeVaryingNoise`. Extra positional
    and keyword arguments of ``forward`` go to ``bn`` (e.g. our BN's ``residual``)."""

    def __init__(self, bn: nn.Module, noise: TimeVaryingNoise):
        super().__init__()
        self.bn = bn
        self.noise = noise

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.noise(self.bn(x, *args, **kwargs))


def add_noise_after_bn(model: nn.Module, mean_range: float = 0.5,
                       std_range: tuple[float, float] = (1.0, 1.25), *, seed: int = 0,
                       eval_noise: bool = False) -> list[str]:
    """Replace, in place, every BN module of ``model`` (torch's ``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, their lazy forms and subclasses, ours included) by :class:`NoisyBN`
    wrapping it. The k-th replaced module (in registration order) gets noise seed
    ``(seed * 1_000_003 + k) mod 2**63``, so the layers' noises are independent. Parameter and
    buffer names gain a ``.bn`` (``bn1.weight`` -> ``bn1.bn.weight``). Returns the names of
    the replaced modules.

    A BN module with a fused ``activation`` would get the noise after its activation, not
    after BN: such modules are refused (split the activation out first).
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, _BatchNorm) and name]
    if isinstance(model, _BatchNorm):
        raise ValueError("add_noise_after_bn: model is itself a BN module; wrap it with "
                         "NoisyBN(model, TimeVaryingNoise(...)) instead")
    for name, module in targets:
        if getattr(module, "activation", None) is not None:
            raise ValueError(f"add_noise_after_bn: {name!r} fuses activation="
                             f"{module.activation!r}; the noise must go between BN and it")
    for k, (name, module) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        noise = TimeVaryingNoise(mean_range, std_range, seed=(seed * 1_000_003 + k) & _MASK,
                                 eval_noise=eval_noise)
        tensors = [*module.parameters(), *module.buffers()]
        if tensors:
            noise.to(device=tensors[0].device)
        setattr(parent, child, NoisyBN(module, noise))
    return [name for name, _ in targets]
