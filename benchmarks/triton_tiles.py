"""``python -m benchmarks.triton_tiles``: the Triton backend's kernel time under other work plans.

The plan's constants (:mod:`lomt_kernels.kernels.triton_group_adam.plan`: ``ROW_BYTES``, the
bytes of a slab's row; ``ITEM_ELEMENTS``, the elements of an item; ``PROGRAMS_PER_SM``, which
sets how many items after a slab's last partial item its finishers come) are estimates until
timed on a GPU; this times the alternatives side by side on one GPU, in a single call. For each
variant and prox it takes one step from the set's warm state and reports the summed kernel time
(:func:`benchmarks.device_time.kernel_times`, median of ``--repeats``), the launches, and the
largest difference from the default plan's step (the same maths in another order: rounding only).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from lomt_kernels.kernels.triton_group_adam import launch, plan

from .baselines import FLOOR, Method, fused_spec, max_abs_diff
from .device_time import kernel_times
from .params import build_set, step_gbs

#: The values tried for each plan constant (the module's own value is always among the variants).
VARIANTS = {
    "ROW_BYTES": (128, 256, 512),
    "ITEM_ELEMENTS": (1024, 2048),
    "PROGRAMS_PER_SM": (1, 2, 4),
}


def run_variant(pset, prox: str, constants: dict[str, int], repeats: int) -> tuple[float, int, Method]:
    """Median kernel ms and launches of one step under ``constants``, and the stepped method."""
    saved = {name: getattr(plan, name) for name in constants}
    launch._CACHE.clear()  # plans are cached per set of tensors
    try:
        for name, value in constants.items():
            setattr(plan, name, value)
        method = Method(fused_spec("triton", prox), pset)
        method.timed_step()  # compiles this plan's kernels
        runs = [kernel_times(method) for _ in range(repeats)]
        method.restore()
        method.step()  # the state compared against the default plan's
    finally:
        for name, value in saved.items():
            setattr(plan, name, value)
        launch._CACHE.clear()
    return statistics.median(ms for ms, _ in runs), sum(n for _, n, _ in runs[-1][1]), method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_tiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="resnet50-convs", help="param set (default resnet50-convs)")
    parser.add_argument("--repeats", type=int, default=5, help="steps profiled per variant")
    for name, values in VARIANTS.items():
        parser.add_argument(
            f"--{name.lower().replace('_', '-')}", dest=name, default=values,
            type=lambda text: tuple(int(x) for x in text.split(",")),
            help=f"comma-separated values of {name} (default {','.join(map(str, values))})",
        )
    args = parser.parse_args(argv)
    variants = {name: getattr(args, name) for name in VARIANTS}
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")

    pset = build_set(args.set, "cuda")
    floor = Method(FLOOR[0], pset)
    floor.timed_step()
    floor_ms = statistics.median(kernel_times(floor)[0] for _ in range(args.repeats))
    print(f"{args.set} on {torch.cuda.get_device_name()}: fused Adam's kernels {floor_ms:.3f} ms")
    print(f"| prox | {' | '.join(variants)} | kernel ms | × fused Adam | GB/s at 28 B/param | launches | max diff from default |")
    print("|---|" + "---:|" * (len(variants) + 5))
    default = {name: getattr(plan, name) for name in VARIANTS}
    for prox in ("group", "group_weighted"):
        _, _, expected = run_variant(pset, prox, default, 1)
        for values in itertools.product(*variants.values()):
            constants = dict(zip(variants, values))
            ms, launches, method = run_variant(pset, prox, constants, args.repeats)
            mark = " (default)" if constants == default else ""
            print(
                f"| {prox}{mark} | {' | '.join(map(str, values))} | {ms:.3f} | {ms / floor_ms:.2f} | {step_gbs(pset.numel, ms):,.0f} | "
                f"{launches} | {max_abs_diff(method, expected):.2g} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
