"""``python -m benchmarks.studies.newton_starts``: how many Newton passes the weighted prox needs, by start and update.

The ``"group_weighted"`` prox solves, per nonzero group, :math:`\\varphi(\\theta) = 1` with
:math:`\\varphi(\\theta) = (\\sum_j z_j^2 / (\\theta + a_j)^2)^{-1/2}` and :math:`a_j = \\tau / d_j`
(:func:`lomt_kernels.reference.weighted_group_prox`). Each Newton update costs the fused kernel
one pass over the group's z and d after Adam's pass, and on the ResNet-50 set most groups take
two. A pass is saved only if the update that follows the first pass lands within the
tolerance, so the start, computed from sums that Adam's pass can gather, and the update,
computed from the sums of the pass, decide it. This study takes, in float64, the set's z and d
of the timed step and, for every conv kind, reports the share of the nonzero groups' weights
whose first update lands within ``WEIGHTED_PROX_RTOL[float32]`` (an upper bound on what one pass
can finish: the kernel must also prove it, or check it in its last pass), for each update rule
of :func:`lands_in_one_pass` (``newton``: two sums per pass; ``gauss``: four) from each start

* ``newton0``: the kernel's start, the Newton step from 0 (two sums);
* ``gauss_x``: the root of the two-point Gauss rule for the measure
  :math:`\\sum_j z_j^2 x_j^2 \\delta(x - x_j)`, :math:`x_j = d_j / \\tau`, whose moments are
  :math:`\\sum_j z_j^2 x_j^{2+k}`, k = 0..3, at :math:`\\theta = 0`, in which
  :math:`\\varphi^{-2} = \\int (1 + \\theta x)^{-2}` (four sums);
* ``gauss_a``: the same rule for :math:`\\sum_j z_j^2 \\delta(a - a_j)`, moments
  :math:`\\sum_j z_j^2 a_j^k` (four sums, accurate for large :math:`\\theta`).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from torch import Tensor

from lomt_kernels.grouping import as_groups
from lomt_kernels.reference import WEIGHTED_PROX_RTOL

from ..params import LR, adam_z_and_d, build_set, set_names

RTOL = WEIGHTED_PROX_RTOL[torch.float32]
#: Newton updates that solve a two-point model (scalar work per group).
MODEL_ITERS = 40
#: The updates a pass's sums can make (lands_in_one_pass).
RULES = ("newton", "gauss")


def gauss_two_point(m: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes t1, t2 and weights w1, w2 of the two-point Gauss rule with moments m[0..3] (per row).

    The nodes are the roots of :math:`t^2 + bt + c`, orthogonal to 1 and t under the measure.
    """
    det = m[0] * m[2] - m[1] ** 2
    b = (m[1] * m[2] - m[0] * m[3]) / det
    c = (m[1] * m[3] - m[2] ** 2) / det
    root = (b * b - 4 * c).clamp(min=0).sqrt()
    t1, t2 = (-b - root) / 2, (-b + root) / 2
    w2 = (m[1] - t1 * m[0]) / (t2 - t1)
    return t1, t2, m[0] - w2, w2


def two_point_root(t1: Tensor, t2: Tensor, w1: Tensor, w2: Tensor, theta: Tensor) -> Tensor:
    """Per row, the root of :math:`h^{-1/2} = 1` for the two-point model
    :math:`h = w_1/(1 + \\theta t_1)^2 + w_2/(1 + \\theta t_2)^2`, by Newton's method from
    ``theta`` (h decreases in theta), clamped at 0; a degenerate rule (NaN) gives 0."""
    for _ in range(MODEL_ITERS):
        h = w1 / (1 + theta * t1) ** 2 + w2 / (1 + theta * t2) ** 2
        dh = -2 * w1 * t1 / (1 + theta * t1) ** 3 - 2 * w2 * t2 / (1 + theta * t2) ** 3
        phi = h.rsqrt()
        theta = (theta + (1 - phi) / (-0.5 * phi**3 * dh)).clamp(min=0)
    return torch.nan_to_num(theta, nan=0.0)


def starts(z: Tensor, d: Tensor, tau: float) -> dict[str, Tensor]:
    """Each start's theta for the rows (groups) of z and d, all with ``||D z|| > tau``."""
    c, x = z * z, d / tau
    mx = [(c * x ** (2 + k)).sum(1) for k in range(4)]
    norm = mx[0].sqrt()
    # The kernel's closed-form step from 0, in units of tau (reference.weighted_group_prox).
    newton0 = mx[0] * (norm - 1) / mx[1]
    # For the measure sum_j z_j^2 delta(a - a_j), h = sum_j v / (theta + u)^2 over its nodes u:
    # the same form with t = 1 / u and w = v / u^2.
    u1, u2, v1, v2 = gauss_two_point([(c * (tau / d) ** k).sum(1) for k in range(4)])
    return {
        "newton0": newton0,
        "gauss_x": two_point_root(*gauss_two_point(mx), newton0),
        "gauss_a": two_point_root(1 / u1, 1 / u2, v1 / u1**2, v2 / u2**2, newton0),
    }


def lands_in_one_pass(z: Tensor, d: Tensor, tau: float, theta: Tensor, rule: str = "newton") -> Tensor:
    """Per row: does the update from ``theta``, made from one pass's sums, land within RTOL?

    The pass at ``theta`` gathers :math:`M_k = \\sum_j q_j^2 r_j^k` with
    :math:`r_j = d_j / (\\theta d_j + \\tau)`, :math:`q_j = z_j r_j`, so that
    :math:`\\varphi^{-2}(\\theta + \\delta) = \\sum_j q_j^2 / (1 + \\delta r_j)^2`. ``rule="newton"``
    takes the kernel's Newton update (M_0, M_1); ``"gauss"`` the root of the two-point Gauss rule
    for the measure :math:`\\sum_j q_j^2 \\delta(r - r_j)` (M_0..M_3).
    """
    def moments(th: Tensor, count: int) -> list[Tensor]:
        r = d / (th[:, None] * d + tau)
        q2 = (z * r) ** 2
        return [(q2 * r**k).sum(1) for k in range(count)]

    m = moments(theta, 2 if rule == "newton" else 4)
    phi = m[0].rsqrt()
    delta = (1 - phi) / (m[1] * phi**3)
    if rule == "gauss":
        delta = two_point_root(*gauss_two_point(m), delta)
    step = (theta + delta).clamp(min=0)
    done_at_start = (1 - phi).abs() <= RTOL
    return done_at_start | ((1 - moments(step, 1)[0].rsqrt()).abs() <= RTOL)


def conv_kind(shape: torch.Size) -> str:
    return "x".join(str(s) for s in shape[2:]) if len(shape) == 4 else "linear"


@torch.no_grad()
def study(set_name: str) -> str:
    """The markdown table for one benchmark set (its tensors with the prox)."""
    pset = build_set(set_name)
    lambda_ = pset.lambdas["group_weighted"]
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for i, use in enumerate(pset.prox_mask):
        if not use:
            continue
        z, d = (as_groups(t.double(), "in_channel") for t in adam_z_and_d(pset, i))
        n = z.shape[1]
        tau = LR * lambda_ * math.sqrt(n)
        active = (d * z).norm(dim=1) > tau
        row = rows[conv_kind(pset.params[i].shape)]
        row["tensors"] += 1
        row["groups"] += z.shape[0]
        row["active"] += int(active.sum())
        row["weights"] += z.numel()
        row["active weights"] += int(active.sum()) * n
        if active.any():
            za, da = z[active], d[active]
            for name, theta in starts(za, da, tau).items():
                for rule in RULES:
                    row[f"{name}, {rule}"] += int(lands_in_one_pass(za, da, tau, theta, rule).sum()) * n
    names = [f"{name}, {rule}" for name in ("newton0", "gauss_x", "gauss_a") for rule in RULES]
    lines = [
        f"### {pset.description}",
        "",
        "| kind | tensors | groups (nonzero) | weights in nonzero groups | "
        + " | ".join(f"lands: {name}" for name in names) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(names),
    ]
    for kind, row in sorted(rows.items(), key=lambda kv: -kv[1]["weights"]):
        share = lambda key: _share(row[key], row["active weights"])  # noqa: E731
        lines.append(
            f"| {kind} | {int(row['tensors'])} | {int(row['groups'])} ({int(row['active'])}) | "
            f"{_count(row['active weights'])} of {_count(row['weights'])} | "
            + " | ".join(share(name) for name in names) + " |"
        )
    return "\n".join(lines)


def _share(part: float, whole: float) -> str:
    """part / whole, with the digits that show a remainder under 1%."""
    if not whole:
        return "-"
    share = part / whole
    return f"{share:.5f}" if 0.99 < share < 1 else f"{share:.3f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.newton_starts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50-convs", help=f"comma-separated, of {', '.join(set_names())}")
    args = parser.parse_args(argv)
    for name in args.sets.split(","):
        print(study(name), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
