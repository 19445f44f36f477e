// Python binding of the native head loop (head_loop.h). Kept apart from head_loop.cpp so that
// only this file parses torch/extension.h (pybind11 and all of torch's C++ API, the slowest
// part of the build) while the other compiles in parallel.
#include <torch/extension.h>

#include "attention.h"
#include "head_loop.h"
#include "small_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engine native CPU head loop (MAR diffusion head)";
  pybind11::class_<engine_native::HeadPlan>(m, "HeadPlan")
      .def(pybind11::init<std::vector<at::Tensor>, std::optional<std::vector<double>>, bool,
                          int64_t, int64_t, int64_t, int64_t, int64_t>(),
           pybind11::arg("tensors"), pybind11::arg("clip_range"), pybind11::arg("bf16"),
           pybind11::arg("gemm_mode"), pybind11::arg("small_gemm_mode"),
           pybind11::arg("mod_budget_bytes"), pybind11::arg("pack_rows"),
           pybind11::arg("stream_rows"))
      .def("run", &engine_native::HeadPlan::run, pybind11::arg("z"), pybind11::arg("x"),
           pybind11::arg("noise"), pybind11::arg("cfg_scale"), pybind11::arg("temperature"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("chunk_steps", &engine_native::HeadPlan::chunk_steps)
      .def("retimed", &engine_native::HeadPlan::retimed, pybind11::arg("time_emb"), pybind11::arg("table"))
      .def("describe", &engine_native::HeadPlan::describe)
      .def_property_readonly("width", &engine_native::HeadPlan::width)
      .def_property_readonly("depth", &engine_native::HeadPlan::depth)
      .def_property_readonly("token_dim", &engine_native::HeadPlan::token_dim)
      .def_property_readonly("num_steps", &engine_native::HeadPlan::num_steps);
  m.def("has_mkl_packed", &engine_native::has_mkl_packed);
  pybind11::class_<engine_native::MklPackedLinear>(m, "MklPackedLinear")
      .def(pybind11::init<const at::Tensor&, const std::optional<at::Tensor>&>(),
           pybind11::arg("weight"), pybind11::arg("bias"))
      .def("run", &engine_native::MklPackedLinear::run, pybind11::arg("x"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("n", &engine_native::MklPackedLinear::n)
      .def_property_readonly("k", &engine_native::MklPackedLinear::k);
  m.def("attention", &engine_native::attention, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("scale"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_bf16_dot", &engine_native::attention_bf16_dot);
  m.def("has_sleef_exp", &engine_native::has_sleef_exp);
  m.def("has_small_gemm", &engine_native::has_small_gemm);
  m.def("small_gemm_bf16_dot", &engine_native::small_gemm_bf16_dot);
  m.def("small_gemm_isa", [] { return std::string(engine_native::small_gemm_isa()); });
  // The small-row kernel on its own, for tests and benchmarks: A [M, K] @ W [N, K]^T.
  m.def("small_gemm_pack", &engine_native::small_gemm_pack, pybind11::arg("weight"));
  m.def("small_gemm", [](const at::Tensor& a, const at::Tensor& panels, int64_t n) {
          return engine_native::small_gemm_run(a, panels, n, at::Tensor());
        }, pybind11::arg("a"), pybind11::arg("panels"), pybind11::arg("n"));
}
