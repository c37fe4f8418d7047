"""fold on random small networks built from a menu of layers: the folded network computes what
the original does (float64), and exactly the BN layers the rule allows are folded; every other
one is reported with a reason. Both ways of finding the layer order are driven: torch.fx
tracing and the nn.Sequential fallback (tracing forced to fail).

Each block is ``layer -> BN`` wired in one of several ways; the menu holds the layers fold
knows (exact Linear/Conv1d/2d/3d; grouped, dilated, without bias), the ones it must refuse
(parametrized, weight-standardizing subclass, hooked, transposed, tied weights), BN layers it
knows (torch's, ours with or without a fused activation, torch's SyncBatchNorm, timm's
BatchNormAct2d) and ones it must refuse (an unknown subclass, no running statistics).
"""

import itertools
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zoo import randomize_statistics
from torch import nn
from torch.nn.utils import parametrizations
from zoo import import_timm

import batchnorm
from batchnorm import folding
from batchnorm.activations import ACTIVATIONS

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
TORCH_BNS = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OUR_BNS = {0: batchnorm.BatchNorm1d, 1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d,
           3: batchnorm.BatchNorm3d}
SPATIAL = {0: (), 1: (7,), 2: (5, 5), 3: (3, 4, 4)}


def _standardized(weight):
    flat = weight.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(
        weight)


class WSLinear(nn.Linear):
    """Weight standardization: the forward undoes any per-output scale of the weight."""

    def forward(self, x):
        return F.linear(x, _standardized(self.weight), self.bias)


def _ws_conv(cls):
    return type(f"WS{cls.__name__}", (cls,), {
        "forward": lambda self, x: self._conv_forward(x, _standardized(self.weight), self.bias)})


WS_CONVS = {dim: _ws_conv(cls) for dim, cls in CONVS.items()}


def _scaled_bn(cls):
    """A BN subclass with a forward of its own, which fold does not know."""
    return type(f"Scaled{cls.__name__}", (cls,), {
        "forward": lambda self, x: cls.forward(self, x) * 2.0 + 1.0})


def _scale_output(module, args, output):
    return output * 1.5


def _timm_norm_act():
    try:
        return import_timm().layers.BatchNormAct2d
    except pytest.skip.Exception:
        return None


NORM_ACT = _timm_norm_act()

# layer kind -> whether fold may fold into it
LAYERS = {"plain": True, "grouped": True, "dilated": True, "no_bias": True,
          "spectral_norm": False, "weight_norm": False, "old_weight_norm": False,
          "standardized": False, "hooked": False, "transposed": False, "tied": False}
LINEAR_LAYERS = ("plain", "no_bias", "spectral_norm", "weight_norm", "standardized", "hooked",
                 "tied")
BNS = {"torch": True, "ours": True, "ours_act": True, "torch_sync": True, "timm_act": True,
       "unknown_subclass": False, "no_stats": False}
# wiring -> whether it folds under "torch.fx", "nn.Sequential"
WIRINGS = {"sequential": (True, True), "attributes": (True, False),
           "output_reused": (False, False), "after_relu": (False, False)}


def _layer(kind: str, dim: int, cin: int, cout: int) -> nn.Module:
    if dim == 0:
        layer = (WSLinear if kind == "standardized" else nn.Linear)(cin, cout,
                                                                    bias=kind != "no_bias")
    else:
        cls = {"standardized": WS_CONVS, "transposed": TRANSPOSED}.get(kind, CONVS)[dim]
        options = {"grouped": {"groups": 2}, "dilated": {"dilation": 2, "padding": 2},
                   "no_bias": {"bias": False}}.get(kind, {})
        layer = cls(cin, cout, 3, **{"padding": 1, **options})
    if kind == "spectral_norm":
        layer = parametrizations.spectral_norm(layer)
    elif kind == "weight_norm":
        layer = parametrizations.weight_norm(layer)
    elif kind == "old_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            layer = torch.nn.utils.weight_norm(layer)
    elif kind == "hooked":
        layer.register_forward_hook(_scale_output)
    return layer


def _bn(kind: str, dim: int, features: int, activation: str) -> nn.Module:
    if kind == "torch":
        return TORCH_BNS[dim](features)
    if kind in ("ours", "ours_act"):
        return OUR_BNS[dim](features, activation=activation if kind == "ours_act" else None)
    if kind == "torch_sync":
        return nn.SyncBatchNorm(features)
    if kind == "timm_act":
        act = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}.get(activation, nn.Hardswish)
        return NORM_ACT(features, act_layer=act)
    if kind == "unknown_subclass":
        return _scaled_bn(TORCH_BNS[dim])(features)
    return TORCH_BNS[dim](features, track_running_stats=False)


class Attributes(nn.Module):
    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return self.bn(self.layer(x))


class OutputReused(Attributes):
    def forward(self, x):
        h = self.layer(x)
        return self.bn(h) + h


def _block(wiring: str, layer: nn.Module, bn: nn.Module) -> nn.Module:
    if wiring == "sequential":
        return nn.Sequential(OrderedDict(layer=layer, bn=bn))
    if wiring == "after_relu":
        return nn.Sequential(OrderedDict(layer=layer, act=nn.ReLU(), bn=bn))
    return {"attributes": Attributes, "output_reused": OutputReused}[wiring](layer, bn)


def _menu(dim: int) -> tuple[list[str], list[str]]:
    """The layer kinds and BN kinds that exist for inputs with ``dim`` spatial dimensions."""
    layers = list(LINEAR_LAYERS) if dim == 0 else list(LAYERS)
    bns = [k for k in BNS if not (k == "timm_act" and (dim != 2 or NORM_ACT is None))]
    return layers, bns


def build_network(dim: int, channels: list[int], specs: list[tuple[str, str, str, str]]):
    """``(network, input, {bn name: whether it may fold under fx, under nn.Sequential})`` for
    blocks given as ``(layer kind, BN kind, wiring, activation)``."""
    blocks, expected = [], {}
    for i, (layer_kind, bn_kind, wiring, activation) in enumerate(specs):
        cin, cout = channels[i], channels[i + 1]
        layer = _layer("plain" if layer_kind == "tied" else layer_kind, dim, cin, cout)
        block = _block(wiring, layer, _bn(bn_kind, dim, cout, activation))
        name = f"{i}.bn"
        if layer_kind == "tied":
            block, name = Tied(block, _layer("plain", dim, cin, cout)), f"{i}.block.bn"
        blocks.append(block)
        ok = LAYERS[layer_kind] and BNS[bn_kind] and not (dim == 0 and bn_kind == "torch_sync")
        expected[name] = tuple(ok and path_ok for path_ok in WIRINGS[wiring])
    x = torch.randn(3, channels[0], *SPATIAL[dim], dtype=torch.float64)
    return nn.Sequential(*blocks).double(), x, expected


@st.composite
def networks(draw):
    dim = draw(st.sampled_from([0, 1, 2, 3]))
    depth = draw(st.integers(1, 3))
    channels = [draw(st.sampled_from([2, 4])) for _ in range(depth + 1)]
    layers, bns = _menu(dim)
    specs = []
    for _ in range(depth):
        bn_kind = draw(st.sampled_from(bns))
        activation = draw(st.sampled_from(sorted(ACTIVATIONS) + ["hardswish"]))
        if bn_kind == "ours_act" and activation == "hardswish":
            activation = "relu"
        specs.append((draw(st.sampled_from(layers)), bn_kind, draw(st.sampled_from(list(WIRINGS))),
                      activation))
    return build_network(dim, channels, specs)


class Tied(nn.Module):
    """A block next to a layer of its own, ``twin``, whose weight is the block's layer's."""

    def __init__(self, block, twin):
        super().__init__()
        self.block, self.twin = block, twin
        twin.weight = block.layer.weight

    def forward(self, x):
        return self.block(x) + self.twin(x)


def _fails_to_trace(*args, **kwargs):
    raise RuntimeError("tracing disabled by the test")


def check_fold(network, x, expected, method: str, seed: int) -> None:
    """Fold ``network`` (random BN statistics) finding the order by ``method``: exactly the
    expected BN layers fold, the others are reported, and the function is the same."""
    randomize_statistics(network, torch.Generator().manual_seed(seed))
    network.eval()
    with torch.no_grad():
        expected_output = network(x)  # also recomputes an old-style weight_norm's weight
    with pytest.MonkeyPatch.context() as patch:
        if method == "nn.Sequential":
            patch.setattr(folding._LeafTracer, "trace", _fails_to_trace)
        folded, report = batchnorm.fold(network, report=True)
    assert report.method == method
    folded_bns = {bn for _, bn in report.folded}
    assert folded_bns | {bn for bn, _ in report.unfolded} == set(expected)
    assert all(reason for _, reason in report.unfolded)
    path = 0 if method == "torch.fx" else 1
    assert folded_bns == {bn for bn, ok in expected.items() if ok[path]}, report
    with torch.no_grad():
        assert rel_err(folded(x), expected_output) < 1e-12


@pytest.mark.parametrize("method", ["torch.fx", "nn.Sequential"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=networks(), seed=st.integers(0, 2**16))
def test_fold_is_exact_or_reports(method, case, seed):
    check_fold(*case, method, seed)


@pytest.mark.parametrize("method", ["torch.fx", "nn.Sequential"])
@pytest.mark.parametrize("dim", [0, 2])
def test_every_menu_combination(method, dim):
    """Each (layer, BN, wiring) of the menu once, as a network of one block."""
    layers, bns = _menu(dim)
    activations = itertools.cycle(["relu", "silu", "tanh", "sigmoid", "leaky_relu"])
    for seed, (layer_kind, bn_kind, wiring) in enumerate(
            itertools.product(layers, bns, WIRINGS)):
        spec = (layer_kind, bn_kind, wiring, next(activations))
        check_fold(*build_network(dim, [2, 4], [spec]), method, seed)
