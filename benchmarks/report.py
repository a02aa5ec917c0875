"""``python -m benchmarks.report``: fused against unfused proximal Adam, as a table.

Times one optimizer step of every method in :mod:`benchmarks.baselines` on every param set of
:mod:`benchmarks.params` (median over ``--repeats`` rounds after one warm-up round; every round
starts from the same warm state, restored and evicted from the caches untimed), prints the
tables and writes them, with the machine, versions, thread count and date, to
``benchmarks/RESULTS.md``.

Columns: ms per step (median, and the range over rounds), the ratio to
``torch.optim.Adam(fused=True)`` on the same set (the median of each round's ratio to a fused
Adam step timed just before it), the effective bandwidth against the bytes a
one-pass fp32 step must move (28 B/param: read p, g, m, v; write p, m, v) and the fraction of
groups (elements, for l1) the step left at zero.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .baselines import FLOOR, PUBLISHED_NEWTON_ITERS, Method, MethodSpec, all_specs, error_summary, skip_reason
from .params import BYTES_PER_PARAM, SWEEP_SIZES_M, ParamSet, build_set, set_names, step_gbs
from .timing import paired_ratio, time_round

RESULTS = Path(__file__).with_name("RESULTS.md")
#: Rounds of the slow published baseline, whatever ``--repeats`` says.
PUBLISHED_MAX_ROUNDS = 3
QUICK_SIZES_M = (0.25, 1.0)
#: The method every ratio is to: torch.optim.Adam(fused=True).
FLOOR_KEY = FLOOR[0].key


@dataclass
class Row:
    spec: MethodSpec
    times_ms: list[float]
    zeroed: float | None = None
    #: Why the method did not run: unavailable here, or (``failed``) it raised when built or stepped.
    skipped: str | None = None
    failed: bool = False
    #: Round k's fused-Adam step, timed just before this method's round k (empty for the floor).
    floor_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def ratio(self) -> float | None:
        """The median over rounds of ``times_ms[k] / floor_ms[k]``: 1 for the floor itself,
        ``None`` where no floor ran."""
        if self.spec.key == FLOOR_KEY:
            return 1.0
        if not self.floor_ms:
            return None
        return paired_ratio(self.times_ms, self.floor_ms)


@dataclass
class SetResult:
    name: str
    description: str
    numel: int
    rows: list[Row]

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.spec.key == key and r.skipped is None), None)


def run_set(pset: ParamSet, device: str, repeats: int, log=print) -> SetResult:
    """Time every available method on ``pset`` with interleaved rounds.

    All methods are built first; round ``k`` of every method runs before round ``k + 1`` of
    any, so a change in the machine's speed during the run touches every method alike. Each
    round of a method other than fused Adam also times a fused-Adam step just before it, so that
    its ratio to the floor (:attr:`Row.ratio`) compares two steps run within milliseconds of each
    other: on a shared VM, the medians of two methods can come from different speeds of the host.
    The slow published baseline takes at most :data:`PUBLISHED_MAX_ROUNDS` rounds and no warm-up;
    the others take one warm-up round. A method that raises while it is built or warmed up is
    left out, with the error in its row, and the others still run.
    """
    rows = [Row(spec, [], skipped=skip_reason(spec, device)) for spec in all_specs()]
    methods = {}
    for row in rows:
        if row.skipped is None:
            try:
                method = Method(row.spec, pset)
                if row.spec.key != "published-weighted":
                    method.timed_step()
            except Exception as exc:  # a backend's bug must not cost the other methods' figures
                row.skipped, row.failed = error_summary(exc), True
                log(f"  {row.spec.label:<58} failed: {row.skipped}")
                continue
            methods[row.spec.key] = method
    rounds = {key: min(repeats, PUBLISHED_MAX_ROUNDS) if key == "published-weighted" else repeats for key in methods}
    floor = methods.get(FLOOR_KEY)
    for k in range(repeats):
        for row in rows:
            key = row.spec.key
            if row.skipped is None and k < rounds[key]:
                paired = floor is not None and key != FLOOR_KEY
                time_round(_ms_of(methods[key]), _ms_of(floor) if paired else None, row.times_ms, row.floor_ms)
    for row in rows:
        if row.skipped is None:
            row.zeroed = methods[row.spec.key].zero_group_fraction() if row.spec.prox != "none" else None
            log(f"  {row.spec.label:<58} {row.median:10.2f} ms")
    methods.clear()
    gc.collect()
    return SetResult(pset.name, pset.description, pset.numel, rows)


def _ms_of(method: Method) -> Callable[[], float]:
    """A round of ``method``: one timed step, in ms."""
    return lambda: 1e3 * method.timed_step()


#: Bytes copied (and as many written) by :func:`copy_bandwidth`: far more than any GPU's L2.
COPY_BYTES = 1 << 30


def copy_bandwidth(device: str, repeats: int = 20) -> float:
    """A device-to-device copy's bandwidth in GB/s, counting bytes read plus bytes written (the
    yardstick a one-pass optimizer step is measured against): the median of ``repeats`` copies
    of :data:`COPY_BYTES`, timed with CUDA events after one warm-up copy."""
    src = torch.rand(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return 2 * COPY_BYTES / (statistics.median(times_ms) / 1e3) / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def set_table(result: SetResult) -> str:
    lines = [
        f"### {result.name}: {result.description}",
        "",
        "| method | ms/step (median) | range | × Adam(fused) | GB/s (28 B/param) | zeroed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        if row.skipped is not None:
            continue
        gbs = step_gbs(result.numel, row.median)
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        rng = f"{_fmt_ms(min(row.times_ms))}–{_fmt_ms(max(row.times_ms))}" if len(row.times_ms) > 1 else "1 round"
        zeroed = "-" if row.zeroed is None else f"{row.zeroed:.0%}"
        lines.append(f"| {row.spec.label} | {_fmt_ms(row.median)} | {rng} | {ratio} | {gbs:.1f} | {zeroed} |")
    return "\n".join(lines)


def best_fused(result: SetResult, prox: str) -> Row | None:
    """The fastest fused backend other than the ``torch`` reference, else the reference."""
    rows = [r for r in result.rows if r.skipped is None and r.spec.kind == "fused" and r.spec.prox == prox]
    kernels = [r for r in rows if r.spec.backend != "torch"]
    return min(kernels or rows, key=lambda r: r.median, default=None)


def sweep_table(results: list[SetResult]) -> str:
    sweep = [r for r in results if r.name.startswith("sweep-")]
    if not sweep:
        return ""
    head = "| method | " + " | ".join(f"{r.name[6:]} ({r.numel / 1e6:.2f}M)" for r in sweep) + " |"
    lines = [
        "### Size sweep: ms/step (ns/param)",
        "",
        "Stacks of [512,512,3,3], [2048,512,1,1], [256,256,3,3], [512,2048,1,1], [128,128,3,3], "
        "[1024,256,1,1] and [64,64,3,3] conv weights, all with the prox. Linear cost shows as a "
        "constant ns/param.",
        "",
        head,
        "|---|" + "---:|" * len(sweep),
    ]
    for spec in all_specs():
        cells = []
        for r in sweep:
            row = r.row(spec.key)
            cells.append("-" if row is None else f"{_fmt_ms(row.median)} ({row.median * 1e6 / r.numel:.2f})")
        if any(c != "-" for c in cells):
            lines.append(f"| {spec.label} | " + " | ".join(cells) + " |")
    lines += ["", "Unfused ÷ fused (the speed-up of the fastest available fused backend):", "",
              head.replace("| method |", "| prox |"), "|---|" + "---:|" * len(sweep)]
    from .baselines import UNFUSED_FOR

    for prox, key in UNFUSED_FOR.items():
        cells = []
        for r in sweep:
            unfused, fused = r.row(key), best_fused(r, prox)
            cells.append("-" if not (unfused and fused) else f"{unfused.median / fused.median:.2f}× ({fused.spec.backend})")
        lines.append(f"| {prox} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speedup(baseline_ms: float, ours_ms: float) -> str:
    r = baseline_ms / ours_ms
    return f"{r:.2f}× faster than" if r >= 1 else f"{1 / r:.2f}× slower than"


def performance_paragraph(
    results: list[SetResult], device: str, threads: int, copy_gbs: float | None = None
) -> str:
    """The README-ready summary, built from the ResNet-50 (or the first) set's results.

    With ``copy_gbs`` (a device-to-device copy's bandwidth) it also says what fraction of it the
    fused group and weighted steps reach at 28 B/param."""
    result = next((r for r in results if r.name == "resnet50-convs"), results[0])
    floor = result.row(FLOOR_KEY)
    group, weighted, l1 = (best_fused(result, p) for p in ("group", "group_weighted", "l1"))
    unf_group, published, unf_l1, traffic = (
        result.row(k) for k in ("unfused-group", "published-weighted", "unfused-l1", "weighted-traffic")
    )
    if not (floor and group and weighted and unf_group and published):
        return "(not enough methods ran to summarise)"
    where = f"{device_name(device)}" + (f", {threads} threads" if device == "cpu" else "")
    backend = group.spec.backend
    ref_note = (
        " (the `torch` reference backend: no fused kernel was available on this device when measured)"
        if backend == "torch" else ""
    )
    text = (
        f"On {where}, one `FusedGroupProxAdam` step (backend `{backend}`{ref_note}) over the "
        f"{result.numel / 1e6:.2f}M conv weights of the dilated ResNet-50 takes "
        f"{_fmt_ms(group.median)} ms with the group-lasso prox, {group.ratio:.2f}× "
        f"`torch.optim.Adam(fused=True)` ({_fmt_ms(floor.median)} ms, no prox) and "
        f"{_speedup(unf_group.median, group.median)} Adam followed by the prox as tensor ops "
        f"({_fmt_ms(unf_group.median)} ms). With the adaptive (weighted) prox, solved to convergence, "
        f"it takes {_fmt_ms(weighted.median)} ms against {_fmt_ms(published.median)} ms for the published "
        f"approach (Adam, then {PUBLISHED_NEWTON_ITERS} Newton iterations per layer as tensor ops), "
        f"{_speedup(published.median, weighted.median)} it."
    )
    if traffic:
        text += (
            f" No exact weighted step can move less memory than Adam plus one more read of z and d "
            f"and one rewrite of p: those bytes alone, as tensor ops after fused Adam, take "
            f"{_fmt_ms(traffic.median)} ms ({traffic.ratio:.2f}× Adam)."
        )
    if l1 and unf_l1:
        text += (
            f" The l1 prox takes {_fmt_ms(l1.median)} ms against {_fmt_ms(unf_l1.median)} ms unfused."
        )
    if copy_gbs:
        floor_gbs, group_gbs, weighted_gbs = (step_gbs(result.numel, row.median) for row in (floor, group, weighted))
        text += (
            f" At {BYTES_PER_PARAM} B/param the group step moves {group_gbs:,.0f} GB/s and the weighted "
            f"step {weighted_gbs:,.0f} GB/s: {group_gbs / copy_gbs:.0%} and {weighted_gbs / copy_gbs:.0%} "
            f"of a device-to-device copy ({copy_gbs:,.0f} GB/s read plus written; fused Adam: "
            f"{floor_gbs / copy_gbs:.0%})."
        )
    return text


def render(
    results: list[SetResult], device: str, threads: int, repeats: int, shared_note: bool,
    copy_gbs: float | None = None,
) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    skipped, failed = {}, {}
    for r in results:
        for row in r.rows:
            if row.failed:
                failed.setdefault(row.spec.label, f"{row.skipped} (set {r.name})")
            elif row.skipped is not None:
                skipped.setdefault(f"backend `{row.spec.backend}`" if row.spec.backend else f"`{row.spec.label}`", row.skipped)
    parts = [
        "# Optimizer step benchmarks: fused against unfused",
        "",
        "Generated by `python -m benchmarks.report"
        + "".join(f" {a}" for a in sys.argv[1:]) + "`; do not edit by hand.",
        "",
        f"* Device: {device} ({device_name(device)})"
        + (f", `torch.get_num_threads() = {threads}`, vector ISA {torch.backends.cpu.get_cpu_capability()} "
           "(the cpu kernel's code path)" if device == "cpu" else ""),
        f"* torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}",
        f"* Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"* Timing: median over {repeats} rounds after one warm-up round (the published baseline: "
        f"at most {PUBLISHED_MAX_ROUNDS} rounds, no warm-up). Every round starts from the same warm "
        "state (params, gradients, Adam moments at step 100, restored untimed, then evicted from the "
        "caches), so every round does the same step and zeroes the same groups; no drift. Rounds are "
        "interleaved: round k of every method runs before round k + 1 of any. × Adam(fused) is the "
        "median over rounds of each round's time over that of a fused-Adam step timed just before it.",
        "* `lambda_` is chosen per set and prox so that the step zeroes 50% of the groups "
        "(of the elements, for l1); the `zeroed` column is what each method actually left at zero.",
        "* GB/s: 28 B/param (fp32 read p, g, m, v; write p, m, v) over all the set's params, "
        "divided by the median time: what a one-pass step must move.",
    ]
    if copy_gbs:
        parts.append(
            f"* Device-to-device copy: {copy_gbs:,.0f} GB/s (bytes read plus written; median of 20 "
            f"copies of {COPY_BYTES >> 20} MiB, CUDA events). Times per step are host wall-clock "
            "around `optimizer.step()` and a device synchronize: launch and Python overhead included."
        )
    if shared_note:
        parts.append(
            "* **Measured on a shared VM**: what it gets moves with the host's load, from one "
            "second to the next (the range column shows how far in this run). Compare ratios "
            "within one run, not times across runs."
        )
    for name, reason in skipped.items():
        parts.append(f"* Skipped {name}: {reason}")
    for label, error in failed.items():
        parts.append(f"* **Failed** `{label}`, left out: {error}")
    parts += ["", "## Performance summary", "", performance_paragraph(results, device, threads, copy_gbs), "", "## Results", ""]
    for r in results:
        if not r.name.startswith("sweep-"):
            parts += [set_table(r), ""]
    sweep = sweep_table(results)
    if sweep:
        parts += [sweep, ""]
        parts += ["### Each sweep set", ""]
        for r in results:
            if r.name.startswith("sweep-"):
                parts += [set_table(r), ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"small sets and sweep sizes {QUICK_SIZES_M}M only")
    parser.add_argument("--sizes", type=lambda s: tuple(float(x) for x in s.split(",")), default=None,
                        help="sweep sizes in millions of params, comma-separated (default 1,4,16,64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per method (default 5, --quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    parser.add_argument("--sets", default=None, help="comma-separated set names instead of the default list")
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-shared-note", action="store_true", help="leave out the shared-VM caveat (CPU runs)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.sets:
        names = args.sets.split(",")
    elif args.quick:
        names = set_names(small=True) + set_names(sizes_m=args.sizes or QUICK_SIZES_M)[2:]
    else:
        names = set_names(sizes_m=args.sizes or SWEEP_SIZES_M)

    # The shared-VM caveat describes this project's CPU host, not a GPU.
    shared_note = args.device == "cpu" and not args.no_shared_note
    copy_gbs = copy_bandwidth(args.device) if args.device == "cuda" else None
    results: list[SetResult] = []

    def render_all() -> str:
        return render(results, args.device, torch.get_num_threads(), repeats, shared_note, copy_gbs)

    for name in names:
        start = time.perf_counter()
        pset = build_set(name, args.device)
        print(f"{name}: {pset.description} (built in {time.perf_counter() - start:.1f} s)", flush=True)
        results.append(run_set(pset, args.device, repeats, log=lambda s: print(s, flush=True)))
        del pset
        gc.collect()
        if not args.no_write:  # after every set, so an interrupted run leaves its results
            args.output.write_text(render_all())

    text = render_all()
    print()
    print(text)
    if not args.no_write:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
