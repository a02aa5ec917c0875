"""``python -m benchmarks.device_time``: what a step's kernels cost on a GPU, apart from launching them.

:mod:`benchmarks.report` times a step as the user sees it: host wall-clock around
``optimizer.step()`` and a synchronize, so Python and launch overhead count. This splits that
time for each method on one param set (CUDA only): the wall-clock median of ``--repeats``
steps (no profiler), the median summed time of the step's kernels under
:mod:`torch.profiler` (each step from the same warm state, :meth:`~benchmarks.baselines.Method.restore`),
the bandwidth that kernel time gives at 28 B/param, and the kernels that took longest in the
last profiled step.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .baselines import FLOOR, WEIGHTED_TRAFFIC, Method, MethodSpec, error_summary, fused_spec, skip_reason
from .params import ParamSet, build_set, step_gbs
from .timing import paired_ratio, time_rounds

#: The methods timed by default: the floor, the traffic yardstick and the GPU backends' steps.
DEFAULT_SPECS = (
    FLOOR[0],
    WEIGHTED_TRAFFIC,
    *(fused_spec(backend, prox) for backend in ("triton", "cuda") for prox in ("group", "group_weighted", "l1")),
)
#: Kernels listed per method.
TOP_KERNELS = 4


def kernel_times(method: Method) -> tuple[float, list[tuple[str, int, float]]]:
    """Summed device time (ms) of one step's kernels, and ``(name, launches, ms)`` of each
    kernel, longest first."""
    method.restore()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        method.step()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted(((e.key, e.count, e.self_device_time_total / 1e3) for e in events), key=lambda k: -k[2])
    return sum(ms for _, _, ms in kernels), kernels


def measure(spec: MethodSpec, pset: ParamSet, repeats: int, floor: Method | None) -> list[str]:
    """The markdown lines of one method: its row, then its longest kernels. ``floor`` (fused
    Adam, ``None`` for itself) is timed just before each wall-clock round."""
    method = Method(spec, pset)
    method.timed_step()  # compiles and builds tables
    paired = None if floor is None else (lambda: 1e3 * floor.timed_step())
    walls, floors = time_rounds(lambda: 1e3 * method.timed_step(), paired, repeats)
    wall = statistics.median(walls)
    ratio = paired_ratio(walls, floors)
    profiled = [kernel_times(method) for _ in range(repeats)]
    device = statistics.median(ms for ms, _ in profiled)
    lines = [f"| {spec.label} | {wall:.3f} | {'1.00' if ratio is None else f'{ratio:.2f}'} | {device:.3f} | "
             f"{step_gbs(pset.numel, device):,.0f} | {wall - device:.3f} |"]
    lines += [f"|   {name[:80]} (×{count}) | | | {ms:.3f} | | |" for name, count, ms in profiled[-1][1][:TOP_KERNELS]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="resnet50-convs", help="param set (default resnet50-convs)")
    parser.add_argument("--repeats", type=int, default=7, help="steps timed, and steps profiled, per method")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")

    pset = build_set(args.set, "cuda")
    lines = [
        f"### {args.set} on {torch.cuda.get_device_name()}: {pset.description}",
        "",
        f"torch {torch.__version__}; medians of {args.repeats} steps from the same warm state; × Adam(fused): "
        "the median of each wall-clock step's time over a fused-Adam step's timed just before it.",
        "",
        "| method (then its longest kernels) | wall ms | × Adam(fused) | kernel ms | GB/s at 28 B/param | wall - kernel ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = Method(FLOOR[0], pset)
    for spec in DEFAULT_SPECS:
        start = len(lines)
        reason = skip_reason(spec, "cuda")
        try:
            lines += ([f"| {spec.label} | skipped: {reason} | | | | |"] if reason
                      else measure(spec, pset, args.repeats, None if spec is FLOOR[0] else floor))
        except Exception as exc:  # one backend's failure must not cost the other rows
            lines.append(f"| {spec.label} | failed: {error_summary(exc)} | | | | |")
        print("\n".join(lines[start:]), flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
