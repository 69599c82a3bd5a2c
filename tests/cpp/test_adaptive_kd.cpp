// C++ test of alphadiv::adaptive_kd through the dispatcher, against a scalar double implementation
// of the paper's formulas in probability space (independent of the kernel's log-space algorithm).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.10g, want %.10g\n", what, got, want);
  }
}

// One row: divergence and gradient of the selected branch (paper Eq. 3 and 5).
struct RowResult {
  double value;
  std::vector<double> grad;
};

RowResult branch(const std::vector<double>& q, const std::vector<double>& p, double alpha, double clip) {
  const size_t n = q.size();
  RowResult r{0.0, std::vector<double>(n)};
  if (std::abs(alpha - 1.0) < 1e-3) {
    for (size_t j = 0; j < n; ++j) {
      r.value += p[j] * std::log(p[j] / q[j]);
      r.grad[j] = q[j] - p[j];
    }
  } else if (std::abs(alpha) < 1e-3) {
    double sum = 0.0;
    for (size_t j = 0; j < n; ++j) sum += q[j] * std::log(std::min(p[j] / q[j], clip));
    r.value = -sum;
    for (size_t j = 0; j < n; ++j) r.grad[j] = q[j] * (sum - std::log(std::min(p[j] / q[j], clip)));
  } else {
    double sum = 0.0;
    for (size_t j = 0; j < n; ++j) sum += q[j] * std::min(std::pow(p[j] / q[j], alpha), clip);
    r.value = (sum - 1.0) / (alpha * (alpha - 1.0));
    for (size_t j = 0; j < n; ++j) r.grad[j] = q[j] / alpha * (sum - std::min(std::pow(p[j] / q[j], alpha), clip));
  }
  return r;
}

std::vector<double> softmax(const double* x, int64_t n) {
  double m = x[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, x[j]);
  std::vector<double> e(n);
  double z = 0.0;
  for (int64_t j = 0; j < n; ++j) z += (e[j] = std::exp(x[j] - m));
  for (auto& v : e) v /= z;
  return e;
}

using OpSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const std::optional<at::Tensor>&, double, double, double,
                                                       double, int64_t, bool, bool);

void check_case(int64_t rows, int64_t cols, double alpha_min, double alpha_max, double clip) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("alphadiv::adaptive_kd", "").typed<OpSignature>();
  const at::Tensor student = at::randn({rows, cols}, at::kDouble) * 3;
  const at::Tensor teacher = at::randn({rows, cols}, at::kDouble) * 3;
  auto [value, grad] = op.call(student.to(at::kFloat), teacher.to(at::kFloat), std::nullopt, alpha_min, alpha_max,
                               clip, 1.0, /*mean*/ 1, false, true);
  const at::Tensor s = student.to(at::kFloat).to(at::kDouble), t = teacher.to(at::kFloat).to(at::kDouble);
  double mean = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const auto q = softmax(s[i].data_ptr<double>(), cols), p = softmax(t[i].data_ptr<double>(), cols);
    const RowResult lo = branch(q, p, alpha_min, clip), hi = branch(q, p, alpha_max, clip);
    const RowResult& chosen = lo.value > hi.value ? lo : hi;
    mean += chosen.value / rows;
    for (int64_t j = 0; j < cols; ++j) {
      const double want = chosen.grad[j] / rows, got = grad[i][j].item<double>();
      expect(std::abs(got - want) <= 1e-4 * std::abs(want) + 2e-7 / rows, "gradient", got, want);
    }
  }
  const double got = value.item<double>();
  expect(std::abs(got - mean) <= 1e-5 * std::abs(mean), "value", got, mean);
}

void check_bad_arguments_raise() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("alphadiv::adaptive_kd", "").typed<OpSignature>();
  const at::Tensor x = at::randn({3, 5});
  try {
    op.call(x, x, std::nullopt, 1.0, -1.0, 5.0, 1.0, 1, false, false);
    expect(false, "alpha_min > alpha_max raises", 0, 1);
  } catch (const c10::ValueError&) {
  }
  try {
    op.call(x, at::randn({3, 6}), std::nullopt, -1.0, 1.0, 5.0, 1.0, 1, false, false);
    expect(false, "shape mismatch raises", 0, 1);
  } catch (const c10::ValueError&) {
  }
}

// alphadiv::adaptive_kd_loss (the C++ autograd node): backward gives adaptive_kd's gradient times the
// incoming one, for a scalar loss and per row (reduction none), and leaves the graph reusable when retained.
void check_autograd_matches_the_op_gradient() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("alphadiv::adaptive_kd", "").typed<OpSignature>();
  static auto loss_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("alphadiv::adaptive_kd_loss", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                              double, double, double, double, int64_t, bool)>();
  const at::Tensor teacher = at::randn({6, 40}) * 3;
  const at::Tensor incoming = at::rand({6}) + 0.5;
  for (int64_t reduction : {0, 1, 2}) {
    const at::Tensor student = (at::randn({6, 40}) * 3).set_requires_grad(true);
    const auto [value, grad] = op.call(student.detach(), teacher, std::nullopt, -1.0, 1.0, 5.0, 2.0, reduction, false,
                                       true);
    const at::Tensor loss = loss_op.call(student, teacher, std::nullopt, -1.0, 1.0, 5.0, 2.0, reduction, false);
    expect(at::allclose(loss.detach(), value), "loss_op value == op value", loss.sum().item<double>(),
           value.sum().item<double>());
    const at::Tensor upstream = reduction == 0 ? incoming : at::full({}, 1.5);
    const at::Tensor want = reduction == 0 ? grad * incoming.unsqueeze(-1) : grad * 1.5;
    torch::autograd::backward({loss}, {upstream}, /*retain_graph=*/true);
    expect(at::allclose(student.grad(), want), "retained backward == op gradient x incoming",
           student.grad().sum().item<double>(), want.sum().item<double>());
    student.mutable_grad().reset();
    torch::autograd::backward({loss}, {upstream});  // the saved gradient survived the retained pass
    expect(at::allclose(student.grad(), want), "second backward == op gradient x incoming",
           student.grad().sum().item<double>(), want.sum().item<double>());
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_case(5, 1000, -1.0, 1.0, 5.0);
  check_case(3, 17, -2.0, 0.5, 5.0);
  check_case(4, 33, 0.0, 1.0, 3.0);
  check_case(2, 64, 1.0, 1.0, 5.0);
  check_bad_arguments_raise();
  check_autograd_matches_the_op_gradient();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
