"""FrozenGroups: zero groups stay exactly zero through optimizer steps; the rest trains."""

import pytest
import torch

from lomt_kernels import FrozenGroups, FusedGroupProxAdam


@pytest.mark.parametrize("grouping", ["in_channel", "out_channel"])
def test_frozen_groups_stay_exactly_zero_while_the_rest_trains(grouping):
    torch.manual_seed(0)
    conv = torch.randn(6, 5, 3, 3, requires_grad=True)
    linear = torch.randn(4, 7, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    dim = 1 if grouping == "in_channel" else 0
    with torch.no_grad():
        conv.index_fill_(dim, torch.tensor([0, 3]), 0.0)
        linear.index_fill_(dim, torch.tensor([2]), 0.0)
    opt = FusedGroupProxAdam([conv, linear, bias], lr=0.1, grouping=grouping, backend="torch")
    frozen = FrozenGroups([(conv, grouping), (linear, grouping), (bias, grouping)])
    assert frozen.frozen == 3
    frozen.attach(opt)
    start = conv.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        (conv.sum() ** 2 + (linear ** 3).sum() + bias.sum()).backward()  # non-zero grads everywhere
        opt.step()
        assert torch.count_nonzero(conv.index_select(dim, torch.tensor([0, 3]))) == 0
        assert torch.count_nonzero(linear.index_select(dim, torch.tensor([2]))) == 0
    alive = [c for c in range(conv.shape[dim]) if c not in (0, 3)]
    assert not torch.equal(conv.index_select(dim, torch.tensor(alive)), start.index_select(dim, torch.tensor(alive)))
    assert torch.count_nonzero(conv.index_select(dim, torch.tensor(alive)) == 0) == 0


def test_without_attach_the_groups_grow_back():
    # The same loop without the hook: Adam moves the zero groups, so the hook is what holds them.
    weight = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        weight[:, 1] = 0
    opt = FusedGroupProxAdam([weight], lr=0.1, backend="torch")
    FrozenGroups([(weight, "in_channel")])
    (weight.sum() ** 2).backward()
    opt.step()
    assert torch.count_nonzero(weight[:, 1]) > 0


def test_state_dict_round_trip_and_checks():
    a = torch.randn(4, 6)
    a[:, [1, 5]] = 0
    frozen = FrozenGroups([(a, "in_channel")])
    b = torch.randn(4, 6)
    other = FrozenGroups([(b, "in_channel")])
    other.load_state_dict(frozen.state_dict())
    other.apply()
    assert torch.count_nonzero(b[:, [1, 5]]) == 0 and torch.count_nonzero(b[:, [0, 2, 3, 4]] == 0) == 0
    with pytest.raises(ValueError, match="2 masks for 1 tensors"):
        other.load_state_dict({"keep": frozen.state_dict()["keep"] * 2})
    with pytest.raises(ValueError, match="has 6 groups, the tensor 4"):
        FrozenGroups([(torch.ones(6, 4), "in_channel")]).load_state_dict(frozen.state_dict())
