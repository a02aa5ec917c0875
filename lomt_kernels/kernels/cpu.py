r"""The ``"cpu"`` backend: the proximal Adam step fused per tensor, in C++.

The kernel is ``csrc/group_prox_adam_cpu.cpp`` (its header comment gives the design and the
measurements behind it), registered as the custom op ``torch.ops.lomt.group_prox_adam_cpu`` so
``torch.compile`` sees one opaque op that mutates params and state. The maths is
:mod:`lomt_kernels.reference`'s: float32, float16 and bfloat16 params compute
in float32 and are rounded once on store, float64 params compute in float64. Per tensor:

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    d = \sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon,\quad z = p - \frac{\mathrm{lr}}{1-\beta_1^t} m/d

then ``p = prox(z)`` for the groups :func:`~lomt_kernels.grouping.group_layout` gives, with
``tau = lr * lambda_ * sqrt(n_G)``. Plain Adam and ``l1`` take one pass over memory; a group
prox takes one more (the rescale), and the weighted prox one more per Newton update.

The op takes the step's tensors and hyperparameters and finds each tensor's layout itself: a param
whose groups have no ``[A, B, K]`` layout in memory (e.g. a transposed weight), or whose grads or
state have other strides, is stepped on contiguous copies that are copied back. That is done
in C++ rather than with :func:`~lomt_kernels.kernels.prepare.work_tensors`, since a Python loop
over every tensor costs a noticeable part of a step that is bound by memory bandwidth
(``benchmarks/RESULTS-cpu-kernel.md``, "The layout step in C++"). The extension is compiled on
first use (about a minute); ``python -m lomt_kernels.build`` does it ahead of time.
"""

from __future__ import annotations

import threading
from typing import cast

import torch
from torch import Tensor

from ..contract import AdamHyper, StepTensors
from ._extension import build_failure, load_extension

EXTENSION_NAME = "group_prox_adam_cpu"
SOURCES = ("group_prox_adam_cpu.cpp",)


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch runs its intra-op threads on OpenMP.

    ``at::parallel_for`` is a header template: compiled without ``-fopenmp`` its
    ``#pragma omp parallel`` is dropped and every "parallel" loop of the kernel runs on the
    calling thread alone. Linked with it, the extension uses the ``libgomp`` torch has loaded.
    """
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def compile_flags() -> list[str]:
    """Optimised for this machine's CPU, with ATen's vectors at its widest supported ISA."""
    flags = ["-O3", "-march=native", "-fno-math-errno", *openmp_flags()]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    return flags


#: Set once the op is loaded and its fake registered; read before every step so that
#: ``torch.compile`` traces straight to the op (the loader's lock is opaque to it).
_loaded = False
_lock = threading.Lock()


def build_flags() -> dict[str, list[str]]:
    """The compiler flags, as :func:`~lomt_kernels.kernels._extension.load_extension` takes them."""
    return {"extra_cflags": compile_flags(), "extra_ldflags": openmp_flags()}


def build() -> str:
    """Build (first use) and load the extension; returns the path of the shared library.

    Raises :class:`~lomt_kernels.kernels._extension.ExtensionUnavailable` with the reason.
    """
    global _loaded
    with _lock:
        path = cast(str, load_extension(EXTENSION_NAME, SOURCES, **build_flags()))
        if not _loaded:
            torch.library.register_fake("lomt::group_prox_adam_cpu")(_fake)
            _loaded = True
    return path


def _fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, prox, grouping, lr, beta1, beta2,  # noqa: ANN001
          eps, weight_decay, decoupled_weight_decay, maximize, lambda_, grad_scale) -> None:
    """The op's meta function: it returns nothing and only mutates its inputs."""
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the fused CPU kernel can step params on ``device``, else what is missing."""
    if device.type != "cpu":
        return f"params are on {device.type}; the cpu backend steps CPU tensors only"
    return build_failure(build)


#: The op reads ``lr``, ``found_inf`` and the step counts on the host (CPU tensors: no device to wait for).
capturable = False


def step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One proximal Adam step, in place, with the fused C++ kernel (the ``"cpu"`` backend;
    :mod:`lomt_kernels.contract`).

    Every tensor must be on the CPU; ``exp_avgs``, ``exp_avg_sqs`` and ``grads`` must have their
    param's dtype (float64, float32, float16 or bfloat16). ``found_inf`` and the step counts are
    handled here, on the host; the op takes the incremented counts.
    """
    if not _loaded:
        build()
    if tensors.skipped():
        return
    tensors.count_step()
    h = hyper
    torch.ops.lomt.group_prox_adam_cpu(
        *tensors.lists(), h.prox.value, h.grouping, float(lr), h.beta1, h.beta2, h.eps,
        h.weight_decay, h.decoupled_weight_decay, h.maximize, h.lambda_, tensors.grad_scale,
    )
