r"""Frozen BN: BN reduced to its inference map with fixed buffers, for fine-tuning.

.. math::
    y = x \cdot \mathrm{scale} + \mathrm{shift}, \qquad
    \mathrm{scale} = \frac{\mathrm{weight}}{\sqrt{\mathrm{running\_var} + \epsilon}}, \qquad
    \mathrm{shift} = \mathrm{bias} - \mathrm{running\_mean} \cdot \mathrm{scale}

per channel (dimension 1): Algorithm 2's inference transform of Ioffe & Szegedy (2015) with
every number frozen. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are *buffers*:
no parameter is trained and no statistic moves, in train and eval mode alike, while the
gradient still flows to the input (``dx = scale * dy``). Used when fine-tuning with batches too
small for batch statistics (detection and segmentation backbones).

:class:`FrozenBatchNorm2d` is compatible with ``torchvision.ops.FrozenBatchNorm2d``: the same
constructor ``(num_features, eps=1e-5)``, the same four buffers and state_dict keys, and a
``num_batches_tracked`` entry in a loaded state_dict (from a ``BatchNorm2d``) is dropped. Two
differences: the output keeps the input's dtype (scale and shift are cast to it), and an
optional ``activation`` (one of our fused names, or a module) is applied after the map, so that
freezing a BN layer with a fused activation keeps the model's function.

:func:`freeze` turns every BN layer of a model into its frozen form and :func:`unfreeze` back
into a trainable one with the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.backends import fused_candidate
from batchnorm.variants._core import ACTIVATIONS, OURS, BatchNormBase, check_activation, replace


class FrozenBatchNorm(nn.Module):
    """The frozen map over dimension 1 of any ``(N, C, *)`` input (rank >= 2).

    Args:
        num_features: C.
        eps: added to ``running_var``. Default 1e-5 (torchvision's).
        activation: ``None``, one of our fused activation names (``"relu"``, ...) or an
            ``nn.Module`` applied after the map. Holds no state: state_dict keys are unchanged.
    """

    _expected_dims: tuple[int, ...] | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, *, activation=None, device=None,
                 dtype=None):
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"{name}: eps must be a number >= 0, got {eps!r}")
        if not isinstance(activation, nn.Module):
            check_activation(activation, name)
        self.num_features, self.eps, self.activation = num_features, float(eps), activation
        options = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **options))
        self.register_buffer("bias", torch.zeros(num_features, **options))
        self.register_buffer("running_mean", torch.zeros(num_features, **options))
        self.register_buffer("running_var", torch.ones(num_features, **options))
        # where unfreeze() goes back to: (class, constructor keywords, num_batches_tracked)
        self.unfreeze_spec: tuple[type, dict, int] | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision's
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` per channel, in the buffers' dtype."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    @torch.no_grad()
    def fold_parts(self):
        """``(scale, shift, activation)`` with ``y = activation(scale x + shift)``, scale and
        shift in float64 (for :func:`batchnorm.fold`; activation None, a name or a module)."""
        scale = self.weight.double() * torch.rsqrt(self.running_var.double() + self.eps)
        return scale, self.bias.double() - self.running_mean.double() * scale, self.activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a tensor, got {type(input).__name__}")
        dims = self._expected_dims
        if (dims is not None and input.dim() not in dims) or input.dim() < 2:
            wanted = " or ".join(f"{d}D" for d in dims) if dims else "rank >= 2 (N, C, ...)"
            raise ValueError(f"{name}: expected {wanted} input, got {input.dim()}D input of "
                             f"shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{name}({self.num_features}): input has {input.shape[1]} channels "
                             f"(dimension 1 of shape {tuple(input.shape)}), expected "
                             f"num_features={self.num_features}")
        scale, shift = self.scale_shift()
        y = None  # one pass each way in plain eager mode, else what graph tools can see:
        if fused_candidate(input, scale, shift):
            from batchnorm import cpu  # on first use: importing the package loads no backend

            y = cpu.fixed_affine(input, scale, shift)
        if y is None:  # addcmul (it rounds the multiply-add once, the kernel twice)
            view = (1, -1, *([1] * (input.dim() - 2)))
            y = torch.addcmul(shift.to(input.dtype).view(view), input,
                              scale.to(input.dtype).view(view))
        if isinstance(self.activation, str):
            return ACTIVATIONS[self.activation](y)
        return y if self.activation is None else self.activation(y)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        return text + (f", activation={self.activation!r}"
                       if isinstance(self.activation, str) else "")

    @classmethod
    def from_batchnorm(cls, module: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of a BN layer's current inference map (numbers copied, not shared)."""
        if not isinstance(module, _BatchNorm):
            raise TypeError(f"{cls.__name__}.from_batchnorm: module must be a BatchNorm layer, "
                            f"got {type(module).__name__}")
        if module.running_mean is None:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {type(module).__name__} has no running "
                "statistics (track_running_stats=False), so it has no inference map to freeze; "
                "train it with track_running_stats=True (or run batchnorm.recalibrate) first")
        if hasattr(module, "frozen_parts"):  # a variant whose map is not (weight, bias) as is
            weight, bias, activation = module.frozen_parts()
        else:
            weight, bias, activation = module.weight, module.bias, getattr(
                module, "activation", None)
        ref = module.running_mean
        new = cls(module.num_features, module.eps, activation=activation, device=ref.device,
                  dtype=ref.dtype)
        with torch.no_grad():
            for name, value in (("weight", weight), ("bias", bias),
                                ("running_mean", module.running_mean),
                                ("running_var", module.running_var)):
                if value is not None:
                    getattr(new, name).copy_(value)
        return new


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BN over ``(N, C)`` or ``(N, C, L)`` input."""

    _expected_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BN over ``(N, C, H, W)`` input; drop-in for ``torchvision.ops.FrozenBatchNorm2d``
    (see the module docstring)."""

    _expected_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BN over ``(N, C, D, H, W)`` input."""

    _expected_dims = (5,)


_FROZEN_BY_RANK = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d,
                   nn.BatchNorm3d: FrozenBatchNorm3d}
_OURS_BY_FROZEN = {FrozenBatchNorm1d: OURS[nn.BatchNorm1d], FrozenBatchNorm2d: OURS[nn.BatchNorm2d],
                   FrozenBatchNorm3d: OURS[nn.BatchNorm3d]}


def _trainable_class(module: nn.Module) -> type | None:
    """The trainable class a frozen layer of ``module`` goes back to: ours (variants keep their
    class), or the one a synchronized layer was made from."""
    if isinstance(module, BatchNormBase) or hasattr(module, "frozen_parts"):
        return type(module)
    base = next((c for c in _FROZEN_BY_RANK if isinstance(module, c)), None)
    if base is not None:
        return OURS[base]
    return getattr(module, "_batchnorm_class", None)  # our SyncBatchNorm knows its origin


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BN layer of ``model`` (torch's, ours, synchronized, the variants) by its
    frozen form, in place; returns the model (or the replacement if ``model`` is one).

    ``BatchNorm1d/2d/3d`` become :class:`FrozenBatchNorm1d/2d/3d`, a synchronized layer of
    unknown rank the rank-agnostic :class:`FrozenBatchNorm`. Each frozen layer computes the
    layer's inference map (eval mode) exactly, fused activation included, and remembers which
    trainable class it came from for :func:`unfreeze`. The BN parameters leave
    ``model.parameters()``: build the optimizer after freezing. A layer without running
    statistics raises ValueError naming it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    for name, module in targets:
        cls = next((f for b, f in _FROZEN_BY_RANK.items() if isinstance(module, b)), None)
        trainable = _trainable_class(module)
        if cls is None and trainable is not None:
            cls = next((f for b, f in _FROZEN_BY_RANK.items() if issubclass(trainable, b)), None)
        try:
            frozen = (cls or FrozenBatchNorm).from_batchnorm(module)
        except ValueError as error:
            raise ValueError(f"freeze: BN layer {name or 'model'!r}: {error}") from None
        frozen.train(module.training)
        if trainable is not None:
            kwargs = dict(momentum=module.momentum, affine=module.affine)
            if isinstance(module, BatchNormBase):
                kwargs.update(activation=module.activation, backend=module.backend)
                if module.ghost_batch_size is not None:
                    kwargs.update(ghost_batch_size=module.ghost_batch_size)
            if hasattr(module, "variant_kwargs"):
                kwargs.update(module.variant_kwargs())
            frozen.unfreeze_spec = (trainable, kwargs, int(module.num_batches_tracked or 0))
        if not name:
            return frozen
        replace(model, name, frozen)
    return model


def unfreeze(model: nn.Module, *, momentum: float | None = 0.1) -> nn.Module:
    """Replace every :class:`FrozenBatchNorm` of ``model`` by a trainable BN layer with the same
    numbers (weight and bias become new parameters; running statistics are copied), in place.

    A layer made by :func:`freeze` goes back to its class and options (ours for torch's layers);
    others (e.g. loaded from a torchvision checkpoint) become ``batchnorm.BatchNorm1d/2d/3d``
    with the given ``momentum`` and the frozen layer's activation if it is one of our names.
    Build a new optimizer afterwards: the parameters are new objects.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)]
    for name, frozen in targets:
        cls, kwargs, tracked = frozen.unfreeze_spec or (None, {}, 0)
        if cls is None:
            cls = _OURS_BY_FROZEN.get(type(frozen))
            if cls is None or isinstance(frozen.activation, nn.Module):
                raise ValueError(f"unfreeze: layer {name or 'model'!r} ({frozen!r}) was not "
                                 "made by freeze() and its rank or activation has no trainable "
                                 "BatchNorm1d/2d/3d equivalent")
            kwargs = dict(momentum=momentum, activation=frozen.activation)
        ref = frozen.running_mean
        new = cls(frozen.num_features, frozen.eps, device=ref.device, dtype=ref.dtype, **kwargs)
        weight = frozen.weight
        if hasattr(cls, "weight_from_frozen"):
            weight = cls.weight_from_frozen(weight, frozen.eps)
        with torch.no_grad():
            for attr, value in (("weight", weight), ("bias", frozen.bias),
                                ("running_mean", frozen.running_mean),
                                ("running_var", frozen.running_var)):
                if getattr(new, attr) is not None:
                    getattr(new, attr).copy_(value)
            new.num_batches_tracked.fill_(tracked)
        new.train(frozen.training)
        if not name:
            return new
        replace(model, name, new)
    return model
