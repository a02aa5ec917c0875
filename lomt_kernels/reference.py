r"""The readable reference of the proximal Adam step: the ``"torch"`` backend.

Plain PyTorch ops, written as the maths reads. Every other backend is tested against this
function run in float64. Lower-precision params are computed in float32 and rounded once on
store, as the fused kernels do.

Per tensor ``p`` with gradient ``g``, moments ``m``, ``v`` and step ``t`` (this step's count):

.. math::

    g &\leftarrow -g \text{ if maximize};\quad g \leftarrow g + \mathrm{wd}\,p
        \text{ (coupled decay)};\quad p \leftarrow p(1 - \mathrm{lr}\,\mathrm{wd})
        \text{ (decoupled decay)} \\
    m &\leftarrow \beta_1 m + (1-\beta_1) g,\qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    d &= \sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon,\qquad
    z = p - \frac{\mathrm{lr}}{1-\beta_1^t}\, m / d

and then ``p = prox(z)`` group by group (see :mod:`lomt_kernels.grouping`), with
``tau = lr * lambda_ * sqrt(n_G)``:

* ``group``: :math:`p_G = \max(0, 1 - \tau/\|z_G\|)\, z_G`;
* ``group_weighted``: :math:`p_G = \arg\min_x \tfrac12\|x - z_G\|^2_{D} + \tau\|x\|`,
  ``D = diag(d_G)``, solved by :func:`weighted_group_prox`;
* ``l1``: :math:`p = \mathrm{sign}(z)\max(|z| - \mathrm{lr}\,\lambda, 0)`;
* ``none`` (or ``lambda_ == 0``, or a tensor with fewer than two dims): ``p = z``.

**Non-finite values.** A prox acts only where its statistics are finite; elsewhere it passes
``z`` through unchanged, as plain Adam (``none``) would leave it. For ``group`` that is a group
whose :math:`\|z_G\|` is not finite; for ``group_weighted`` a group whose :math:`\|D z_G\|`
or :math:`\sum_j d_j^3 z_j^2` is not finite; for ``l1`` an element whose ``z`` is not finite.
Any NaN or inf in ``z_G`` (for ``group_weighted``, or in ``d_G``) makes these sums non-finite,
as does their overflow. So a NaN gradient element gives one NaN element, as in
:class:`torch.optim.Adam`, never a group of exact zeros that would read as sparsity; finite
groups are unaffected. Passing such a group through is also the prox's limit as its norm
grows: the shrink factor tends to 1.

The group proxes need each group's sums (its norm, and the weighted prox's Newton sums). When a
tensor is one shard of a bigger one whose groups span shards (an FSDP2 ``Shard(0)`` weight
grouped by input channel), a ``reduce`` hook sums those per-group partial sums across the
shards: the same maths, with one all-reduce where the unsharded code takes a sum
(:mod:`lomt_kernels.distributed`). ``reduce=None`` means every group lies wholly in the tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .contract import AdamHyper, Prox, StepTensors
from .grouping import as_groups, from_groups, group_dim, group_threshold, is_grouped

#: Newton iterations allowed for the weighted prox's scalar equation. The iteration is monotone
#: from below (see :func:`weighted_group_prox`) and quadratically convergent; with the
#: well-scaled form it reaches float32 precision in fewer than 10 steps on the test cases.
WEIGHTED_PROX_MAX_ITER = 30
#: Stop once ``1 - phi(theta) <= rtol``, i.e. ``||x||`` is within ``rtol`` of ``theta``.
WEIGHTED_PROX_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}

#: Sums per-group partial sums over the shards a group is split across. It takes a
#: ``[groups, k]`` tensor of this shard's partial sums (``k`` sums per group, reduced together)
#: and returns the totals in the same shape, identical on every shard.
GroupReduce = Callable[[Tensor], Tensor]


def _group_norms(*rows: Tensor, reduce: GroupReduce | None) -> tuple[Tensor, ...]:
    """Each group's 2-norm, ``[groups, 1]``, for each ``[groups, n]`` tensor; one ``reduce`` for all."""
    if reduce is None:
        return tuple(r.norm(dim=1, keepdim=True) for r in rows)
    sums = reduce(torch.cat([r.square().sum(dim=1, keepdim=True) for r in rows], dim=1))
    return sums.sqrt().split(1, dim=1)


def _group_sums(*terms: Tensor, reduce: GroupReduce | None) -> tuple[Tensor, ...]:
    """Each group's sum, ``[groups, 1]``, for each ``[groups, n]`` tensor; one ``reduce`` for all."""
    sums = tuple(t.sum(dim=1, keepdim=True) for t in terms)
    if reduce is None:
        return sums
    return reduce(torch.cat(sums, dim=1)).split(1, dim=1)


def group_shrink(z: Tensor, tau: float, grouping: str, *, reduce: GroupReduce | None = None) -> Tensor:
    r"""The group-lasso prox :math:`\max(0, 1 - \tau/\|z_G\|)\, z_G` for every group of ``z``.

    A group whose :math:`\|z_G\|` is not finite (a NaN or inf in it, or an overflowing sum of
    squares) is returned unchanged, the limit of the shrink as the norm grows.
    ``reduce`` sums the groups' squared norms across shards (see :data:`GroupReduce`).
    """
    rows = as_groups(z, grouping)
    (norm,) = _group_norms(rows, reduce=reduce)
    scale = torch.where(norm > tau, 1 - tau / norm.clamp_min(torch.finfo(z.dtype).tiny), 0)
    scale = torch.where(norm.isfinite(), scale, 1)
    return from_groups(rows * scale, z, grouping)


def weighted_group_prox(
    z: Tensor,
    d: Tensor,
    tau: float,
    grouping: str,
    *,
    max_iter: int = WEIGHTED_PROX_MAX_ITER,
    rtol: float | None = None,
    reduce: GroupReduce | None = None,
) -> Tensor:
    r"""The adaptive (diagonally weighted) group prox of Deleu & Bengio (2021).

    For each group, ``x = argmin 1/2 (x - z)^T D (x - z) + tau ||x||`` with ``D = diag(d)``,
    ``d > 0``. The minimiser is zero iff :math:`\|D z\| \le \tau`. Otherwise
    :math:`x_j = d_j\theta z_j / (d_j\theta + \tau)` where :math:`\theta = \|x\| > 0` solves
    :math:`\sum_j z_j^2 / (\theta + a_j)^2 = 1` with :math:`a_j = \tau / d_j`.

    We solve :math:`\varphi(\theta) = (\sum_j z_j^2/(\theta + a_j)^2)^{-1/2} = 1` by Newton's
    method from :math:`\theta = 0`. :math:`\varphi` is increasing and concave (it is the
    reciprocal norm of the trust-region secular equation), so every Newton iterate lies at or
    below the root and they increase monotonically to it; when all :math:`a_j` are equal
    :math:`\varphi` is linear and one step is exact. Iterates are clamped at 0, the safeguard
    kept in every backend (an upper clamp would never act: the iterates stay below the root).

    The first step, from 0, is taken in closed form,
    :math:`\theta_1 = \|Dz\|^2 (\|Dz\| - \tau) / \sum_j d_j^3 z_j^2`, from
    :math:`\varphi(0) = \tau / \|Dz\|` and :math:`\varphi'(0) = \sum_j d_j^3 z_j^2 / \|Dz\|^3`:
    evaluating the sums at :math:`\theta = 0` divides by :math:`a_j = \tau / d_j`, which
    overflows float32 when ``tau`` is tiny (``lambda_`` around 1e-15), where the prox is nearly
    the identity. Every iterate after it is positive, so the sums stay well scaled.
    ``tau == 0`` is the identity (``lr == 0``, as in a warm-up's first step).

    A group whose :math:`\|Dz\|^2` or :math:`\sum_j d_j^3 z_j^2` is not finite is returned
    unchanged (``x = z``, the limit :math:`\theta \to \infty` of the formula above): any NaN or
    inf in its ``z`` or ``d`` makes them so. When both are finite, so are ``z`` and ``d``
    (``d_j = 0`` arises only with ``eps == 0`` and ``v_j = 0``, where Adam's ``z_j`` is NaN or inf).

    ``reduce`` sums the per-group sums across shards (see :data:`GroupReduce`): one reduction
    for ``(||Dz||^2, sum_j d_j^3 z_j^2)``, then one per Newton iteration for the two sums
    :math:`\sum_j z_j^2/(\theta + a_j)^2` and :math:`\sum_j z_j^2/(\theta + a_j)^3`. Every
    branch depends only on reduced values, so all shards take the same branches.
    """
    if tau == 0:
        return z.clone()
    if rtol is None:
        rtol = WEIGHTED_PROX_RTOL.get(z.dtype, 1e-6)
    zr = as_groups(z, grouping)
    dr = as_groups(d, grouping)
    dz2 = (zr * dr).square()
    dz_sq, dz_sq_d = _group_sums(dz2, dz2 * dr, reduce=reduce)
    dz_norm = dz_sq.sqrt()
    finite = (dz_sq.isfinite() & dz_sq_d.isfinite()).squeeze(1)
    active = finite & (dz_norm.squeeze(1) > tau)
    out = zr.masked_fill(finite[:, None], 0)  # zero groups, and the non-finite ones unchanged
    if active.any():
        za, da = zr[active], dr[active]
        a = tau / da
        theta = dz_sq[active] * (dz_norm[active] - tau) / dz_sq_d[active]  # the step from 0
        for _ in range(max_iter - 1):
            q = za / (theta + a)
            q2 = q * q
            s2, s3 = _group_sums(q2, q2 / (theta + a), reduce=reduce)
            phi = s2.rsqrt()
            if (1 - phi).max() <= rtol:
                break
            dphi = s3 * phi**3
            theta = (theta + (1 - phi) / dphi).clamp_min(0)
        out[active] = da * theta * za / (da * theta + tau)
    return from_groups(out, z, grouping)


def l1_shrink(z: Tensor, threshold: float) -> Tensor:
    """Soft thresholding, element by element. A non-finite ``z`` comes out unchanged: NaN
    propagates through every op here, and ``sign(±inf) (inf - threshold) = ±inf``."""
    return z.sign() * (z.abs() - threshold).clamp_min(0)


#: The reference needs no build and runs on any device; its steps read ``lr``, ``found_inf`` and
#: the step counts on the host.
capturable = False


def unavailable_reason(device: torch.device) -> str | None:
    """Always ``None``: plain PyTorch ops run wherever the params are."""
    return None


def step(tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One proximal Adam step, in place (the ``"torch"`` backend; :mod:`lomt_kernels.contract`).

    Host-side: a nonzero ``found_inf`` returns at once; otherwise every step count goes up by one
    and each tensor takes :func:`group_prox_adam_tensor`.
    """
    if tensors.skipped():
        return
    tensors.count_step()
    group_prox_adam(*tensors.lists(), hyper=hyper, lr=float(lr), grad_scale=tensors.grad_scale)


def group_prox_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    grad_scale: Tensor | None = None,
    hyper: AdamHyper | None = None,
    **fields: object,
) -> None:
    """:func:`step` on lists whose ``state_steps`` already hold this step's count.

    The float64 path of the float32 kernels' hosts, which count the steps themselves; they pass
    the :class:`~lomt_kernels.contract.AdamHyper` record as ``hyper`` or its fields as keywords.
    """
    if hyper is None:
        hyper = AdamHyper(**fields)  # type: ignore[arg-type]
    elif fields:
        raise TypeError(f"pass hyper or its fields, not both (got {sorted(fields)})")
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        if p.numel() != 0:
            group_prox_adam_tensor(p, g, m, v, step_t, hyper, float(lr), grad_scale=grad_scale)


def group_prox_adam_tensor(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    step_t: Tensor,
    hyper: AdamHyper,
    lr: float,
    *,
    grad_scale: Tensor | None = None,
    group_size: int | None = None,
    reduce: GroupReduce | None = None,
) -> None:
    """One tensor's step (its count ``step_t`` already incremented); it may be one shard of a
    bigger tensor.

    For a shard, ``group_size`` is the whole tensor's ``n_G`` (the prox threshold's) and
    ``reduce`` sums per-group partial sums across the shards (see :data:`GroupReduce`); a shard
    may then be empty, and still takes part in the reductions. By default both describe ``p``
    itself.
    """
    beta1, beta2, eps, weight_decay = hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay
    prox, lambda_, grouping = hyper.prox, hyper.lambda_, hyper.grouping
    compute = torch.promote_types(p.dtype, torch.float32)
    x = p.to(compute)
    g = g.to(compute)
    if grad_scale is not None:
        g = g / grad_scale.to(compute)
    if hyper.maximize:
        g = -g
    if weight_decay != 0:
        if hyper.decoupled_weight_decay:
            x = x * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * x
    m32 = torch.lerp(m.to(compute), g, 1 - beta1)
    v32 = v.to(compute) * beta2 + (1 - beta2) * g * g
    step = float(step_t)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    d = v32.sqrt() / bc2**0.5 + eps
    z = x - (lr / bc1) * m32 / d

    if prox != Prox.NONE and lambda_ != 0 and is_grouped(p):
        if prox == Prox.L1:
            z = l1_shrink(z, group_threshold(lr, lambda_, prox, 1))
        else:
            if group_size is None:
                group_size = p.numel() // p.shape[group_dim(grouping)]
            tau = group_threshold(lr, lambda_, prox, group_size)
            if prox == Prox.GROUP:
                z = group_shrink(z, tau, grouping, reduce=reduce)
            else:
                z = weighted_group_prox(z, d, tau, grouping, reduce=reduce)

    p.copy_(z)
    m.copy_(m32)
    v.copy_(v32)
