"""The ``"cuda"`` backend: the fused proximal Adam step as a CUDA C++ extension.

The kernels are in ``csrc/group_prox_adam_cuda.cu`` (its header comment gives the tile design
and the bytes moved); this module prepares the tensors (:mod:`~lomt_kernels.kernels.prepare`),
computes the bias corrections in float64 and calls the extension, which
:func:`~lomt_kernels.kernels._extension.load_extension` builds on first use (about two minutes;
later processes load the cached build). Same maths and float32 arithmetic as the ``"triton"``
backend; one launch per tensor (two or three for groups too big for shared memory).

Compile without a GPU (a CI check)::

    python -m lomt_kernels.kernels.cuda --compile-only

``TORCH_CUDA_ARCH_LIST`` (numbers such as ``"8.0;9.0+PTX"``) picks the GPU architectures,
:data:`DEFAULT_ARCH_LIST` when unset. They are passed to nvcc as explicit ``-gencode`` flags, so
no device is queried and a different list builds a different cached library.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch import Tensor

from ..contract import AdamHyper, Prox, StepTensors
from ._extension import build_failure, load_extension
from .cuda_toolkit import use_cuda_home
from .prepare import float64_on_reference, work_tensors, write_back

EXTENSION_NAME = "group_prox_adam_cuda"
SOURCES = ("group_prox_adam_cuda.cu", "group_prox_adam_cuda_bindings.cpp")
#: Architectures built when ``TORCH_CUDA_ARCH_LIST`` is unset: A100 and H100 class GPUs.
DEFAULT_ARCH_LIST = "8.0;9.0"


def arch_flags() -> list[str]:
    """nvcc ``-gencode`` flags for ``TORCH_CUDA_ARCH_LIST`` (or :data:`DEFAULT_ARCH_LIST`)."""
    flags = []
    for arch in (os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST).replace(" ", ";").split(";"):
        if arch:
            number = arch.removesuffix("+PTX").replace(".", "")
            flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
            if arch.endswith("+PTX"):
                flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def build_flags() -> dict[str, list[str]]:
    """The compiler flags, as :func:`~lomt_kernels.kernels._extension.load_extension` takes them."""
    return {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3", "-lineinfo", *arch_flags()]}


def build() -> ModuleType:
    """Build (first use) and load the extension; needs the CUDA toolkit, not a GPU.

    Raises :class:`~lomt_kernels.kernels._extension.ExtensionUnavailable` with the reason.
    """
    module = load_extension(EXTENSION_NAME, SOURCES, **build_flags(), python_module=True, prepare_build=use_cuda_home)
    assert isinstance(module, ModuleType)
    return module


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the extension can step params on ``device`` (building it on first call)."""
    if device.type != "cuda":
        return f"params are on {device.type}; the cuda backend steps CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return build_failure(build)


#: Each step reads ``lr``, ``found_inf`` and the step counts on the host.
capturable = False


def step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One proximal Adam step, in place, with the CUDA extension (the ``"cuda"`` backend;
    :mod:`lomt_kernels.contract`).

    Grads of another dtype than their param are cast to it; float64 params take the reference path.
    """
    if tensors.skipped():
        return
    tensors.count_step()
    lr = float(lr)
    params, grads, exp_avgs, exp_avg_sqs, state_steps = tensors.lists()
    float64_on_reference(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, hyper=hyper,
                         grad_scale=tensors.grad_scale)
    works = work_tensors(
        params, grads, exp_avgs, exp_avg_sqs, prox=hyper.prox, lambda_=hyper.lambda_, grouping=hyper.grouping,
        grad_dtype="cast",
    )
    if not works:
        return
    # The step counts live on the device (as torch's fused Adam keeps them): one read for all.
    steps = torch.stack([state_steps[i] for i in works]).tolist()
    h = hyper
    build().group_prox_adam(
        [w.p for w in works.values()],
        [w.g for w in works.values()],
        [w.m for w in works.values()],
        [w.v for w in works.values()],
        [size for w in works.values() for size in w.layout],
        [Prox(w.prox).code for w in works.values()],
        [lr / (1 - h.beta1**step) for step in steps],
        [math.sqrt(1 - h.beta2**step) for step in steps],
        lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled_weight_decay, h.maximize, h.lambda_,
        None if tensors.grad_scale is None else tensors.grad_scale.to(torch.float32),
    )
    write_back(params, exp_avgs, exp_avg_sqs, works)


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Build the lomt CUDA extension (no GPU needed).")
    parser.add_argument("--compile-only", action="store_true", required=True)
    parser.parse_args()
    start = time.perf_counter()
    print(f"built {build().__file__} in {time.perf_counter() - start:.0f} s")
