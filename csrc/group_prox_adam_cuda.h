// The "cuda" backend's entry point, defined in group_prox_adam_cuda.cu and bound to Python in
// group_prox_adam_cuda_bindings.cpp (see lomt_kernels/kernels/cuda.py for its arguments).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

void group_prox_adam_cuda(const at::Tensor& p_anchor, const at::Tensor& g_anchor, const at::Tensor& step_anchor,
                          const at::Tensor& tensors, const at::Tensor& blocks, const at::Tensor& counters,
                          const at::Tensor& partials, const at::Tensor& stats,
                          const std::vector<int64_t>& launch_blocks, int64_t smem_bytes, int64_t prox,
                          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, double lr, double lambda, double beta1,
                          double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool maximize);
