r"""Smoothness of the loss landscape along the gradient (Santurkar et al. 2018, section 3.1).

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018, arXiv 1805.11604), section 3.1 and Figure 4, measure at a training step how the
loss and its gradient change as one moves from the current weights :math:`w` along the
current gradient :math:`g = \nabla \mathcal{L}(w)` (same batch) by a range of step sizes
:math:`\eta`:

- *loss landscape* (Figure 4a): the variation of :math:`\mathcal{L}(w - \eta g)` over the
  range; here ``loss_variation`` :math:`= \max_\eta \mathcal{L}(w - \eta g) - \min_\eta
  \mathcal{L}(w - \eta g)`;
- *gradient predictiveness* (Figure 4b): the :math:`\ell_2` change of the gradient,
  :math:`\lVert \nabla\mathcal{L}(w - \eta g) - \nabla\mathcal{L}(w) \rVert_2`, per
  :math:`\eta` (``grad_change``; smaller means the gradient predicts better what it will be
  after the step);
- *"effective" beta-smoothness* (Figure 4c): the largest change of the gradient per distance
  moved, :math:`\max_\eta \lVert \nabla\mathcal{L}(w - \eta g) - \nabla\mathcal{L}(w)
  \rVert_2 / \lVert \eta g \rVert_2` (``beta``), an estimate of the gradient's Lipschitz
  constant along the trajectory.

The gradient and the moves cover all trainable parameters (or the named ones). The step
sizes are the caller's: the natural range brackets the training learning rate (e.g. 0.25x to
4x of it); every :math:`\eta` must be positive.

Training is not disturbed: all passes run on one deep copy of the model, each from the
model's buffers (BN running statistics) and RNG states at the call, which are restored
afterwards; the original's parameters, buffers, ``.grad`` and optimizer are not touched.

Cost: one deep copy of the model; ``1 + len(step_sizes)`` forward and backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from batchnorm.probes._copies import LossFn, ModelCopy, flat, trainable_names, untouched_rng


@dataclass(frozen=True)
class Smoothness:
    """The landscape along the gradient at one step (float64 norms)."""

    step_sizes: tuple[float, ...]
    loss: float                     # L(w)
    grad_norm: float                # ||g||
    losses: tuple[float, ...]       # L(w - eta g) per eta
    grad_change: tuple[float, ...]  # ||grad L(w - eta g) - g|| per eta
    loss_variation: float           # max - min of losses
    beta: float                     # max over eta of grad_change / (eta ||g||)

    @property
    def max_grad_change(self) -> float:
        return max(self.grad_change)

    def as_dict(self) -> dict:
        return {**asdict(self), "max_grad_change": self.max_grad_change}


def landscape_smoothness(model: nn.Module, loss_fn: LossFn, step_sizes: Sequence[float],
                         params: Iterable[str] | None = None) -> Smoothness:
    """Loss variation, gradient predictiveness and effective beta-smoothness along the
    current gradient (Santurkar et al., section 3.1).

    Args:
        model: the model at the current weights :math:`w`; not modified.
        loss_fn: ``model -> scalar loss`` on the step's batch (called on a copy only).
        step_sizes: the :math:`\\eta` to move by, all > 0.
        params: names of the parameters to move and differentiate (default: all trainable).

    ``beta`` is 0 when the gradient is zero (no move). Cost: a deep copy of the model and
    ``1 + len(step_sizes)`` forward+backward passes.
    """
    etas = tuple(float(s) for s in step_sizes)
    if not etas or not all(math.isfinite(s) and s > 0 for s in etas):
        raise ValueError(f"step_sizes must be a non-empty list of positive numbers, got "
                         f"{list(step_sizes)}")
    names = trainable_names(model) if params is None else list(params)
    known = dict(model.named_parameters())
    unknown = [n for n in names if n not in known or not known[n].requires_grad]
    if unknown or not names:
        raise ValueError(f"params must name trainable parameters of the model; not: {unknown}")
    with untouched_rng(model):
        work = ModelCopy(model, loss_fn)
        shapes = {n: work.params[n] for n in names}
        start = work.initial(names)
        loss0, grads = work.grads(names)
        g = flat(grads, shapes)
        g_norm = float(g.norm())
        losses, changes, betas = [], [], []
        for eta in etas:
            work.set({n: start[n] - eta * grads[n] for n in names if grads[n] is not None})
            loss, moved = work.grads(names)
            change = float((flat(moved, shapes) - g).norm())
            losses.append(loss)
            changes.append(change)
            betas.append(change / (eta * g_norm) if g_norm > 0 else 0.0)
    return Smoothness(etas, loss0, g_norm, tuple(losses), tuple(changes),
                      max(losses) - min(losses), max(betas))
