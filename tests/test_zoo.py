"""convert, fold, recalibrate and quantization on torchvision and timm models (random weights,
small inputs, float64): never a silent change of what the model computes.

Every BN layer gets non-trivial statistics and affine parameters first (an identity BN would
hide a wrong fold). Folding runs both ways of finding the layer order (torch.fx and the
nn.Sequential fallback); conversion is checked in training (outputs and updated running
statistics) and in evaluation, and its state_dict moves both ways.
"""

import copy
import logging
import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import import_timm, import_torchvision

import batchnorm
from batchnorm import folding
from batchnorm.modules import BatchNormBase

IMAGE, VIDEO = (4, 3, 32, 32), (2, 3, 4, 32, 32)

#: name -> (library, constructor arguments, input shape)
MODELS = {
    "tv.resnet18": ("torchvision", "resnet18", IMAGE),
    "tv.mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", IMAGE),
    "tv.efficientnet_b0": ("torchvision", "efficientnet_b0", IMAGE),
    "tv.densenet121": ("torchvision", "densenet121", IMAGE),
    "tv.shufflenet_v2_x0_5": ("torchvision", "shufflenet_v2_x0_5", IMAGE),
    "tv.r3d_18": ("torchvision", "video.r3d_18", VIDEO),
    "timm.resnet18d": ("timm", "resnet18d", IMAGE),
    "timm.ghostnet_050": ("timm", "ghostnet_050", IMAGE),
    "timm.efficientnet_b0": ("timm", "efficientnet_b0", IMAGE),
    "timm.tf_efficientnet_b0": ("timm", "tf_efficientnet_b0", IMAGE),  # Conv2dSame
    "timm.mobilenetv3_small_050": ("timm", "mobilenetv3_small_050", IMAGE),
    "timm.rexnet_100": ("timm", "rexnet_100", IMAGE),
    "timm.regnetx_002": ("timm", "regnetx_002", IMAGE),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model in float64 with randomized BN statistics, and an input for it."""
    library, arch, shape = MODELS[name]
    torch.manual_seed(0)
    if library == "torchvision":
        constructor = import_torchvision().models
        for part in arch.split("."):
            constructor = getattr(constructor, part)
        model = constructor(num_classes=10)
    else:
        model = import_timm().create_model(arch, num_classes=10)
    model = model.double()
    randomize_statistics(model, torch.Generator().manual_seed(1))
    return model, torch.randn(shape, dtype=torch.float64) * 2 + 0.5


def randomize_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters of every BN layer drawn at random."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                dtype = m.running_mean.dtype
                m.running_mean.copy_(torch.randn(n, generator=generator, dtype=dtype) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator, dtype=dtype) * 1.5 + 0.5)
            if m.affine:
                dtype = m.weight.dtype
                m.weight.copy_(torch.rand(n, generator=generator, dtype=dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator, dtype=dtype) * 0.3)


def bn_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _fails_to_trace(*args, **kwargs):
    raise RuntimeError("tracing disabled by the test")


@pytest.mark.parametrize("method", ["torch.fx", "nn.Sequential"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fold_keeps_the_function(name, method, monkeypatch, one_thread, caplog):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    if method == "nn.Sequential":
        monkeypatch.setattr(folding._LeafTracer, "trace", _fails_to_trace)
    with caplog.at_level(logging.ERROR, logger="batchnorm"):
        folded, report = batchnorm.fold(model, report=True)
    assert report.method == method
    assert {bn for _, bn in report.folded} | {bn for bn, _ in report.unfolded} == bn_names(model)
    if method == "torch.fx":  # only DenseNet's BN layers after a concatenation stay
        assert all("the function cat" in reason for _, reason in report.unfolded), report
        assert report.folded
    with torch.no_grad():
        assert rel_err(folded(x), expected) < 1e-12


def test_fold_into_video_convolutions():
    """torchvision's Conv3DNoTemporal (like r3d_18's Conv3DSimple) is a plain Conv3d."""
    video = import_torchvision().models.video.resnet
    torch.manual_seed(0)
    model = nn.Sequential(video.Conv3DNoTemporal(2, 4, 3), nn.BatchNorm3d(4)).double().eval()
    randomize_statistics(model, torch.Generator().manual_seed(2))
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    folded, report = batchnorm.fold(model, report=True)
    assert report.folded == [("0", "1")]
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12


def _outputs_and_statistics(model, x):
    """One training forward (fixed dropout masks), the running statistics it leaves, and an
    evaluation forward."""
    model.train()
    torch.manual_seed(3)
    train = model(x)
    stats = {name: (m.running_mean.clone(), m.running_var.clone())
             for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    model.eval()
    with torch.no_grad():
        return train.detach(), stats, model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_keeps_the_function_in_training_and_evaluation(name, one_thread):
    original, x = build(name)
    converted, report = batchnorm.convert(copy.deepcopy(original), fused=True, report=True)
    assert {n for n, _ in report.converted} | {n for n, _ in report.skipped} == bn_names(original)
    ours = {n for n, m in converted.named_modules() if isinstance(m, BatchNormBase)}
    assert ours == {n for n, _ in report.converted}
    if "mobilenetv3" in name:  # hard-swish is not one of our activations
        assert report.skipped and all("Hardswish" in r for _, r in report.skipped)
    else:
        assert not report.skipped
    assert converted.state_dict().keys() == original.state_dict().keys()
    train, stats, evaluation = _outputs_and_statistics(original, x)
    train2, stats2, evaluation2 = _outputs_and_statistics(converted, x)
    # float64 rounding grows through ~50 normalizations in training mode to ~1e-12
    assert rel_err(train2, train) < 1e-10 and rel_err(evaluation2, evaluation) < 1e-10
    for layer, (mean, var) in stats.items():
        assert rel_err(stats2[layer][0], mean) < 1e-10 and rel_err(stats2[layer][1], var) < 1e-10
    copy.deepcopy(original).load_state_dict(converted.state_dict())
    converted.load_state_dict(original.state_dict())


def test_convert_reports_timm_layers_it_leaves(caplog):
    model, _ = build("timm.efficientnet_b0")
    with caplog.at_level(logging.WARNING, logger="batchnorm"):
        same, report = batchnorm.convert(model, report=True)
    assert same is model and not report.converted and len(report.skipped) == 49
    assert all("BatchNormAct2d" in r and "fused=True" in r for _, r in report.skipped)
    assert "49 BN layer(s) left as they were" in caplog.text
    assert not any(isinstance(m, BatchNormBase) for m in model.modules())


@pytest.mark.parametrize("name", ["tv.resnet18", "timm.efficientnet_b0"])
def test_recalibrate_equals_cumulative_average(name, one_thread):
    """Equal batches: precise BN is torch's cumulative moving average (momentum=None) of the
    batch statistics taken with the rest of the network frozen (eval mode)."""
    model, _ = build(name)
    batchnorm.convert(model, fused=True)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(IMAGE, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(3)]
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = None
                m.reset_running_stats()
                m.train()
        for x in batches:
            reference(x)
    batchnorm.recalibrate(model, batches, progress=False)
    for (name_, m), r in zip(model.named_modules(), reference.modules(), strict=True):
        if isinstance(m, _BatchNorm):
            assert rel_err(m.running_mean, r.running_mean) < 1e-10, name_
            assert rel_err(m.running_var, r.running_var) < 1e-10, name_


def test_quantization_after_convert_to_torch():
    """torch.ao's fuse_modules looks fusers up by exact type, so it refuses ours; converting
    back to torch's BN first (the README's how-to) makes the eager quantization flow work."""
    models = import_torchvision().models.quantization
    torch.manual_seed(0)
    model = batchnorm.convert(models.resnet18(quantize=False, num_classes=10).eval())
    randomize_statistics(model, torch.Generator().manual_seed(5))
    x = torch.randn(IMAGE)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(AssertionError, match="did not find fuser method.*batchnorm"):
        copy.deepcopy(model).fuse_model()
    _, report = batchnorm.convert(model, to="torch", report=True)
    assert len(report.converted) == 20 and not report.skipped
    quantization = torch.ao.quantization
    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated for torchao
        warnings.simplefilter("ignore")
        model.fuse_model()
        with torch.no_grad():
            assert rel_err(model(x), expected) < 1e-5
        model.qconfig = quantization.get_default_qconfig("x86")
        quantization.prepare(model, inplace=True)
        with torch.no_grad():
            model(x)
        quantization.convert(model, inplace=True)
        with torch.no_grad():
            assert rel_err(model(x), expected) < 0.2  # int8


def test_convert_fused_maps_only_exact_activations():
    """timm's BatchNormAct2d becomes ours with activation= only when the activation is one of
    ours exactly, there is no drop layer and no hook on its parts; also when synchronizing."""
    layers = import_timm().layers
    relu_with_hook = layers.BatchNormAct2d(3, act_layer=nn.ReLU)
    relu_with_hook.act.register_forward_hook(lambda module, args, output: output)
    model = nn.Sequential(
        layers.BatchNormAct2d(3, act_layer=nn.LeakyReLU),  # slope 0.01: ours
        layers.BatchNormAct2d(3, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
        layers.BatchNormAct2d(3, act_layer=nn.GELU),
        layers.BatchNormAct2d(3, act_layer=nn.SiLU, drop_layer=nn.Dropout),
        relu_with_hook,
        layers.BatchNormAct2d(3, apply_act=False),
    ).double()
    randomize_statistics(model, torch.Generator().manual_seed(6))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    original = copy.deepcopy(model)
    _, report = batchnorm.convert(model, fused=True, report=True)
    assert [name for name, _ in report.converted] == ["0", "5"]
    assert model[0].activation == "leaky_relu" and model[5].activation is None
    reasons = dict(report.skipped)
    assert "LeakyReLU(negative_slope=0.2" in reasons["1"] and "GELU" in reasons["2"]
    assert "drop layer Dropout" in reasons["3"] and "hooks" in reasons["4"]
    for mode in (True, False):
        model.train(mode), original.train(mode)
        torch.manual_seed(7)
        y = original(x)
        torch.manual_seed(7)
        assert rel_err(model(x), y) < 1e-12
    synced, report = batchnorm.convert(copy.deepcopy(original), sync=True, fused=True,
                                       report=True)
    assert [name for name, _ in report.converted] == ["0", "5"]
    assert synced[0].activation == "leaky_relu"
    assert synced[0].to_batchnorm().activation == "leaky_relu"  # it knows its input rank
    assert type(synced[1]) is layers.BatchNormAct2d


def test_fold_keeps_a_timm_drop_layer_and_activation():
    layers = import_timm().layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(
        4, act_layer=nn.GELU, drop_layer=nn.Dropout)).double().eval()
    randomize_statistics(model, torch.Generator().manual_seed(8))
    folded, report = batchnorm.fold(model, report=True)
    assert report.folded == [("0", "1")]
    assert [type(m) for m in folded[1]] == [nn.Dropout, nn.GELU]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12
