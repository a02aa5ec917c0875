r"""The ``"triton"`` backend: the proximal Adam step in one launch per param group and dtype.

* :mod:`.plan` cuts the tensors into slabs of whole groups and items of one tile, in ticket order;
* :mod:`.kernel` is the one Triton kernel that runs every item (its docstring gives the maths);
* :mod:`.launch` builds the launch and calls the kernel; the host path around it
  (:mod:`lomt_kernels.kernels.device_table`, shared with the ``"cuda"`` backend) caches launch
  plans per set of tensors and leaves step counts, bias corrections, ``lr``, ``grad_scale`` and
  ``found_inf`` to the device, so a steady-state step makes no host sync and no table build.

Eager calls launch the kernel directly; under ``torch.compile`` the step is the custom op
``torch.ops.lomt.triton_group_prox_adam_``, so the compiler sees one opaque mutating op.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from torch import Tensor

from ...contract import AdamHyper, StepTensors
from .. import device_table
from . import kernel, launch
from .launch import COUNTS, INTERPRETED
from .plan import TileShape

__all__ = ["step", "capturable", "unavailable_reason", "compile_kernels", "ptxas_report", "INTERPRETED", "COUNTS"]


#: A step makes no host sync once a first step with the same tensors has built its launch plan.
capturable = True


def step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One proximal Adam step, in place, with the fused Triton kernel (the ``"triton"`` backend;
    :mod:`lomt_kernels.contract`).

    The kernel reads ``lr`` (a float, or a 0-d tensor on the params' device), ``grad_scale`` and
    ``found_inf``, and adds one to each step count (one-element float32 tensors on the params'
    device); a nonzero ``found_inf`` leaves everything unchanged, decided on the device. Nothing
    here waits for the device, so a step (after a first one with the same tensors, which builds
    the launch plan) can be captured in a CUDA graph. float64 params take the reference path (the
    kernel computes in float32); those steps read ``lr``, the steps and ``found_inf`` on the host.
    """
    if torch.compiler.is_compiling():
        lr_tensor = lr if isinstance(lr, Tensor) else None
        torch.ops.lomt.triton_group_prox_adam_(
            *tensors.lists(), tensors.grad_scale, tensors.found_inf, lr_tensor,
            lr=0.0 if lr_tensor is not None else float(lr), **_op_hyper(hyper),
        )
    else:
        _step(tensors, hyper, lr)


def _op_hyper(hyper: AdamHyper) -> dict[str, object]:
    """``hyper`` as the custom op's keyword arguments (its schema takes plain values)."""
    return dict(vars(hyper), prox=hyper.prox.value)  # vars: asdict's deep copy costs host time every step


def _step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    device_table.step(launch.BACKEND, tensors, hyper, lr)


@torch.library.custom_op("lomt::triton_group_prox_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"))
def _group_prox_adam_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_tensor: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    lambda_: float,
    prox: str,
    grouping: str,
) -> None:
    """The step as a ``torch.library`` custom op (``lr_tensor``, if given, replaces ``lr``); its
    schema spells out :class:`~lomt_kernels.contract.AdamHyper`'s fields, as an op's must."""
    hyper = AdamHyper(beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, lambda_, prox, grouping)
    tensors = StepTensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, found_inf)
    _step(tensors, hyper, lr if lr_tensor is None else lr_tensor)


@_group_prox_adam_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, found_inf, lr_tensor, **kwargs) -> None:
    return None


#: The kernel's pointer arguments and their types for :func:`compile_kernels` (anchors by dtype).
_POINTERS = dict(
    items="*i32", slabs="*i64", tensors="*i64", counters="*i64", partials="*fp32", stats="*fp32",
    z_anchor="*fp32", step_anchor="*fp32", lr_ptr="*fp32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32",
)
_TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def compile_kernels(arch: int = 90) -> dict[str, "triton.compiler.CompiledKernel"]:
    """Compile, for ``sm_{arch}`` and without a GPU, the kernel for each param dtype and with every
    option switched on or off; returns them by name.

    A CI check that the kernel builds with the real compiler, stricter than the interpreter, and
    the source of the PTX that :func:`ptxas_report` and the tests read. Needs this module imported
    without ``TRITON_INTERPRET``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_kernels needs the module imported without TRITON_INTERPRET=1")
    fn = kernel.step_kernel
    compiled = {}
    for dtype in (torch.float32, torch.bfloat16):
        tile = TileShape.for_itemsize(dtype.itemsize)
        for options in (False, True):
            constexprs = dict(
                HAS_LR_PTR=options, HAS_GRAD_SCALE=options, HAS_FOUND_INF=options, MAXIMIZE=options,
                DECOUPLED=options, MAX_ITER=30, BLOCK_R=tile.block_r,
                BLOCK_C=tile.block_c, VEC=tile.vec, Z_IN_P=dtype == torch.float32, SPIN=True,
            )
            if not options:
                constexprs.update(lr_ptr=None, grad_scale_ptr=None, found_inf_ptr=None)
            types = dict(_POINTERS, p_anchor=_TRITON_TYPES[dtype], g_anchor=_TRITON_TYPES[dtype])
            signature = {
                name: "constexpr" if name in constexprs else types.get(name, "i64" if name.startswith("n_") else "fp32")
                for name in fn.arg_names
            }
            aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in types if name not in constexprs}
            name = f"{str(dtype).removeprefix('torch.')}-{'all-options' if options else 'plain'}"
            compiled[name] = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.NUM_WARPS},
            )
    return compiled


def ptxas_report(ptx: str, arch: int = 90) -> dict[str, int]:
    """``ptxas -v`` on ``ptx`` for ``sm_{arch}`` (``sm_90a`` for 90): registers, spill stores and
    spill loads (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"-arch={sm_arch_from_capability(arch)}", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(re.search(r"Used (\d+) registers", out).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the kernel can run on ``device``: a CUDA device, or the CPU under the interpreter."""
    if INTERPRETED:
        if device.type == "cpu":
            return None
        return "Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors only"
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu":
        return (
            "Triton kernels need a CUDA device; on the CPU they run only in Triton's interpreter, "
            "with TRITON_INTERPRET=1 set before this module is first imported"
            + (f" (it is {os.environ['TRITON_INTERPRET']!r} now)" if "TRITON_INTERPRET" in os.environ else "")
        )
    return f"Triton kernels need a CUDA device, not {device.type}"

