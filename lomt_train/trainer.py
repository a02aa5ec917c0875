"""One training run: data, model, FusedGroupProxAdam, validation, test, timing, all to a folder.

:func:`train` opens the run (:func:`open_run`: checks, data, building, restoring a
:class:`~lomt_train.run_state.RunState`), calls :func:`run_epoch` (train one epoch, validate,
select and early-stop, checkpoint) until the run is done, then :func:`finish_run` (test).

A run folder holds ``config.json`` (the exact configuration), ``history.json`` and
``history.csv`` (one row per epoch: losses, validation metrics, task weights, sparsity, time,
loader and model images/s), ``last.pt`` (the :class:`~lomt_train.run_state.RunState`) and
``best.pt`` (atomic checkpoints), ``sparsity.json`` (per-layer figures of the selected model's
backbone), ``timing.json`` (inference latency) and ``results.json`` (the test metrics of the
selected model, evaluated once, in eval mode, and the device settings that ran).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
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
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from lomt_kernels import FusedGroupProxAdam, MacFraction, group_sparsity, prox_param_groups

from .atomic import remove_orphans
from .checkpoint import atomic_save, atomic_write_text, load_checkpoint, seed_everything
from .config import RunConfig
from .distributed import DistContext, init_distributed, shard
from .data import DATASET_NAMES, build_dataset, generate_cached, make_synthetic_celeba, make_synthetic_nyu
from .locking import LockedError, hold_lock
from .losses import build_weighting
from .models import MultiTaskModel, build_model
from .nonfinite import NonFiniteGuard, all_finite
from . import run_identity
from .pat import check_peer, pat_optimizer
from .resume import check_resume
from .run_state import RunState, check_layout
from .runtime import Runtime, runtime_for
from .selection import check_criterion, selection_score
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
                        ("patience", 0)):
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
    runtime_for(config, resolve_device(config.device))  # refuses settings the device cannot run
    build_weighting(config.weighting, config.tasks)
    check_target(config)
    check_peer(config)
    check_criterion(config)
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


def _train_loader(dataset, config: RunConfig, runtime: Runtime, ctx: DistContext, epoch: int) -> DataLoader:
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
        num_workers=runtime.workers,
        pin_memory=runtime.pin_memory,
        generator=generator,
    )


def _eval_loader(dataset, config: RunConfig, runtime: Runtime, ctx: DistContext) -> DataLoader:
    # Persistent workers: the validation loader is read once per epoch and keeps its order.
    return DataLoader(shard(dataset, ctx), batch_size=config.batch_size, num_workers=runtime.workers,
                      pin_memory=runtime.pin_memory, persistent_workers=runtime.workers > 0)


def _to(batch: dict[str, Any], device: torch.device, runtime: Runtime) -> dict[str, Any]:
    """The batch on ``device``; copies do not wait for the host (they overlap compute from pinned
    memory), and images take the model's memory format."""
    image_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    return {
        k: v.to(device, non_blocking=True, memory_format=image_format if k == "image" else torch.preserve_format)
        if isinstance(v, Tensor) else v
        for k, v in batch.items()
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], tasks: list[Task], runtime: Runtime, ctx: DistContext
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean loss per task and metrics per task over a whole split, in eval mode.

    Under DDP each rank evaluates its shard and the sums behind every figure are all-reduced,
    so the result is the split-level figure, identical on every rank.
    """
    model.eval()
    meters = {t.name: t.metrics() for t in tasks}
    loss_sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=ctx.device)  # last entry: item count
    for batch in loader:
        batch = _to(batch, ctx.device, runtime)
        with runtime.autocast():
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


#: Training images (evenly spaced over the split) whose forward passes re-estimate BatchNorm's
#: statistics before each validation; the whole split when it is smaller.
PRECISE_BN_IMAGES = 2048


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, run: "Run", epoch: int) -> None:
    """Re-estimate every BatchNorm's running mean and variance with the current weights ("precise
    BN", Wu and Johnson 2021; what ``torch.optim.swa_utils.update_bn`` does): the equal-weight
    average over train-mode forward passes of up to :data:`PRECISE_BN_IMAGES` training images,
    averaged over the ranks. The momenta and the train/eval mode are restored.

    The running averages kept during training mix in statistics of earlier weights; while the prox
    shrinks the backbone's channels step by step they lag behind, and the model evaluated with
    them is not the one trained (the README's demo collapsed to one class that way).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    dataset = run.train_set
    stride = math.ceil(len(dataset) / PRECISE_BN_IMAGES)
    loader = _train_loader(Subset(dataset, range(0, len(dataset), stride)), run.config, run.runtime, run.ctx, epoch)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative (equal-weight) average over the batches
    was_training = model.training
    model.train()
    for batch in loader:
        with run.runtime.autocast():
            model(_to(batch, run.ctx.device, run.runtime)["image"])
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        for stat in (m.running_mean, m.running_var):
            run.ctx.all_reduce_sum(stat).div_(run.ctx.world_size)


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


def build_run(
    config: RunConfig, tasks: list[Task], num_classes: int, device: torch.device, steps_per_epoch: int,
    *, channels_last: bool = False, output_bias: dict[str, float] | None = None,
):
    """Model, loss weighting, optimizer and LR schedule of a run, on ``device``; ``output_bias``
    is the heads' starting outputs (:func:`output_bias_for`)."""
    model = build_model(
        tasks, num_classes=num_classes, backbone=config.backbone, weights=config.weights,
        attach=config.attach or None, aspp_channels=config.aspp_channels, output_bias=output_bias,
    ).to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
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


def build_state(
    config: RunConfig, tasks: list[Task], num_classes: int, ctx: DistContext, runtime: Runtime, steps_per_epoch: int,
    *, output_bias: dict[str, float] | None = None,
) -> RunState:
    """A fresh :class:`RunState` at epoch 0: :func:`build_run`'s parts, the GradScaler, the λ
    controller of a target run, and a non-finite guard that logs on rank 0."""
    model, weighting, optimizer, scheduler = build_run(
        config, tasks, num_classes, ctx.device, steps_per_epoch, channels_last=runtime.channels_last,
        output_bias=output_bias,
    )
    return RunState(
        model=model, weighting=weighting, optimizer=optimizer, scheduler=scheduler, scaler=runtime.grad_scaler(),
        controller=build_controller(config, model, optimizer, ctx.device, steps_per_epoch),
        guard=NonFiniteGuard(config.max_nonfinite_steps, log=tqdm.write if ctx.is_main else lambda _: None),
    )


def _wrap_for_ranks(objective: Objective, ctx: DistContext) -> nn.Module:
    """``objective`` under DDP (with SyncBatchNorm on CUDA) when several processes train; else itself."""
    if not ctx.enabled:
        return objective
    if ctx.device.type == "cuda":
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    return DistributedDataParallel(objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _data_on_every_rank(config: RunConfig, ctx: DistContext) -> Path:
    """:func:`dataset_root` on every rank: rank 0 generates synthetic data while the others wait
    at a barrier, then they find it."""
    root = dataset_root(config) if ctx.is_main else None
    ctx.barrier()
    return root if root is not None else dataset_root(config)


def output_bias_for(train_set: Any, tasks: list[Task]) -> dict[str, float]:
    """The heads' starting outputs, from the training split: depth starts at its mean depth.

    A head that starts at 0 predicts depth metres short, and Adam moves each weight by about
    ``lr`` per step, so a short run never reaches the targets, and meanwhile depth's squared
    error dwarfs the other tasks' losses.
    """
    return {"depth": train_set.mean_depth()} if any(t.name == "depth" for t in tasks) else {}


def _dataset_options(config: RunConfig, tasks: list[Task]) -> dict[str, Any]:
    return dict(tasks=[t.name for t in tasks], image_size=config.image_size, layout=config.layout)


@dataclass
class Run:
    """A run opened by :func:`open_run`: its data, device settings and :class:`RunState`, ready
    for :func:`run_epoch` until :attr:`done`, then :func:`finish_run`."""

    config: RunConfig
    tasks: list[Task]
    ctx: DistContext
    run_dir: Path
    runtime: Runtime
    root: Path
    train_set: Any
    output_bias: dict[str, float]
    val_loader: DataLoader
    state: RunState
    objective: nn.Module
    progress: bool

    @property
    def done(self) -> bool:
        """Every epoch trained, or early stopping's patience spent."""
        return self.state.epoch >= self.config.epochs or self.state.early.exhausted(self.config.patience)


@contextlib.contextmanager
def open_run(config: RunConfig, *, resume: bool = False, progress: bool = True) -> Iterator[Run]:
    """Check ``config``, join ``torchrun``'s process group if any, hold the run folder's lock and
    build the run (restored from ``last.pt`` with ``resume``), then yield it.

    :func:`train` is this with :func:`run_epoch` in a loop and :func:`finish_run`; a caller
    that runs fewer epochs leaves a folder that ``resume=True`` continues exactly.
    """
    tasks = validate(config)
    ctx = init_distributed(resolve_device(config.device))
    run_dir = run_dir_for(config)
    with _run_lock(run_dir, ctx):
        yield _prepare(config, tasks, ctx, run_dir, resume=resume, progress=progress and ctx.is_main)


def train(config: RunConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train one run to completion and evaluate its selected model on the test split.

    ``resume=True`` continues from the run folder's ``last.pt`` so that the run ends exactly as
    if it had never stopped, and only with the options it was started with. Under ``torchrun``
    every rank calls this; rank 0 alone writes files and shows progress, and holds the folder's
    lock so that no other process writes the same run.
    """
    with open_run(config, resume=resume, progress=progress) as run:
        while not run.done:
            run_epoch(run)
        return finish_run(run)


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


def _prepare(
    config: RunConfig, tasks: list[Task], ctx: DistContext, run_dir: Path, *, resume: bool, progress: bool
) -> Run:
    """Everything before the first epoch; a checkpoint to resume is read and checked before any
    data is generated or file written."""
    if ctx.is_main:
        remove_orphans(run_dir)  # left by a writer that was killed; the lock says it is gone
    ckpt = check_resume(config, run_dir, resume=resume)
    if ckpt is not None:
        check_layout(ckpt, run_dir / "last.pt")
    elif ctx.is_main:
        atomic_write_text(config.to_json(), run_dir / "config.json")
    root = _data_on_every_rank(config, ctx)
    runtime = runtime_for(config, ctx.device)

    seed_everything(config.seed)
    # The splits are the dataset's (build_dataset's fixed split seed), never the run's: every seed
    # trains, selects and tests on the same images.
    common = _dataset_options(config, tasks)
    train_set = build_dataset(config.dataset, root, "train", augment=config.augment, **common)
    val_set = build_dataset(config.dataset, root, "val", **common)
    if ctx.is_main:
        splits = {"train": train_set.ids, "val": val_set.ids,
                  "test": build_dataset(config.dataset, root, "test", **common).ids}
        atomic_write_text(json.dumps(splits), run_dir / "splits.json")
    steps_per_epoch = len(_train_loader(train_set, config, runtime, ctx, 0))
    output_bias = output_bias_for(train_set, tasks)
    state = build_state(config, tasks, train_set.num_classes, ctx, runtime, steps_per_epoch, output_bias=output_bias)
    if ckpt is not None:
        state.load_state_dict(ckpt, run_dir / "last.pt")
    objective = _wrap_for_ranks(Objective(state.model, state.weighting, tasks), ctx)
    if progress:
        tqdm.write(f"{run_dir}: {len(train_set)} training items, effective batch {config.batch_size * ctx.world_size}"
                   f" ({ctx.world_size} process{'es' if ctx.enabled else ''}), device {ctx.device}, "
                   f"{runtime_summary(runtime)}"
                   + "".join(f", {name} head starts at {value:.4g}" for name, value in output_bias.items()))
    return Run(config, tasks, ctx, run_dir, runtime, root, train_set, output_bias,
               _eval_loader(val_set, config, runtime, ctx), state, objective, progress)


def runtime_summary(runtime: Runtime) -> str:
    """The resolved device settings in words, for the run's first log line."""
    precision = f"{runtime.amp_dtype} autocast" if runtime.amp_dtype else "fp32"
    memory = "channels_last" if runtime.channels_last else "contiguous"
    pinned = ", pinned" if runtime.pin_memory else ""
    return f"{precision}, {memory}, {runtime.workers} loader worker{'s' * (runtime.workers != 1)}{pinned}"


class StepClock:
    """Time inside training steps, summed over an epoch.

    On the CPU it is the host clock. On CUDA the host runs ahead of the kernels, so CUDA events
    are recorded around each step and read once, at :meth:`seconds`: the figure covers the
    kernels and the timing adds no synchronisation per step.
    """

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host = 0.0
        self._started: Any = None

    def __enter__(self) -> None:
        if self._stream is None:
            self._started = time.perf_counter()
        else:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(self._stream)

    def __exit__(self, *exc: object) -> None:
        if self._stream is None:
            self._host += time.perf_counter() - self._started
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self._stream)
            self._events.append((self._started, end))

    def seconds(self) -> float:
        if self._stream is None or not self._events:
            return self._host
        self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000  # elapsed_time is in milliseconds


@dataclass
class EpochStats:
    """What :func:`train_one_epoch` measured. ``images`` counts every item drawn (skipped steps
    included); ``train_loss`` averages over the steps taken; ``loader_seconds`` is the time this
    process waited for batches and ``step_seconds`` the time in steps (see :class:`StepClock`)."""

    train_loss: dict[str, float]
    skipped_steps: int
    images: int
    loader_seconds: float
    step_seconds: float
    target: dict[str, Any] | None


def _rate(images: int, seconds: float) -> float | None:
    return images / seconds if seconds > 0 else None


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    """One pass over this rank's share of the training set, and the LR schedule's step."""
    state, ctx, runtime = run.state, run.ctx, run.runtime
    run.objective.train()
    # Summed on the device so that bookkeeping adds no host sync per step.
    sums = torch.zeros(len(run.tasks), dtype=torch.float64, device=ctx.device)
    seen = images = 0
    skipped_before = state.guard.skipped
    target = None
    clock, loader_seconds = StepClock(ctx.device), 0.0
    bar = tqdm(
        _train_loader(run.train_set, run.config, runtime, ctx, epoch),
        desc=f"epoch {epoch + 1}/{run.config.epochs}", disable=not run.progress, leave=False,
    )
    batches = iter(bar)
    for step in itertools.count():
        waited = time.perf_counter()
        batch = next(batches, None)
        loader_seconds += time.perf_counter() - waited
        if batch is None:
            break
        index = batch["index"]
        with clock:
            batch = _to(batch, ctx.device, runtime)
            total, losses, finite = train_step(
                run.objective, state.optimizer, state.scaler, batch, runtime.autocast(), ctx.all_reduce_sum
            )
            state.guard.update(finite, losses, "" if finite else _batch_name(run.train_set, index, epoch, step))
            if finite and state.controller is not None:
                target = state.controller.update()
        n = len(index)
        images += n
        if not finite:
            continue
        seen += n
        sums += torch.stack([losses[t.name] for t in run.tasks]).double() * n
        if run.progress:
            lam = state.optimizer.param_groups[0].get("lambda_", 0.0)
            bar.set_postfix(loss=f"{total.item():.3f}", lam=f"{lam:.3g}")
    state.scheduler.step()
    return EpochStats(
        train_loss={t.name: v / max(seen, 1) for t, v in zip(run.tasks, sums.tolist())},
        skipped_steps=state.guard.skipped - skipped_before, images=images,
        loader_seconds=loader_seconds, step_seconds=clock.seconds(), target=target,
    )


def select(run: Run, epoch: int, score: float) -> bool:
    """Early stopping's record for ``epoch`` with validation ``score`` (lower is better); an
    eligible new best is written to ``best.pt``. Returns whether it was one."""
    if not selectable(run.config, epoch, run.state.controller):
        return False
    improved = run.state.early.update(score, epoch)
    if improved and run.ctx.is_main:
        atomic_save({"model": run.state.model.state_dict(), "epoch": epoch}, run.run_dir / "best.pt")
    return improved


def save_checkpoint(run: Run) -> None:
    """Rank 0 writes the history and ``last.pt``; every rank waits for it."""
    if run.ctx.is_main:
        _write_history(run.run_dir, run.state.history)
        run.state.save(run.run_dir / "last.pt", run.config)
    run.ctx.barrier()


#: History entries that depend on the machine's speed, not on the training: left out when two
#: runs are compared for an exact resume.
WALL_CLOCK_KEYS = ("images_per_s", "seconds")


def run_epoch(run: Run) -> dict[str, Any]:
    """Train, validate, select and checkpoint epoch ``run.state.epoch``; returns its history row.

    The row's ``images_per_s`` holds this process's ``loader`` figure (items over the time spent
    waiting for batches) and ``model`` figure (items over the time in steps): a loader figure
    below the model's means the data loading starves the device.
    """
    state, config = run.state, run.config
    epoch = state.epoch
    started = time.perf_counter()
    stats = train_one_epoch(run, epoch)
    recalibrate_batchnorm(state.model, run, epoch)
    val_losses, val_metrics = evaluate(state.model, run.val_loader, run.tasks, run.runtime, run.ctx)
    sparsity = group_sparsity(state.model.backbone, config.grouping)
    score = selection_score(config, val_losses, val_metrics)
    select(run, epoch, score)
    row = {
        "epoch": epoch + 1,
        "lr": state.optimizer.param_groups[0]["lr"],
        "train_loss": stats.train_loss,
        "val_loss": val_losses,
        "val": val_metrics,
        "task_weight": state.weighting.weights(),
        "group_sparsity": sparsity.group_sparsity,
        "param_sparsity": sparsity.param_sparsity,
        "nonfinite_groups": sparsity.nonfinite_groups,
        "skipped_steps": stats.skipped_steps,
        "lambda_": state.optimizer.param_groups[0].get("lambda_", 0.0),
        **({"target": stats.target} if stats.target is not None else {}),
        "images_per_s": {"loader": _rate(stats.images, stats.loader_seconds),
                         "model": _rate(stats.images, stats.step_seconds)},
        "seconds": time.perf_counter() - started,
    }
    state.history.append(row)
    state.epoch = epoch + 1
    save_checkpoint(run)
    if run.progress:
        parts = [summary_line(f"epoch {row['epoch']} val", row["val"], row["group_sparsity"])]
        parts += [f"{k} {v:.1f} img/s" for k, v in row["images_per_s"].items() if v is not None]
        if stats.target is not None:
            parts.append(target_summary(config, stats.target))
        tqdm.write(" | ".join(parts))
    return row


def _batch_name(dataset, index: Tensor, epoch: int, step: int) -> str:
    """``epoch 2, batch 5 (items 000012, 000031)``: the dataset's ids where it has them."""
    indices = index.tolist()
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


def finish_run(run: Run) -> RunResult:
    """Evaluate the selected model (``best.pt``) once on the test split, and record sparsity,
    latency and the resolved device settings."""
    config, ctx, model = run.config, run.ctx, run.state.model
    best_ckpt = load_checkpoint(run.run_dir / "best.pt")
    model.load_state_dict(best_ckpt["model"])
    test_set = build_dataset(config.dataset, run.root, "test", **_dataset_options(config, run.tasks))
    split = "test"
    _, test_metrics = evaluate(model, _eval_loader(test_set, config, run.runtime, ctx), run.tasks, run.runtime, ctx)
    sparsity = group_sparsity(model.backbone, config.grouping).to_dict()
    result = RunResult(run.run_dir, best_ckpt["epoch"] + 1, split, test_metrics, sparsity, run.state.history)
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
        "tasks": [t.name for t in run.tasks],
        "output_bias": run.output_bias,
        "runtime": run.runtime.to_dict(),
    }
    atomic_write_text(json.dumps(sparsity, indent=2), run.run_dir / "sparsity.json")
    atomic_write_text(json.dumps(timing, indent=2), run.run_dir / "timing.json")
    atomic_write_text(json.dumps(results, indent=2), run.run_dir / "results.json")
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
