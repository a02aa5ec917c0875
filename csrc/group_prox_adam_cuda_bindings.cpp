// Python bindings of the "cuda" backend (csrc/group_prox_adam_cuda.cu), kept apart so that nvcc
// never parses torch/extension.h.

#include <torch/extension.h>

#include <optional>
#include <vector>

void group_prox_adam_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const std::vector<int64_t>& layouts, const std::vector<int64_t>& proxes,
                          const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s, double lr,
                          double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                          bool maximize, double lambda, const std::optional<at::Tensor>& grad_scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_prox_adam", &group_prox_adam_cuda,
        "One fused proximal Adam step, in place (see lomt_kernels/kernels/cuda.py)", py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("layouts"), py::arg("proxes"),
        py::arg("step_sizes"), py::arg("sqrt_bc2s"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled_weight_decay"), py::arg("maximize"),
        py::arg("lambda_"), py::arg("grad_scale"));
}
