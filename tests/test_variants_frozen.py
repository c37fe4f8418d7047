"""Frozen BN against the float64 inference map (Algorithm 2 with fixed buffers), torchvision's
FrozenBatchNorm2d conventions, and freeze/unfreeze on whole models."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_variants_common import KINDS, check, make_input, randomize
from torch import nn

import batchnorm
from batchnorm import reference as bn_ref
from batchnorm.variants import (
    BatchRenorm2d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm2d,
    InPlaceABN2d,
    freeze,
    unfreeze,
)
from batchnorm.variants import reference as ref

FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _trained_bn(rank, c, gen, dtype=torch.float64):
    bn = randomize(TORCH[rank](c, dtype=dtype), gen)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(0.2 + torch.rand(c, generator=gen, dtype=torch.float64))
    return bn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_backward_match_reference_in_both_modes(kind, dtype):
    rank, shape = KINDS[kind]
    gen = torch.Generator().manual_seed(len(kind))
    bn = _trained_bn(rank, shape[1], gen, dtype)
    frozen = FROZEN[rank].from_batchnorm(bn)
    buffers = {k: v.clone() for k, v in frozen.state_dict().items()}
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for training in (True, False):
        frozen.train(training)
        x = make_input(kind, gen, dtype).requires_grad_()
        y = frozen(x)
        args = [t.detach().double().numpy() for t in
                (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        check(y, ref.frozen_batch_norm(x.detach().double().numpy(), *args, bn.eps), tol, "y")
        assert y.dtype == dtype and y.stride() == x.stride()
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
        y.backward(dy)
        scale, _ = bn_ref.inference_affine(*args, bn.eps)
        view = (1, -1, *([1] * (x.dim() - 2)))
        check(x.grad, dy.double() * torch.as_tensor(scale).view(view), tol, "dx = scale dy")
        check(y, bn.eval()(x), 1e-13 if dtype == torch.float64 else 1e-5, "== eval BN")
    assert list(frozen.parameters()) == []
    for name, value in frozen.state_dict().items():
        assert torch.equal(value, buffers[name]), f"{name} moved"


def test_torchvision_compatibility():
    """torchvision.ops.FrozenBatchNorm2d: constructor (num_features, eps=1e-5), buffers and
    state_dict keys, num_batches_tracked dropped on load, repr, and y = x * scale + shift with
    scale = w * rsqrt(rv + eps), shift = b - rm * scale."""
    gen = torch.Generator().manual_seed(0)
    bn = _trained_bn(2, 4, gen, torch.float32)
    frozen = FrozenBatchNorm2d(4)
    assert frozen.eps == 1e-5 and repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert [n for n, _ in frozen.named_buffers()] == list(frozen.state_dict())
    frozen.load_state_dict(bn.state_dict())  # strict, with num_batches_tracked in it
    x = torch.randn(3, 4, 5, 5, generator=gen)
    w, b, rm, rv = (bn.state_dict()[k].reshape(1, -1, 1, 1) for k in
                    ("weight", "bias", "running_mean", "running_var"))
    scale = w * (rv + 1e-5).rsqrt()
    assert torch.allclose(frozen(x), x * scale + (b - rm * scale), rtol=1e-6, atol=1e-6)
    FrozenBatchNorm2d(4, eps=0.0)  # torchvision's old default eps=0 is accepted


def test_freeze_and_unfreeze_a_model():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        batchnorm.BatchNorm2d(4, activation="relu", momentum=0.3),
        BatchRenorm2d(4, r_max=2.0, d_max=1.0), InPlaceABN2d(4, negative_slope=0.2),
        GhostBatchNorm2d(4, ghost_batch_size=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
        nn.BatchNorm1d(3, affine=False), nn.Unflatten(1, (3, 1, 1, 1)), nn.BatchNorm3d(3),
    ).double()
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            randomize(m, gen, signed=True)
    classes = [type(m) for m in model]
    model.eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    frozen = freeze(model)
    assert frozen is model
    assert [type(m).__name__ for m in model if isinstance(m, FrozenBatchNorm)] == [
        "FrozenBatchNorm2d"] * 5 + ["FrozenBatchNorm1d", "FrozenBatchNorm3d"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for m in (model[0], model[8]) for p in m.parameters())
    model.train()  # frozen: training mode computes the same map, and nothing moves
    assert rel_err(model(x), expected) < 1e-13
    unfreeze(model)
    restored = [type(m) for m in model]
    assert restored[1] is batchnorm.BatchNorm2d and restored[9] is batchnorm.BatchNorm1d
    assert restored[3:7] == classes[3:7]
    assert model[3].momentum == 0.3 and model[3].activation == "relu"
    assert model[4].r_max == 2.0 and model[5].negative_slope == 0.2
    assert model[6].ghost_batch_size == 2 and not model[9].affine
    assert int(model[4].num_batches_tracked) == 3  # renorm's schedule step survives
    model.eval()
    assert rel_err(model(x), expected) < 1e-13
    assert all(p.requires_grad for p in model[1].parameters())
    single = freeze(nn.BatchNorm2d(3))
    assert isinstance(single, FrozenBatchNorm2d)
    assert isinstance(unfreeze(single), batchnorm.BatchNorm2d)


def test_unfreeze_a_loaded_checkpoint_and_errors():
    gen = torch.Generator().manual_seed(2)
    bn = _trained_bn(2, 4, gen, torch.float32)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    back = unfreeze(nn.Sequential(frozen), momentum=0.05)[0]  # no freeze() record: ours
    assert type(back) is batchnorm.BatchNorm2d and back.momentum == 0.05
    x = torch.randn(2, 4, 3, 3, generator=gen)
    assert rel_err(back.eval()(x), bn.eval()(x)) < 1e-6
    with pytest.raises(ValueError, match=r"freeze: BN layer '1'.*no running statistics"):
        freeze(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match=r"unfreeze: layer 'model'.*not made by freeze"):
        unfreeze(FrozenBatchNorm(4))
    with pytest.raises(ValueError, match=r"expected 4D input, got 2D"):
        FrozenBatchNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"input has 3 channels .* expected num_features=4"):
        FrozenBatchNorm1d(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"activation must be None or one of"):
        FrozenBatchNorm2d(4, activation="gelu")
    with pytest.raises(TypeError, match=r"freeze: model must be a torch.nn.Module"):
        freeze("model")


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    frozen = FrozenBatchNorm2d.from_batchnorm(_trained_bn(2, 3, gen))
    x = make_input("2d", gen).requires_grad_()
    assert torch.autograd.gradcheck(frozen, (x,))
    assert torch.autograd.gradgradcheck(frozen, (x,))


def test_fold_parts_give_the_same_map():
    """What batchnorm.fold needs (see the integration notes): y = act(scale x + shift)."""
    gen = torch.Generator().manual_seed(4)
    bn = batchnorm.BatchNorm2d(3, activation="relu", dtype=torch.float64)
    randomize(bn, gen, signed=True)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    scale, shift, activation = frozen.fold_parts()
    x = make_input("2d", gen)
    y = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    assert activation == "relu" and rel_err(frozen(x), y) < 1e-14
