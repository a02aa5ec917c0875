"""DDP training on the CPU with gloo: two processes equal one process on the global batch."""

import os
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lomt_kernels import FusedGroupProxAdam, prox_param_groups
from lomt_train.cli import main
from lomt_train.losses import build_weighting
from lomt_train.models import build_model
from lomt_train.tasks import resolve_tasks
from lomt_train.trainer import Objective, train_step

import spawned
from test_locking import held_by_another_process

STEPS, GLOBAL_BATCH = 2, 4


def _objective() -> tuple[Objective, FusedGroupProxAdam]:
    torch.manual_seed(0)
    tasks = resolve_tasks("seg,depth", "nyu")
    model = build_model(tasks, num_classes=5, backbone="small", aspp_channels=8).double()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # each rank draws its own dropout masks; one process draws others
    weighting = build_weighting("uncertainty", [t.name for t in tasks]).double()
    groups = prox_param_groups(model, "backbone", lambda_=1e-3, prox="group_weighted")
    groups.append({"params": list(weighting.parameters()), "lambda_": 0.0})
    optimizer = FusedGroupProxAdam(groups, lr=1e-2, backend="torch")
    return Objective(model, weighting, tasks), optimizer


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen, dtype=torch.float64),
            "seg": torch.randint(0, 5, (GLOBAL_BATCH, 32, 32), generator=gen),
            "depth": torch.rand(GLOBAL_BATCH, 1, 32, 32, generator=gen, dtype=torch.float64) + 0.5,
        }
        for _ in range(STEPS)
    ]


def _slice(batch, rank: int, world: int):
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        objective, optimizer = _objective()
        ddp = DistributedDataParallel(objective)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for batch in _batches():
            train_step(ddp, optimizer, scaler, _slice(batch, rank, world), torch.autocast("cpu", enabled=False))
        if rank == 0:
            torch.save(objective.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_ddp_steps_equal_single_process_steps(tmp_path):
    """DDP averages the ranks' gradients: the same as averaging the two slices' losses in one process.

    BatchNorm normalises each slice on its own in both (gloo has no SyncBatchNorm on the CPU).
    Dropout is off: each rank draws its own masks. float64 throughout; the only differences
    are summation order in the all-reduce, so the parameters agree to 1e-10.
    """
    out = tmp_path / "ddp.pt"
    spawned.run(_ddp_worker, 2, str(tmp_path / "init"), str(out), nprocs=2)

    objective, optimizer = _objective()
    for batch in _batches():
        optimizer.zero_grad()
        totals = [objective(_slice(batch, r, 2))[0] for r in range(2)]
        (sum(totals) / 2).backward()
        optimizer.step()

    ddp_state = torch.load(out)
    moved = 0
    for name, value in objective.state_dict().items():
        if "running_" in name or "num_batches" in name:
            continue  # DDP broadcasts rank 0's BatchNorm buffers; one process updated them twice
        torch.testing.assert_close(ddp_state[name], value, rtol=0, atol=1e-10, msg=name)
        moved += 1
    assert moved > 10
    assert (objective.weighting.log_vars != 0).all()


@pytest.mark.slow
def test_torchrun_trains_writes_from_rank_0_and_resumes(tmp_path):
    out = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lomt_train",
        "nyu", "--tasks", "seg,depth", "--synthetic", "--backend", "torch", "--image-size", "32",
        "--batch-size", "2", "--epochs", "2", "--aspp-channels", "8", "--synthetic-images", "8",
        "--device", "cpu", "--no-progress", "--out", str(out),
    ]
    env = {**os.environ, "LOMT_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results.json")
    run = results.parent
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert not list(run.glob(".*.tmp"))
    # Resuming a finished sweep under torchrun is a no-op that still exits cleanly.
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_into_a_locked_run_folder_stops_every_rank(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = [
        "nyu", "--tasks", "seg", "--synthetic", "--backend", "torch", "--image-size", "32", "--batch-size", "2",
        "--epochs", "1", "--aspp-channels", "8", "--synthetic-images", "8", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]
    assert main([*argv, "--dry-run"]) == 0
    (run,) = map(Path, json.loads(capsys.readouterr().out)["runs"])
    with held_by_another_process(run / ".lock") as holder:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lomt_train", *argv]
        env = {**os.environ, "LOMT_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"run folder {run} is in use by pid {holder.pid}" in done.stderr
    assert [p.name for p in run.iterdir()] == [".lock"]
