"""LambdaController: λ moves toward the target, stays in bounds, heals, resumes, agrees across ranks."""

import math

import pytest
import torch
from torch import nn

from lomt_kernels import FusedGroupProxAdam, LambdaController, MacFraction, ZeroGroupFraction, prox_param_groups

import spawned


def _optimizer(channels: int = 8, lambda_: float = 1e-2) -> tuple[torch.Tensor, FusedGroupProxAdam]:
    weight = nn.Parameter(torch.randn(4, channels, 3, 3))
    bias = nn.Parameter(torch.zeros(4))
    opt = FusedGroupProxAdam(
        [{"params": [weight], "lambda_": lambda_, "prox": "group"}, {"params": [bias], "lambda_": 0.0}],
        lr=1e-3, backend="torch",
    )
    return weight, opt


def _zero(weight: torch.Tensor, channels: int) -> None:
    with torch.no_grad():
        weight.copy_(torch.randn_like(weight))
        weight[:, :channels] = 0


def test_lambda_rises_below_the_goal_falls_above_it_and_stays_in_bounds():
    weight, opt = _optimizer()
    controller = LambdaController(opt, 0.5, total_updates=30, warmup=0, bounds=(1e-3, 4e-2), gain=3.0, max_step=math.log(2))
    assert controller.group_indices == [0]  # the bias group has lambda_ = 0: not controlled
    lambdas = [opt.param_groups[0]["lambda_"]]
    for _ in range(6):  # every group alive: below the goal, λ must grow, up to its bound
        record = controller.update()
        lambdas.append(opt.param_groups[0]["lambda_"])
        assert record["lambda_"] == lambdas[-1] and record["phase"] == "control"
    assert all(b > a for a, b in zip(lambdas, lambdas[1:4]))
    assert all(b <= 2 * a * (1 + 1e-12) for a, b in zip(lambdas, lambdas[1:]))  # max_step: a factor 2
    assert lambdas[-1] == 4e-2 and max(lambdas) <= 4e-2
    assert opt.param_groups[1]["lambda_"] == 0.0
    _zero(weight, 8)  # every group zero: above the goal, λ must fall, down to its bound
    for _ in range(12):
        before = opt.param_groups[0]["lambda_"]
        controller.update()
        after = opt.param_groups[0]["lambda_"]
        assert after < before or after == 1e-3
    assert opt.param_groups[0]["lambda_"] == 1e-3
    assert controller.history[0]["figure"] == 0.0 and controller.history[-1]["figure"] == 1.0


def test_at_the_goal_lambda_holds_and_the_ramp_reaches_the_target():
    weight, opt = _optimizer()
    controller = LambdaController(opt, 0.5, total_updates=11, warmup=1, healing=0, ramp=0.5)
    _zero(weight, 2)
    controller.update()  # warm-up: λ held, the ramp starts from 0.25
    assert opt.param_groups[0]["lambda_"] == 1e-2 and controller.start is None
    controller.update()
    assert controller.start == 0.25 and controller.goal(1) == 0.25
    assert controller.goal(6) == controller.goal(10) == 0.5 and 0.25 < controller.goal(3) < 0.5
    _zero(weight, 4)
    for n in range(3, 12):
        before = opt.param_groups[0]["lambda_"]
        controller.update()
        if n < 6:  # the figure is above the ramp's goal: λ falls
            assert opt.param_groups[0]["lambda_"] < before
        else:  # the figure is at the goal: λ holds
            assert opt.param_groups[0]["lambda_"] == before


def test_a_mac_budget_moves_lambda_the_other_way():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    opt = FusedGroupProxAdam(prox_param_groups(net, "", lambda_=1e-2), lr=1e-3, backend="torch")
    figure = MacFraction(net, torch.zeros(1, 3, 9, 9))
    controller = LambdaController(opt, 0.5, total_updates=10, figure=figure, warmup=0)
    controller.update()  # dense: MACs 1.0, above the budget, so more sparsity: λ grows
    assert opt.param_groups[0]["lambda_"] > 1e-2
    with torch.no_grad():
        net[3].weight[:, :7] = 0
        net[0].weight[:, :2] = 0
    high = opt.param_groups[0]["lambda_"]
    controller.update()  # far below the budget: λ falls
    assert figure() < 0.3 and opt.param_groups[0]["lambda_"] < high


def test_healing_freezes_the_zero_groups_and_sets_lambda_to_zero():
    weight, opt = _optimizer()
    controller = LambdaController(opt, 0.5, total_updates=4, warmup=0, healing=2)
    _zero(weight, 3)
    assert controller.update()["phase"] == "control"
    record = controller.update()
    assert record["phase"] == "healing" and record["lambda_"] == 0.0 and controller.phase == "healing"
    assert controller.frozen.frozen == 3
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert torch.count_nonzero(weight[:, :3]) == 0 and torch.count_nonzero(weight[:, 3:] == 0) == 0


def test_bad_arguments_name_the_problem():
    _, opt = _optimizer()
    with pytest.raises(ValueError, match="a fraction, not a percentage"):
        LambdaController(opt, 50, total_updates=10)
    with pytest.raises(ValueError, match="at least one control call"):
        LambdaController(opt, 0.5, total_updates=3, warmup=1, healing=2)
    _, zero = _optimizer(lambda_=0.0)
    with pytest.raises(ValueError, match="no param group to control"):
        LambdaController(zero, 0.5, total_updates=10)
    with pytest.raises(ValueError, match="must be > 0"):
        LambdaController(zero, 0.5, total_updates=10, groups=[0])


def _teacher_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=generator)
    w = torch.zeros(32)
    w[:8] = torch.linspace(1.0, 2.0, 8)
    return x, x @ w + 0.1 * torch.randn(256, generator=generator)


def _plain_loop(epochs: int):
    """A user's own loop: a linear model whose 32 input columns are the groups, target 50% zero,
    the controller called after every step, the last 4 epochs healing."""
    torch.manual_seed(0)
    x, y = _teacher_data()
    model = nn.Linear(32, 1)
    opt = FusedGroupProxAdam(
        [{"params": [model.weight], "lambda_": 1e-2, "prox": "group"}, {"params": [model.bias]}], lr=3e-2, backend="torch"
    )
    steps = 8
    controller = LambdaController(opt, 0.5, total_updates=epochs * steps, warmup=2 * steps, healing=4 * steps)
    for epoch in range(epochs):
        for batch in range(0, 256, 256 // steps):
            opt.zero_grad()
            loss = (model(x[batch:batch + 32]).squeeze(1) - y[batch:batch + 32]).pow(2).mean()
            loss.backward()
            opt.step()
            controller.update()
    return model, opt, controller


def test_the_controller_in_a_plain_training_loop():
    model, opt, controller = _plain_loop(40)
    figure = ZeroGroupFraction(opt.param_groups[:1])()
    assert abs(figure - 0.5) <= 0.05, controller.history
    healing = [r for r in controller.history if r["phase"] == "healing"]  # the freezing call, then 4 epochs
    assert len(healing) == 4 * 8 + 1 and {r["figure"] for r in healing} == {healing[0]["figure"]}
    low, high = controller.bounds
    assert all(low <= r["lambda_"] <= high for r in controller.history if r["phase"] != "healing")
    assert torch.count_nonzero(model.weight[0, :8]) == 8  # the teacher's inputs survive


def test_state_dict_resumes_exactly():
    weight, opt = _optimizer()
    a = LambdaController(opt, 0.5, total_updates=8, warmup=1, healing=3)
    sequence = [1, 1, 2, 3, 5, 5, 5, 5]
    for zeros in sequence[:5]:
        _zero(weight, zeros)
        a.update()
    state = a.state_dict()
    rest = []
    for zeros in sequence[5:]:
        _zero(weight, zeros)
        rest.append(a.update())

    weight2, opt2 = _optimizer()
    b = LambdaController(opt2, 0.5, total_updates=8, warmup=1, healing=3)
    b.load_state_dict(state)
    assert opt2.param_groups[0]["lambda_"] == 0.0 and b.frozen.frozen == 5  # resumed in healing
    for zeros in sequence[5:]:
        _zero(weight2, zeros)
        b.update()
    assert b.history == a.history and b.history[-3:] == rest


def _agree_worker(rank: int, init_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        weight, opt = _optimizer()
        _zero(weight, 1 + 5 * rank)  # the ranks' replicas disagree on purpose
        controller = LambdaController(opt, 0.5, total_updates=5, warmup=0)
        record = controller.update()
        values = torch.tensor([record["figure"], record["lambda_"]], dtype=torch.float64)
        gathered = [torch.zeros_like(values) for _ in range(2)]
        torch.distributed.all_gather(gathered, values)
        assert torch.equal(gathered[0], gathered[1]), gathered
        assert record["figure"] == 1 / 8 and record["lambda_"] > 1e-2  # rank 0's figure
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_uses_rank_zeros_figure_and_the_same_lambda(tmp_path):
    spawned.run(_agree_worker, str(tmp_path / "init"), nprocs=2)


def test_healing_starts_early_on_the_first_call_within_tolerance():
    weight, opt = _optimizer()
    controller = LambdaController(opt, 0.5, total_updates=12, warmup=0, healing=4, settle=3, tolerance=0.01)
    for zeros in (1, 2, 3, 3):  # calls 1-4: control (healing may start from call 5)
        _zero(weight, zeros)
        assert controller.update()["phase"] == "control"
    _zero(weight, 3)
    assert controller.update()["phase"] == "control"  # call 5: 3/8 is off target
    _zero(weight, 4)
    record = controller.update()  # call 6: 4/8 is on target, two calls before schedule
    assert record["phase"] == "healing" and controller.frozen.frozen == 4
    _zero(weight, 1)
    assert controller.update()["phase"] == "healing"  # it stays healing whatever the figure
