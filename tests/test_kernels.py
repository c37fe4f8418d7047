"""The Triton kernels (``batchnorm.kernels``, the ``"triton"`` backend) against a float64 oracle.

Without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before Triton is imported, so
the same kernels run on CPU tensors through the Triton interpreter, on tiny shapes with tiny
tiles (so that every loop runs several ragged iterations). With CUDA they run on the GPU with
realistic shapes and the default tiles; tests that only make sense there are marked ``gpu``::

    pytest tests/test_kernels.py            # CPU: interpreter; GPU machine: real kernels
    pytest -m gpu                           # GPU machine: only the GPU-only tests

Every numerical test poisons every buffer the kernels allocate with NaN first, so an element
the kernels forget to write fails the comparison.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import batchnorm  # noqa: E402
import batchnorm.kernels as K  # noqa: E402
from batchnorm import backends, reference  # noqa: E402
from batchnorm.activations import ACTIVATIONS, epilogue  # noqa: E402
from batchnorm.kernels import launch, ops  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and not K.INTERPRETED:
    pytest.skip("the kernels were compiled for the GPU: TRITON_INTERPRET=1 must be set before "
                "Triton is imported (tests/conftest.py does this)", allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"
ROOT = Path(__file__).resolve().parents[1]

# Worst elementwise error allowed, relative to the largest reference magnitude of the tensor
# but at least 1 (the inputs are O(1); dx can be pure cancellation, e.g. with m = 2):
# a few units in the last place of the output dtype (float32 math inside).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name -> (shape, memory format); odd sizes so no dimension is a multiple of a tile
if ON_GPU:
    LAYOUTS = {
        "nchw": ((32, 64, 28, 28), torch.contiguous_format),
        "nhwc": ((32, 64, 28, 28), torch.channels_last),
        "nc": ((4097, 300), torch.contiguous_format),
        "ncl": ((64, 24, 999), torch.contiguous_format),
        "ndhwc": ((4, 16, 8, 15, 17), torch.channels_last_3d),
    }
    TILE = launch.KernelConfig.tile
else:
    LAYOUTS = {
        "nchw": ((3, 5, 7, 9), torch.contiguous_format),
        "nhwc": ((3, 5, 7, 9), torch.channels_last),
        "nc": ((37, 6), torch.contiguous_format),
        "ncl": ((5, 3, 13), torch.contiguous_format),
        "ndhwc": ((2, 3, 3, 4, 5), torch.channels_last_3d),
    }
    TILE = 32
# launch paths: one fused launch per direction, or reductions split across programs
PATHS = {"fused": 1, "split": 3}
if ON_GPU:
    PATHS["auto"] = None  # what the heuristics pick for the shape


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launcher allocates starts as NaN (integers: a huge value)."""

    def empty_strided(shape, stride, dtype, device):
        out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return out.fill_(float("nan") if dtype.is_floating_point else 2**30)

    monkeypatch.setattr(launch, "empty_strided", empty_strided)


@pytest.fixture
def gen():
    return torch.Generator(device=DEVICE).manual_seed(20150211)


def randn(shape, gen, dtype=torch.float32, memory_format=torch.contiguous_format, scale=1.0,
          offset=0.0):
    x = torch.randn(shape, generator=gen, device=DEVICE) * scale + offset
    return x.to(dtype).contiguous(memory_format=memory_format)


def reference_bn(x, weight, bias, residual, activation, training, running_mean, running_var,
                 momentum, eps, dy):
    """float64 oracle: ``y = act(BN(x) + z)``, gradients via float64 autograd, new running stats.

    Inputs are the (possibly rounded) tensors the kernels saw, promoted to float64.
    """

    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    x64, w64, b64, z64 = leaf(x), leaf(weight), leaf(bias), leaf(residual)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x64.mean(dims)
        var = x64.var(dims, correction=0)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if w64 is not None:
        y = y * w64.view(shape)
    if b64 is not None:
        y = y + b64.view(shape)
    y = epilogue(y, activation, z64)
    y.backward(dy.double())
    grads = {name: t.grad for name, t in
             [("x", x64), ("weight", w64), ("bias", b64), ("residual", z64)] if t is not None}
    new_running = None
    if training and running_mean is not None:
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            new_running = (
                (1 - momentum) * running_mean.double() + momentum * mean,
                (1 - momentum) * running_var.double() + momentum * var * m / (m - 1),
            )
    return y.detach(), grads, new_running


def assert_close(actual, expected, tol, what):
    assert actual is not None, f"{what}: missing"
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not actual.isnan().any(), f"{what}: NaN (an element was never written?)"
    scale = float(expected.abs().max().clamp_min(1.0))
    err = float((actual - expected).abs().max()) / scale
    assert err <= tol, f"{what}: max error {err:.3g} x max|ref| > {tol:.3g}"


def run_case(gen, layout, dtype, path, activation, with_residual, training=True,
             param_dtype=torch.float32, affine=True, running=True, momentum=0.1, eps=1e-5,
             needs=("x", "weight", "bias", "residual"), batch_norm=K.batch_norm):
    """Run ``batch_norm`` (by default the backend function) forward and backward once, compare
    the output, the gradients in ``needs`` and the running statistics to float64."""
    shape, memory_format = LAYOUTS[layout] if isinstance(layout, str) else layout
    C = shape[1]
    x = randn(shape, gen, dtype, memory_format, scale=2.0, offset=0.5)
    z = randn(shape, gen, dtype, memory_format) if with_residual else None
    weight = bias = None
    if affine:
        weight = (randn((C,), gen, param_dtype) + 1.0)
        bias = randn((C,), gen, param_dtype)
    running_mean = running_var = None
    if running or not training:
        running_mean = randn((C,), gen)
        running_var = randn((C,), gen).abs() + 0.5
    dy = randn(shape, gen, dtype, memory_format)
    expected_y, expected_grads, expected_running = reference_bn(
        x, weight, bias, z, activation, training, running_mean, running_var, momentum, eps, dy)

    inputs = {"x": x, "weight": weight, "bias": bias, "residual": z}
    leaves = {k: (v.detach().clone().requires_grad_(k in needs) if v is not None else None)
              for k, v in inputs.items()}
    with K.configure(splits=PATHS[path], tile=TILE):
        y = batch_norm(leaves["x"], running_mean, running_var, leaves["weight"],
                       leaves["bias"], training, momentum, eps, activation, leaves["residual"])
        assert y.stride() == x.stride(), "the output must keep the input's memory format"
        assert y.dtype == dtype
        y.backward(dy)
    tol = TOL[dtype]
    assert_close(y, expected_y, tol, "y")
    for name, leaf in leaves.items():
        if leaf is not None and name in needs:
            assert leaf.grad is not None, f"d{name} missing"
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, expected_grads[name], tol, f"d{name}")
    if expected_running is not None:
        assert_close(running_mean, expected_running[0], 2e-6, "running_mean")
        assert_close(running_var, expected_running[1], 2e-6, "running_var")
    return y


# --- correctness --------------------------------------------------------------------------

# each activation and residual setting meets each layout in one of the dtype x path cases
EPILOGUES = [(None, False), ("relu", True), ("silu", True), ("leaky_relu", False),
             ("tanh", True), ("sigmoid", False)]
MATRIX = [
    pytest.param(layout, dtype, path, *EPILOGUES[(i + j + 2 * k) % len(EPILOGUES)],
                 id=f"{layout}-{str(dtype)[6:]}-{path}")
    for i, layout in enumerate(LAYOUTS)
    for j, dtype in enumerate(TOL)
    for k, path in enumerate(PATHS)
]


@pytest.mark.parametrize("layout, dtype, path, activation, with_residual", MATRIX)
def test_training_matches_float64(gen, layout, dtype, path, activation, with_residual):
    # half-precision inputs with float32 parameters (autocast style) and, for bf16, bf16 ones
    param_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    run_case(gen, layout, dtype, path, activation, with_residual, param_dtype=param_dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
@pytest.mark.parametrize("layout, path", [("nchw", "split"), ("nhwc", "fused")])
def test_every_activation(gen, layout, path, activation, with_residual):
    run_case(gen, layout, torch.float32, path, activation, with_residual)


@pytest.mark.parametrize(
    "layout, dtype, path",
    [("nchw", torch.float32, "split"), ("nhwc", torch.bfloat16, "fused"),
     ("nc", torch.float16, "split"), ("ndhwc", torch.float32, "fused")],
)
def test_eval_matches_float64(gen, layout, dtype, path):
    run_case(gen, layout, dtype, path, "silu", True, training=False)


@pytest.mark.parametrize("path", PATHS)
def test_eval_input_gradient_only(gen, path):
    # no parameter gradients wanted in eval: a single elementwise backward pass
    run_case(gen, "nhwc", torch.float32, path, "relu", True, training=False, needs=("x",))


@pytest.mark.parametrize("path", PATHS)
def test_without_affine_or_running_stats(gen, path):
    run_case(gen, "nchw", torch.float32, path, "tanh", True, affine=False, running=False)


@pytest.mark.parametrize("needs", [("weight", "bias"), ("residual",), ("x", "residual")])
def test_partial_gradients(gen, needs):
    run_case(gen, "nchw", torch.float32, "split", "sigmoid", True, needs=needs)
    run_case(gen, "nhwc", torch.float32, "fused", None, True, needs=needs)


@pytest.mark.parametrize(
    "shape, memory_format",
    [((4, 1, 3, 5), torch.contiguous_format),  # C = 1
     ((4, 1, 3, 5), torch.channels_last),
     ((9, 7, 1, 1), torch.contiguous_format),  # a single spatial position
     ((9, 7, 1, 1), torch.channels_last),
     ((2, 3), torch.contiguous_format),  # the smallest batch that has a variance
     ((1, 4, 3, 3), torch.contiguous_format),  # N = 1
     ((5, 70), torch.contiguous_format)],  # more channels than one (M, C) block holds
    ids=["C1", "C1-nhwc", "S1", "S1-nhwc", "2x3", "N1", "C70"],
)
@pytest.mark.parametrize("path", PATHS)
def test_edge_shapes(gen, shape, memory_format, path):
    run_case(gen, (shape, memory_format), torch.float32, path, "relu", True)


def test_mixed_layouts_and_strided_input(gen):
    """A residual / grad in another layout is matched; a strided input is copied once."""
    shape = LAYOUTS["nchw"][0]
    x = randn(shape, gen).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    z = randn(shape, gen)  # NCHW residual for an NHWC input
    dy = randn(shape, gen)
    y = K.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, "relu", z)
    y.backward(dy)
    expected_y, grads, _ = reference_bn(x, None, None, z, "relu", True, None, None, 0.1, 1e-5, dy)
    assert_close(y, expected_y, TOL[torch.float32], "y")
    assert_close(x.grad, grads["x"], TOL[torch.float32], "dx")
    # a transposed view is neither layout
    base = randn((shape[0], shape[2], shape[1], shape[3]), gen)
    xt = base.transpose(1, 2)
    assert launch.layout_of(xt) is None
    y = K.batch_norm(xt, None, None, None, None, True, 0.1, 1e-5, None, None)
    expected_y, _, _ = reference_bn(xt, None, None, None, None, True, None, None, 0.1, 1e-5, dy)
    assert_close(y, expected_y, TOL[torch.float32], "y (strided input)")


def test_running_stats_updates_are_versioned(gen):
    """In-place kernel writes bump the autograd version like aten's (a!) arguments do, so a
    backward that saved the running statistics (eval) refuses stale ones."""
    shape = LAYOUTS["nchw"][0]
    x = randn(shape, gen).requires_grad_(True)
    rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    y = K.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5, None, None)
    version = rm._version
    K.batch_norm(x.detach(), rm, rv, None, None, True, 0.1, 1e-5, None, None)
    assert rm._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_running_stats_in_low_precision(gen):
    """Buffers of a module cast to bfloat16 are read and written in bfloat16."""
    shape = LAYOUTS["nhwc"][0]
    x = randn(shape, gen, torch.bfloat16, torch.channels_last)
    rm = randn((shape[1],), gen).to(torch.bfloat16)
    rv = (randn((shape[1],), gen).abs() + 0.5).to(torch.bfloat16)
    _, _, (mean, var) = reference_bn(x, None, None, None, None, True, rm, rv, 0.1, 1e-5,
                                     torch.zeros_like(x))
    K.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, None, None)
    assert rm.dtype == torch.bfloat16
    assert_close(rm, mean, 8e-3, "running_mean")
    assert_close(rv, var, 8e-3, "running_var")


@pytest.mark.parametrize("path", PATHS)
def test_large_offset(gen, path):
    """1e4 + N(0, 1) in float32: the variance to 1e-4 relative (naive E[x^2]-E[x]^2 fails)."""
    shape = (64, 3, 32, 32) if not ON_GPU else (256, 3, 112, 112)
    x = randn(shape, gen, scale=1.0, offset=1e4)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with K.configure(splits=PATHS[path]):
        y, mean, var = ops.bn_train(x, None, None, None, 1e-5, None)
        K.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, None, None)
    x64 = x.double()
    dims = [0, 2, 3]
    true_var = x64.var(dims, correction=0)
    assert float(((var.double() - true_var) / true_var).abs().max()) < 1e-4
    assert float(((rv.double() - x64.var(dims)) / x64.var(dims)).abs().max()) < 1e-4
    assert float((mean.double() - x64.mean(dims)).abs().max()) < 2e-3  # ~ulp(1e4) = 1e-3
    # y is (x - mu) / sigma: accurate to float32's resolution of x near 1e4, about 1e-3
    expected_y, _, _ = reference_bn(x, None, None, None, None, True, None, None, 0.1, 1e-5,
                                    torch.zeros_like(x))
    assert float((y.double() - expected_y).abs().max()) < 2e-3


def test_agrees_with_numpy_reference(gen):
    """Cross-check with the project's float64 NumPy oracle (Algorithm 1 and its backward)."""
    shape = LAYOUTS["nchw"][0]
    x = randn(shape, gen, scale=3.0)
    gamma, beta, dy = randn((shape[1],), gen), randn((shape[1],), gen), randn(shape, gen)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, gamma, beta))
    y = K.batch_norm(xg, None, None, wg, bg, True, 0.1, 1e-5, None, None)
    y.backward(dy)
    y_ref, cache = reference.batch_norm_forward(x.cpu().numpy(), gamma.cpu().numpy(),
                                                beta.cpu().numpy(), 1e-5)
    grads = reference.batch_norm_backward(dy.cpu().numpy(), cache)
    for actual, expected, name in [(y, y_ref, "y"), (xg.grad, grads.dx, "dx"),
                                   (wg.grad, grads.dgamma, "dgamma"),
                                   (bg.grad, grads.dbeta, "dbeta")]:
        assert_close(actual.cpu(), torch.from_numpy(expected), TOL[torch.float32], name)


# --- integration: backend seam, modules, torch.compile, custom ops -----------------------

@pytest.mark.parametrize(
    "layout, dtype, path, training",
    [("nchw", torch.float32, "split", True), ("nhwc", torch.bfloat16, "fused", True),
     ("nc", torch.float32, "fused", False)],
)
def test_custom_op_path_matches_float64(gen, layout, dtype, path, training):
    """What torch.compile runs: the torch.library operators and their registered autograd."""
    run_case(gen, layout, dtype, path, "silu", True, training=training,
             batch_norm=ops.traced_batch_norm)


def test_registered_backend_and_supports(gen):
    x = randn(LAYOUTS["nchw"][0], gen)
    backend = backends.resolve("triton", x, None, True, "relu", None)
    assert backend.name == "triton" and backend.batch_norm is K.batch_norm
    assert K.supports(x, None, True, "silu", x) is None
    assert "float64" in K.supports(x.double(), None, True, None, None)
    assert "activation" in K.supports(x, None, True, "gelu", None)
    assert "CUDA" in K.supports(torch.empty(2, 3, device="meta"), None, True, None, None)
    assert (K.supports(x.cpu(), None, True, None, None) is None) == K.INTERPRETED
    # "auto" takes the kernels for CUDA tensors only
    assert backends.resolve("auto", x, None, True, None, None).name == (
        "triton" if ON_GPU else "torch")
    with pytest.raises(NotImplementedError, match="float64"):
        batchnorm.batch_norm(x.double(), None, None, training=True, backend="triton")


def test_module_and_functional_route_to_kernels(gen):
    shape = LAYOUTS["nhwc"][0]
    x = randn(shape, gen, memory_format=torch.channels_last)
    z = randn(shape, gen, memory_format=torch.channels_last)
    ours = batchnorm.BatchNorm2d(shape[1], activation="relu", backend="triton").to(DEVICE)
    torch_bn = torch.nn.BatchNorm2d(shape[1]).to(DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.uniform_(-0.5, 0.5, generator=gen)
    torch_bn.load_state_dict(ours.state_dict())
    for training in (True, False):
        ours.train(training)
        torch_bn.train(training)
        for _ in range(2):
            assert_close(ours(x, z), F.relu(torch_bn(x) + z).double(), TOL[torch.float32], "y")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).double(), getattr(torch_bn, name).double(),
                              rtol=1e-5, atol=1e-6), name


def test_torch_compile_fullgraph(gen):
    """The custom ops trace into one graph (forward and backward) and match eager."""
    torch._dynamo.reset()
    shape = LAYOUTS["nhwc"][0]
    x = randn(shape, gen, memory_format=torch.channels_last)
    z, dy = randn(shape, gen), randn(shape, gen)
    models = [batchnorm.BatchNorm2d(shape[1], activation="silu", backend="triton").to(DEVICE)
              for _ in range(2)]
    results = []
    for model, compiled in zip(models, (False, True), strict=True):
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        xg, zg = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
        y = fn(xg, zg)
        y.backward(dy)
        results.append((y, xg.grad, zg.grad, model.weight.grad, model.running_var.clone()))
        model.eval()
        results.append((fn(xg, zg),))
    torch._dynamo.reset()
    for eager, compiled in zip(results[0] + results[1], results[2] + results[3], strict=True):
        assert_close(compiled, eager.double(), 1e-6, "compiled vs eager")


@pytest.mark.gpu
def test_cuda_graph_capture(gen):
    """Forward (with the running-statistics update) and backward replay from a CUDA graph."""
    shape = LAYOUTS["nhwc"][0]
    C = shape[1]
    x = randn(shape, gen, memory_format=torch.channels_last).requires_grad_(True)
    z, dy = randn(shape, gen), randn(shape, gen)
    w, b = randn((C,), gen).requires_grad_(True), randn((C,), gen).requires_grad_(True)
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)

    def step():
        y = K.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, "relu", z)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    with torch.no_grad():
        x.copy_(randn(shape, gen, scale=3.0))
        rm.zero_()
        rv.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    expected_y, grads, (mean, var) = reference_bn(x, w, b, z, "relu", True, torch.zeros_like(rm),
                                                  torch.ones_like(rv), 0.1, 1e-5, dy)
    expected = (expected_y, grads["x"], grads["weight"], grads["bias"])
    for actual, wanted, name in zip(outputs, expected, ("y", "dx", "dw", "db"), strict=True):
        assert_close(actual, wanted, TOL[torch.float32], name)
    assert_close(rm, mean, 2e-6, "running_mean")
    assert_close(rv, var, 2e-6, "running_var")


def test_opcheck_custom_ops(gen):
    shape = LAYOUTS["nchw"][0]
    C = shape[1]
    x, z, dy = randn(shape, gen), randn(shape, gen), randn(shape, gen)
    w = randn((C,), gen).requires_grad_(True)
    b = randn((C,), gen).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    rm, rv = randn((C,), gen), randn((C,), gen).abs() + 0.5
    with K.configure(splits=1):
        torch.library.opcheck(ops.bn_train, (xg, w, b, z, 1e-5, "silu"))
        torch.library.opcheck(ops.bn_train, (x, None, None, None, 1e-5, None))
        torch.library.opcheck(ops.bn_eval, (xg, rm, rv, w, b, z, 1e-5, "tanh"))
        torch.library.opcheck(ops.bn_update_running, (rm, rv, randn((C,), gen), rv.clone(), 0.1, 9))
        _, mean, var = ops.bn_train(x, w.detach(), b.detach(), z, 1e-5, "relu")
        torch.library.opcheck(
            ops.bn_backward,
            (dy, x, w.detach(), b.detach(), z, mean, var, True, 1e-5, "relu",
             True, True, True, True),
        )


@pytest.mark.parametrize("path", ["eager", "traced"])
def test_double_backward_is_refused(gen, path):
    batch_norm = ops.eager_batch_norm if path == "eager" else ops.traced_batch_norm
    x = randn(LAYOUTS["nchw"][0], gen).requires_grad_(True)
    y = batch_norm(x, None, None, None, None, True, 0.1, 1e-5, "tanh", None)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula"):
        (y.sum() + dx.square().sum()).backward()  # e.g. a gradient penalty


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_missing_triton_is_an_import_error():
    """Without Triton the package import fails cleanly and the seam falls back to torch."""
    result = _python(
        "import sys; sys.modules['triton'] = None\n"
        "from batchnorm import backends\n"
        "try:\n    import batchnorm.kernels\nexcept ImportError: pass\n"
        "else: raise SystemExit('imported without triton')\n"
        "assert 'triton' not in backends.available_backends(), backends.available_backends()\n"
        "assert 'triton' in backends._IMPORT_ERRORS\n"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("quick", [pytest.param(True, id="one-variant-per-kernel"),
                                   pytest.param(False, id="all", marks=pytest.mark.slow)])
def test_kernels_compile_for_sm90(quick):
    """The interpreter never lowers the kernels: compile them for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    code = ("from batchnorm.kernels import compile_check as c\n"
            f"raise SystemExit(c.main(['--arch', '90'] + (['--quick'] if {quick} else [])))")
    result = _python(code)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "variants compiled for sm_90" in result.stdout


# --- the benchmark scripts (no GPU here: their --dry-run) ----------------------------------

@pytest.fixture
def bench(monkeypatch):
    """benchmarks/ on sys.path (resnet_step imports kernels); the modules are not left behind."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import importlib

    yield importlib.import_module
    for name in ("kernels", "resnet_step"):
        sys.modules.pop(name, None)


def test_kernel_benchmark_dry_run(bench, tmp_path):
    script = bench("kernels")
    assert script.parse_args([]).shape_list == script.SHAPES
    with pytest.raises(SystemExit):
        script.parse_args(["--dtypes", "float64"])
    argv = ["--dry-run", "--shapes", "32x64x8x8", "--dtypes", "bfloat16", "--layouts", "nhwc",
            "--out", str(tmp_path)]
    assert script.main(argv) == 0
    data = json.loads((tmp_path / "dry-run-cpu.json").read_text())
    measured = {(r["section"], r["mode"], r["impl"]) for r in data["rows"]}
    assert len(measured) == len(script.MODES) * 3 + len(script.EPILOGUES) * 4
    assert all(r["ms"] > 0 and r["pct_floor"] > 0 for r in data["rows"])
    eager = {r["mode"]: r["ms"] for r in data["rows"] if r["impl"] == "eager"}
    for r in data["rows"]:
        if r["section"] == "bn":
            assert r["x_eager"] == pytest.approx(eager[r["mode"]] / r["ms"])
    text = (tmp_path / "dry-run-cpu.md").read_text()
    assert "DRY RUN" in text and "| 32x64x8x8 | bfloat16 | nhwc | fwd_bwd |" in text
    # --merge keeps the earlier rows and replaces re-measured ones
    assert script.main(argv[:-2] + ["--layouts", "nchw", "--no-compile", "--no-fused",
                                    "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "dry-run-cpu.json").read_text())["rows"]
    assert {r["layout"] for r in merged} == {"nchw", "nhwc"}
    assert len(merged) == len(data["rows"]) + len(script.MODES) * 2


def test_resnet_benchmark_dry_run(bench, tmp_path):
    script = bench("resnet_step")
    assert script.main(["--dry-run", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dry-run-cpu-resnet50.json").read_text())["rows"]
    (eager,) = rows
    assert eager["mode"] == "eager" and eager["speedup"] > 0
    # the same weights and batch: in bfloat16 the first losses agree to a few bf16 ulps
    assert eager["ours_first_loss"] == pytest.approx(eager["torch_first_loss"], rel=2e-2)
