"""PyTorch's own BatchNorm tests, taken from the installed torch, run on our layers and function.

What is imported (not copied) from ``torch.testing._internal``:

* the ModuleInfo entries of ``torch.nn.BatchNorm1d/2d/3d`` in ``common_modules.module_db``:
  their constructor and forward inputs (affine or not, no running statistics, cumulative
  average, ``bias=False``, zero batch, ...), error inputs and flags, for our BatchNorm1d/2d/3d;
* the OpInfo ``nn.functional.batch_norm`` in ``common_methods_invocations.op_db``: its sample
  inputs and autograd flags, for :func:`batchnorm.batch_norm`;
* torch's test-suite ``gradcheck``/``gradgradcheck`` wrappers (batched checks on by default).

They are driven the way ``test_modules.py`` (forward, factory kwargs, repr, pickle,
non-contiguous inputs, grad, gradgrad, memory format, train/eval, errors, state_dict) and
``test_ops_gradients.py``/``test_ops_fwd_gradients.py`` (fn_grad, fn_gradgrad,
fn_fwgrad_bwgrad, forward_mode_AD) drive them, on the CPU in float32 and float64 (gradients in
float64, as there). Each instance runs torch's class or function first: what fails with torch
is skipped (not ours to match); ours must then pass, and where a check yields values (outputs,
gradients, running statistics) they must equal torch's.

Deliberate differences (:data:`DIFFERENCES`): samples we refuse on purpose, each asserted to
raise our error instead.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

import batchnorm
from batchnorm import cpu as cpu_kernels
from batchnorm.modules import TORCH_TO_OURS

MODULE_INFOS = [info for info in module_db if info.module_cls in TORCH_TO_OURS]
OP_INFOS = [op for op in op_db
            if op.name == "nn.functional.batch_norm" and op.supported_dtypes("cpu")]

def _momentum_outside_unit_interval(sample) -> bool:
    kwargs = sample.kwargs
    return (kwargs.get("training", False) and sample.args[0] is not None
            and not 0.0 <= kwargs.get("momentum", 0.1) <= 1.0)


#: (predicate on an op_db sample, the error we raise, why). Torch accepts these; we refuse.
DIFFERENCES = [
    (_momentum_outside_unit_interval, "momentum must be a number in \\[0, 1\\]",
     "a training call that updates running statistics with momentum outside [0, 1] "
     "extrapolates instead of averaging (momentum -1 doubles the old value and subtracts the "
     "batch's: the running variance can turn negative); it is a bug, most often a Keras-style "
     "momentum or arguments in the wrong order, so we name it instead of running it"),
]


def _differs(sample):
    return next((d for d in DIFFERENCES if d[0](sample)), None)


def _close(got, expected):
    """torch's comparison; half-precision outputs may differ by a unit in the last place (both
    compute in float32 and round, in different orders)."""
    if isinstance(expected, str):
        assert got == expected
        return
    loose = {}
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(expected)):
        loose = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, expected, equal_nan=True, **loose)


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------- module_db driver

def _inputs(info, dtype, training, requires_grad=False):
    torch.manual_seed(0)  # the same inputs for torch's class and ours
    return list(info.module_inputs_func(info, device="cpu", dtype=dtype,
                                        requires_grad=requires_grad, training=training))


def _build(cls, module_input, dtype, training):
    torch.manual_seed(0)
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    module = cls(*args, **kwargs).to(dtype).train(training)
    with torch.no_grad():  # non-trivial parameters and statistics, the same for both classes
        gen = torch.Generator().manual_seed(1)
        for tensor in (*module.parameters(), module.running_mean):
            if tensor is not None:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return module


def _forward(module, module_input, transform=lambda t: t):
    args = [transform(a) if isinstance(a, torch.Tensor) else a
            for a in module_input.forward_input.args]
    return module(*args, **module_input.forward_input.kwargs)


def _buffers(module):
    return [b.clone() for b in module.buffers()]


def check_forward(cls, info, dtype, training):
    results = []
    for module_input in _inputs(info, dtype, training):
        module = _build(cls, module_input, dtype, training)
        results.append((_forward(module, module_input), _buffers(module)))
    return results


def check_factory_kwargs(cls, info, dtype, training):
    for module_input in _inputs(info, dtype, training):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        module = cls(*args, **kwargs, device="cpu", dtype=dtype)
        for tensor in (*module.parameters(), *module.buffers()):
            assert tensor.device.type == "cpu"
            assert tensor.dtype == dtype or not tensor.dtype.is_floating_point


def check_repr(cls, info, dtype, training):
    return "\n".join(repr(_build(cls, m, dtype, training)) for m in _inputs(info, dtype, training))


def check_pickle(cls, info, dtype, training):
    results = []
    for module_input in _inputs(info, dtype, training):
        module = _build(cls, module_input, dtype, training)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        _close(_forward(loaded, module_input), _forward(module, module_input))
        results.append(_buffers(loaded))
    return results


def _outputs_and_grads(module, module_input, transform):
    x = _forward(module, module_input, transform)
    inputs = [a for a in module_input.forward_input.args if isinstance(a, torch.Tensor)]
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(x.sum() + (x * x).sum(), inputs + params, allow_unused=True)
    return x, grads


def _non_contiguous(t):
    copy_ = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    return copy_.requires_grad_(t.requires_grad)


def check_non_contiguous(cls, info, dtype, training):
    results = []
    for module_input in _inputs(info, dtype, training, requires_grad=True):
        if not all(a.numel() for a in module_input.forward_input.args):
            continue
        expected = _outputs_and_grads(_build(cls, module_input, dtype, training), module_input,
                                      lambda t: t)
        got = _outputs_and_grads(_build(cls, module_input, dtype, training), module_input,
                                 _non_contiguous)
        _close(got[0], expected[0])
        results.append(got[0])
    return results


def check_memory_format(cls, info, dtype, training):
    results = []
    for module_input in _inputs(info, dtype, training):
        x = module_input.forward_input.args[0]
        if x.dim() not in (4, 5) or x.numel() == 0:
            continue
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        expected = _forward(_build(cls, module_input, dtype, training), module_input)
        module = _build(cls, module_input, dtype, training).to(memory_format=fmt)
        got = _forward(module, module_input, lambda t, fmt=fmt: t.to(memory_format=fmt))
        assert got.is_contiguous(memory_format=fmt)
        _close(got, expected)
        results.append(got)
    return results


def check_train_and_eval_differ(cls, info, dtype, training):
    differ = []
    for module_input in _inputs(info, dtype, training):
        module = _build(cls, module_input, dtype, training)
        outputs = [_forward(copy.deepcopy(module).train(mode), module_input)
                   for mode in (True, False)]
        differ.append(not torch.equal(*outputs))
    assert any(differ) == info.train_and_eval_differ
    return differ


def check_state_dict(cls, info, dtype, training):
    for module_input in _inputs(info, dtype, training):
        module = _build(cls, module_input, dtype, training)
        other = cls(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
        other.to(dtype).load_state_dict(module.state_dict())
        _close(_forward(other.train(training), module_input), _forward(module, module_input))


def check_errors(cls, info, dtype, training):
    for error_input in info.module_error_inputs_func(info, device="cpu", dtype=dtype,
                                                     requires_grad=False, training=training):
        assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            _forward(_build(cls, error_input.module_error_input, dtype, training),
                     error_input.module_error_input)


def _gradient_check(check, cls, info, dtype, training):
    for module_input in _inputs(info, dtype, training, requires_grad=True):
        module = _build(cls, module_input, dtype, training)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        args = [a for a in module_input.forward_input.args if isinstance(a, torch.Tensor)]

        def fn(*flat, module=module, names=names, args=args):
            params = dict(zip(names, flat[len(args):], strict=True))
            return torch.func.functional_call(module, params, tuple(flat[:len(args)]))

        flat = (*args, *(p.detach().requires_grad_() for p in module.parameters()))
        assert check(fn, flat, nondet_tol=info.gradcheck_nondet_tol,
                     fast_mode=info.gradcheck_fast_mode)


def check_grad(cls, info, dtype, training):
    _gradient_check(gradcheck, cls, info, dtype, training)


def check_gradgrad(cls, info, dtype, training):
    _gradient_check(gradgradcheck, cls, info, dtype, training)


ALL = (torch.float32, torch.float64)
MODULE_CHECKS = {  # name -> (check, dtypes)
    "forward": (check_forward, ALL), "factory_kwargs": (check_factory_kwargs, ALL),
    "repr": (check_repr, (torch.float32,)), "pickle": (check_pickle, ALL),
    "non_contiguous": (check_non_contiguous, ALL), "memory_format": (check_memory_format, ALL),
    "train_and_eval_differ": (check_train_and_eval_differ, (torch.float32,)),
    "state_dict": (check_state_dict, ALL), "errors": (check_errors, ALL),
    "grad": (check_grad, (torch.float64,)), "gradgrad": (check_gradgrad, (torch.float64,)),
}
MODULE_CASES = [
    pytest.param(info, name, dtype, training,
                 id=f"{info.module_cls.__name__}-{name}-{str(dtype)[6:]}-"
                    f"{'train' if training else 'eval'}")
    for info in MODULE_INFOS for name, (_, dtypes) in MODULE_CHECKS.items()
    for dtype in dtypes for training in (True, False)
]


@pytest.mark.parametrize("info,name,dtype,training", MODULE_CASES)
def test_module_db(info, name, dtype, training):
    check = MODULE_CHECKS[name][0]
    try:
        expected = check(info.module_cls, info, dtype, training)
    except Exception as error:  # noqa: BLE001 -- any failure of torch's: not ours to match
        pytest.skip(f"fails with torch.nn too: {type(error).__name__}: {error}")
    got = check(TORCH_TO_OURS[info.module_cls], info, dtype, training)
    if expected is not None:
        _close(got, expected)


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda i: i.module_cls.__name__)
def test_module_db_grad_on_the_aten_path(info, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    for training in (True, False):
        check_grad(TORCH_TO_OURS[info.module_cls], info, torch.float64, training)


# ----------------------------------------------------------------------------- op_db driver

def _samples(op, dtype, requires_grad):
    torch.manual_seed(0)
    return list(op.sample_inputs("cpu", dtype, requires_grad=requires_grad))


def _call(fn, sample):
    return fn(sample.input, *sample.args, **sample.kwargs)


def op_forward(fn, op, dtype):
    results = []
    for sample in _samples(op, dtype, requires_grad=False):
        if _differs(sample):  # see test_deliberate_differences_raise_our_error
            continue
        results.append((_call(fn, sample), [a for a in sample.args if a is not None]))
    return results


def _op_gradient_check(fn, op, check, **flags):
    for sample in _samples(op, torch.float64, requires_grad=True):
        if _differs(sample):
            continue
        tensors = [sample.input, *sample.args]
        wanted = [i for i, t in enumerate(tensors) if t is not None and t.requires_grad]

        def f(*grads, tensors=tensors, wanted=wanted, sample=sample):
            args = list(tensors)
            for i, t in zip(wanted, grads, strict=True):
                args[i] = t
            return fn(args[0], *args[1:], **sample.kwargs)

        assert check(f, tuple(tensors[i] for i in wanted), **flags)


OP_CHECKS = {  # name -> (check, flags from the OpInfo)
    "fn_grad": (gradcheck, lambda op: dict(check_batched_grad=op.check_batched_grad)),
    "fn_gradgrad": (gradgradcheck,
                    lambda op: dict(check_batched_grad=op.check_batched_gradgrad)),
    "fn_fwgrad_bwgrad": (gradgradcheck, lambda op: dict(
        check_fwd_over_rev=True, check_rev_over_rev=False, check_batched_grad=False,
        check_undefined_grad=False)),
    "forward_mode_AD": (gradcheck, lambda op: dict(
        check_forward_ad=True, check_backward_ad=False, check_batched_grad=False,
        check_undefined_grad=False, check_batched_forward_grad=op.check_batched_forward_grad)),
}
OP_CASES = [pytest.param(op, name, id=f"{op.variant_test_name or 'default'}-{name}")
            for op in OP_INFOS for name in ("forward", *OP_CHECKS)]


@pytest.mark.parametrize("op,name", OP_CASES)
def test_op_db(op, name):
    def run(fn):
        if name == "forward":
            return [op_forward(fn, op, dtype) for dtype in op.supported_dtypes("cpu")]
        check, flags = OP_CHECKS[name]
        return _op_gradient_check(fn, op, check, **flags(op))

    try:
        expected = run(op.op)
    except Exception as error:  # noqa: BLE001 -- any failure of torch's: not ours to match
        pytest.skip(f"fails with torch too: {type(error).__name__}: {error}")
    got = run(batchnorm.batch_norm)
    if expected is not None:
        _close(got, expected)


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d[0].__name__)
def test_deliberate_differences_raise_our_error(difference):
    predicate, message, _why = difference
    samples = [s for op in OP_INFOS for s in _samples(op, torch.float64, False) if predicate(s)]
    assert samples, "the difference no longer matches any sample of torch's suite"
    for sample in samples:
        with pytest.raises(ValueError, match=message):
            _call(batchnorm.batch_norm, sample)
