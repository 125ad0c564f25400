// Python bindings of the emulated CUDA ops: the registered CUDA ops' bodies (op_bodies.h)
// and kernels, run on CPU tensors. Validation is the ops' own (checks.h).

#include <torch/extension.h>

#include <string>
#include <string_view>

#include "checks.h"
#include "cuda/op_bodies.h"
#include "emulator_control.h"

namespace {

using namespace fdsm;

void check(cudaError_t status) {
  if (status != cudaSuccess) {
    throw std::runtime_error("emulated launch failed (cudaError " + std::to_string(status) +
                             "): " + fdsm_emu::last_error_message());
  }
}

at::Tensor stencil_batch(const at::Tensor& x, const at::Tensor& v, std::vector<double> offsets) {
  return run_stencil_batch(x, v, check_stencil_batch(x, v, offsets), nullptr, check);
}

std::tuple<at::Tensor, at::Tensor> random_stencil_batch(const at::Tensor& x,
                                                        const at::Tensor& seed,
                                                        std::vector<double> offsets,
                                                        int64_t n_projections,
                                                        const std::string& noise, double eps) {
  const StencilLayout L = check_random_stencil_batch(x, seed, offsets, n_projections, eps);
  return run_random_stencil_batch(x, seed, L, parse_noise(noise), eps, nullptr, check);
}

std::tuple<at::Tensor, at::Tensor> stencil_batch_backward(const at::Tensor& grad,
                                                          std::vector<double> offsets,
                                                          int64_t n_projections,
                                                          bool compute_grad_v) {
  const StencilLayout L = check_stencil_batch_backward(grad, offsets, n_projections);
  return run_stencil_batch_backward(grad, L, compute_grad_v, nullptr, check);
}

at::Tensor fd_combine(const at::Tensor& y, std::vector<double> weights) {
  check_fd_combine(y, weights);
  return run_fd_combine(y, weights, nullptr, check);
}

at::Tensor fd_combine_backward(const at::Tensor& grad, std::vector<double> weights) {
  check_fd_combine_backward(grad, weights);
  return run_fd_combine_backward(grad, weights, nullptr, check);
}

at::Tensor fd_ssm_scalar(const at::Tensor& f, int64_t n_projections, double scale, double sign) {
  const int64_t B = check_fd_ssm_scalar(f, n_projections);
  return run_fd_ssm_scalar(f, B, n_projections, scale, sign, nullptr, check);
}

at::Tensor fd_ssm_scalar_backward(const at::Tensor& grad, const at::Tensor& f,
                                  int64_t n_projections, double scale, double sign) {
  const int64_t B = check_fd_ssm_scalar(f, n_projections);
  check_reduction_grad(grad, f, B, "f");
  return run_fd_ssm_scalar_backward(grad, f, B, n_projections, scale, sign, nullptr, check);
}

at::Tensor fd_ssm_score(const at::Tensor& s, const at::Tensor& v, int64_t n_projections,
                        bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s, v, n_projections);
  return run_fd_ssm_score(s, v, B, n_projections, variance_reduction, scale, nullptr, check);
}

at::Tensor fd_ssm_score_backward(const at::Tensor& grad, const at::Tensor& s,
                                 const at::Tensor& v, int64_t n_projections,
                                 bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s, v, n_projections);
  check_reduction_grad(grad, s, B, "s");
  return run_fd_ssm_score_backward(grad, s, v, B, n_projections, variance_reduction, scale,
                                   nullptr, check);
}

std::tuple<at::Tensor, at::Tensor> fd_dsm_scalar(const at::Tensor& f, const at::Tensor& v,
                                                 const at::Tensor& target, double scale,
                                                 double sign) {
  const int64_t B = check_fd_dsm_scalar(f, v, target);
  return run_fd_dsm_scalar(f, v, target, B, scale, sign, nullptr, check);
}

at::Tensor fd_dsm_scalar_backward(const at::Tensor& grad, const at::Tensor& residual,
                                  double scale, double sign) {
  check_fd_dsm_scalar_backward(grad, residual);
  return run_fd_dsm_scalar_backward(grad, residual, scale, sign, nullptr, check);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_grid_cap", &fdsm_emu::set_grid_cap, "clamp every grid dimension (0: no cap)");
  m.def("run_case", &fdsm_emu::run_case, "run one of the emulator's own test kernels");
  m.def("stencil_batch", &stencil_batch);
  m.def("random_stencil_batch", &random_stencil_batch);
  m.def("stencil_batch_backward", &stencil_batch_backward);
  m.def("fd_combine", &fd_combine);
  m.def("fd_combine_backward", &fd_combine_backward);
  m.def("fd_ssm_scalar", &fd_ssm_scalar);
  m.def("fd_ssm_scalar_backward", &fd_ssm_scalar_backward);
  m.def("fd_ssm_score", &fd_ssm_score);
  m.def("fd_ssm_score_backward", &fd_ssm_score_backward);
  m.def("fd_dsm_scalar", &fd_dsm_scalar);
  m.def("fd_dsm_scalar_backward", &fd_dsm_scalar_backward);
}
