"""``python -m benchmarks.host_overhead``: the host cost of a steady-state ``FusedGroupProxAdam``
step on the Triton backend, with the kernel stubbed, beside ``torch.optim.Adam(fused=True)``.

What a GPU step costs on the host decides whether a fused optimizer pays off: a step whose Python
and launch bookkeeping outlast the kernel is slower than plain Adam whatever the kernel does. This
measures that cost on any machine. The Triton kernel is replaced by a stub that only counts its
launches (Triton's interpreter is switched on only so the backend accepts CPU tensors; it never
runs), so a step's time is the optimizer's Python, the launch plan's checks and the table
refreshes, and nothing of the kernel itself. Fused Adam runs for real, on tiny CPU tensors of
the same count and ranks, where its time is almost all host time too.

Each step starts as a training step does: ``zero_grad(set_to_none=True)``, then new gradient
tensors (allocated while the old ones are still held, so they land at new addresses: the worst
case for a table keyed on addresses). Only ``optimizer.step()`` is timed, the two optimizers in
alternating rounds (:func:`benchmarks.timing.time_rounds`). Per set and prox it prints the medians, their ratio, and per steady-state
step the kernel launches, launch plans built and gradient-column refreshes (one asynchronous
host-to-device copy each on a GPU); the last line is the worst ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the backend then takes CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.baselines import PROXES  # noqa: E402
from benchmarks.timing import fused_adam, time_rounds  # noqa: E402
from lomt_kernels import FusedGroupProxAdam  # noqa: E402
from lomt_kernels.kernels import triton_group_adam as triton_backend  # noqa: E402
from lomt_kernels.kernels.triton_group_adam import kernel as triton_kernel  # noqa: E402


class _StubKernel:
    """Stands in for the Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def tiny(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A small shape of the same rank: channel dims capped at 4, kernel dims kept."""
    return tuple(min(d, 4) for d in shape[:2]) + tuple(shape[2:])


def model_shapes(name: str) -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, takes the prox)`` of every trainable tensor of the set called ``name``."""
    from benchmarks.params import nyu_model_params, resnet50_conv_shapes

    if name == "resnet50-convs":
        return [(shape, True) for shape in resnet50_conv_shapes()]
    with torch.device("meta"):
        return [(tuple(p.shape), sparse) for p, sparse in nyu_model_params()]


class Setup:
    """Tiny params of a set's shapes, with one optimizer over them."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], bool]], make_optimizer) -> None:
        gen = torch.Generator().manual_seed(0)
        self.params = [nn.Parameter(torch.randn(tiny(shape), generator=gen)) for shape, _ in shapes]
        self.templates = [torch.randn(p.shape, generator=gen) for p in self.params]
        self.optimizer = make_optimizer(self.params, [prox for _, prox in shapes])
        self.new_grads()
        self.optimizer.step()  # state, launch plan, compiled kernels: everything a first step makes

    def new_grads(self) -> None:
        old = [p.grad for p in self.params]  # held until the new ones exist: new addresses
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.params, self.templates):
            p.grad = g.clone()
        del old

    def timed_steps(self, steps: int) -> float:
        """Microseconds per ``step()`` over ``steps`` steps (gradient allocation not timed)."""
        total = 0.0
        for _ in range(steps):
            self.new_grads()
            start = time.perf_counter()
            self.optimizer.step()
            total += time.perf_counter() - start
        return total / steps * 1e6


def fused_group_prox_adam(prox: str):
    def make(params, prox_mask):
        groups = [{"params": [p for p, m in zip(params, prox_mask) if m], "lambda_": 1e-3, "prox": prox}]
        rest = [p for p, m in zip(params, prox_mask) if not m]
        if rest:
            groups.append({"params": rest, "lambda_": 0.0, "prox": "none"})
        return FusedGroupProxAdam(groups, lr=1e-3, backend="triton")
    return make


def measure(name: str, prox: str, rounds: int, steps: int) -> dict:
    shapes = model_shapes(name)
    ours = Setup(shapes, fused_group_prox_adam(prox))
    adam = Setup(shapes, lambda params, _: fused_adam(params, lr=1e-3))
    before = dict(triton_backend.COUNTS)
    ours_us, adam_us = time_rounds(lambda: ours.timed_steps(steps), lambda: adam.timed_steps(steps), rounds)
    per_step = {key: (triton_backend.COUNTS[key] - before.get(key, 0)) / (rounds * steps)
                for key in ("launches", "builds", "grad_refreshes")}
    return dict(set=name, prox=prox, tensors=len(shapes), ours_us=statistics.median(ours_us),
                adam_us=statistics.median(adam_us), **per_step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating timed rounds per row")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--sets", default="resnet50-convs,nyu-3task")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (host cost is one thread's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    triton_kernel.step_kernel = _StubKernel()
    print(f"{'set':<16} {'prox':<15} {'tensors':>7} {'ours us':>9} {'Adam us':>9} {'ratio':>6} "
          f"{'launches':>8} {'builds':>6} {'refreshes':>9}")
    worst = 0.0
    for name in args.sets.split(","):
        for prox in PROXES:
            row = measure(name, prox, args.rounds, args.steps)
            ratio = row["ours_us"] / row["adam_us"]
            worst = max(worst, ratio)
            print(f"{row['set']:<16} {row['prox']:<15} {row['tensors']:>7} {row['ours_us']:>9.1f} "
                  f"{row['adam_us']:>9.1f} {ratio:>6.2f} {row['launches']:>8.2f} {row['builds']:>6.2f} "
                  f"{row['grad_refreshes']:>9.2f}", flush=True)
    print(f"worst ratio to Adam(fused=True): {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
