"""``lomt_train``: the command line. It parses arguments and calls library functions.

    lomt_train nyu --tasks seg,normal,depth --synthetic
    lomt_train celeba --tasks seg,male,smile --data /data/CelebAMask-HQ --paper --lambda 1e-5 1e-4
    lomt_train nyu --tasks seg,normal,depth --synthetic --epochs 20 --target-sparsity 50
    lomt_train report runs/nyu-seg+normal+depth --out reports/nyu
    lomt_train lomt-probe nyu --tasks seg,normal,depth --synthetic --seeds 0 1 --out runs/probe
    lomt_train nyu --tasks seg,normal,depth --synthetic --lomt runs/probe/profile.json
    lomt_train compact runs/nyu-seg+normal+depth/group_weighted-lambda0.01-<hash>/seed0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (
    PAPER_BATCH_SIZE, PAPER_LAMBDAS, PAPER_PATIENCE, PAPER_PRESET, PAPER_SEEDS, SYNTHETIC_PRESET, RunConfig,
)
from .data import DATASET_NAMES, default_data_root
from .lomt import USED_THRESHOLD
from .selection import CRITERIA, check_criterion
from .tasks import resolve_tasks
from .trainer import run_dir_for, run_sweep, summary_line, validate


def _attach_pairs(values: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in values:
        task, sep, node = item.partition("=")
        if not sep or not task or not node:
            raise ValueError(f"--attach {item!r}: expected TASK=LAYER, e.g. seg=layer3.3.conv1")
        pairs[task] = node
    return pairs


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that we can tell an explicit flag from a preset's value.
    p.add_argument("--tasks", required=True, help="comma-separated tasks, e.g. seg,normal,depth or seg,male,smile")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="dataset folder in its official layout")
    src.add_argument("--synthetic", action="store_true", help="use the built-in synthetic data (generated on first use)")
    p.add_argument("--layout", choices=["nyud_mt", "mtan"], help="NYU-v2 layout (detected when omitted)")
    p.add_argument("--paper", action="store_true",
                   help="the papers' protocol: lr 1e-4, 256x256, batch 16/32, ResNet-50, no augmentation, up to 1000 "
                        "epochs with early stopping on the validation loss (patience 25 NYU / 10 CelebA), 5 seeds, "
                        "and the published λ values unless --lambda is given (README: the --paper table)")
    p.add_argument("--lambda", dest="lambdas", type=float, nargs="+", help="sparsity strength(s); several = a sweep")
    p.add_argument("--target-sparsity", type=float, metavar="P",
                   help="learn λ during training so that P%% of the backbone's channel groups end at zero (--lambda: start)")
    p.add_argument("--target-macs", type=float, metavar="F",
                   help="learn λ so that the compacted backbone ends at F times the dense MACs per image (--lambda: start)")
    p.add_argument("--healing-epochs", type=int, metavar="N",
                   help="with a target: the last N epochs freeze the zero groups and fine-tune the rest "
                        "(default: a fifth of the epochs; 0: no healing)")
    p.add_argument("--peer", choices=["pat"],
                   help="reach --target-sparsity with torchao's PAT (min-sparsity constraint, healing) instead of our controller")
    p.add_argument("--prox", choices=["group", "group_weighted", "l1", "none"])
    p.add_argument("--grouping", choices=["in_channel", "out_channel"])
    p.add_argument("--seeds", type=int, nargs="+", help="seed(s); several = repeated trials")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["cosine", "step", "none"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement (0 = off)")
    p.add_argument("--criterion", choices=sorted(CRITERIA),
                   help="validation score that selects the tested epoch and drives early stopping (default val_loss)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--augment", action="store_true", default=None, help="random scale-crop and flip")
    p.add_argument("--backbone", choices=["resnet50", "resnet101", "small"])
    p.add_argument("--weights", help="local ImageNet weights (.pth state dict) for the backbone")
    p.add_argument("--aspp-channels", type=int, help="ASPP width of the DeepLab heads (default 256)")
    p.add_argument("--attach", nargs="+", metavar="TASK=LAYER", help="attach a task's head at a backbone layer (LOMT)")
    p.add_argument("--lomt", type=Path, help="a lomt-probe profile.json: attach each task at its chosen layer")
    p.add_argument("--weighting", choices=["uncertainty", "equal"])
    p.add_argument("--depth-loss", choices=["mse", "l1"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=["auto", "torch", "cpu", "triton", "cuda"], help="FusedGroupProxAdam kernel")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="mixed precision (default: bf16 on a CUDA GPU that supports it, off on the CPU)")
    p.add_argument("--amp-dtype", choices=["bfloat16", "float16"], help="autocast dtype (float16: CUDA only, with a GradScaler)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format for the model and images (default: on CUDA only)")
    p.add_argument("--workers", type=int, help="data loader workers (default: min(8, CPUs) on CUDA, 0 on the CPU)")
    p.add_argument("--synthetic-images", type=int, help="training images in the synthetic set")
    p.add_argument("--out", help="output folder (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration, the λ values, the seeds and the run folders as JSON, and exit")
    p.add_argument("--max-nonfinite-steps", type=int,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped; "
                   "default 5)")


# Flags that map one-to-one onto RunConfig fields (tasks and attach are parsed first).
_CONFIG_FLAGS = {f.name for f in dataclasses.fields(RunConfig)} - {"dataset", "tasks", "attach"}


def config_from_args(dataset: str, args: argparse.Namespace) -> tuple[RunConfig, list[float], list[int]]:
    """The base config, the lambda_ values and the seeds a training command asks for.

    Precedence: defaults, then the synthetic preset (with ``--synthetic``), then the papers'
    preset (with ``--paper``: its λ values too), then explicit flags. Without ``--data`` or
    ``--synthetic`` the data is ``$LOMT_DATA/<dataset>``.
    """
    # Canonical task names, so that `normals` and `normal` name the same run folder.
    values: dict[str, Any] = {"dataset": dataset, "tasks": [t.name for t in resolve_tasks(args.tasks, dataset)]}
    lambdas: list[float] = [0.0]
    seeds: list[int] = [0]
    if args.synthetic:
        values["synthetic"] = True
        preset = dict(SYNTHETIC_PRESET)
        lambdas = [preset.pop("lambda_")]
        values.update(preset)
    elif args.data is None:
        values["data"] = str(default_data_root(dataset))
    if args.paper:
        values.update(PAPER_PRESET, batch_size=PAPER_BATCH_SIZE[dataset], patience=PAPER_PATIENCE[dataset])
        lambdas = list(PAPER_LAMBDAS[dataset])
        seeds = list(PAPER_SEEDS)
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in _CONFIG_FLAGS}
    values.update(explicit)
    if args.attach:
        values["attach"] = _attach_pairs(args.attach)
    if args.lomt:
        try:
            attach = json.loads(args.lomt.read_text())["attach"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--lomt {args.lomt}: not a lomt-probe profile.json ({exc!r})") from exc
        values["attach"] = {**attach, **values.get("attach", {})}
    if args.lambdas:
        lambdas = args.lambdas
    if args.seeds:
        seeds = args.seeds
    return RunConfig.from_dict(values), lambdas, seeds


def dry_run(config: RunConfig, lambdas: Sequence[float], seeds: Sequence[int]) -> str:
    """What a command would run, as JSON: the resolved configuration (its ``lambda_`` and ``seed``
    are the first of ``lambdas`` and ``seeds``), early stopping in words (``enabled``, ``patience``,
    ``criterion``, ``max_epochs``), every λ and seed, and the run folders. Each run's configuration
    is checked as training would check it; nothing is written."""
    runs = []
    for lambda_ in lambdas:
        for seed in seeds:
            run = dataclasses.replace(config, lambda_=lambda_, seed=seed)
            validate(run)
            check_criterion(run)
            runs.append(str(run_dir_for(run)))
    resolved = dataclasses.asdict(dataclasses.replace(config, lambda_=lambdas[0], seed=seeds[0]))
    stopping = {"enabled": config.patience > 0, "patience": config.patience, "criterion": config.criterion,
                "max_epochs": config.epochs}
    return json.dumps({"config": resolved, "early_stopping": stopping, "lambdas": list(lambdas), "seeds": list(seeds),
                       "runs": runs}, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lomt_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])
    for name in DATASET_NAMES:
        _add_train_arguments(add_parser(name, help=f"train on {name} (single- or multi-task, sweeps, seeds)"))
    report = add_parser("report", help="tables and plots from run folders")
    report.add_argument("runs", nargs="+", type=Path, help="run folders, or folders that contain them")
    report.add_argument("--out", type=Path, default=Path("report"))
    probe = add_parser(
        "lomt-probe",
        help="LOMT step 1: train each task alone with sparsity, write profile.json (attachment layers) and a heatmap",
    )
    probe.add_argument("dataset", choices=DATASET_NAMES)
    _add_train_arguments(probe)
    probe.add_argument("--threshold", type=float, default=USED_THRESHOLD, metavar="TAU",
                       help="a conv is used by a task when more than this fraction of its input channels "
                            f"is active in every seed (default {USED_THRESHOLD})")
    compact = add_parser("compact", help="physically remove zero channel groups from a run's best model")
    compact.add_argument("run", type=Path, help="a run folder (config.json, best.pt)")
    compact.add_argument("--image-size", type=int, default=256, help="input size for MACs and latency")
    compact.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="latency batch sizes")
    compact.add_argument("--repeats", type=int, default=5, help="timed calls per latency figure (after warm-up)")
    compact.add_argument("--device", default="cpu", help="device for the latency figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in DATASET_NAMES:
            config, lambdas, seeds = config_from_args(args.command, args)
            if args.dry_run:
                print(dry_run(config, lambdas, seeds))
                return 0
            results = run_sweep(config, lambdas, seeds, resume=args.resume, progress=not args.no_progress)
            for result in results if os.environ.get("RANK", "0") == "0" else []:
                label = f"{result.run_dir} test ({result.test_split})"
                print(summary_line(label, result.test_metrics, result.sparsity["total"]["group_sparsity"]))
        elif args.command == "report":
            from .report import write_report

            for path in write_report(args.runs, args.out):
                print(path)
        elif args.command == "lomt-probe":
            from .lomt import probe, write_profile

            config, lambdas, seeds = config_from_args(args.dataset, args)
            profile = probe(config, lambdas, seeds, threshold=args.threshold, progress=not args.no_progress)
            for path in write_profile(profile, config.out):
                print(path)
            print(f"attach: {json.dumps(profile['attach'])}")
        elif args.command == "compact":
            from .compaction import compact_run

            report = compact_run(args.run, image_size=args.image_size, batch_sizes=tuple(args.batch_sizes),
                                 repeats=args.repeats, device=args.device)
            print((args.run / "compact.md").read_text(), end="")
            print(f"max |sparse - compact| = {report['max_abs_diff']:.2e}")
    except Exception as exc:
        if args.debug:
            raise
        # Our own errors name the file and the fix; anything else also says what it is.
        expected = isinstance(exc, (ValueError, OSError, RuntimeError))
        message = str(exc) if expected else f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
        print(f"lomt_train: error: {message}", file=sys.stderr)
        return 2
    return 0
