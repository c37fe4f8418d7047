"""Our BN layers and function under PyTorch's tools, each against ``torch.nn`` doing the same.

One test (or parametrized group) per row of the compatibility table: constructor keywords
(``bias=``), empty batches, batched gradients, forward-mode AD, ``torch.func``,
``torch.compile``, ``torch.export``, ``torch.jit.script``; and the tracing tools
(``torch.jit.trace``, ``torch.fx``, ONNX). SyncBatchNorm without a process group is in
``test_distributed.py``. Every row runs on the fused C++ path and on the ATen path (the
kernels disabled, as with ``BATCHNORM_CPU_KERNELS=0``), and on the Triton path (interpreter)
where the kernels can take part. float64 throughout, compared to ``TOL``.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.autograd import forward_ad
from zoo import import_torchvision

import batchnorm
from batchnorm import cpu as cpu_kernels

TOL = 1e-10


@pytest.fixture(params=["fused", "aten"])
def path(request, monkeypatch):
    """The torch backend's CPU path: the fused C++ kernels, or the ATen operations."""
    if request.param == "fused" and cpu_kernels.extension() is None:
        pytest.skip("the fused CPU kernels did not compile here")
    if request.param == "aten":
        monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    return request.param


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


def _models(**bn_kwargs):
    """(ours, torch's): conv -> BN2d -> ReLU -> linear -> BN1d, float64, same state. The conv
    and linear layers have no bias, whose gradient BN makes exactly 0 (cancellation noise)."""
    torch.manual_seed(0)
    theirs = _randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5, bias=False), nn.BatchNorm1d(5, **bn_kwargs)).double())
    return batchnorm.convert(copy.deepcopy(theirs)), theirs


def _x(shape=(6, 3, 6, 6), seed=1, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _assert_same_state(ours: nn.Module, theirs: nn.Module, tol=TOL):
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(their_state)
    for key, value in their_state.items():
        assert rel_err(ours_state[key], value) < tol, key


def _step(model, x, dy_seed=1000):
    """Forward and backward with a fixed random output gradient; (y, dx, parameter grads)."""
    x = x.clone().requires_grad_()
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x, *model.parameters()], dy)
    return y, grads


def _assert_steps_match(ours, theirs, xs, tol=TOL):
    for x in xs:
        (y1, g1), (y2, g2) = _step(ours, x), _step(theirs, x)
        assert rel_err(y1, y2) < tol
        for a, b in zip(g1, g2, strict=True):
            assert rel_err(a, b) < tol
    _assert_same_state(ours, theirs)


# ----------------------------------------------------------------------- constructor keywords

PAIRS = [(batchnorm.BatchNorm1d, nn.BatchNorm1d), (batchnorm.BatchNorm2d, nn.BatchNorm2d),
         (batchnorm.BatchNorm3d, nn.BatchNorm3d), (batchnorm.SyncBatchNorm, nn.SyncBatchNorm)]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__module__.split(".")[0])
def test_every_torch_constructor_keyword_is_ours(ours, theirs):
    """Against the installed torch: a keyword that a new release adds fails here."""
    mine = inspect.signature(ours.__init__).parameters
    for name, param in inspect.signature(theirs.__init__).parameters.items():
        assert name in mine, f"{ours.__name__} lacks torch's keyword {name!r}"
        assert mine[name].kind == param.kind and mine[name].default == param.default, name


@pytest.mark.parametrize("shape,channels_last", [((7, 3), False), ((5, 3, 4), False),
                                                  ((4, 3, 5, 6), True), ((2, 3, 4, 3, 5), False)])
def test_bias_false_matches_torch(path, shape, channels_last):
    ours_cls, torch_cls = PAIRS[max(0, len(shape) - 3)]
    theirs = _randomize(torch_cls(3, bias=False, momentum=None, dtype=torch.float64))
    ours = ours_cls(3, bias=False, momentum=None, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert ours.bias is None and "bias=False" in repr(ours)
    xs = [_x(shape, seed, channels_last) for seed in range(3)]
    _assert_steps_match(ours, theirs, xs)
    _assert_steps_match(ours.eval(), theirs.eval(), xs[:1])


# ------------------------------------------------------------------------------ empty batches

@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_matches_torch(path, shape, backend):
    """Empty output, zero parameter gradients, running statistics untouched, and (as torch
    does) num_batches_tracked counts the batch; SyncBatchNorm without a process group too."""
    if backend == "triton":
        pytest.importorskip("triton")
    for ours_cls, torch_cls in [PAIRS[max(0, len(shape) - 3)], PAIRS[-1]]:
        ours = _randomize(ours_cls(3, backend=backend))
        theirs = _randomize(torch_cls(3))
        for training in (True, False):
            ours.train(training)
            theirs.train(training)
            _assert_steps_match(ours, theirs, [torch.randn(shape)])
            assert int(ours.num_batches_tracked) == 1
            assert torch.equal(ours.running_mean, torch.zeros(3))


# ------------------------------------------------------------------------- batched gradients

def test_batched_gradients_match_torch(path):
    """is_grads_batched, jacobian(vectorize=True) and gradcheck's batched checks, after a plain
    eager forward (the fused path's C++ backward then receives BatchedTensor gradients and
    takes its differentiable ATen form)."""
    x, gen = _x((4, 3, 2, 2)), torch.Generator().manual_seed(3)
    w, b = torch.rand(3, generator=gen, dtype=x.dtype) + 0.5, torch.randn(3, dtype=x.dtype)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def ours(x, w, b):
        return batchnorm.batch_norm(x, None, None, w, b, training=True)

    def theirs(x, w, b):
        return nn.functional.batch_norm(x, None, None, w, b, training=True)

    dys = torch.randn(5, *x.shape, generator=gen, dtype=x.dtype)
    for got, want in zip(torch.autograd.grad(ours(*inputs), inputs, dys, is_grads_batched=True),
                         torch.autograd.grad(theirs(*inputs), inputs, dys,
                                             is_grads_batched=True), strict=True):
        assert rel_err(got, want) < TOL
    jacobians = [torch.autograd.functional.jacobian(f, tuple(inputs), vectorize=True)
                 for f in (ours, theirs)]
    for got, want in zip(*jacobians, strict=True):
        assert rel_err(got, want) < TOL
    assert torch.autograd.gradcheck(ours, tuple(inputs), check_batched_grad=True,
                                    check_forward_ad=True, check_batched_forward_grad=True)


# ------------------------------------------------------------------------- forward-mode AD

def test_forward_mode_ad_matches_torch(path):
    """Tangents through x, gamma and beta with forward_ad (running statistics updated as by
    torch), and torch.func.jvp of the modules."""
    gen = torch.Generator().manual_seed(4)
    x, tx = _x((5, 3, 4)), torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    w, tw, b, tb = (torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(4))
    results = []
    for fn in (batchnorm.batch_norm, nn.functional.batch_norm):
        rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
        with forward_ad.dual_level():
            y = fn(forward_ad.make_dual(x, tx), rm, rv, forward_ad.make_dual(w, tw),
                   forward_ad.make_dual(b, tb), True)
            results.append((*forward_ad.unpack_dual(y), rm, rv))
    for got, want in zip(*results, strict=True):
        assert rel_err(got, want) < TOL
    ours, theirs = _models()
    for model in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(model)
    x = _x()
    primal, tangent = torch.func.jvp(ours, (x,), (x.sin(),))
    expected = torch.func.jvp(theirs, (x,), (x.sin(),))
    assert rel_err(primal, expected[0]) < TOL and rel_err(tangent, expected[1]) < TOL


def test_eval_mode_under_transforms_matches_torch(path):
    """Eval mode (the fused path's one-pass kernel in plain eager mode) under forward-mode AD,
    vmap, grad and batched gradients: the ATen form, and torch's results."""
    ours, theirs = _models()
    for model in (ours, theirs):
        _step(model.train(), _x(seed=5))  # running statistics that are not the defaults
        model.eval()
    _assert_same_state(ours, theirs)
    x, xs = _x(), torch.stack([_x(seed=seed) for seed in range(3)])
    primal, tangent = torch.func.jvp(ours, (x,), (x.sin(),))
    expected = torch.func.jvp(theirs, (x,), (x.sin(),))
    assert rel_err(primal, expected[0]) < TOL and rel_err(tangent, expected[1]) < TOL
    assert rel_err(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs)) < TOL
    grads = [torch.func.grad(lambda x, m=m: m(x).sin().sum())(x) for m in (ours, theirs)]
    assert rel_err(*grads) < TOL
    dys = torch.randn(4, *ours(x).shape, generator=torch.Generator().manual_seed(6),
                      dtype=x.dtype)
    batched = []
    for model in (ours, theirs):
        xg = x.clone().requires_grad_()
        batched.append(torch.autograd.grad(model(xg), xg, dys, is_grads_batched=True)[0])
    assert rel_err(*batched) < TOL
    _assert_same_state(ours, theirs)


# ------------------------------------------------------------------------------- torch.func

def test_torch_func_grad_vmap_and_ensembling_match_torch(path):
    ours, theirs = _models()
    for model in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(model)
    xs = torch.stack([_x(seed=seed) for seed in range(3)])

    def loss(model, params, x):
        return torch.func.functional_call(model, params, (x,)).sin().sum()

    grads = [torch.func.grad(loss, argnums=(1, 2))(m, dict(m.named_parameters()), xs[0])
             for m in (ours, theirs)]
    assert rel_err(grads[0][1], grads[1][1]) < TOL
    for name, value in grads[1][0].items():
        assert rel_err(grads[0][0][name], value) < TOL, name
    assert rel_err(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs)) < TOL
    # model ensembling: three models' stacked parameters, one vmap
    members = [_randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
                          seed).double() for seed in range(3)]
    ensembles = []
    for group in (members, [batchnorm.convert(copy.deepcopy(m)) for m in members]):
        for member in group:
            torch.func.replace_all_batch_norm_modules_(member)
        params, buffers = torch.func.stack_module_state(group)
        base = copy.deepcopy(group[0]).to("meta")
        ensembles.append(torch.func.vmap(
            lambda p, b, x, base=base: torch.func.functional_call(base, (p, b), (x,)),
            in_dims=(0, 0, 0))(params, buffers, xs))
    assert rel_err(*ensembles) < TOL


def test_vmap_over_running_statistics_fails_as_torch(path):
    for cls in (batchnorm.BatchNorm1d, nn.BatchNorm1d):
        with pytest.raises(RuntimeError, match="batched"):
            torch.func.vmap(cls(3))(torch.randn(2, 4, 3))


# -------------------------------------------------------------------- compile, export, script

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_training_matches_torch(path, backend):
    if backend == "inductor" and path == "aten":
        pytest.skip("compiled graphs hold the ATen composite on either path; inductor once")
    ours, theirs = _models(bias=False)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    (y1, g1), (y2, g2) = _step(compiled, _x()), _step(theirs, _x())
    assert rel_err(y1, y2) < TOL and all(rel_err(a, b) < TOL for a, b in zip(g1, g2, strict=True))
    _assert_same_state(ours, theirs)


def test_triton_backend_compiles_and_exports():
    """The Triton kernels' torch.library operators (under the interpreter on the CPU): a
    compiled training step and an exported training graph, with bias=False, match torch."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    x = _x().float()
    ours = batchnorm.BatchNorm2d(3, bias=False, backend="triton")
    theirs = nn.BatchNorm2d(3, bias=False)
    (y1, g1), (y2, g2) = _step(torch.compile(ours, fullgraph=True, backend="aot_eager"),
                               x), _step(theirs, x)
    assert rel_err(y1, y2) < 1e-5 and rel_err(g1[0], g2[0]) < 1e-4
    _assert_same_state(ours, theirs, 1e-5)
    exported = torch.export.export(ours, (x,)).module()
    assert rel_err(exported(x), theirs(x)) < 1e-5
    _assert_same_state(exported, theirs, 1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_export_matches_torch(path, training):
    ours, theirs = _models()
    ours.train(training)
    theirs.train(training)
    exported = torch.export.export(ours, (_x(),)).module()
    expected = torch.export.export(theirs, (_x(),)).module()
    for seed in range(2):
        assert rel_err(exported(_x(seed=seed)), expected(_x(seed=seed))) < TOL
    _assert_same_state(exported, expected)


@pytest.mark.parametrize("training", [True, False])
def test_jit_script_matches_torch_and_saves(training):
    ours, theirs = _models(momentum=None)
    ours.train(training)
    theirs.train(training)
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    _assert_steps_match(loaded, theirs, [_x(seed=seed, channels_last=True) for seed in range(2)])
    # the fused epilogue and residual, and the layer's checks, compiled too
    fused = torch.jit.script(batchnorm.BatchNorm1d(3, activation="silu").double())
    x, z = _x((4, 3)), _x((4, 3), seed=2)
    assert rel_err(fused(x, z), nn.functional.silu(nn.BatchNorm1d(3).double()(x) + z)) < TOL
    with pytest.raises(torch.jit.Error, match="num_features=3"):
        fused(_x((4, 5)))


def test_triton_backend_refuses_transforms_by_name():
    pytest.importorskip("triton")
    x = _x((4, 3)).float()
    with pytest.raises(NotImplementedError, match="torch.func transform"):
        torch.func.jvp(lambda x: batchnorm.batch_norm(x, None, None, training=True,
                                                      backend="triton"), (x,), (x,))
    # backend="auto" falls back to "torch" under the same transform (Triton is for CUDA)
    ours = torch.func.jvp(lambda x: batchnorm.batch_norm(x, None, None, training=True), (x,),
                          (x.sin(),))
    theirs = torch.func.jvp(lambda x: nn.functional.batch_norm(x, None, None, training=True),
                            (x,), (x.sin(),))
    assert rel_err(ours[1], theirs[1]) < 1e-5


def test_jit_script_of_sync_batch_norm_says_what_to_do():
    with pytest.raises(RuntimeError, match="to='batchnorm'"):
        torch.jit.script(nn.Sequential(batchnorm.SyncBatchNorm(3)))


# --------------------------------------------------------------------- tracers and exporters

@pytest.mark.parametrize("training", [True, False])
def test_jit_trace_matches_torch_without_tracer_warnings(path, training):
    ours, theirs = _models()
    ours.train(training)
    theirs.train(training)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(ours, _x(seed=9), check_trace=False)
    theirs(_x(seed=9))  # the forward that tracing ran
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, [str(w.message) for w in tracer_warnings]
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)  # plain ATen operations: the trace can be saved
    _assert_steps_match(traced, theirs, [_x(seed=seed) for seed in range(2)])
    _assert_same_state(ours, theirs)  # the traced module updates the layers' buffers


@pytest.mark.parametrize("training", [True, False])
def test_fx_symbolic_trace_records_leaves_that_match_torch(path, training):
    ours, theirs = _models()
    ours.train(training)
    theirs.train(training)
    graph = torch.fx.symbolic_trace(ours)
    called = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert {"1", "5"} <= called
    _assert_steps_match(graph, theirs, [_x(seed=seed) for seed in range(2)])
    if not training:  # torch.fx's own Conv-BN fusion runs on the traced graph
        from torch.fx.experimental.optimization import fuse
        assert rel_err(fuse(ours)(_x()), theirs(_x())) < TOL


def test_torchvision_feature_extractor_matches_torch(path):
    torchvision = import_torchvision()
    from torchvision.models.feature_extraction import create_feature_extractor
    theirs = _randomize(torchvision.models.resnet18(num_classes=4).double())
    ours = batchnorm.convert(copy.deepcopy(theirs))
    nodes = ["layer1", "layer4.1.bn2"]
    features = [create_feature_extractor(m, nodes)(_x((2, 3, 32, 32))) for m in (ours, theirs)]
    for node in nodes:
        assert rel_err(features[0][node], features[1][node]) < TOL
    _assert_same_state(ours, theirs)


def test_onnx_export_emits_torch_graph(path):
    """Eval-mode export: BN becomes ONNX BatchNormalization and folds into the convolution,
    as for torch.nn (the same operators); onnxruntime reproduces our outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = _x().float()
    graphs, files = [], []
    for model in _models():
        program = torch.onnx.export(model.float().eval(), (x,), dynamo=True, verbose=False)
        graphs.append(sorted(node.op_type for node in program.model_proto.graph.node))
        files.append(io.BytesIO())
        torch.onnx.export(model, (x,), files[-1], dynamo=False)
        legacy = onnx.load_from_string(files[-1].getvalue())
        graphs.append(sorted(node.op_type for node in legacy.graph.node))
    assert "BatchNormalization" not in graphs[0]  # folded, as torch's
    assert graphs[0] == graphs[2] and graphs[1] == graphs[3]
    session = ort.InferenceSession(files[0].getvalue())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ours = _models()[0].float().eval()
    assert rel_err(torch.from_numpy(got), ours(x)) < 1e-5


def test_fx_symbolic_trace_of_the_function(path):
    """A direct call of batchnorm.batch_norm is recorded as one call_function node."""
    def f(x, mean, var, weight):
        return batchnorm.batch_norm(x, mean, var, weight, None, True, 0.3, activation="relu")

    def g(x, mean, var, weight):
        return nn.functional.batch_norm(x, mean, var, weight, None, True, 0.3).relu()

    graph = torch.fx.symbolic_trace(f)
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [
        batchnorm.batch_norm]
    states = [(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
              for _ in range(2)]
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    assert rel_err(graph(_x((4, 3, 2)), *states[0], weight),
                   g(_x((4, 3, 2)), *states[1], weight)) < TOL
    for got, want in zip(*states, strict=True):
        assert rel_err(got, want) < TOL
