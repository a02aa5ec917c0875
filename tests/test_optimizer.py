"""FusedGroupProxAdam's API and the reference maths (the ``"torch"`` backend).

Backend kernels are checked against this reference in ``test_kernels_*.py``.
"""

import copy
import math

import pytest
import torch
from torch import nn

from lomt_kernels import FusedGroupProxAdam, group_sparsity, prox_param_groups
from lomt_kernels.grouping import as_groups, from_groups, group_layout
from lomt_kernels.kernels.prepare import work_tensors, write_back
from lomt_kernels.reference import group_shrink, l1_shrink, weighted_group_prox


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    ).double()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _assert_same_params(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=name)


# float64 through identical op sequences: any difference is a maths difference, not rounding.
@pytest.mark.parametrize(
    "kwargs, torch_cls",
    [
        ({}, torch.optim.Adam),
        ({"weight_decay": 0.1}, torch.optim.Adam),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, torch.optim.AdamW),
        ({"maximize": True}, torch.optim.Adam),
    ],
)
def test_lambda_zero_is_adam(kwargs, torch_cls):
    ours, theirs = _model(), _model()
    _train(ours, FusedGroupProxAdam(ours.parameters(), lr=1e-2, backend="torch", **kwargs), 7)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "decoupled_weight_decay"}
    _train(theirs, torch_cls(theirs.parameters(), lr=1e-2, foreach=False, **torch_kwargs), 7)
    _assert_same_params(ours, theirs, atol=1e-14)


def test_prox_none_ignores_lambda():
    ours, theirs = _model(), _model()
    _train(ours, FusedGroupProxAdam(ours.parameters(), lr=1e-2, lambda_=5.0, prox="none", backend="torch"), 3)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2, foreach=False), 3)
    _assert_same_params(ours, theirs, atol=1e-14)


def test_group_shrink_by_hand():
    # W[N=2, C=2]: in-channel groups are columns [3, 4] (norm 5) and [0.3, 0.4] (norm 0.5).
    z = torch.tensor([[3.0, 0.3], [4.0, 0.4]], dtype=torch.float64)
    out = group_shrink(z, tau=1.0, grouping="in_channel")
    torch.testing.assert_close(out, torch.tensor([[2.4, 0.0], [3.2, 0.0]], dtype=torch.float64))
    # Out-channel groups are rows [3, 0.3] and [4, 0.4].
    out = group_shrink(z, tau=1.0, grouping="out_channel")
    r0, r1 = math.hypot(3, 0.3), math.hypot(4, 0.4)
    expected = torch.tensor([[3 * (1 - 1 / r0), 0.3 * (1 - 1 / r0)], [4 * (1 - 1 / r1), 0.4 * (1 - 1 / r1)]])
    torch.testing.assert_close(out, expected.double())


def test_l1_shrink_by_hand():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], dtype=torch.float64)
    torch.testing.assert_close(l1_shrink(z, 1.0), torch.tensor([-1.0, 0.0, 0.0, 0.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("grouping", ["in_channel", "out_channel"])
@pytest.mark.parametrize("spread", [1.0, 1e2, 1e6])
def test_weighted_prox_optimality(grouping, spread):
    """KKT conditions of argmin 1/2||x - z||_D^2 + tau ||x||, per group.

    Non-zero groups: D (x - z) + tau x / ||x|| = 0. Zero groups: ||D z|| <= tau.
    ``spread`` is the ratio of the largest to the smallest d, up to Adam-like extremes.
    """
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(24, 16, 3, 3, generator=gen, dtype=torch.float64)
    d = spread ** torch.rand(z.shape, generator=gen, dtype=torch.float64)
    tau = float(torch.quantile(as_groups(d * z, grouping).norm(dim=1), 0.5))  # half the groups zero
    x = weighted_group_prox(z, d, tau, grouping)
    xr, zr, dr = (as_groups(t, grouping) for t in (x, z, d))
    norms = xr.norm(dim=1, keepdim=True)
    live = norms.squeeze(1) > 0
    assert 0 < live.sum() < live.numel()
    residual = (dr * (xr - zr) + tau * xr / norms.clamp_min(1e-300))[live].norm(dim=1)
    assert residual.max() <= 1e-9 * tau
    assert ((dr * zr).norm(dim=1)[~live] <= tau).all()


@pytest.mark.parametrize("tau", [1e-20, 1e-10])
def test_weighted_prox_in_float32_with_a_tiny_tau(tau):
    # With tau -> 0 the prox tends to the identity. At theta = 0 the Newton sums divide by tau
    # ((z d / tau)^2 d / tau ~ 1e60 for tau = 1e-20), beyond float32's range; the first step,
    # taken in closed form, keeps float32 within its rounding (~1e-7 relative) of float64.
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(16, 12, 3, 3, generator=gen, dtype=torch.float64)
    d = 10 ** torch.empty(z.shape, dtype=torch.float64).uniform_(-3, 0, generator=gen)
    expected = weighted_group_prox(z, d, tau, "in_channel")
    actual = weighted_group_prox(z.float(), d.float(), tau, "in_channel")
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected, z, rtol=1e-6, atol=0)


def test_weighted_prox_with_constant_metric_is_group_shrink():
    # With D = c I the problem is c/2 ||x - z||^2 + tau ||x||: the group shrink with tau / c.
    z = torch.randn(8, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c, tau = 4.0, 6.0
    torch.testing.assert_close(
        weighted_group_prox(z, torch.full_like(z, c), tau, "in_channel"), group_shrink(z, tau / c, "in_channel")
    )


#: Ways a group's z becomes non-finite in one step; each poisons input channel 1 of the weight
#: in test_nonfinite_values_pass_through_the_prox (whose hyperparameters it may override).
NONFINITE_CASES = ("nan_grad", "inf_grad", "inf_param", "zero_grads_eps0")


def _poison(case: str, w: torch.Tensor, g: torch.Tensor) -> dict:
    """Poisons channel 1 of ``w`` or ``g`` in place, as ``case`` says; returns the overrides."""
    if case == "nan_grad":
        g[3, 1, 1, 1] = float("nan")
    elif case == "inf_grad":
        g[3, 1, 1, 1] = float("inf")  # m and v become inf, so z = p - s m/d is NaN
    elif case == "inf_param":
        w[3, 1, 1, 1] = float("inf")
    else:  # m = v = 0 and d = eps = 0: Adam's z is 0/0
        g[:, 1] = 0.0
        return {"eps": 0.0}
    return {}


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["none", "group", "group_weighted", "l1"])
def test_nonfinite_values_pass_through_the_prox(prox, case):
    """The rule of the reference (the "torch" backend) for non-finite values: a group whose
    statistics are not finite, and for l1 an element whose z is not, comes out as plain Adam
    leaves it, never as exact zeros, and the other groups come out as without it.

    Channel 1 is one the prox zeroes when it is finite. Two steps: the second starts from the
    first's NaN moments, as a run that goes on would. Compared with torch.optim.Adam to the
    tolerance of test_lambda_zero_is_adam, and with the clean run (channel 1 finite) to float64
    rounding (the weighted prox's Newton loop runs to the slowest group of the tensor).
    """
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 0, 6, dtype=torch.float64)[:, None, None]  # channel 1: 0.025
    w = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64) * scale
    grads = [0.1 * torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    clean_w, clean_grads = w.clone(), [g.clone() for g in grads]
    hyper = dict(lr=1e-2, lambda_={"group_weighted": 1.0}.get(prox, 10.0), prox=prox)
    hyper |= _poison(case, w, grads[0])
    if case == "zero_grads_eps0":
        grads[1][:, 1] = 0.0

    def run(cls, weight, grads, **kwargs):
        p = nn.Parameter(weight.clone())
        opt = cls([p], **kwargs)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    ours = run(FusedGroupProxAdam, w, grads, backend="torch", **hyper)
    clean = run(FusedGroupProxAdam, clean_w, clean_grads, backend="torch", **hyper)
    adam = run(torch.optim.Adam, w, grads, lr=hyper["lr"], eps=hyper.get("eps", 1e-8), foreach=False)
    nonfinite = ~adam.isfinite()
    if prox in ("group", "group_weighted"):
        nonfinite = nonfinite.any(dim=(0, 2, 3), keepdim=True).expand_as(adam)
    assert nonfinite.any() and not nonfinite[:, [0, 2, 3, 4, 5]].any()
    torch.testing.assert_close(ours[nonfinite], adam[nonfinite], rtol=0, atol=1e-14, equal_nan=True)
    assert ours[~nonfinite].isfinite().all()
    if prox in ("group", "group_weighted"):
        control = [0, 2, 3, 4, 5]
        torch.testing.assert_close(ours[:, control], clean[:, control], rtol=1e-12, atol=0)
        assert (clean[:, 1] == 0).all()
        zero_channels = (ours[:, control] == 0).all(dim=(0, 2, 3))
        assert zero_channels.any() and not zero_channels.all()
    else:
        torch.testing.assert_close(ours[~nonfinite], clean[~nonfinite], rtol=1e-12, atol=0)


def test_group_views_round_trip():
    w = torch.randn(4, 3, 2, 2)
    for grouping, n in (("in_channel", 3), ("out_channel", 4)):
        rows = as_groups(w, grouping)
        assert rows.shape[0] == n
        torch.testing.assert_close(from_groups(rows, w, grouping), w)
    assert group_layout(w, "in_channel") == (4, 3, 4)
    assert group_layout(w.to(memory_format=torch.channels_last), "in_channel") == (16, 3, 1)
    assert group_layout(w, "out_channel") == (1, 4, 12)
    assert group_layout(w.transpose(0, 1), "in_channel") is None
    assert group_layout(torch.randn(5), "in_channel") is None


@pytest.mark.parametrize("policy", ["keep", "cast"])
def test_work_tensors_grad_dtype_and_copies(policy):
    """What the Triton and CUDA backends step: a dense param and its state as they are, a
    transposed param as a contiguous copy to write back, and a grad of another dtype kept or cast."""
    dense, transposed = torch.randn(4, 3, 2, 2), torch.randn(3, 5).t()
    params = [dense, transposed]
    grads = [torch.randn(4, 3, 2, 2, dtype=torch.bfloat16), torch.randn(5, 3)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    kwargs = dict(prox="group", lambda_=1.0, grouping="in_channel", grad_dtype=policy)
    works = work_tensors(params, grads, *state, **kwargs)
    assert works[0].p is dense and works[0].m is state[0][0] and works[0].v is state[1][0]
    assert works[0].g.dtype == (torch.float32 if policy == "cast" else torch.bfloat16)
    assert works[0].layout == (4, 3, 4)
    assert works[1].p is not transposed and works[1].p.is_contiguous()
    assert works[1].layout == (5, 3, 1) and torch.equal(works[1].p, transposed)
    works[1].p.add_(1.0)
    write_back(params, *state, works)
    assert torch.equal(transposed, works[1].p)


def test_prox_reaches_exact_zero_and_leaves_1d_params_alone():
    model = _model()
    opt = FusedGroupProxAdam(model.parameters(), lr=1e-2, lambda_=2.0, backend="torch")
    _train(model, opt, 5)
    report = group_sparsity(model)
    assert report.zero_groups > 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert (p != 0).all(), name


def test_group_sparsity_figures():
    conv = nn.Conv2d(4, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[:, 1] = 0
        conv.weight[0, 2, 0, 0] = 0
    report = group_sparsity(conv)
    (layer,) = report.layers
    assert (layer.groups, layer.zero_groups, layer.params, layer.zero_params) == (4, 1, 72, 19)
    assert report.group_sparsity == 25.0
    assert report.param_sparsity == pytest.approx(100 * 19 / 72)
    assert group_sparsity(conv, grouping="out_channel").zero_groups == 0
    assert report.to_dict()["total"]["zero_groups"] == 1


def test_group_sparsity_never_counts_a_non_finite_group_as_zero():
    conv = nn.Conv2d(4, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 1] = float("nan")  # otherwise-zero group with one NaN: diverged, not sparse
        conv.weight[1, 2] = float("inf")
        conv.weight[:, 3] = 1.0
    report = group_sparsity(conv)
    assert (report.zero_groups, report.nonfinite_groups) == (1, 2)
    assert report.to_dict()["total"]["nonfinite_groups"] == 2


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.complex128])
def test_params_the_maths_does_not_cover_are_refused(backend, dtype):
    bad = torch.zeros(3, 2, dtype=dtype)
    message = "complex" if dtype.is_complex else "only floating-point params"
    with pytest.raises(ValueError, match=f"param 1 .*{message}"):
        FusedGroupProxAdam([torch.zeros(2), bad], backend=backend)
    opt = FusedGroupProxAdam([torch.zeros(2)], backend=backend)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


def _saved_state() -> dict:
    model = _model()
    opt = FusedGroupProxAdam(model.parameters(), lr=1e-2, lambda_=0.5, backend="torch")
    _train(model, opt, 1)
    return opt.state_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lambda_": -5.0}, "lambda_=-5.0"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"prox": "bogus"}, "unknown prox='bogus'"),
        ({"betas": (0.9, 1.5)}, r"betas\[1\]=1.5"),
        ({"amsgrad": True}, "amsgrad=True, which FusedGroupProxAdam does not support"),
        ({"momentum": 0.9}, r"keys \['momentum'\] that neither .* another optimizer's state"),
    ],
)
def test_crafted_state_dicts_are_refused(change, message):
    state = _saved_state()
    state["param_groups"][0].update(change)
    opt = FusedGroupProxAdam(_model().parameters(), backend="torch")
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == before[0]["lr"] and not opt.state


def test_another_optimizers_state_is_refused():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, 1)
    with pytest.raises(ValueError, match="another optimizer's"):
        FusedGroupProxAdam(model.parameters(), backend="torch").load_state_dict(sgd.state_dict())
    adam_state = _saved_state()
    adam_state["state"][0]["max_exp_avg_sq"] = adam_state["state"][0]["exp_avg_sq"]  # amsgrad's extra moment
    with pytest.raises(ValueError, match=r"param 0 has keys .*max_exp_avg_sq.*not Adam's"):
        FusedGroupProxAdam(_model().parameters(), backend="torch").load_state_dict(adam_state)


def test_prox_param_groups_selects_backbone_convs():
    model = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "head": nn.Conv2d(4, 2, 1)}
    )
    sparse, dense = prox_param_groups(model, "backbone", lambda_=0.5, prox="group_weighted")
    assert sparse["params"] == [model["backbone"][0].weight]
    assert (sparse["lambda_"], sparse["prox"], dense["lambda_"]) == (0.5, "group_weighted", 0.0)
    assert len(dense["params"]) == 5  # conv bias, bn weight and bias, head weight and bias
    FusedGroupProxAdam([sparse, dense], backend="torch")
    with pytest.raises(ValueError, match="no 4-D conv weights.*'backbone'"):
        prox_param_groups(model, "trunk", lambda_=0.5)


def test_param_group_overrides():
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    opt = FusedGroupProxAdam(
        [{"params": a.parameters(), "lambda_": 50.0}, {"params": b.parameters()}], lr=0.1, backend="torch"
    )
    for m in (a, b):
        m.weight.grad = torch.ones_like(m.weight)
        m.bias.grad = torch.ones_like(m.bias)
    opt.step()
    assert (a.weight == 0).all() and (b.weight != 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lambda_": -0.1}, "lambda_=-0.1"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]=1.0"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]=-0.1"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"prox": "group_lasso"}, "unknown prox='group_lasso'"),
        ({"grouping": "channel"}, "unknown grouping='channel'"),
        ({"backend": "metal"}, "unknown backend='metal'"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedGroupProxAdam(nn.Linear(2, 2).parameters(), **kwargs)
    with pytest.raises(ValueError, match=message):
        FusedGroupProxAdam([{"params": nn.Linear(2, 2).parameters(), **kwargs}])


def test_sparse_grad_is_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        FusedGroupProxAdam(emb.parameters(), backend="torch").step()


def test_unavailable_backend_names_what_is_missing():
    layer = nn.Linear(2, 2)
    layer(torch.randn(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        FusedGroupProxAdam(layer.parameters(), backend="cuda").step()


def test_none_grads_and_empty_params():
    used, unused, empty = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(0, 4))
    opt = FusedGroupProxAdam([used, unused, empty], lr=0.1, lambda_=0.1, backend="torch")
    used.grad = torch.ones_like(used)
    empty.grad = torch.ones_like(empty)
    opt.step()
    assert (unused == 1).all() and unused not in opt.state
    assert (used != 1).all() and empty.numel() == 0


def test_lr_scheduler_drives_lr():
    model = _model()
    opt = FusedGroupProxAdam(model.parameters(), lr=1e-2, backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 5e-3


def test_state_dict_round_trip_resumes_exactly():
    kwargs = dict(lr=1e-2, lambda_=0.5, prox="group_weighted", backend="torch")
    straight = _model()
    straight_opt = FusedGroupProxAdam(straight.parameters(), **kwargs)
    _train(straight, straight_opt, 3)
    _train(straight, straight_opt, 3, seed=2)

    first = _model()
    first_opt = FusedGroupProxAdam(first.parameters(), **kwargs)
    _train(first, first_opt, 3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(first_opt.state_dict())

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt = FusedGroupProxAdam(resumed.parameters(), **kwargs)
    opt.load_state_dict(saved_opt)
    assert opt.state_dict()["param_groups"] == saved_opt["param_groups"]
    _train(resumed, opt, 3, seed=2)
    _assert_same_params(resumed, straight)


def test_cross_loading_with_torch_adam():
    ours, theirs = _model(), _model()
    our_opt = FusedGroupProxAdam(ours.parameters(), lr=1e-2, backend="torch")
    their_opt = torch.optim.Adam(theirs.parameters(), lr=1e-2, foreach=False)
    _train(ours, our_opt, 3)
    _train(theirs, their_opt, 3)

    # Adam's checkpoint into ours: our extra keys take the constructor's values.
    loaded = FusedGroupProxAdam(theirs.parameters(), lr=1e-2, lambda_=0.0, prox="group_weighted", backend="torch")
    loaded.load_state_dict(their_opt.state_dict())
    group = loaded.param_groups[0]
    assert (group["lambda_"], group["prox"], group["grouping"]) == (0.0, "group_weighted", "in_channel")
    # Ours into Adam.
    adam = torch.optim.Adam(ours.parameters(), lr=1e-2, foreach=False)
    adam.load_state_dict(our_opt.state_dict())
    assert set(our_opt.state_dict()["state"][0]) == set(their_opt.state_dict()["state"][0]) == {
        "step", "exp_avg", "exp_avg_sq"
    }
    _train(theirs, loaded, 3, seed=2)
    _train(ours, adam, 3, seed=2)
    _assert_same_params(ours, theirs, atol=1e-14)


def test_grad_scaler_unscales_and_skips_inf_steps():
    scaled, plain = _model(), _model()
    scaled_opt = FusedGroupProxAdam(scaled.parameters(), lr=1e-2, lambda_=0.5, backend="torch")
    plain_opt = FusedGroupProxAdam(plain.parameters(), lr=1e-2, lambda_=0.5, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    for model, opt, scale in ((scaled, scaled_opt, True), (plain, plain_opt, False)):
        loss = model(x).square().mean()
        if scale:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    _assert_same_params(scaled, plain, atol=1e-12)

    before = copy.deepcopy(scaled.state_dict())
    steps_before = [s["step"].item() for s in scaled_opt.state.values()]
    scaled_opt.zero_grad()
    scaler.scale(scaled(x).square().mean()).backward()
    next(scaled.parameters()).grad[0].view(-1)[0] = float("inf")
    scaler.step(scaled_opt)
    scaler.update()
    for key, value in scaled.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [s["step"].item() for s in scaled_opt.state.values()] == steps_before
    assert scaler.get_scale() == 512.0


def test_capturable_needs_a_capturable_backend():
    layer = nn.Linear(2, 2)
    layer(torch.randn(1, 2)).sum().backward()
    opt = FusedGroupProxAdam(layer.parameters(), backend="torch", capturable=True)
    with pytest.raises(RuntimeError, match="capturable=True needs a backend whose steps make no host sync"):
        opt.step()
