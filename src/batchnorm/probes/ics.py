r"""Internal covariate shift measured as gradient change (Santurkar et al. 2018, Definition 2.1).

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018, arXiv 1805.11604), section 2 ("Is BatchNorm reducing internal covariate
shift?"), Definition 2.1: for a network with layer parameters
:math:`W_1, \dots, W_k`, the batch :math:`(x^{(t)}, y^{(t)})` of step :math:`t` and the loss
:math:`\mathcal{L}`,

.. math::
    G_{t,i}  &= \nabla_{W_i} \mathcal{L}(W_1^{(t)}, \dots, W_k^{(t)}; x^{(t)}, y^{(t)}) \\
    G'_{t,i} &= \nabla_{W_i} \mathcal{L}(W_1^{(t+1)}, \dots, W_{i-1}^{(t+1)}, W_i^{(t)},
                \dots, W_k^{(t)}; x^{(t)}, y^{(t)})

:math:`G_{t,i}` is the gradient layer :math:`i` receives in the usual simultaneous update;
:math:`G'_{t,i}` is the gradient it would receive if all layers before it had already taken
their step :math:`W^{(t)} \to W^{(t+1)}` (computed from the same batch). The ICS of layer
:math:`i` at step :math:`t` is :math:`\lVert G_{t,i} - G'_{t,i} \rVert_2`; the paper also
plots the cosine of the angle between them (its Figure 3). :func:`gradient_ics` computes both.

Which update: ``update`` says how :math:`W^{(t+1)}` follows from :math:`W^{(t)}` and the
gradient :math:`G_t` of all parameters:

- a float ``lr``: plain SGD, :math:`W^{(t+1)} = W^{(t)} - \mathrm{lr}\, G_t`;
- a ``torch.optim.Optimizer`` (the one that trains ``model``): its exact next step, taken by
  a clone of it (same class, hyperparameters and a deep copy of its state: momentum buffers,
  Adam moments, step counts) on the copy of the model, so the original is not stepped;
- a callable ``update(params, grads) -> new_params`` on ``{name: tensor}`` dicts (names from
  ``model.named_parameters()``); parameters missing from its result keep their value.

Which layers: ``layers`` lists modules (or their names) in the order that defines
"preceding"; a layer's parameters are all parameters of that module (recursively). The
default is every module that owns parameters directly, in registration order: for a
``Sequential`` (or any model whose modules are registered in the order they run) that is the
forward order, with BN's gamma/beta a layer of their own. Give the list explicitly when
registration order differs from the order of computation. Parameters in no listed layer are
never moved when computing :math:`G'` (they keep :math:`W^{(t)}`).

Training is not disturbed: everything runs on one deep copy of the model. Each pass on it
starts from the model's buffers (BN running statistics are updated by the copy's forward
passes and reset before the next; the original's are never written) and from the RNG states
at the call, so dropout masks and the noise of :mod:`batchnorm.probes.noise` are identical in
all passes; afterwards the global generators are restored. Gradients come from
``torch.autograd.grad``: the original's ``.grad`` fields are not read or written. Call the
probe at the chosen steps, before ``optimizer.step()``, with the batch of that step, and with
the model in the mode it trains in (``model.train()``).

Cost: one deep copy of the model (and, for an optimizer ``update``, of its state) plus two
parameter-sized sets (:math:`G_t` and :math:`W^{(t+1)}`); ``1 + (L - 1)`` forward and
backward passes for ``L`` layers (the first layer has no preceding layers: :math:`G' = G`);
one optimizer step on the copy. Hooks registered on the model are deep-copied with it and
run in the probe's passes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from batchnorm.probes._copies import LossFn, ModelCopy, flat, trainable_names, untouched_rng

Update = float | torch.optim.Optimizer | Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor | None]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LayerICS:
    """One layer's gradient change at one step (all norms in float64, l2 over all its
    parameters together). ``cosine`` is NaN when either gradient is zero."""

    layer: str
    l2: float              # ||G - G'||
    cosine: float          # <G, G'> / (||G|| ||G'||)
    grad_norm: float       # ||G||
    grad_norm_after: float  # ||G'||

    def as_dict(self) -> dict:
        return asdict(self)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own trainable parameters directly, in registration order."""
    return [name for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))]


def layer_parameters(model: nn.Module, layers: Sequence[str | nn.Module] | None
                     ) -> dict[str, list[str]]:
    """``{layer name: [parameter names]}`` for the layers (default :func:`default_layers`);
    checks that every layer has trainable parameters and that no parameter is in two."""
    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    if layers is None:
        layers = default_layers(model)
        recurse = False
    else:
        recurse = True
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    result: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in module_names:
                raise ValueError(f"layer {type(layer).__name__} is not a module of the model")
            name, module = module_names[id(layer)], layer
        else:
            try:
                name, module = layer, model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"model has no module {layer!r}") from None
        names = [param_names[id(p)] for p in module.parameters(recurse=recurse)
                 if p.requires_grad]
        if not names:
            raise ValueError(f"layer {name!r} has no trainable parameters")
        for p in names:
            if p in owner:
                raise ValueError(f"parameter {p!r} is in two layers: {owner[p]!r} and {name!r}")
            owner[p] = name
        result[name] = names
    if not result:
        raise ValueError("no layers to measure")
    return result


def next_parameters(model: nn.Module, work: ModelCopy, grads: dict[str, torch.Tensor | None],
                    update: Update) -> dict[str, torch.Tensor]:
    """:math:`W^{(t+1)}` for every trainable parameter, by ``update`` (see the module doc);
    leaves ``work``'s parameters at :math:`W^{(t)}`."""
    names = list(grads)
    current = work.initial(names)
    if isinstance(update, bool):
        raise TypeError("update must be a learning rate, an optimizer or a callable")
    if isinstance(update, (int, float)):
        lr = float(update)
        return {n: current[n] - lr * g if g is not None else current[n]
                for n, g in grads.items()}
    if isinstance(update, torch.optim.Optimizer):
        clone = _clone_optimizer(model, work, update)
        for n, p in work.params.items():
            p.grad = grads.get(n)
        clone.step()
        new = work.initial(names)
        for p in work.params.values():
            p.grad = None
        work.set(current)
        return new
    if callable(update):
        result = update({n: t.clone() for n, t in current.items()}, dict(grads))
        if not isinstance(result, dict):
            raise TypeError(f"update must return a dict {{name: new value}}, got "
                            f"{type(result).__name__}")
        unknown = sorted(set(result) - set(current))
        if unknown:
            raise ValueError(f"update returned unknown or frozen parameters {unknown}")
        new = dict(current)
        for n, value in result.items():
            value = torch.as_tensor(value).to(current[n])
            if value.shape != current[n].shape:
                raise ValueError(f"update: {n!r} has shape {tuple(current[n].shape)}, the "
                                 f"update returned {tuple(value.shape)}")
            new[n] = value
        return new
    raise TypeError(f"update must be a learning rate, an optimizer or a callable, got "
                    f"{type(update).__name__}")


def _clone_optimizer(model: nn.Module, work: ModelCopy,
                     optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            params.append(work.params[names[id(p)]])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    try:
        clone = type(optimizer)(groups, **optimizer.defaults)
    except TypeError as error:
        raise TypeError(f"cannot clone {type(optimizer).__name__} for the probe ({error}); "
                        "pass a callable update instead") from None
    # load_state_dict may keep the very tensors it is given: hand it copies
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return clone


def _compare(layer: str, before: torch.Tensor, after: torch.Tensor) -> LayerICS:
    norm_b, norm_a = float(before.norm()), float(after.norm())
    cosine = (min(1.0, max(-1.0, float(before @ after) / (norm_b * norm_a)))
              if norm_b > 0 and norm_a > 0 else math.nan)
    return LayerICS(layer, float((before - after).norm()), cosine, norm_b, norm_a)


def gradient_ics(model: nn.Module, loss_fn: LossFn, update: Update,
                 layers: Sequence[str | nn.Module] | None = None) -> list[LayerICS]:
    """Santurkar et al.'s ICS (Definition 2.1) of every layer at the current step.

    Args:
        model: the model being trained, at :math:`W^{(t)}`; not modified.
        loss_fn: ``model -> scalar loss`` on the step's batch (see
            :func:`batchnorm.probes.batch_loss`); called on copies only.
        update: the step rule: SGD learning rate, the training optimizer, or a callable
            (module doc).
        layers: modules or module names in forward order (default :func:`default_layers`).

    Returns:
        one :class:`LayerICS` per layer, in the order of ``layers``.

    Cost: a deep copy of the model; ``L`` forward+backward passes for ``L`` layers.
    """
    groups = layer_parameters(model, layers)
    with untouched_rng(model):
        work = ModelCopy(model, loss_fn)
        _, grads = work.grads(trainable_names(model))
        new = next_parameters(model, work, grads, update)
        results: list[LayerICS] = []
        moved: list[str] = []
        for i, (layer, names) in enumerate(groups.items()):
            shapes = {n: work.params[n] for n in names}
            before = flat({n: grads[n] for n in names}, shapes)
            if i == 0:
                after = before
            else:
                work.set({n: new[n] for n in moved})
                _, after_grads = work.grads(names)
                after = flat(after_grads, shapes)
            results.append(_compare(layer, before, after))
            moved = names
    return results
