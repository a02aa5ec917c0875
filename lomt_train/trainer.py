"""One training run: data, model, FusedGroupProxAdam, validation, test, timing, all to a folder.

A run folder holds ``config.json`` (the exact configuration), ``history.json`` and
``history.csv`` (one row per epoch: losses, validation metrics, task weights, sparsity, time),
``last.pt`` and ``best.pt`` (atomic checkpoints), ``sparsity.json`` (per-layer figures of the
selected model's backbone), ``timing.json`` (inference latency) and ``results.json`` (the
test metrics of the selected model, evaluated once, in eval mode).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from lomt_kernels import FusedGroupProxAdam, MacFraction, group_sparsity, prox_param_groups

from .atomic import remove_orphans
from .checkpoint import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, rng_state, seed_everything, set_rng_state,
)
from .config import RunConfig
from .distributed import DistContext, init_distributed, shard
from .data import DATASET_NAMES, build_dataset, generate_cached, make_synthetic_celeba, make_synthetic_nyu
from .locking import LockedError, hold_lock
from .losses import build_weighting
from .models import MultiTaskModel, build_model
from .nonfinite import NonFiniteGuard, all_finite
from . import run_identity
from .resume import check_resume
from .selection import selection_score
from .pat import check_peer, pat_optimizer
from .targets import WARMUP_EPOCHS, build_controller, check_target, healing_epochs, selectable
from .tasks import Task, get_task, resolve_tasks
from .timing import measure_latency


@dataclass
class RunResult:
    """What a finished run reports back; everything here is also in its folder."""

    run_dir: Path
    best_epoch: int
    test_split: str
    test_metrics: dict[str, dict[str, float]]
    sparsity: dict[str, Any]
    history: list[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def run_dir_for(config: RunConfig) -> Path:
    """The run's folder: :func:`lomt_train.run_identity.run_dir_for` (the rule is defined there)."""
    return run_identity.run_dir_for(config)


def validate(config: RunConfig) -> list[Task]:
    """Check a config before any work is done; returns its tasks."""
    if config.dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {config.dataset!r}: expected one of {DATASET_NAMES}")
    if config.lambda_ < 0:
        raise ValueError(f"lambda_={config.lambda_} is negative: the sparsity strength must be >= 0")
    for name in ("lambda_", "lr", "weight_decay"):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise ValueError(f"{name}={value}: it must be a finite number {'> 0' if name == 'lr' else '>= 0'}")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs ({config.epochs}) and batch size ({config.batch_size}) must be >= 1")
    for name, least in (("image_size", 8), ("synthetic_images", 4), ("max_nonfinite_steps", 1), ("timing_repeats", 1),
                        ("patience", 0), ("workers", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name}={getattr(config, name)}: it must be >= {least}")
    if config.aspp_channels is not None and config.aspp_channels < 1:
        raise ValueError(f"aspp_channels={config.aspp_channels}: it must be >= 1")
    if config.lr_schedule not in ("cosine", "step", "none"):
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}: expected cosine, step or none")
    if not config.synthetic and config.data is None:
        raise ValueError("give a dataset folder with --data PATH, or use --synthetic for the built-in data")
    if not config.synthetic and not Path(config.data).is_dir():
        raise FileNotFoundError(f"--data {config.data}: no such folder")
    resolve_device(config.device)
    build_weighting(config.weighting, config.tasks)
    check_target(config)
    check_peer(config)
    return resolve_tasks(config.tasks, config.dataset, depth_loss=config.depth_loss)


def dataset_root(config: RunConfig) -> Path:
    """The folder to read: ``--data``, or the built-in synthetic set (generated on first use, in a
    cache folder of its own for every set of generation parameters)."""
    if not config.synthetic:
        return Path(config.data)
    n = config.synthetic_images
    size = [config.image_size, config.image_size]
    if config.dataset == "nyu":
        return generate_cached(
            "nyu", make_synthetic_nyu, num_train=n, num_val=n // 4, num_test=n // 4, size=size, seed=0
        )
    return generate_cached("celeba", make_synthetic_celeba, num_images=n + n // 2, size=size, seed=0)


def _train_loader(dataset, config: RunConfig, ctx: DistContext, epoch: int) -> DataLoader:
    """This rank's batches of epoch ``epoch``, the same whether or not the run was interrupted.

    Shuffling and the workers' seeds derive from (seed, epoch) only. Under DDP each rank draws
    ``batch_size`` items per step from its DistributedSampler share (effective batch
    ``batch_size * world_size``).
    """
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=config.seed, drop_last=True)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        # BatchNorm needs more than one item per batch; a short last batch is dropped.
        drop_last=len(dataset) > config.batch_size * ctx.world_size,
        num_workers=config.workers,
        generator=generator,
    )


def _eval_loader(dataset, config: RunConfig, ctx: DistContext) -> DataLoader:
    return DataLoader(shard(dataset, ctx), batch_size=config.batch_size, num_workers=config.workers)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _autocast(config: RunConfig, device: torch.device):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=config.amp)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], tasks: list[Task], config: RunConfig, ctx: DistContext
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean loss per task and metrics per task over a whole split, in eval mode.

    Under DDP each rank evaluates its shard and the sums behind every figure are all-reduced,
    so the result is the split-level figure, identical on every rank.
    """
    model.eval()
    meters = {t.name: t.metrics() for t in tasks}
    loss_sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=ctx.device)  # last entry: item count
    for batch in loader:
        batch = _to(batch, ctx.device)
        with _autocast(config, ctx.device):
            preds = model(batch["image"])
        n = batch["image"].shape[0]
        loss_sums[-1] += n
        for i, t in enumerate(tasks):
            pred = preds[t.name].float()
            loss_sums[i] += t.loss(pred, batch[t.name]).double() * n
            meters[t.name].update(pred, batch[t.name])
    ctx.all_reduce_sum(loss_sums)
    if ctx.enabled:
        for meter in meters.values():
            meter.sync(torch.distributed.all_reduce)
    count = max(loss_sums[-1].item(), 1.0)
    losses = {t.name: loss_sums[i].item() / count for i, t in enumerate(tasks)}
    return losses, {k: m.compute() for k, m in meters.items()}


class Objective(nn.Module):
    """The model and its loss weighting as one module, so that DDP averages every gradient,
    the weighting's log-variances included."""

    def __init__(self, model: MultiTaskModel, weighting: nn.Module, tasks: list[Task]) -> None:
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.tasks = tasks

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        preds = self.model(batch["image"])
        losses = {t.name: t.loss(preds[t.name].float(), batch[t.name]) for t in self.tasks}
        return self.weighting(losses), losses


def train_step(
    objective: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    batch: dict[str, Tensor], autocast, all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor], bool]:
    """One optimisation step on ``batch``; returns the weighted total, each task's loss, and
    whether the step was taken.

    The step is skipped when the loss or a gradient is not finite (on any rank, when
    ``all_reduce_sum`` sums over ranks). With fp16 the GradScaler checks the (scaled) gradients
    itself, so only the loss is checked here.
    """
    with autocast:
        total, losses = objective(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    params = [] if scaler.is_enabled() else [p for group in optimizer.param_groups for p in group["params"]]
    bad = (~all_finite(total, params)).to(torch.float32)
    if all_reduce_sum is not None:
        bad = all_reduce_sum(bad)
    finite = bad.item() == 0
    if finite:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.zero_grad(set_to_none=True)
    return total.detach(), {k: v.detach() for k, v in losses.items()}, finite


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(json.dumps(history, indent=2), run_dir / "history.json")
    flat = [_flatten(row) for row in history]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in flat for k in row)))
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(text.getvalue(), run_dir / "history.csv")


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def build_run(config: RunConfig, tasks: list[Task], num_classes: int, device: torch.device, steps_per_epoch: int):
    """Model, loss weighting, optimizer and LR schedule of a run, on ``device``."""
    model = build_model(
        tasks, num_classes=num_classes, backbone=config.backbone, weights=config.weights,
        attach=config.attach or None, aspp_channels=config.aspp_channels,
    ).to(device)
    names = [t.name for t in tasks]
    weighting = build_weighting(config.weighting, names).to(device)
    groups = prox_param_groups(model, "backbone", lambda_=config.lambda_, prox=config.prox, grouping=config.grouping)
    weighting_params = list(weighting.parameters())
    if weighting_params:
        groups.append({"params": weighting_params, "lambda_": 0.0, "weight_decay": 0.0})
    if config.peer == "pat":
        optimizer = pat_optimizer(config, groups, steps_per_epoch, WARMUP_EPOCHS, healing_epochs(config))
    else:
        optimizer = FusedGroupProxAdam(groups, lr=config.lr, weight_decay=config.weight_decay, backend=config.backend)
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    elif config.lr_schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(config.epochs // 3, 1), gamma=0.1)
    elif config.lr_schedule == "none":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}: expected cosine, step or none")
    return model, weighting, optimizer, scheduler


def train(
    config: RunConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> RunResult | None:
    """Train one run to completion (or, with ``stop_after``, for that many epochs of this call).

    ``resume=True`` continues from the run folder's ``last.pt`` so that the run ends exactly as
    if it had never stopped, and only with the options it was started with. Returns ``None``
    when stopped early by ``stop_after``. Under ``torchrun`` every rank calls this; rank 0 alone
    writes files and shows progress, and holds the folder's lock so that no other process
    writes the same run.
    """
    tasks = validate(config)
    ctx = init_distributed(resolve_device(config.device))
    run_dir = run_dir_for(config)
    with _run_lock(run_dir, ctx):
        return _train(config, tasks, ctx, run_dir, resume=resume, progress=progress, stop_after=stop_after)


@contextlib.contextmanager
def _run_lock(run_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds ``run_dir``'s lock for the run; if it cannot, every rank stops (none waits
    for it at a barrier)."""
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                stack.enter_context(hold_lock(run_dir / ".lock", purpose=f"run folder {run_dir}"))
            except LockedError as exc:
                error = exc
        failed = ctx.all_reduce_sum(torch.tensor([float(error is not None)], device=ctx.device)).item()
        if error is not None:
            raise error
        if failed:
            raise LockedError(f"run folder {run_dir} is in use by another process (rank 0 names it)")
        yield


def _train(
    config: RunConfig, tasks: list[Task], ctx: DistContext, run_dir: Path, *, resume: bool, progress: bool,
    stop_after: int | None,
) -> RunResult | None:
    device = ctx.device
    progress = progress and ctx.is_main
    if ctx.is_main:
        remove_orphans(run_dir)  # left by a writer that was killed; the lock says it is gone
    ckpt = check_resume(config, run_dir, resume=resume)
    if ctx.is_main:
        if ckpt is None:
            atomic_write_text(config.to_json(), run_dir / "config.json")
        root = dataset_root(config)  # rank 0 generates synthetic data; the others then find it
    ctx.barrier()
    if not ctx.is_main:
        root = dataset_root(config)

    seed_everything(config.seed)
    names = [t.name for t in tasks]
    # The splits are the dataset's (build_dataset's fixed split seed), never the run's: every seed
    # trains, selects and tests on the same images.
    common = dict(tasks=names, image_size=config.image_size, layout=config.layout)
    train_set = build_dataset(config.dataset, root, "train", augment=config.augment, **common)
    val_set = build_dataset(config.dataset, root, "val", **common)
    if ctx.is_main:
        splits = {"train": train_set.ids, "val": val_set.ids,
                  "test": build_dataset(config.dataset, root, "test", **common).ids}
        atomic_write_text(json.dumps(splits), run_dir / "splits.json")
    steps_per_epoch = len(_train_loader(train_set, config, ctx, 0))
    model, weighting, optimizer, scheduler = build_run(config, tasks, train_set.num_classes, device, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    controller = build_controller(config, model, optimizer, device, steps_per_epoch)
    target = None

    history: list[dict[str, Any]] = []
    best = {"score": math.inf, "epoch": -1, "bad_epochs": 0}
    start_epoch = 0
    guard = NonFiniteGuard(config.max_nonfinite_steps, log=tqdm.write if ctx.is_main else lambda _: None)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            weighting.load_state_dict(ckpt["weighting"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            guard.load_state_dict(ckpt.get("nonfinite", {"skipped": 0, "consecutive": 0}))
            if controller is not None:
                controller.load_state_dict(ckpt["controller"])
            history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {run_dir / 'last.pt'} does not fit this run ({exc}); delete it to start over"
            ) from exc

    objective: nn.Module = Objective(model, weighting, tasks)
    if ctx.enabled:
        if device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if progress:
        tqdm.write(f"{run_dir}: {len(train_set)} training items, effective batch {config.batch_size * ctx.world_size}"
                   f" ({ctx.world_size} process{'es' if ctx.enabled else ''}), device {device}")
    val_loader = _eval_loader(val_set, config, ctx)
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if best["bad_epochs"] >= config.patience > 0:
            break
        started = time.perf_counter()
        objective.train()
        sums = {n: 0.0 for n in names}
        seen = 0
        bar = tqdm(
            _train_loader(train_set, config, ctx, epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
        )
        skipped_before = guard.skipped
        for step, batch in enumerate(bar):
            batch = _to(batch, device)
            total, losses, finite = train_step(
                objective, optimizer, scaler, batch, _autocast(config, device), ctx.all_reduce_sum
            )
            guard.update(finite, losses, _batch_name(train_set, batch, epoch, step))
            if not finite:
                continue
            if controller is not None:
                target = controller.update()
            n = batch["image"].shape[0]
            seen += n
            for k, v in losses.items():
                sums[k] += v.item() * n
            bar.set_postfix(loss=f"{total.item():.3f}", lam=f"{optimizer.param_groups[0].get('lambda_', 0.0):.3g}")
        scheduler.step()

        val_losses, val_metrics = evaluate(model, val_loader, tasks, config, ctx)
        sparsity = group_sparsity(model.backbone, config.grouping)
        score = selection_score(config, val_losses, val_metrics)
        eligible = selectable(config, epoch, controller)
        if eligible and score < best["score"]:
            best = {"score": score, "epoch": epoch, "bad_epochs": 0}
            if ctx.is_main:
                atomic_save({"model": model.state_dict(), "epoch": epoch}, run_dir / "best.pt")
        elif eligible:
            best["bad_epochs"] += 1
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": {k: v / max(seen, 1) for k, v in sums.items()},
            "val_loss": val_losses,
            "val": val_metrics,
            "task_weight": weighting.weights(),
            "group_sparsity": sparsity.group_sparsity,
            "param_sparsity": sparsity.param_sparsity,
            "nonfinite_groups": sparsity.nonfinite_groups,
            "skipped_steps": guard.skipped - skipped_before,
            "lambda_": optimizer.param_groups[0].get("lambda_", 0.0),
            **({"target": target} if target is not None else {}),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if ctx.is_main:
            _write_history(run_dir, history)
            atomic_save(
                {
                    "model": model.state_dict(), "weighting": weighting.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state(), "epoch": epoch,
                    "history": history, "best": best, "nonfinite": guard.state_dict(),
                    "config": dataclasses.asdict(config),
                    "controller": None if controller is None else controller.state_dict(),
                },
                run_dir / "last.pt",
            )
        ctx.barrier()
        if progress:
            line = summary_line(f"epoch {row['epoch']} val", row["val"], row["group_sparsity"])
            tqdm.write(line if target is None else f"{line} | {target_summary(config, target)}")
        epochs_run += 1
        if stop_after is not None and epochs_run >= stop_after and epoch + 1 < config.epochs:
            return None

    return _finish(config, run_dir, model, tasks, ctx, history, root, common)


def _batch_name(dataset, batch: dict[str, Any], epoch: int, step: int) -> str:
    """``epoch 2, batch 5 (items 000012, 000031)``: the dataset's ids where it has them."""
    indices = batch["index"].tolist()
    ids = getattr(dataset, "ids", None)
    items = ", ".join(str(ids[i]) if ids is not None else str(i) for i in indices)
    return f"epoch {epoch + 1}, batch {step + 1} (items {items})"


def summary_line(label: str, metrics: dict[str, dict[str, float]], group_sparsity: float) -> str:
    """One line: each task's primary metric and the backbone's group sparsity."""
    parts = [label]
    for name, values in metrics.items():
        primary = get_task(name).primary_metric
        parts.append(f"{name} {primary}={values[primary]:.4g}")
    parts.append(f"group sparsity {group_sparsity:.1f}%")
    return " | ".join(parts)


def target_summary(config: RunConfig, record: dict[str, Any]) -> str:
    """A controller's last record in words: the figure against its goal, and the next λ."""
    figure = "MACs" if config.target_macs is not None else "zero groups"
    return (f"{figure} {record['figure']:.3f} (goal {record['goal']:.3f}) | {record['phase']} "
            f"| next λ {record['lambda_']:.3g}")


def _finish(
    config: RunConfig, run_dir: Path, model: MultiTaskModel, tasks: list[Task], ctx: DistContext,
    history: list[dict[str, Any]], root: Path, common: dict[str, Any],
) -> RunResult:
    """Evaluate the selected model once on the test split, and record sparsity and latency."""
    best_ckpt = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best_ckpt["model"])
    test_set = build_dataset(config.dataset, root, "test", **common)
    split = "test"
    _, test_metrics = evaluate(model, _eval_loader(test_set, config, ctx), tasks, config, ctx)
    sparsity = group_sparsity(model.backbone, config.grouping).to_dict()
    result = RunResult(run_dir, best_ckpt["epoch"] + 1, split, test_metrics, sparsity, history)
    if not ctx.is_main:
        return result
    timing = {
        part: [
            measure_latency(module, batch_size=b, image_size=config.image_size, device=ctx.device,
                            repeats=config.timing_repeats)
            for b in config.timing_batch_sizes
        ]
        for part, module in (("backbone", model.backbone), ("model", model))
    }
    results = {
        "best_epoch": best_ckpt["epoch"] + 1,
        "test_split": split,
        "test": test_metrics,
        "group_sparsity": sparsity["total"]["group_sparsity"],
        "param_sparsity": sparsity["total"]["param_sparsity"],
        "mac_fraction": MacFraction(model.backbone, torch.zeros(1, 3, config.image_size, config.image_size, device=ctx.device))(),
        "lambda_": config.lambda_,
        "seed": config.seed,
        "tasks": [t.name for t in tasks],
    }
    atomic_write_text(json.dumps(sparsity, indent=2), run_dir / "sparsity.json")
    atomic_write_text(json.dumps(timing, indent=2), run_dir / "timing.json")
    atomic_write_text(json.dumps(results, indent=2), run_dir / "results.json")
    return result


def run_sweep(
    config: RunConfig, lambdas: Iterable[float], seeds: Iterable[int], *, resume: bool = False, progress: bool = True
) -> list[RunResult]:
    """One run per (lambda_, seed), each in its own folder; all validated before the first starts."""
    configs = [dataclasses.replace(config, lambda_=lam, seed=seed) for lam in lambdas for seed in seeds]
    for c in configs:
        validate(c)
    results = []
    for c in configs:
        if progress and len(configs) > 1:
            tqdm.write(f"run lambda_={c.lambda_:g} seed={c.seed} -> {run_dir_for(c)}")
        done = run_dir_for(c) / "results.json"
        if resume and done.exists():
            check_resume(c, run_dir_for(c), resume=True)
            if os.environ.get("RANK", "0") == "0":
                tqdm.write(f"{run_dir_for(c)} is finished (results.json): nothing to resume")
            continue
        result = train(c, resume=resume, progress=progress)
        results.append(result)
    return results
