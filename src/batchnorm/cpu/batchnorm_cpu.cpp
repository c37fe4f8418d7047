// Fused CPU kernels for the "torch" backend's BN (float32 / float64): the autograd glue and
// the Python bindings. The kernels' files:
//   kernels.h                 shared pieces (layouts, vectors, accumulators, streaming stores),
//                             and the passes over memory and threads, in words
//   batchnorm_cpu.h           the tensor-level entry points this file calls, their helpers
//   train.cpp                 training forward and backward on tensors, with the formulas
//   contiguous.h              their pieces for contiguous (N, C, S) inputs: a channel reduced,
//                             then rewritten from cache (the BN family's kernels use them too)
//   train_contiguous.cpp      training kernels for contiguous (N, C, S) inputs
//   train_channels_last.cpp   training kernels for (M, C) rows: 2-D and channels-last inputs
//   eval.cpp                  the eval (inference) forward, one pass
// batchnorm.cpu compiles them into one extension (torch.utils.cpp_extension).
//
// The entry points `train` and `infer` return None unless the call is plain eager mode (see
// plain_eager): the caller then uses ATen operations, which compilers, tracers, torch.func
// transforms and forward-mode AD can see.

#include <torch/extension.h>

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <vector>

#include "batchnorm_cpu.h"

namespace {

std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

}  // namespace

// Training BN as a C++ autograd Function around the kernels. The same Function in Python
// costs tens of microseconds per call in the autograd machinery, more than the kernels take on
// small layers (the MNIST network's 60 x 100).
class TrainingBatchNorm : public torch::autograd::Function<TrainingBatchNorm> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            c10::optional<at::Tensor> running_mean,
                            c10::optional<at::Tensor> running_var, double momentum, double eps) {
    auto out = bncpu::forward(x, weight, bias, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor(), out[1]});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    // needs_input_grad counts only the tensor arguments that were given
    const bool has_weight = weight.defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dgamma = has_weight && ctx->needs_input_grad(1);
    const bool need_dbeta =
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 2 : 1);
    std::vector<at::Tensor> d;  // dx, dgamma, dbeta
    // The differentiable ATen form when create_graph=True (the backward must be
    // differentiable), and when the gradient has no storage to read: a functorch BatchedTensor
    // (is_grads_batched=True, jacobian(vectorize=True), gradcheck's batched checks) or another
    // wrapper tensor; vmap batches the ATen operations.
    if (at::GradMode::is_enabled() || !grads[0].has_storage()) {
      d = differentiable_backward(grads[0], x, weight, ctx->saved_data["eps"].toDouble());
    } else {
      const c10::optional<at::Tensor> w =
          weight.defined() ? c10::optional<at::Tensor>(weight) : c10::nullopt;
      d = bncpu::backward(grads[0], x, w, saved[2], need_dx);
    }
    const at::Tensor none;
    return {need_dx ? d[0] : none, need_dgamma ? d[1] : none, need_dbeta ? d[2] : none,
            none, none, none, none};
  }

 private:
  // The closed form in differentiable ATen operations, with the statistics recomputed from x
  // inside the graph (they depend on x):
  //   dx = gamma invstd (dy - (dbeta + xhat dgamma) / m),  dgamma = sum(dy xhat),  dbeta = sum(dy)
  static std::vector<at::Tensor> differentiable_backward(const at::Tensor& dy,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
    const auto dims = reduce_dims(x), shape = channel_shape(x);
    const double m = double(x.numel() / x.size(1));
    const at::Tensor xc = x - x.mean(dims, /*keepdim=*/true);
    const at::Tensor invstd = ((xc * xc).mean(dims, /*keepdim=*/true) + eps).rsqrt();
    const at::Tensor xhat = xc * invstd;
    const at::Tensor dbeta = dy.sum(dims);
    const at::Tensor dgamma = (dy * xhat).sum(dims);
    const at::Tensor gain = weight.defined() ? weight.view(shape) * invstd : invstd;
    const at::Tensor dx = gain * (dy - (dbeta.view(shape) + xhat * dgamma.view(shape)) / m);
    return {dx, dgamma, dbeta};
  }
};

// Whether the kernels may take this call: plain CPU float32/float64 strided tensors in plain
// eager mode. Not under a functorch transform (grad, vmap, jvp), a forward-mode AD tangent, a
// Python dispatch mode or tensor subclass (FakeTensor, FunctionalTensor, ...), or
// torch.jit.trace: each of those must see the operations, which the kernels hide.
bool plain(const c10::optional<at::Tensor>& t) {
  constexpr c10::DispatchKeySet kWrapped({c10::DispatchKey::Python,
                                          c10::DispatchKey::PythonTLSSnapshot,
                                          c10::DispatchKey::FuncTorchBatched,
                                          c10::DispatchKey::FuncTorchGradWrapper,
                                          c10::DispatchKey::Functionalize});
  if (!t.has_value() || !t->defined()) return true;
  return !t->key_set().has_any(kWrapped) && !t->_fw_grad(/*level=*/0).defined();
}

bool plain_eager(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias) {
  return x.is_cpu() && x.layout() == at::kStrided &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && plain(x) &&
         plain(weight) && plain(bias) &&
         // a torch.func transform is active: functorch includes its dynamic-layer keys
         !c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !torch::jit::tracer::isTracing();
}

// Eval BN when x, weight or bias requires a gradient: the kernel forward, and the backward of
// the affine map in ATen operations (differentiable, so double backward works too):
//   dx = dy scale,  dgamma = invstd sum(dy (x - running_mean)),  dbeta = sum(dy).
class InferenceBatchNorm : public torch::autograd::Function<InferenceBatchNorm> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            double eps) {
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["mean"] = running_mean.detach().clone();
    ctx->saved_data["var"] = running_var.detach().clone();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return bncpu::infer(x, weight, bias, running_mean, running_var, eps);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &dy = grads[0];
    const bool has_weight = weight.defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dgamma = has_weight && ctx->needs_input_grad(1);
    const bool need_dbeta =
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 2 : 1);
    const auto dtype = at::kDouble == x.scalar_type() ? at::kDouble : at::kFloat;
    const auto dims = reduce_dims(x), shape = channel_shape(x);
    const at::Tensor mean = ctx->saved_data["mean"].toTensor().to(dtype);
    const at::Tensor invstd =
        (ctx->saved_data["var"].toTensor().to(dtype) + ctx->saved_data["eps"].toDouble()).rsqrt();
    const at::Tensor none;
    at::Tensor dx, dgamma, dbeta;
    if (need_dx) dx = dy * (has_weight ? weight.to(dtype) * invstd : invstd).view(shape);
    if (need_dgamma)
      dgamma = ((dy * (x - mean.view(shape))).sum(dims) * invstd).to(weight.scalar_type());
    if (need_dbeta) dbeta = dy.sum(dims);
    return {dx, dgamma, dbeta, none, none, none};
  }
};

// Frozen BN's map y = x * scale + shift with fixed scale and shift (no gradient): one pass each
// way, dx = dy * scale. The backward is the ATen product when it must be differentiable
// (create_graph=True) or the gradient has no storage (see TrainingBatchNorm).
class FixedAffine : public torch::autograd::Function<FixedAffine> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& scale, const at::Tensor& shift) {
    ctx->saved_data["scale"] = scale;
    return bncpu::affine(x, scale, shift);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor scale = ctx->saved_data["scale"].toTensor(), &dy = grads[0];
    const at::Tensor dx = at::GradMode::is_enabled() || !dy.has_storage()
                              ? dy * scale.to(dy.scalar_type()).view(channel_shape(dy))
                              : bncpu::affine(dy, scale, c10::nullopt);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// Frozen BN through the kernel, or None when it cannot take the call: outside plain eager mode,
// when scale or shift require a gradient (the caller's ATen form differentiates them), or are
// not (C,) CPU tensors (the ATen form then raises its error).
py::object fixed_affine(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  const auto per_channel = [&](const at::Tensor& t) {
    return t.dim() == 1 && x.dim() >= 2 && t.size(0) == x.size(1) && t.is_cpu() &&
           t.is_floating_point() && !t.requires_grad();
  };
  if (!plain_eager(x, scale, shift) || !per_channel(scale) || !per_channel(shift))
    return py::none();
  if (!at::GradMode::is_enabled() || !x.requires_grad())
    return py::cast(bncpu::affine(x, scale, shift));
  return py::cast(FixedAffine::apply(x, scale, shift));
}

// Training BN through the kernels, or None when they cannot take the call (see plain_eager):
// the caller then uses an ATen form.
py::object train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, c10::optional<at::Tensor> running_mean,
                 c10::optional<at::Tensor> running_var, double momentum, double eps) {
  if (!plain_eager(x, weight, bias)) return py::none();
  return py::cast(
      TrainingBatchNorm::apply(x, weight, bias, running_mean, running_var, momentum, eps));
}

// Eval BN through the kernel, or None when it cannot take the call: outside plain eager mode
// (see plain_eager; the running statistics are read through raw pointers too), or when the
// running statistics require a gradient (the caller's ATen path differentiates through them).
py::object infer_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double eps) {
  if (!plain_eager(x, weight, bias) || !plain(running_mean) || !plain(running_var))
    return py::none();
  if (!at::GradMode::is_enabled())
    return py::cast(bncpu::infer(x, weight, bias, running_mean, running_var, eps));
  if (running_mean.requires_grad() || running_var.requires_grad()) return py::none();
  const bool needs_graph = x.requires_grad() || (weight.has_value() && weight->requires_grad()) ||
                           (bias.has_value() && bias->requires_grad());
  if (!needs_graph)
    return py::cast(bncpu::infer(x, weight, bias, running_mean, running_var, eps));
  return py::cast(InferenceBatchNorm::apply(x, weight, bias, running_mean, running_var, eps));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "BN in training mode with its closed-form backward (fused, CPU)");
  m.def("infer", &infer_autograd, "BN in eval mode: one pass y = x * scale + shift (CPU)");
  m.def("fixed_affine", &fixed_affine, "frozen BN: y = x * scale + shift, fixed scale and shift");
}
