"""Latency of compaction and of LOMT attachment on a ResNet-50 multi-task model (CPU by default).

    PYTHONPATH=. python benchmarks/compaction_latency.py --out benchmarks/results/compaction

Builds the NYU-v2 model (``--tasks``, DeepLab-V3 heads, dilated ResNet-50), zeroes a random
``--sparsity`` fraction of the input-channel groups of every backbone conv but the stem (the
pattern the group prox leaves; BatchNorm statistics are randomised so that dropped channels
carry non-zero constants), compacts it, checks that the outputs agree, and measures params,
MACs and latency (warm-up, median) of the backbone and the whole model before and after. It
then times a LOMT model (``--lomt-attach``, deepest attachment before ``layer4``) against the
full multi-task model, which is the sparse model's architecture. Writes ``benchmark.json`` and
``benchmark.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lomt_train.compaction import compact_model, measure, zero_random_groups
from lomt_train.models import build_model


def _row(name: str, figures: dict, part: str) -> str:
    f = figures[part]
    latency = " | ".join(f"{m['median_ms']:,.0f} ({m['min_ms']:,.0f})" for m in f["latency"])
    return f"| {name} | {part} | {f['params'] / 1e6:.2f} | {f['macs'] / 1e9:.2f} | {latency} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--aspp-channels", type=int, default=None)
    p.add_argument("--sparsity", type=float, default=0.7, help="fraction of input-channel groups zeroed")
    p.add_argument("--lomt-attach", nargs="+", default=["seg=layer3", "depth=layer3.2"],
                   metavar="TASK=LAYER")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compaction"))
    args = p.parse_args()

    tasks = args.tasks.split(",")
    build = dict(num_classes=13, backbone=args.backbone, aspp_channels=args.aspp_channels)
    timing = dict(image_size=args.image_size, batch_sizes=args.batch_sizes, warmup=args.warmup,
                  repeats=args.repeats, device=torch.device("cpu"))
    sparse = build_model(tasks, **build).eval()
    zero_random_groups(sparse.backbone, args.sparsity)
    compact, _ = compact_model(sparse)
    x = torch.randn(2, 3, args.image_size, args.image_size)
    with torch.no_grad():
        a, b = sparse(x), compact(x)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    lomt = build_model(tasks, attach=dict(item.split("=", 1) for item in args.lomt_attach), **build).eval()

    figures = {name: measure(model, **timing) for name, model in
               (("sparse", sparse), ("compact", compact), ("lomt", lomt))}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
               "max_abs_diff": diff, "lomt_attach": lomt.attach, **figures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2))
    batches = " | ".join(f"latency b{b}, ms: median (min)" for b in args.batch_sizes)
    lines = [f"| model | part | params (M) | MACs/image (G) | {batches} |",
             "|---|---|---:|---:|" + "---:|" * len(args.batch_sizes)]
    names = {"sparse": f"sparse ({args.sparsity:.0%} groups zero; = full multi-task)",
             "compact": "compact", "lomt": f"LOMT dense ({', '.join(args.lomt_attach)})"}
    lines += [_row(names[n], figures[n], part) for part in ("backbone", "model") for n in figures]
    for part in ("backbone", "model"):
        for i, bs in enumerate(args.batch_sizes):
            for n in ("compact", "lomt"):
                ratio = figures[n][part]["latency"][i]["median_ms"] / figures["sparse"][part]["latency"][i]["median_ms"]
                lines.append(f"\n{n} / sparse {part} latency, batch {bs}: {ratio:.3f}")
    lines.append(f"\nmax |sparse - compact| over the outputs: {diff:.2e}")
    (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
