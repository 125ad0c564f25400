// Operator schemas of the `fdsm` library. The kernels register themselves per device in
// csrc/cpu and csrc/cuda; fake (meta) kernels and autograd live in fdsm_ext/_ops.py.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fdsm, m) {
  m.def("stencil_batch(Tensor x, Tensor v, float[] offsets) -> Tensor");
  m.def(
      "random_stencil_batch(Tensor x, Tensor seed, float[] offsets, int n_projections, "
      "str noise, float eps) -> (Tensor, Tensor)");
  m.def(
      "stencil_batch_backward(Tensor grad, float[] offsets, int n_projections, "
      "bool compute_grad_v) -> (Tensor, Tensor)");
  // TEST-ONLY (CPU only), not part of the API and without a Python wrapper in fdsm_ext: the
  // unscaled directions of rows first_row .. first_row + rows - 1, checked by
  // python_tests/test_ops.py against fdsm_ext.reference._philox_directions.
  m.def("philox_directions(Tensor seed, int first_row, int rows, int d, str noise) -> Tensor");
  m.def("fd_combine(Tensor y, float[] weights) -> Tensor");
  m.def("fd_combine_backward(Tensor grad, float[] weights) -> Tensor");
  m.def("fd_ssm_scalar(Tensor f, int n_projections, float scale, float sign) -> Tensor");
  m.def(
      "fd_ssm_scalar_backward(Tensor grad, Tensor f, int n_projections, float scale, "
      "float sign) -> Tensor");
  m.def(
      "fd_ssm_score(Tensor s, Tensor v, int n_projections, bool variance_reduction, "
      "float scale) -> Tensor");
  m.def(
      "fd_ssm_score_backward(Tensor grad, Tensor s, Tensor v, int n_projections, "
      "bool variance_reduction, float scale) -> Tensor");
  m.def(
      "fd_dsm_scalar(Tensor f, Tensor v, Tensor target, float scale, float sign) "
      "-> (Tensor, Tensor)");
  m.def("fd_dsm_scalar_backward(Tensor grad, Tensor residual, float scale, float sign) -> Tensor");
}

// Importing fdsm_ext._C only has to run the static registrations above; the ops are then
// reached through torch.ops.fdsm, so the module itself exposes nothing (and needs no
// pybind11, which keeps it independent of torch's Python bindings).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
