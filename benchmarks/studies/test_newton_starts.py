"""Checks of the Newton-start study's maths (``python -m benchmarks.studies.newton_starts``)."""

import torch

from benchmarks.studies import newton_starts


def test_newton_starts_two_point_rule_is_exact_on_a_two_point_measure():
    # Moments of 0.25 at t = 1 plus 0.75 at t = 3: the rule must give back those nodes and weights.
    m = [torch.tensor([0.25 * 1**k + 0.75 * 3**k], dtype=torch.float64) for k in range(4)]
    t1, t2, w1, w2 = newton_starts.gauss_two_point(m)
    torch.testing.assert_close(torch.cat([t1, t2, w1, w2]), torch.tensor([1.0, 3.0, 0.25, 0.75], dtype=torch.float64))


def test_newton_starts_every_start_is_exact_when_a_groups_weights_are_equal():
    # With equal d, phi is linear in theta: each start is the root, so one pass confirms it; with
    # unequal d the kernel's start (a Newton step from 0) lies below the root and does not land.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    tau = 0.5
    equal = torch.full_like(z, 2.0)
    for name, theta in newton_starts.starts(z, equal, tau).items():
        assert newton_starts.lands_in_one_pass(z, equal, tau, theta).all(), name
    spread = torch.rand(4, 64, generator=gen, dtype=torch.float64) * 10 + 0.01
    theta = newton_starts.starts(z, spread, tau)["newton0"]
    assert not newton_starts.lands_in_one_pass(z, spread, tau, theta).any()


def test_newton_starts_gauss_update_is_exact_when_a_group_has_two_weights():
    # d takes two values per group, so each pass's measure has two atoms and the Gauss rule is
    # exact: its update lands from a start far below the root, where a Newton update does not.
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    d = torch.where(torch.arange(64) % 2 == 0, 0.2, 5.0).to(torch.float64).expand(4, 64)
    tau = 0.5
    theta = 0.2 * newton_starts.starts(z, d, tau)["newton0"]
    assert newton_starts.lands_in_one_pass(z, d, tau, theta, "gauss").all()
    assert not newton_starts.lands_in_one_pass(z, d, tau, theta, "newton").any()


def test_newton_starts_prints_a_row_per_conv_kind(capsys):
    assert newton_starts.main(["--sets", "small-convs"]) == 0
    table = capsys.readouterr().out
    assert "| 3x3 |" in table and "| 1x1 |" in table
