r"""The readable reference of the proximal Adam step: the ``"torch"`` backend.

Plain PyTorch ops, written as the maths reads. Every other backend is tested against this
function run in float64. Lower-precision params are computed in float32 and rounded once on
store, as the fused kernels do.

Per tensor ``p`` with gradient ``g``, moments ``m``, ``v`` and step ``t`` (already incremented):

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grouping import as_groups, from_groups, group_threshold, is_grouped

#: Newton iterations allowed for the weighted prox's scalar equation. The iteration is monotone
#: from below (see :func:`weighted_group_prox`) and quadratically convergent; with the
#: well-scaled form it reaches float32 precision in fewer than 10 steps on the test cases.
WEIGHTED_PROX_MAX_ITER = 30
#: Stop once ``1 - phi(theta) <= rtol``, i.e. ``||x||`` is within ``rtol`` of ``theta``.
WEIGHTED_PROX_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def group_shrink(z: Tensor, tau: float, grouping: str) -> Tensor:
    r"""The group-lasso prox :math:`\max(0, 1 - \tau/\|z_G\|)\, z_G` for every group of ``z``."""
    rows = as_groups(z, grouping)
    norm = rows.norm(dim=1, keepdim=True)
    scale = torch.where(norm > tau, 1 - tau / norm.clamp_min(torch.finfo(z.dtype).tiny), 0)
    return from_groups(rows * scale, z, grouping)


def weighted_group_prox(
    z: Tensor,
    d: Tensor,
    tau: float,
    grouping: str,
    *,
    max_iter: int = WEIGHTED_PROX_MAX_ITER,
    rtol: float | None = None,
) -> Tensor:
    r"""The adaptive (diagonally weighted) group prox of Deleu & Bengio (2021).

    For each group, ``x = argmin 1/2 (x - z)^T D (x - z) + tau ||x||`` with ``D = diag(d)``,
    ``d > 0``. The minimiser is zero iff :math:`\|D z\| \le \tau`. Otherwise
    :math:`x_j = d_j\theta z_j / (d_j\theta + \tau)` where :math:`\theta = \|x\| > 0` solves
    :math:`\sum_j z_j^2 / (\theta + a_j)^2 = 1` with :math:`a_j = \tau / d_j`.

    We solve :math:`\varphi(\theta) = (\sum_j z_j^2/(\theta + a_j)^2)^{-1/2} = 1` by Newton's
    method from :math:`\theta = 0`. :math:`\varphi` is increasing and concave (it is the
    reciprocal norm of the trust-region secular equation), so Newton iterates increase
    monotonically to the root without overshooting; when all :math:`a_j` are equal
    :math:`\varphi` is linear and one step is exact. Iterates are clamped to
    :math:`[0, \|z\|]` (``theta = ||x|| <= ||z||``), a safeguard kept in every backend.
    """
    if rtol is None:
        rtol = WEIGHTED_PROX_RTOL.get(z.dtype, 1e-6)
    zr = as_groups(z, grouping)
    dr = as_groups(d, grouping)
    active = (zr * dr).norm(dim=1) > tau
    out = torch.zeros_like(zr)
    if active.any():
        za, da = zr[active], dr[active]
        a = tau / da
        theta = torch.zeros(za.shape[0], 1, dtype=z.dtype, device=z.device)
        upper = za.norm(dim=1, keepdim=True)
        for _ in range(max_iter):
            q = za / (theta + a)
            phi = (q * q).sum(dim=1, keepdim=True).rsqrt()
            if (1 - phi).max() <= rtol:
                break
            dphi = (q * q / (theta + a)).sum(dim=1, keepdim=True) * phi**3
            theta = torch.minimum(theta + (1 - phi) / dphi, upper).clamp_min(0)
        out[active] = da * theta * za / (da * theta + tau)
    return from_groups(out, z, grouping)


def l1_shrink(z: Tensor, threshold: float) -> Tensor:
    """Soft thresholding, element by element."""
    return z.sign() * (z.abs() - threshold).clamp_min(0)


def group_prox_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    lambda_: float,
    prox: str,
    grouping: str,
    grad_scale: Tensor | None = None,
) -> None:
    """One proximal Adam step, in place, for a list of tensors (the ``"torch"`` backend).

    This is the signature every backend implements. ``state_steps`` hold the step count
    *after* this step's increment. ``grad_scale``, if given, divides the gradients (AMP).
    """
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        if p.numel() == 0:
            continue
        compute = torch.promote_types(p.dtype, torch.float32)
        x = p.to(compute)
        g = g.to(compute)
        if grad_scale is not None:
            g = g / grad_scale.to(compute)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
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

        if prox != "none" and lambda_ != 0 and is_grouped(p):
            if prox == "l1":
                z = l1_shrink(z, group_threshold(lr, lambda_, prox, 1))
            else:
                n_group = p.numel() // p.shape[1 if grouping == "in_channel" else 0]
                tau = group_threshold(lr, lambda_, prox, n_group)
                if prox == "group":
                    z = group_shrink(z, tau, grouping)
                else:
                    z = weighted_group_prox(z, d, tau, grouping)

        p.copy_(z)
        m.copy_(m32)
        v.copy_(v32)
