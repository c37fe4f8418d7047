"""What the gradient probes share: a private copy of the model that can be evaluated several
times under identical conditions, and leaves the original (weights, buffers, ``.grad``,
optimizer, random number generators) exactly as it was.

Every pass on the copy starts from the same buffers (BN running statistics, the noise step of
:mod:`batchnorm.probes.noise`, any other registered buffer) and the same random number
generator states, so two passes differ only in the parameter values the probe sets. After the
probe, the global generators are put back to where they were before it, so training draws
the same random numbers as it would have without the probe.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

LossFn = Callable[[nn.Module], torch.Tensor]


def batch_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               inputs: torch.Tensor, targets: torch.Tensor) -> LossFn:
    """The loss closure the probes take: ``model -> criterion(model(inputs), targets)``."""

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return criterion(model(inputs), targets)

    return loss_fn


class ModelCopy:
    """A deep copy of ``model`` with its buffers and the RNG states saved at creation.

    ``grads(names)`` runs ``loss_fn`` on the copy from those saved states and returns
    ``(loss, {name: gradient})``; ``set(values)`` overwrites parameters of the copy.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: model -> scalar loss tensor")
        self.model = copy.deepcopy(model)
        self.loss_fn = loss_fn
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        for p in self.params.values():
            p.grad = None  # the copy's gradients come from autograd.grad, never .grad
        self._buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.devices = sorted({t.device.index or 0 for t in
                               (*self.model.parameters(), *self.model.buffers()) if t.is_cuda})
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = {d: torch.cuda.get_rng_state(d) for d in self.devices}

    def initial(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Detached clones of the named parameters as they are now."""
        return {n: self.params[n].detach().clone() for n in names}

    @torch.no_grad()
    def set(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.params[name].copy_(value)

    @torch.no_grad()
    def _reset(self) -> None:
        for buffer, saved in self._buffers:
            buffer.copy_(saved)
        torch.set_rng_state(self._cpu_rng)
        for device, state in self._cuda_rng.items():
            torch.cuda.set_rng_state(state, device)

    def grads(self, names: Sequence[str]) -> tuple[float, dict[str, torch.Tensor | None]]:
        """One forward and one backward pass: the loss and its gradient with respect to the
        named parameters (``None`` for a parameter the loss does not depend on)."""
        self._reset()
        loss = self.loss_fn(self.model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        wanted = [self.params[n] for n in names]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
        return float(loss.detach()), {n: None if g is None else g.detach()
                                      for n, g in zip(names, grads, strict=True)}

    @torch.no_grad()
    def loss(self) -> float:
        """One forward pass: the loss only."""
        self._reset()
        return float(self.loss_fn(self.model))


@contextmanager
def untouched_rng(model: nn.Module) -> Iterator[None]:
    """Restore the CPU generator and those of the CUDA devices ``model`` lives on on exit."""
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers())
                      if t.is_cuda})
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flat(tensors: dict[str, torch.Tensor | None], like: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate in float64; a missing gradient counts as zeros of its parameter's shape."""
    parts = [(tensors.get(n) if tensors.get(n) is not None else torch.zeros_like(p))
             .reshape(-1).double() for n, p in like.items()]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.to(parts[0].device) for p in parts])
