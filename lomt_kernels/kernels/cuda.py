"""The ``"cuda"`` backend: the fused proximal Adam step as a CUDA C++ extension, the fallback
where Triton is missing.

It runs on the host path the ``"triton"`` backend runs on (:mod:`~lomt_kernels.kernels.device_table`):
launches cached per set of tensors and found again by their data pointers, the grads' column
refreshed asynchronously when they move, step counts (float32 on the params' device), bias
corrections, ``lr``, ``grad_scale`` and ``found_inf`` read by the kernels, so a steady-state step
makes no host sync. Per param group and dtype a step is at most three launches over every tensor
(:mod:`~lomt_kernels.kernels.cuda_plan` plans them; ``csrc/group_prox_adam_cuda.cu``'s header
comment gives the kernels' design). Same maths and float32 arithmetic as the ``"triton"`` backend.
:func:`~lomt_kernels.kernels._extension.load_extension` builds the extension on first use (a few
minutes; later processes load the cached build).

Compile without a GPU (a CI check)::

    python -m lomt_kernels.kernels.cuda --compile-only

``TORCH_CUDA_ARCH_LIST`` (numbers such as ``"8.0;9.0+PTX"``) picks the GPU architectures,
:data:`DEFAULT_ARCH_LIST` when unset. They are passed to nvcc as explicit ``-gencode`` flags, so
no device is queried and a different list builds a different cached library.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from ..contract import AdamHyper, StepTensors
from . import cuda_plan, device_table
from ._extension import build_failure, load_extension
from .cuda_toolkit import use_cuda_home
from .device_table import COUNTS, Entry, PlanKey, TensorTable

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
    # ptxas's resource report (registers, spills) reaches the output only in a verbose build.
    return {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3", "-lineinfo", "-Xptxas=-v", *arch_flags()]}


def build(verbose: bool = False) -> ModuleType:
    """Build (first use) and load the extension; needs the CUDA toolkit, not a GPU. ``verbose``
    prints the compilers' output, ptxas's registers and spills per kernel included, if it compiles.

    Raises :class:`~lomt_kernels.kernels._extension.ExtensionUnavailable` with the reason.
    """
    module = load_extension(
        EXTENSION_NAME, SOURCES, **build_flags(), python_module=True, prepare_build=use_cuda_home, verbose=verbose
    )
    assert isinstance(module, ModuleType)
    return module


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the extension can step params on ``device`` (building it on first call)."""
    if device.type != "cuda":
        return f"params are on {device.type}; the cuda backend steps CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return build_failure(build)


#: A step makes no host sync once a first step with the same tensors has built its launch plan.
capturable = True


def step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One proximal Adam step, in place, with the CUDA extension (the ``"cuda"`` backend;
    :mod:`lomt_kernels.contract`), on the host path the Triton backend shares
    (:mod:`~lomt_kernels.kernels.device_table`). Grads of another dtype than their param are cast
    to it on copies; float64 params take the reference path.
    """
    device_table.step(BACKEND, tensors, hyper, lr)


#: Columns of the tensor table after the shared ones (``Column`` in the .cu, from ``kA``).
TENSOR_COLUMNS = ("A", "B", "K", "tile_a", "tile_g", "tile_k", "pitch", "prox", "one_pass", "partial0", "stat0",
                  "blocks")


def tensor_columns(plan: cuda_plan.CudaPlan, layouts: list) -> list[list[int]]:
    """The rows of :data:`TENSOR_COLUMNS` for the tensors of ``plan``."""
    return [
        [*layout, tile.ba, tile.bg, tile.bk, tile.pitch, cuda_plan.PROX_CODE[prox], int(tile.one_pass),
         plan.partial_offsets[t], plan.stat_offsets[t], plan.tensor_blocks[t]]
        for t, (layout, tile, prox) in enumerate(zip(layouts, plan.tiles, plan.proxes))
    ]


class Launch:
    """The kernels of one ``(param dtype)`` launch group over fixed tensors: its plan, tables,
    scratch and per-tensor block counters (zero between steps: the last block of a tensor
    resets its own)."""

    def __init__(self, index: list[int], entries: list[Entry], g_dtype: torch.dtype, hyper: PlanKey) -> None:
        device = entries[0][0].device
        self.index = index
        self.prox = cuda_plan.PROX_CODE[hyper.prox]
        layouts = [layout for *_, layout, _ in entries]
        self.plan = cuda_plan.build_plan(layouts, [prox for *_, prox in entries])
        self.table = TensorTable(entries, g_dtype, tensor_columns(self.plan, layouts), "cuda")
        self.launch_blocks = [len(blocks) for blocks in self.plan.blocks]
        self.blocks = torch.tensor([pair for blocks in self.plan.blocks for pair in blocks], dtype=torch.int32).to(device)
        self.counters = torch.zeros(len(entries), dtype=torch.int32, device=device)
        self.partials = torch.empty(max(1, self.plan.partials), dtype=torch.float32, device=device)
        self.stats = torch.empty(max(1, self.plan.stats), dtype=torch.float32, device=device)
        self.extension = build()

    def run(self, *, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
            lambda_: float, maximize: bool, decoupled_weight_decay: bool, grad_scale: Tensor | None,
            found_inf: Tensor | None) -> None:
        """Launch the plan's kernels (at most three) on the current stream."""
        lr_tensor = lr if isinstance(lr, Tensor) else None
        COUNTS["launches"] += self.plan.launches
        self.extension.group_prox_adam(
            self.table.p_anchor, self.table.g_anchor, self.table.step_anchor, self.table.table, self.blocks,
            self.counters, self.partials, self.stats, self.launch_blocks, self.plan.smem_bytes, self.prox,
            _float32(lr_tensor), _float32(grad_scale), _float32(found_inf), 0.0 if lr_tensor is not None else float(lr),
            float(lambda_), float(beta1), float(beta2), float(eps), float(weight_decay), decoupled_weight_decay,
            maximize,
        )


def _float32(t: Tensor | None) -> Tensor | None:
    """A device scalar as the kernels read it (float32; a cast only for other dtypes)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


#: The cuda backend of the shared host path.
BACKEND = device_table.Backend("cuda", Launch, grads_of_param_dtype=True)


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Build the lomt CUDA extension (no GPU needed).")
    parser.add_argument("--compile-only", action="store_true", required=True)
    parser.parse_args()
    start = time.perf_counter()
    print(f"built {build(verbose=True).__file__} in {time.perf_counter() - start:.0f} s")
