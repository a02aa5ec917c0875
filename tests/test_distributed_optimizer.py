"""FusedGroupProxAdam on DTensor params (FSDP2): two CPU processes with gloo (one, to reshard).

Each spawned run does all its cases at once (starting two processes costs most of the time),
and rank 0 writes full tensors (``DTensor.full_tensor()``) for the test process to compare.
The processes meet through a file store in ``tmp_path`` (no port to pick), every collective
times out after ``PG_TIMEOUT``, and a run that outlives ``spawned.DEFAULT_TIMEOUT`` is killed.

Tolerance: float64 throughout. The sharded step differs from the unsharded one only in how
sums are added up: a group's norm from two all-reduced partial sums instead of one
``torch.norm`` (a few ulps), and the weighted prox's Newton iteration, which stops when every
group *in the tensor at hand* has converged to ``1e-12``, so a rank holding some of the groups
may stop an iteration earlier or later than one process holding all. The largest difference
seen is about 1e-13. Hence ``rtol = 1e-10, atol = 1e-12``: far below any real difference (one
Adam step moves an entry by about ``lr = 1e-2``), far above that noise. Zero groups must match
exactly.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lomt_kernels import FusedGroupProxAdam
from lomt_kernels.grouping import GROUPINGS, as_groups

import spawned
from parity import PROX_NAMES

WORLD = 2
PG_TIMEOUT = datetime.timedelta(seconds=30)
STEPS = 3
LR, LAMBDA = 1e-2, 3.0  # groups with entries around 1 survive; groups around 1e-2 go to zero
RTOL, ATOL = 1e-10, 1e-12
PLACEMENTS = ("Shard(0)", "Shard(1)", "Replicate()")

if not dist.is_available():  # pragma: no cover - builds without torch.distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)


# ---------------------------------------------------------------------------------- harness


def _init(rank: int, init_file: str, world: int = WORLD):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=PG_TIMEOUT
    )
    return init_device_mesh("cpu", (world,))


def _placement(name: str, ndim: int):
    """The placement called ``name``; a 1-D tensor takes Shard(0) for Shard(1)."""
    from torch.distributed.tensor import Replicate, Shard

    return {"Shard(0)": Shard(0), "Shard(1)": Shard(min(1, ndim - 1)), "Replicate()": Replicate()}[name]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, grouping: str, msg: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True, msg=msg)
    if actual.dim() >= 2:
        zero = lambda t: (as_groups(t, grouping) == 0).all(dim=1)  # noqa: E731
        assert torch.equal(zero(actual), zero(expected)), f"{msg}: zero groups differ"


def _zero_group_counts(tensors: list[torch.Tensor], grouping: str) -> tuple[int, int]:
    """(zero groups, all groups) over the grouped tensors."""
    rows = [as_groups(t, grouping) for t in tensors if t.dim() >= 2]
    return sum(int((r == 0).all(dim=1).sum()) for r in rows), sum(r.shape[0] for r in rows)


# ------------------------------------------------------ distribute_tensor: every placement


def _tensors() -> list[torch.Tensor]:
    """A conv weight, a Linear weight, a weight with one row (empty on rank 1 under Shard(0))
    and a bias. Rows and columns scaled by 1e-2 make both in- and out-channel groups that
    the prox zeroes next to groups it keeps."""
    gen = torch.Generator().manual_seed(0)

    def small(n: int, idx: set[int]) -> torch.Tensor:
        return torch.tensor([1e-2 if i in idx else 1.0 for i in range(n)], dtype=torch.float64)

    conv = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    conv = conv * small(5, {1, 4})[:, None, None, None] * small(4, {1, 3})[None, :, None, None]
    linear = torch.randn(3, 6, generator=gen, dtype=torch.float64) * small(3, {0})[:, None] * small(6, {2})
    row = torch.randn(1, 4, generator=gen, dtype=torch.float64) * small(4, {0})
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    return [conv, linear, row, bias]


#: The conv gradient element made NaN in the first step of the "nan_grad" runs: in in-channel
#: group 2 and out-channel group 1, each split across the ranks by Shard(0) or Shard(1).
NAN_ELEMENT = (1, 2, 1, 1)


def _grads(step: int, nan_grad: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in _tensors()]
    if nan_grad and step == 0:
        grads[0][NAN_ELEMENT] = float("nan")
    return grads


def _steps(params: list[torch.Tensor], make_grad, nan_grad: bool = False, **kwargs) -> FusedGroupProxAdam:
    opt = FusedGroupProxAdam(params, lr=LR, lambda_=LAMBDA, backend="torch", **kwargs)
    for step in range(STEPS):
        for p, g in zip(params, _grads(step, nan_grad)):
            p.grad = make_grad(g)
        opt.step()
    return opt


def _placements_worker(rank: int, init_file: str, out: str) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = _init(rank, init_file)
    try:
        results = {}
        for name in PLACEMENTS:
            shard = lambda t: distribute_tensor(t, mesh, [_placement(name, t.dim())])  # noqa: E731
            for prox in PROX_NAMES:
                for grouping in GROUPINGS:
                    for nan_grad in (False, True):
                        kwargs = dict(prox=prox, grouping=grouping, weight_decay=0.1, nan_grad=nan_grad)
                        plain = [nn.Parameter(t) for t in _tensors()]
                        _steps(plain, lambda g: g, **kwargs)
                        sharded = [nn.Parameter(shard(t)) for t in _tensors()]
                        opt = _steps(sharded, shard, **kwargs)
                        state_layout = all(
                            isinstance(s[key], DTensor) and s[key].placements == p.placements
                            for p, s in zip(sharded, (opt.state[p] for p in sharded))
                            for key in ("exp_avg", "exp_avg_sq")
                        )
                        results[name, prox, grouping, nan_grad] = {
                            "sharded": [p.full_tensor().detach() for p in sharded],
                            "plain": [p.detach() for p in plain],
                            "state_layout": state_layout,
                        }
        results["partial"] = _partial_param_error(mesh)
        results["partial_grads"] = _partial_grads_run(mesh)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _partial_param_error(mesh) -> str:
    """What the step says about a parameter with a Partial() placement (before any collective)."""
    from torch.distributed.tensor import DTensor, Partial

    param = nn.Parameter(DTensor.from_local(torch.ones(2, 3, dtype=torch.float64), mesh, [Partial()]))
    param.grad = DTensor.from_local(torch.ones(2, 3, dtype=torch.float64), mesh, [Partial()])
    try:
        FusedGroupProxAdam([param], lr=LR, lambda_=LAMBDA, prox="l1", backend="torch").step()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _partial_grads_run(mesh) -> dict:
    """Shard(0) params whose grads arrive as Partial() (each rank holding half the sum)."""
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    kwargs = dict(prox="group_weighted", grouping="in_channel")
    plain = [nn.Parameter(t) for t in _tensors()]
    _steps(plain, lambda g: g, **kwargs)
    sharded = [nn.Parameter(distribute_tensor(t, mesh, [_placement("Shard(0)", t.dim())])) for t in _tensors()]
    _steps(sharded, lambda g: DTensor.from_local(g / WORLD, mesh, [Partial()]), **kwargs)
    return {"sharded": [p.full_tensor().detach() for p in sharded], "plain": [p.detach() for p in plain]}


def _results(tmp_path_factory, name: str, worker) -> dict:
    """What ``worker`` (run on :data:`WORLD` ranks) saved to its output file."""
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "results.pt"
    spawned.run(worker, str(tmp / "init"), str(out), nprocs=WORLD)
    return torch.load(out)


@pytest.fixture(scope="module")
def placement_results(tmp_path_factory):
    return _results(tmp_path_factory, "placements", _placements_worker)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROX_NAMES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sharded_steps_equal_unsharded(placement_results, placement, prox, grouping):
    """Shard(0) (FSDP2's layout) splits in-channel groups across the ranks, Shard(1) splits
    out-channel groups; the other pairings and Replicate() keep every group on one rank."""
    result = placement_results[placement, prox, grouping, False]
    for i, (actual, expected) in enumerate(zip(result["sharded"], result["plain"])):
        _assert_close(actual, expected, grouping, f"tensor {i} {tuple(expected.shape)}")
    assert result["state_layout"], "exp_avg / exp_avg_sq are not DTensors laid out as their params"
    if prox in ("group", "group_weighted"):
        zero, total = _zero_group_counts(result["plain"], grouping)
        assert 0 < zero < total, f"{zero} of {total} groups are zero: the case tests nothing"
    if prox == "l1":
        flat = torch.cat([t.flatten() for t in result["plain"][:3]])
        assert 0 < int((flat == 0).sum()) < flat.numel()


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROX_NAMES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sharded_nonfinite_group_equals_unsharded(placement_results, placement, prox, grouping):
    """A NaN gradient element in a group split across the ranks: the all-reduced sums are NaN on
    every rank, so each rank passes its part of the group through, as one process does
    (reference.py's rule), and the other groups come out as in one process."""
    result = placement_results[placement, prox, grouping, True]
    for i, (actual, expected) in enumerate(zip(result["sharded"], result["plain"])):
        _assert_close(actual, expected, grouping, f"tensor {i} {tuple(expected.shape)}")
    conv = result["sharded"][0]
    assert int(conv.isnan().sum()) == 1 and bool(conv[NAN_ELEMENT].isnan())
    if prox in ("group", "group_weighted"):
        group = conv[:, 2] if grouping == "in_channel" else conv[1]
        assert (group != 0).all()


# ----------------------------------------------------------------------- fully_shard models

GLOBAL_BATCH = 4
# The weighted prox measures groups in Adam's metric (d ~ |g|, here about 1e-2): it zeroes
# groups at a far smaller lambda_. These leave some groups of each model zero, some not.
MODEL_LAMBDA = {"none": 1.0, "group": 1.0, "group_weighted": 0.03, "l1": 1.0}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()
    with torch.no_grad():  # groups that the prox zeroes next to groups it keeps, both groupings
        for layer in (model[0], model[2], model[4]):
            layer.weight[1] *= 1e-2
            layer.weight[:, 1] *= 1e-2
    return model


def _batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + step)
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=gen, dtype=torch.float64)


def _param_groups(model: nn.Module, prox: str, grouping: str) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "lambda_": MODEL_LAMBDA[prox], "prox": prox, "grouping": grouping},
        {"params": biases, "lambda_": 0.0},
    ]


def _shard_model(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model: nn.Module, opt, steps: range, rank: int | None) -> None:
    """Mean squared output; rank ``r`` of ``WORLD`` takes its slice of the global batch (FSDP2
    averages the ranks' gradients), ``rank=None`` the whole batch."""
    per = GLOBAL_BATCH // WORLD
    for step in steps:
        x = _batch(step)
        if rank is not None:
            x = x[rank * per : (rank + 1) * per]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _fsdp_worker(rank: int, init_file: str, out: str) -> None:
    mesh = _init(rank, init_file)
    try:
        results = {}
        for prox in PROX_NAMES:
            for grouping in GROUPINGS:
                plain, sharded = _model(), _shard_model(_model(), mesh)
                for model, data_rank in ((plain, None), (sharded, rank)):
                    opt = FusedGroupProxAdam(_param_groups(model, prox, grouping), lr=LR, backend="torch")
                    _train(model, opt, range(STEPS), data_rank)
                results[prox, grouping] = {
                    "sharded": {n: p.full_tensor().detach() for n, p in sharded.named_parameters()},
                    "plain": {n: p.detach() for n, p in plain.named_parameters()},
                }
        results["amp"] = _amp_run(mesh, rank)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _amp_run(mesh, rank: int) -> dict:
    """Two GradScaler steps, then one with an inf in rank 0's gradient shard only."""
    runs = {}
    for name in ("plain", "sharded"):
        model = _model() if name == "plain" else _shard_model(_model(), mesh)
        opt = FusedGroupProxAdam(_param_groups(model, "group_weighted", "in_channel"), lr=LR, backend="torch")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(2):
            x = _batch(step)
            if name == "sharded":
                x = x[rank * 2 : rank * 2 + 2]
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
        gather = (lambda t: t.full_tensor()) if name == "sharded" else (lambda t: t)  # noqa: E731
        runs[name] = {n: gather(p).detach().clone() for n, p in model.named_parameters()}
    # `model` is the sharded one now: a non-finite value on one rank must skip the step on all.
    opt.zero_grad()
    scaler.scale(model(_batch(2)[rank * 2 : rank * 2 + 2]).square().mean()).backward()
    if rank == 0:
        model[0].weight.grad.to_local().view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    runs["after_inf"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    runs["scale"] = scaler.get_scale()
    runs["steps"] = sorted({float(s["step"]) for s in opt.state.values()})
    return runs


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return _results(tmp_path_factory, "fsdp", _fsdp_worker)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROX_NAMES)
def test_fully_shard_training_equals_one_process(fsdp_results, prox, grouping):
    """FSDP2 on two ranks, each with half the batch, equals one process on the whole batch.

    The gradients differ by summation order too (FSDP2's reduce-scatter averages the ranks'),
    still a few ulps in float64: the same tolerance holds.
    """
    result = fsdp_results[prox, grouping]
    assert result["sharded"].keys() == result["plain"].keys()
    for name, expected in result["plain"].items():
        _assert_close(result["sharded"][name], expected, grouping, name)
    if prox in ("group", "group_weighted"):
        weights = [t for n, t in result["plain"].items() if n.endswith("weight")]
        zero, total = _zero_group_counts(weights, grouping)
        assert 0 < zero < total, f"{zero} of {total} groups are zero: the case tests nothing"


def test_grad_scaler_with_fully_shard(fsdp_results):
    """GradScaler's unscaling reaches the sharded step, and an inf in one rank's gradient
    shard skips the step on every rank (DTensor all-reduces ``found_inf``), without a hang."""
    amp = fsdp_results["amp"]
    for name, expected in amp["plain"].items():
        _assert_close(amp["sharded"][name], expected, "in_channel", name)
    for name, before in amp["sharded"].items():
        assert torch.equal(amp["after_inf"][name], before), name
    assert amp["scale"] == 512.0 and amp["steps"] == [2.0]


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_groups(model: nn.Module) -> list[dict]:
    """Two prox groups: one needs cross-rank reductions (in-channel on Shard(0)), one does not."""
    convs = [model[0].weight, model[2].weight]
    return [
        {"params": convs, "lambda_": MODEL_LAMBDA["group_weighted"], "prox": "group_weighted",
         "grouping": "in_channel"},
        {"params": [model[4].weight], "lambda_": MODEL_LAMBDA["group"], "prox": "group", "grouping": "out_channel"},
        {"params": [model[0].bias, model[2].bias, model[4].bias], "lambda_": 0.0},
    ]


def _full_state(model: nn.Module, opt) -> dict:
    """Params and optimizer state as full tensors, keyed by parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    gather = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {
        "params": {n: gather(p).detach().clone() for n, p in model.named_parameters()},
        "state": {
            names[p]: {k: gather(v).clone() for k, v in s.items()} for p, s in opt.state.items()
        },
    }


def _checkpoint_worker(rank: int, init_file: str, ckpt: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    mesh = _init(rank, init_file)
    try:
        # Uninterrupted: 2 steps, checkpoint, 2 more.
        straight = _shard_model(_model(), mesh)
        straight_opt = FusedGroupProxAdam(_checkpoint_groups(straight), lr=LR, backend="torch")
        _train(straight, straight_opt, range(2), rank)
        dcp.save(
            {"model": get_model_state_dict(straight), "optim": get_optimizer_state_dict(straight, straight_opt)},
            checkpoint_id=ckpt,
        )
        _train(straight, straight_opt, range(2, 4), rank)

        # Resumed: a fresh model (another init) and optimizer, loaded from the checkpoint.
        resumed = _shard_model(_model(seed=1), mesh)
        resumed_opt = FusedGroupProxAdam(_checkpoint_groups(resumed), lr=LR, backend="torch")
        before_init = _full_state(resumed, resumed_opt)["params"]
        # On a fresh optimizer this takes a step with lr = 0 and zero grads to create the state.
        state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
        after_init = _full_state(resumed, resumed_opt)["params"]
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
        _train(resumed, resumed_opt, range(2, 4), rank)

        # A one-process optimizer state dict (plain tensors) loaded into an FSDP2 optimizer.
        plain = _model()
        plain_opt = FusedGroupProxAdam(_checkpoint_groups(plain), lr=LR, backend="torch")
        _train(plain, plain_opt, range(2), None)
        from_plain = _shard_model(copy.deepcopy(plain), mesh)
        from_plain_opt = FusedGroupProxAdam(_checkpoint_groups(from_plain), lr=LR, backend="torch")
        from_plain_opt.load_state_dict(copy.deepcopy(plain_opt.state_dict()))
        _train(plain, plain_opt, range(2, 4), None)
        _train(from_plain, from_plain_opt, range(2, 4), rank)

        results = {
            "straight": _full_state(straight, straight_opt),
            "resumed": _full_state(resumed, resumed_opt),
            "plain": _full_state(plain, plain_opt),
            "from_plain": _full_state(from_plain, from_plain_opt),
            "init_step_kept_params": all(torch.equal(before_init[n], after_init[n]) for n in before_init),
        }
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("checkpoint")
    spawned.run(_checkpoint_worker, str(tmp / "init"), str(tmp / "ckpt"), str(tmp / "results.pt"), nprocs=WORLD)
    return tmp


@pytest.fixture(scope="module")
def checkpoint_results(checkpoint_dir):
    return torch.load(checkpoint_dir / "results.pt")


def _assert_same_state(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(actual["params"][name], value, rtol=rtol, atol=atol, msg=name)
    assert actual["state"].keys() == expected["state"].keys()
    for name, state in expected["state"].items():
        assert actual["state"][name].keys() == state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            torch.testing.assert_close(
                actual["state"][name][key], value, rtol=rtol, atol=atol, msg=f"{name} {key}"
            )


def test_dcp_round_trip_resumes_exactly(checkpoint_results):
    """Save with torch.distributed.checkpoint after 2 steps, load into a fresh model and
    optimizer, take 2 more: the same ranks doing the same ops, so bit for bit the same."""
    straight, resumed = checkpoint_results["straight"], checkpoint_results["resumed"]
    _assert_same_state(resumed, straight, rtol=0, atol=0)
    # get_optimizer_state_dict's lr = 0 step on the fresh optimizer left the params alone (the
    # weighted prox with tau = 0 is the identity, not 0/0).
    assert checkpoint_results["init_step_kept_params"]
    assert all(float(s["step"]) == 4 for s in straight["state"].values())
    convs = [straight["params"]["0.weight"], straight["params"]["2.weight"]]
    zero, total = _zero_group_counts(convs, "in_channel")
    assert 0 < zero < total


def test_one_process_state_dict_loads_into_fsdp2(checkpoint_results):
    """An optimizer state dict saved without FSDP (full plain tensors), loaded with plain
    ``load_state_dict``: the first step shards the moments like the params, and training
    goes on as in one process (tolerance as for the sharded steps)."""
    _assert_same_state(checkpoint_results["from_plain"], checkpoint_results["plain"], rtol=RTOL, atol=ATOL)


def test_partial_grads_are_redistributed(placement_results):
    result = placement_results["partial_grads"]
    for i, (actual, expected) in enumerate(zip(result["sharded"], result["plain"])):
        _assert_close(actual, expected, "in_channel", f"tensor {i}")


def test_partial_params_are_rejected(placement_results):
    assert "placement Partial(sum) is not supported" in placement_results["partial"]


@pytest.mark.parametrize("prox", PROX_NAMES)
def test_zero_lr_step_leaves_params_alone(prox):
    """A step with lr = 0 (a warm-up's first, or DCP's state-creating step) changes no param."""
    params = [nn.Parameter(t) for t in _tensors()]
    before = [p.detach().clone() for p in params]
    opt = FusedGroupProxAdam(params, lr=0.0, lambda_=LAMBDA, prox=prox, backend="torch")
    for p, g in zip(params, _grads(0)):
        p.grad = g
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_plain_tensors_are_not_dtensors():
    from lomt_kernels.distributed import is_dtensor

    assert not is_dtensor(torch.zeros(2))
    assert not is_dtensor(nn.Parameter(torch.zeros(2)))


def _reshard_worker(rank: int, init_file: str, ckpt: str, out: str) -> None:
    """One process resumes the two-rank checkpoint and takes the same 2 steps on whole batches."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = _init(rank, init_file, world=1)
    try:
        model = _shard_model(_model(seed=1), mesh)
        opt = FusedGroupProxAdam(_checkpoint_groups(model), lr=LR, backend="torch")
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(model, opt, range(2, 4), None)
        torch.save(_full_state(model, opt), out)
    finally:
        dist.destroy_process_group()


def test_dcp_checkpoint_reshards_to_one_process(checkpoint_dir, checkpoint_results, tmp_path):
    """The two-rank checkpoint resumed on one rank (DCP reshards the DTensor moments): the
    same training as on two (tolerance as for the sharded steps: other summation orders)."""
    out = tmp_path / "resharded.pt"
    spawned.run(_reshard_worker, str(tmp_path / "init"), str(checkpoint_dir / "ckpt"), str(out), nprocs=1)
    _assert_same_state(torch.load(out), checkpoint_results["straight"], rtol=RTOL, atol=ATOL)
