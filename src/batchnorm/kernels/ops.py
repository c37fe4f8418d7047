"""Autograd and ``torch.compile`` integration of the kernels; the ``"triton"`` backend function.

Two entry paths share the launch code (:mod:`.launch`) and the backward logic:

Eager: ``torch.autograd.Function`` subclasses calling the launches directly. The
    ``torch.library`` dispatch layers cost tens of microseconds of host time per call, which is
    the whole budget of a small BN; and here the forward may update the running statistics
    inside the kernel that finishes the batch statistics (one launch for a small tensor).
Traced (``torch.compiler.is_compiling()``): ``torch.library`` custom operators in the
    ``batchnorm`` namespace, each with a fake (meta) implementation so ``torch.compile``
    traces them without graph breaks:

    ``triton_bn_train(x, weight?, bias?, residual?, eps, activation?) -> (y, mean, var)``
        training forward; ``mean``/``var`` are the float32 batch statistics (biased
        variance) that the backward needs; not differentiable.
    ``triton_bn_update_running(running_mean!, running_var!, mean, var, momentum, count)``
        the in-place running-statistics update. A separate operator because
        ``torch.library`` refuses autograd formulas on operators that mutate inputs.
    ``triton_bn_eval(x, running_mean, running_var, weight?, bias?, residual?, eps,
    activation?) -> y``
    ``triton_bn_backward(...) -> (dx, dweight, dbias, dresidual)``: both backwards; a
        gradient that was not requested comes back as an empty tensor.

Both paths are CUDA-graph safe: no host synchronization, allocations through the caching
allocator, launches on the current stream. First derivatives only: double backward raises
(use ``backend="torch"``).
"""

import os

import torch
import triton

from batchnorm.activations import check_activation
from batchnorm.kernels import launch
from batchnorm.kernels.forward import bn_fwd_fused_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton decides at import time whether @triton.jit compiles for the GPU or interprets on CPU.
INTERPRETED = not isinstance(bn_fwd_fused_kernel, triton.runtime.jit.JITFunction)


# --- shared autograd pieces ------------------------------------------------------------------

def _save(ctx, x, weight, bias, residual, mean, var, eps, activation):
    """Keep what the backward kernels read: ``mean``/``var`` are the float32 batch statistics
    (training) or the running ones (eval), the statistics the forward normalized with."""
    ctx.eps, ctx.activation = eps, activation
    # z only shapes the backward through an activation; do not keep it alive otherwise
    ctx.save_for_backward(x, weight, bias, residual if activation else None, mean, var)


def _grads(ctx, dy, training, needs, backward_fn):
    """``(dx, dweight, dbias, dresidual)`` with None for what ``needs`` does not ask for.

    ``needs``: whether ``(x, weight, bias, residual)`` each want a gradient; ``backward_fn``:
    :func:`launch.backward` (eager) or the ``triton_bn_backward`` operator (traced), which take
    the same arguments.
    """
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    need_x, need_w, need_b, need_z = needs
    dx, dw, db, dz = backward_fn(dy, x, weight, bias, residual, mean, var, training, ctx.eps,
                                 ctx.activation, need_x, need_w, need_b, need_z)
    if need_z and ctx.activation is None:
        dz = dy  # y = BN(x) + z: the residual's gradient is dy itself, no copy
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            dz if need_z else None)


# --- eager path ------------------------------------------------------------------------------

class _TrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps,
                activation):
        y, mean, var = launch.forward_train(x, weight, bias, residual, eps, activation,
                                            running_mean, running_var, momentum)
        if running_mean is not None:
            # written through raw pointers: tell autograd, as aten does for its Tensor(a!) args
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        _save(ctx, x, weight, bias, residual, mean, var, eps, activation)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        grads = _grads(ctx, dy, True, ctx.needs_input_grad[:4], launch.backward)
        return (*grads, None, None, None, None, None)


class _EvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation):
        y = launch.forward_eval(x, running_mean, running_var, weight, bias, residual, eps,
                                activation)
        _save(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        grads = _grads(ctx, dy, False, ctx.needs_input_grad[:4], launch.backward)
        return (*grads, None, None, None, None)


# --- traced path: torch.library custom operators ---------------------------------------------

def _empty(x: torch.Tensor, n: int = 0, dtype=None) -> torch.Tensor:
    return x.new_empty((n,), dtype=dtype or x.dtype)


def _like_output(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.new_empty_strided(x.shape, launch.output_strides(x), dtype=dtype or x.dtype)


@torch.library.custom_op(
    "batchnorm::triton_bn_train",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
    "str? activation) -> (Tensor, Tensor, Tensor)",
)
def bn_train(x, weight, bias, residual, eps, activation):
    return launch.forward_train(x, weight, bias, residual, eps, activation)


@bn_train.register_fake
def _bn_train_fake(x, weight, bias, residual, eps, activation):
    c = x.shape[1]
    return _like_output(x), _empty(x, c, torch.float32), _empty(x, c, torch.float32)


def _bn_train_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, activation = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    _save(ctx, x, weight, bias, residual, mean, var, eps, activation)


def _bn_train_backward(ctx, dy, _dmean, _dvar):
    grads = _grads(ctx, dy, True, ctx.needs_input_grad[:4], _backward_op)
    return (*grads, None, None)


torch.library.register_autograd(
    "batchnorm::triton_bn_train", _bn_train_backward, setup_context=_bn_train_setup
)


@torch.library.custom_op(
    "batchnorm::triton_bn_update_running",
    mutates_args=("running_mean", "running_var"),
    schema="(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
    "float momentum, int count) -> ()",
)
def bn_update_running(running_mean, running_var, mean, var, momentum, count):
    launch.update_running_stats(running_mean, running_var, mean, var, momentum, count)


@bn_update_running.register_fake
def _bn_update_running_fake(running_mean, running_var, mean, var, momentum, count):
    return None


@torch.library.custom_op(
    "batchnorm::triton_bn_eval",
    mutates_args=(),
    schema="(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
    "Tensor? residual, float eps, str? activation) -> Tensor",
)
def bn_eval(x, running_mean, running_var, weight, bias, residual, eps, activation):
    return launch.forward_eval(x, running_mean, running_var, weight, bias, residual, eps,
                               activation)


@bn_eval.register_fake
def _bn_eval_fake(x, running_mean, running_var, weight, bias, residual, eps, activation):
    return _like_output(x)


def _bn_eval_setup(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, residual, eps, activation = inputs
    _save(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation)


def _bn_eval_backward(ctx, dy):
    need_x, _, _, need_w, need_b, need_z, *_ = ctx.needs_input_grad
    dx, dw, db, dz = _grads(ctx, dy, False, (need_x, need_w, need_b, need_z), _backward_op)
    return dx, None, None, dw, db, dz, None, None


torch.library.register_autograd(
    "batchnorm::triton_bn_eval", _bn_eval_backward, setup_context=_bn_eval_setup
)


@torch.library.custom_op(
    "batchnorm::triton_bn_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
    "Tensor mean, Tensor var, bool training, float eps, str? activation, bool need_dx, "
    "bool need_dweight, bool need_dbias, bool need_dresidual) -> (Tensor, Tensor, Tensor, Tensor)",
)
def bn_backward(grad_out, x, weight, bias, residual, mean, var, training, eps, activation,
                need_dx, need_dweight, need_dbias, need_dresidual):
    grads = launch.backward(grad_out, x, weight, bias, residual, mean, var, training, eps,
                            activation, need_dx, need_dweight, need_dbias, need_dresidual)
    return tuple(_empty(x) if g is None else g for g in grads)


@bn_backward.register_fake
def _bn_backward_fake(grad_out, x, weight, bias, residual, mean, var, training, eps, activation,
                      need_dx, need_dweight, need_dbias, need_dresidual):
    c = x.shape[1]
    store_dz = need_dresidual and activation is not None
    return (
        _like_output(x) if need_dx else _empty(x),
        _empty(x, c, weight.dtype) if need_dweight and weight is not None else _empty(x),
        _empty(x, c, bias.dtype) if need_dbias and bias is not None else _empty(x),
        _like_output(x, residual.dtype) if store_dz else _empty(x),
    )


def _backward_op(*args):
    return bn_backward(*args)  # unrequested gradients are empty tensors; _grads drops them


# --- the backend -----------------------------------------------------------------------------

def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
               activation, residual):
    """The ``"triton"`` backend; arguments are already validated by :mod:`batchnorm.functional`."""
    path = traced_batch_norm if torch.compiler.is_compiling() else eager_batch_norm
    return path(input, running_mean, running_var, weight, bias, bool(training),
                0.0 if momentum is None else float(momentum), float(eps), activation, residual)


def eager_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation, residual):
    if training:
        return _TrainFunction.apply(input, weight, bias, residual, running_mean, running_var,
                                    momentum, eps, activation)
    return _EvalFunction.apply(input, weight, bias, residual, running_mean, running_var, eps,
                               activation)


def traced_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      activation, residual):
    if training:
        y, mean, var = bn_train(input, weight, bias, residual, eps, activation)
        if running_mean is not None:
            count = input.numel() // input.shape[1]
            bn_update_running(running_mean, running_var, mean, var, momentum, count)
        return y
    return bn_eval(input, running_mean, running_var, weight, bias, residual, eps, activation)


def supports(input, weight, training, activation, residual) -> str | None:
    """None when the kernels can run this call, else the reason they cannot."""
    if input.device.type != "cuda" and not (input.device.type == "cpu" and INTERPRETED):
        if input.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "0":
            return ("TRITON_INTERPRET was set after batchnorm.kernels was imported, so its "
                    "kernels were compiled for the GPU and cannot run on CPU tensors")
        return (f"the Triton kernels need a CUDA tensor, got device {input.device.type!r} "
                "(CPU tensors run under the Triton interpreter when TRITON_INTERPRET=1 is set "
                "before batchnorm.kernels is imported)")
    if input.dtype not in SUPPORTED_DTYPES:
        return f"input dtype must be float32, float16 or bfloat16, got {input.dtype}"
    if residual is not None and residual.dtype not in SUPPORTED_DTYPES:
        return f"residual dtype must be float32, float16 or bfloat16, got {residual.dtype}"
    try:
        check_activation(activation, "backend='triton'")
    except ValueError as error:
        return str(error)
    if input.dim() < 2 or input.numel() == 0:
        return f"input must be non-empty with at least 2 dimensions, got shape {tuple(input.shape)}"
    return None
