// Python bindings of the "cuda" backend (csrc/group_prox_adam_cuda.cu), kept apart so that nvcc
// never parses torch/extension.h.

#include <torch/extension.h>

#include "group_prox_adam_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_prox_adam", &group_prox_adam_cuda,
        "One fused proximal Adam step over a launch plan's tensors, in place (see lomt_kernels/kernels/cuda.py)",
        py::arg("p_anchor"), py::arg("g_anchor"), py::arg("step_anchor"), py::arg("tensors"), py::arg("blocks"),
        py::arg("counters"), py::arg("partials"), py::arg("stats"), py::arg("launch_blocks"), py::arg("smem_bytes"),
        py::arg("prox"), py::arg("lr_tensor"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("lr"),
        py::arg("lambda_"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled_weight_decay"), py::arg("maximize"));
}
