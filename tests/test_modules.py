"""Our BatchNorm1d/2d/3d against torch.nn's: same outputs, gradients, running statistics."""

import itertools
import random

import pytest
import torch
from conftest import rel_err
from torch import nn

import batchnorm

KINDS = {
    "1d-2D": (batchnorm.BatchNorm1d, nn.BatchNorm1d, (12, 5)),
    "1d-3D": (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 4, 7)),
    "2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)),
    "2d-channels_last": (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 6, 3, 5)),
    "3d": (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 3, 5)),
    "3d-channels_last": (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3)),
}
# (forward rel tol, gradient rel tol) per dtype; bf16 holds ~3 significant digits
TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 2e-5),
              torch.bfloat16: (2e-2, 5e-2)}


def _configs():
    """Every layout x dtype, with affine/track/momentum/mode options spread over them."""
    chooser = random.Random(0)
    configs = []
    for kind, dtype in itertools.product(KINDS, TOLERANCES):
        configs.append(dict(kind=kind, dtype=dtype, affine=chooser.random() < 0.7,
                            track=chooser.random() < 0.7, momentum=chooser.choice([0.1, None]),
                            eval_first=chooser.random() < 0.2))
    # make sure the rarer options are all present at least once
    configs.append(dict(kind="2d", dtype=torch.float64, affine=False, track=False,
                        momentum=None, eval_first=False))
    configs.append(dict(kind="1d-3D", dtype=torch.float32, affine=True, track=True,
                        momentum=None, eval_first=True))
    return configs


CONFIGS = _configs()


def _pair(kind, dtype, affine, track, momentum, seed):
    ours_cls, torch_cls, shape = KINDS[kind]
    torch.manual_seed(seed)
    theirs = torch_cls(shape[1], momentum=momentum, affine=affine,
                       track_running_stats=track).to(dtype)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours = ours_cls(shape[1], momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


def _input(kind, shape, dtype, gen):
    x = (1.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if kind.endswith("channels_last"):
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else
                 torch.channels_last_3d)
    return x


@pytest.mark.parametrize("config", CONFIGS,
                         ids=[f"{c['kind']}-{str(c['dtype'])[6:]}-aff{int(c['affine'])}-"
                              f"track{int(c['track'])}-mom{c['momentum']}" for c in CONFIGS])
def test_matches_torch_over_several_steps(config):
    kind, dtype = config["kind"], config["dtype"]
    fwd_tol, grad_tol = TOLERANCES[dtype]
    ours, theirs, shape = _pair(kind, dtype, config["affine"], config["track"],
                                config["momentum"], seed=len(kind))
    gen = torch.Generator().manual_seed(42)
    modes = [False, True, True, True, False] if config["eval_first"] else [True] * 3 + [False]
    for training in modes:
        ours.train(training)
        theirs.train(training)
        x = _input(kind, shape, dtype, gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert rel_err(ya, yb) < fwd_tol
        assert ya.dtype == yb.dtype and ya.shape == yb.shape
        if kind.endswith("channels_last"):
            assert ya.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                    else torch.channels_last_3d)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        ya.backward(dy)
        yb.backward(dy)
        assert rel_err(xa.grad, xb.grad) < grad_tol
        if config["affine"]:
            assert rel_err(ours.weight.grad, theirs.weight.grad) < grad_tol
            assert rel_err(ours.bias.grad, theirs.bias.grad) < grad_tol
            ours.zero_grad()
            theirs.zero_grad()
        if config["track"]:
            assert rel_err(ours.running_mean, theirs.running_mean) < fwd_tol + 1e-6
            assert rel_err(ours.running_var, theirs.running_var) < fwd_tol + 1e-6
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        else:
            assert ours.running_mean is None and theirs.running_mean is None


def test_same_parameters_buffers_and_state_dict_keys():
    for ours_cls, torch_cls, shape in KINDS.values():
        ours, theirs = ours_cls(shape[1]), torch_cls(shape[1])
        assert isinstance(ours, torch_cls)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
        assert [n for n, _ in ours.named_buffers()] == ["running_mean", "running_var",
                                                         "num_batches_tracked"]


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_round_trip(direction):
    torch.manual_seed(0)
    src_cls, dst_cls = ((nn.BatchNorm2d, batchnorm.BatchNorm2d) if direction == "torch->ours"
                        else (batchnorm.BatchNorm2d, nn.BatchNorm2d))
    src = src_cls(4)
    for _ in range(3):
        src(torch.randn(5, 4, 3, 3) * 3 + 1)
    with torch.no_grad():
        src.weight.uniform_()
        src.bias.normal_()
    dst = dst_cls(4)
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    src.eval()
    dst.eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(src(x), dst(x), rtol=1e-6, atol=1e-6)


def test_cumulative_average_with_momentum_none():
    bn = batchnorm.BatchNorm1d(3, momentum=None).double()
    xs = [torch.randn(10, 3, dtype=torch.float64) * (k + 1) for k in range(4)]
    for x in xs:
        bn(x)
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


def test_activation_and_residual_in_the_module():
    bn = batchnorm.BatchNorm2d(3, activation="relu")
    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = torch.relu(nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True) + z)
    assert torch.allclose(bn(x, z), expected, atol=1e-6)
    assert "activation='relu'" in repr(bn)


@pytest.mark.parametrize("module,x,match", [
    (batchnorm.BatchNorm2d(3), torch.randn(2, 3, 4), "expected 4D input, got 3D"),
    (batchnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 4), "expected 2D or 3D input"),
    (batchnorm.BatchNorm3d(3), torch.randn(2, 3, 4, 4), "expected 5D input"),
    (batchnorm.BatchNorm2d(3), torch.randn(2, 4, 4, 4), "input has 4 channels.*num_features=3"),
    (batchnorm.BatchNorm1d(3), torch.randn(1, 3), "more than 1 value per channel"),
])
def test_module_errors(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation must be None or one of"):
        batchnorm.BatchNorm2d(3, activation="swish")
    with pytest.raises(ValueError, match="momentum must be a number in"):
        batchnorm.BatchNorm2d(3, momentum=2.0)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="eps must be positive"):
        batchnorm.BatchNorm2d(3, eps=0.0)(torch.randn(2, 3, 2, 2))


def test_convert_round_trip_keeps_parameters_mode_and_optimizer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)))
    model[1].eval()
    weight_before = model[1].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.BatchNorm2d and type(model[2][2]) is batchnorm.BatchNorm1d
    assert model[1].weight is weight_before and not model[1].training and model[2][2].training
    loss = model(torch.randn(4, 3, 6, 6)).square().mean()
    loss.backward()
    optimizer.step()  # the optimizer still updates the converted layers' parameters
    assert weight_before.grad is not None
    batchnorm.convert(model, to="torch")
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight_before
    single = batchnorm.convert(nn.BatchNorm3d(2))
    assert type(single) is batchnorm.BatchNorm3d
    with pytest.raises(ValueError, match="to must be"):
        batchnorm.convert(model, to="jax")


def test_convert_to_torch_refuses_to_drop_a_fused_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"))
    with pytest.raises(ValueError, match=r"to='torch'\): BN layer\(s\) 1 fuse an activation"):
        batchnorm.convert(model, to="torch")
    assert type(model[1]) is batchnorm.BatchNorm2d  # nothing was half-converted
