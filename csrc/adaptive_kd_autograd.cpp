// alphadiv::adaptive_kd_loss: the loss with its autograd in C++, for eager training calls.
//
// `fused_adaptive_kd` in eager mode calls this op once: it runs alphadiv::adaptive_kd (any device's
// kernel, through the dispatcher) with compute_grad = true, saves d value / d student, and records a C++
// autograd node whose backward scales that gradient by the incoming one. A Python autograd.Function
// costs about 10 us per forward and again per backward on a CPU; at the supernet's shapes (32 x 1000
// logits) that is as long as the kernel. torch.compile, torch.func and opcheck use alphadiv::adaptive_kd
// itself, with its Python-registered fake and autograd (same gradient, same in-place rule).
//
// Backward, with g the incoming gradient and G the saved d value / d student:
//   reduction none: d loss / d student = g[:, None] * G;   mean / sum: g * G (g = 1 for loss.backward()).
// G becomes the result in place unless the graph is retained (retain_graph=True, gradcheck): then every
// backward must see G intact, and the product is a new tensor.
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "adaptive_kd_math.h"

namespace {

using alphadiv::kReductionNone;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_adaptive_kd(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& mask, double alpha_min,
                                                    double alpha_max, double clip, double temperature,
                                                    int64_t reduction, bool surrogate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("alphadiv::adaptive_kd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                 double, double, double, int64_t, bool, bool)>();
  return op.call(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction, surrogate,
                 /*compute_grad=*/true);
}

struct AdaptiveKDFunction : public torch::autograd::Function<AdaptiveKDFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& mask, double alpha_min, double alpha_max, double clip,
                            double temperature, int64_t reduction, bool surrogate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad] =
        call_adaptive_kd(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction, surrogate);
    ctx->save_for_backward({grad});
    ctx->saved_data["reduction"] = reduction;
    ctx->set_materialize_grads(false);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(9);  // student, teacher, mask and six settings; only the student gets one
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined() || !ctx->needs_input_grad(0)) {
      return grads;
    }
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused_adaptive_kd has no second derivative: backward with create_graph=True (double backward, "
                "gradient penalties, Hessians) is not supported");
    at::Tensor grad = ctx->get_saved_variables()[0];
    const bool none = ctx->saved_data["reduction"].toInt() == kReductionNone;
    const at::Tensor scale = none ? grad_loss.unsqueeze(-1) : grad_loss;
    if (torch::autograd::get_current_graph_task_keep_graph()) {
      grads[0] = grad.mul(scale);
    } else if (!none && grad_loss.is_cpu() && grad_loss.item<double>() == 1.0) {
      grads[0] = grad;  // loss.backward(): the saved gradient is the answer (a free read on the CPU)
    } else {
      grads[0] = grad.mul_(scale);
    }
    return grads;
  }
};

at::Tensor adaptive_kd_loss(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& mask, double alpha_min, double alpha_max, double clip,
                            double temperature, int64_t reduction, bool surrogate) {
  return AdaptiveKDFunction::apply(student, teacher.detach(), mask, alpha_min, alpha_max, clip, temperature,
                                   reduction, surrogate);
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CompositeImplicitAutograd, m) { m.impl("adaptive_kd_loss", &adaptive_kd_loss); }
