r"""The fused step's Triton kernel: one launch runs every item of a :class:`~.plan.Plan`.

The maths is :func:`lomt_kernels.reference.group_prox_adam`'s, computed in float32 whatever the
storage dtype (float32, float16 or bfloat16; ``m`` and ``v`` in the param's dtype). Per element,
with ``t`` the step count after this step, ``s = lr / (1 - beta1^t)`` and ``c = sqrt(1 - beta2^t)``
(both from float64 in the kernel, rounded once to float32, as the reference's Python scalars are):

.. math::

    m \leftarrow m + (1-\beta_1)(g - m),\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    d = \sqrt{v}/c + \epsilon,\quad z = p - s\, m / d

then per group ``G`` with ``tau = lr * lambda_ * sqrt(n_G)``: ``group`` scales ``z_G`` by
``max(0, 1 - tau/||z_G||)``; ``group_weighted`` solves the adaptive prox by Newton's method on
``phi(theta) = (sum_j z_j^2/(theta + tau/d_j)^2)^{-1/2} = 1`` from ``theta = 0`` (the first step
in closed form), stopped once ``1 - phi <= rtol`` holds or provably will after the step (see
``_newton_update``), or after ``MAX_ITER`` iterations, then
``p_j = d_j theta z_j / (d_j theta + tau)``; ``l1`` soft-thresholds at ``lr * lambda_``. A group
whose statistics are not finite (a NaN or inf in ``z``, or in ``d`` for the weighted prox) is
left at ``z``, as Adam leaves it, and so is a non-finite element under ``l1``.

Addresses: every data pointer is an element offset from an *anchor* tensor of its dtype passed as
an argument, so that Triton knows the base alignment and, with ``tl.multiple_of`` on offsets
that the host checked, emits vectorised loads and stores for aligned items.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import Prox
from .plan import ItemKind

# Columns of the int64 tensor table.
T_P, T_G, T_M, T_V, T_STEP = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
T_ALIGNED, T_ITEMS, T_LOG_BETA1, T_LOG_BETA2 = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7), tl.constexpr(8)
T_GROUP_SIZE, T_Z, T_D = tl.constexpr(9), tl.constexpr(10), tl.constexpr(11)
TENSOR_FIELDS = tl.constexpr(12)
# Columns of the int64 slab table (see plan.Slab).
S_TENSOR, S_BASE, S_ROWS, S_STRIDE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
S_WIDTH, S_LIMIT, S_GROUP_WIDTH, S_GROUPS = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
S_PROX, S_ALIGNED, S_PARTIAL0, S_STAT0 = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10), tl.constexpr(11)
S_PARTIALS, S_COL_TILES = tl.constexpr(12), tl.constexpr(13)
SLAB_FIELDS = tl.constexpr(14)
# Columns of the int32 item table (see plan.Item).
I_KIND, I_SLAB, I_ROW0, I_COL0, I_SLOT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
ITEM_FIELDS = tl.constexpr(5)
# Prox codes, as the host path writes them from Prox.code.
NONE, GROUP, WEIGHTED, L1 = (tl.constexpr(p.code) for p in (Prox.NONE, Prox.GROUP, Prox.GROUP_WEIGHTED, Prox.L1))
#: A prox's code by name, for the host path.
PROX_CODE = {p.value: p.code for p in Prox}

_ELEMENTWISE = tl.constexpr(int(ItemKind.ELEMENTWISE))
_FUSED = tl.constexpr(int(ItemKind.FUSED))
_PARTIAL = tl.constexpr(int(ItemKind.PARTIAL))
_FINISH = tl.constexpr(int(ItemKind.FINISH))


# --------------------------------------------------------------------------- addressing


@triton.jit
def _tile(slab, row0, col0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Offsets ``[BLOCK_R, BLOCK_C]`` in the slab's tensor, their mask, and the slab columns
    ``[BLOCK_C]`` of the tile at ``(row0, col0)``. With ``VEC > 1`` the host has checked that
    every run starts and ends on a ``VEC``-element boundary."""
    base = tl.load(slab + S_BASE)
    stride = tl.load(slab + S_STRIDE)
    width = tl.load(slab + S_WIDTH)
    limit = tl.load(slab + S_LIMIT)
    cols = col0 + tl.arange(0, BLOCK_C)
    if VEC > 1:
        base = tl.multiple_of(base, VEC)
        stride = tl.multiple_of(stride, VEC)
        width = tl.multiple_of(width, VEC)
        limit = tl.multiple_of(limit, VEC)
        cols = tl.multiple_of(cols, VEC)  # runs of VEC from a multiple of VEC
    r = (row0 + tl.arange(0, BLOCK_R))[:, None]
    c = cols[None, :]
    local = r * stride + c
    mask = (r < tl.load(slab + S_ROWS)) & (c < width) & (local < limit)
    return base + local, mask, cols


@triton.jit
def _data(anchor, tensor, column, VEC: tl.constexpr):
    """The data pointer in ``column`` of the tensor's row: an element offset from ``anchor``."""
    offset = tl.load(tensor + column)
    if VEC > 1:
        offset = tl.multiple_of(offset, VEC)
    return anchor + offset


@triton.jit
def _waiting_z(p_anchor, z_anchor, tensor, VEC: tl.constexpr, Z_IN_P: tl.constexpr):
    """Where ``z`` waits between a slab's ``PARTIAL`` items and its finishers: in ``p`` for
    float32 params, else in float32 scratch, since a 16-bit ``z`` (or ``d`` recomputed from a
    16-bit ``v``) would move the prox's result by more than an ulp near the zeroing threshold,
    where the prox is ill-conditioned."""
    if Z_IN_P:
        return _data(p_anchor, tensor, T_P, VEC)
    else:
        return _data(z_anchor, tensor, T_Z, VEC)


@triton.jit
def _waiting_d(p_anchor, z_anchor, tensor, offs, mask, sqrt_bc2, eps, VEC: tl.constexpr, Z_IN_P: tl.constexpr):
    """``d`` of a waiting tile (1 in padding lanes): from the float32 ``v`` for float32 params,
    else from the float32 scratch beside ``z``."""
    if Z_IN_P:
        v = tl.load(_data(p_anchor, tensor, T_V, VEC) + offs, mask=mask, other=0.0, cache_modifier=".cg")
        d = tl.sqrt_rn(v.to(tl.float32)) / sqrt_bc2 + eps
    else:
        d = tl.load(_data(z_anchor, tensor, T_D, VEC) + offs, mask=mask, other=1.0, cache_modifier=".cg")
    return tl.where(mask, d, 1.0)


# --------------------------------------------------------------------------- maths


@triton.jit
def _finite(x):
    return (x - x) == 0


@triton.jit
def _group_totals(x, col0, group_width, BLOCK_C: tl.constexpr):
    """For each column of a ``[BLOCK_R, BLOCK_C]`` tile whose first column is slab column ``col0``,
    the sum of ``x`` over the column's whole group within the tile, ``[BLOCK_C]``: slab column
    ``c`` is in group ``c // group_width``. A group as wide as the tile or wider covers all of it."""
    col = tl.sum(x, axis=0)
    if group_width >= BLOCK_C:
        total = tl.zeros_like(col) + tl.sum(col)
    else:  # whole groups, and col0 == 0
        lane = tl.arange(0, BLOCK_C)
        start = (lane // group_width) * group_width
        total = tl.zeros_like(col)
        for j in range(group_width):
            at = start + j
            total += tl.where(at < BLOCK_C, tl.gather(col, tl.minimum(at, BLOCK_C - 1), 0), 0.0)
    return total


@triton.jit
def _per_group(per_column, group_width, BLOCK_C: tl.constexpr):
    """Per-column group values (as :func:`_group_totals` gives) as one value per group ``[BLOCK_C]``."""
    g = tl.arange(0, BLOCK_C)
    at = tl.where(group_width < BLOCK_C, tl.minimum(g * group_width, BLOCK_C - 1), 0)
    return tl.gather(per_column, at, 0)


@triton.jit
def _per_column(per_group, gid, BLOCK_C: tl.constexpr):
    """One value per group as per-column values, column ``c`` taking group ``gid[c]``'s."""
    return tl.gather(per_group, tl.minimum(gid, BLOCK_C - 1), 0)


@triton.jit
def _group_scale(sum_sq, tau):
    """The group-lasso factor ``max(0, 1 - tau/||z_G||)``, or 1 for a non-finite norm."""
    norm = tl.sqrt_rn(sum_sq)
    scale = tl.where(norm > tau, 1 - tau / norm, 0.0)
    return tl.where(_finite(norm), scale, 1.0)


@triton.jit
def _first_theta(sum_dz2, sum_dz2_d, tau, rtol):
    """``theta`` after the Newton step from 0, in closed form,
    ``||Dz||^2 (||Dz|| - tau) / sum (dz)^2 d``, for groups the prox does not zero, else 0 (NaN for
    groups whose sums are not finite: left at ``z``); and the groups still in flight. The step is
    the last where ``1 - phi(0) <= rtol``: ``phi`` rises from ``phi(0) = tau / ||Dz||`` to at most 1
    over it, so ``1 - phi`` stays within ``rtol``."""
    finite = _finite(sum_dz2) & _finite(sum_dz2_d)
    norm = tl.sqrt_rn(sum_dz2)
    active = finite & (norm > tau)
    theta = tl.where(active, sum_dz2 * (norm - tau) / sum_dz2_d, 0.0)
    return tl.where(finite, theta, float("nan")), active & (1 - tau / norm > rtol)


@triton.jit
def _newton_terms(z, a, theta):
    """The summands of ``s1 = sum q^2``, ``s2 = sum q^2 r`` and ``s3 = sum q^2 r^2``, with
    ``r = 1 / (theta + a)``, ``q = z r`` and ``a = tau / d``: ``phi = s1^(-1/2)``,
    ``phi' = phi^3 s2``, and ``s3`` bounds ``phi''`` (see :func:`_newton_update`)."""
    r = 1 / (theta + a)
    q = z * r
    q2 = q * q
    return q2, q2 * r, q2 * r * r


@triton.jit
def _newton_update(theta, in_flight, s1, s2, s3, rtol):
    """One Newton update on ``phi(theta) = 1`` of the groups in flight, from a pass's sums at
    their ``theta``; returns ``theta`` and the groups still in flight.

    A group whose ``1 - phi <= rtol`` is done. The others step by ``delta = (1 - phi) / phi'``
    (clamped at 0), and the step is their last when a bound on ``phi''`` over it, from the mean and
    variance of ``r`` under the weights ``q^2 / s1``, shows it lands within ``rtol``: then no pass
    is spent to confirm it. The same rule as the CPU kernel's ``newton_step``
    (csrc/group_prox_adam_cpu.cpp), whose comment gives the proof.
    """
    phi = tl.rsqrt(s1)
    gap = 1 - phi
    delta = gap / (s2 * phi * phi * phi)
    mean_r = s2 / s1
    mean_r2 = s3 / s1
    # Raised by 8 ulps of E r^2 against the cancellation in E r^2 - (E r)^2.
    var_r = tl.maximum(mean_r2 - mean_r * mean_r, 0.0) + 8 * 1.1920928955078125e-07 * mean_r2
    rho = delta / theta
    spread = (1 + rho) * (tl.sqrt(var_r) + rho * tl.sqrt(mean_r2)) * delta
    stepping = in_flight & (gap > rtol)
    theta = tl.where(stepping, tl.maximum(theta + delta, 0.0), theta)
    return theta, stepping & (1.5 * spread * spread > rtol)


@triton.jit
def _any(flags):
    return tl.sum(flags.to(tl.int32)) > 0


@triton.jit
def _weighted_shrink(z, d, theta, tau):
    """``x_j = d_j theta z_j / (d_j theta + tau)``; ``z`` where ``theta`` is NaN or ``tau == 0``."""
    x = d * theta * z / (d * theta + tau)
    return tl.where(tau > 0, tl.where(theta == theta, x, z), z)


@triton.jit
def _l1(z, threshold):
    x = tl.where(z >= 0, 1.0, -1.0) * tl.maximum(tl.abs(z) - threshold, 0.0)
    return tl.where(_finite(z), x, z)


# --------------------------------------------------------------------------- item bodies


@triton.jit
def _adam(
    p, g, m, v, offs, mask, write, grad_scale_ptr, lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps,
    weight_decay, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
):
    """The Adam update of a tile; stores ``m`` and ``v`` (if ``write``) and returns ``z`` and
    ``d`` (padding lanes: ``z = 0``, ``d = 1``, so they drop out of every sum)."""
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    m1 = tl.load(m + offs, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(v + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        grad = -grad
    if DECOUPLED:
        x = x * (1 - lr * weight_decay)
    elif weight_decay != 0:  # as the reference: 0 * inf would make an inf param's moments NaN
        grad = grad + weight_decay * x
    m1 = m1 + beta1c * (grad - m1)  # torch.lerp(m, g, 1 - beta1) for 1 - beta1 < 0.5
    v1 = v1 * beta2 + beta2c * grad * grad
    tl.store(m + offs, m1.to(m.dtype.element_ty), mask=tl.where(write, mask, False))
    tl.store(v + offs, v1.to(v.dtype.element_ty), mask=tl.where(write, mask, False))
    d = tl.where(mask, tl.sqrt_rn(v1) / sqrt_bc2 + eps, 1.0)
    z = tl.where(mask, x - step_size * m1 / d, 0.0)
    return z, d


@triton.jit
def _fused(
    slab, tensor, row0, col0, p_anchor, g_anchor, write, grad_scale_ptr,
    lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, tau, rtol,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, MAX_ITER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A slab in one tile: Adam and the group prox with every sum in registers."""
    offs, mask, cols = _tile(slab, row0, col0, BLOCK_R, BLOCK_C, 1)
    p = _data(p_anchor, tensor, T_P, 1)
    z, d = _adam(
        p, _data(g_anchor, tensor, T_G, 1), _data(p_anchor, tensor, T_M, 1), _data(p_anchor, tensor, T_V, 1),
        offs, mask, write, grad_scale_ptr, lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay,
        HAS_GRAD_SCALE, MAXIMIZE, DECOUPLED,
    )
    # Every group value below is per column: each column holds its group's.
    width = tl.load(slab + S_GROUP_WIDTH)
    if tl.load(slab + S_PROX) == GROUP:
        x = z * _group_scale(_group_totals(z * z, col0, width, BLOCK_C), tau)[None, :]
    else:
        dz2 = d * z * d * z
        theta, in_flight = _first_theta(
            _group_totals(dz2, col0, width, BLOCK_C), _group_totals(dz2 * d, col0, width, BLOCK_C), tau, rtol
        )
        a = tau / d
        it = 1
        while _any(in_flight) & (it < MAX_ITER):
            q2, q2r, q2r2 = _newton_terms(z, a, theta[None, :])
            theta, in_flight = _newton_update(
                theta, in_flight, _group_totals(q2, col0, width, BLOCK_C), _group_totals(q2r, col0, width, BLOCK_C),
                _group_totals(q2r2, col0, width, BLOCK_C), rtol,
            )
            it += 1
        x = _weighted_shrink(z, d, theta[None, :], tau)
    tl.store(p + offs, x.to(p.dtype.element_ty), mask=tl.where(write, mask, False))


@triton.jit
def _streamed(
    kind, slab, tensor, row0, col0, slot, p_anchor, g_anchor, z_anchor, partials, stats, write, grad_scale_ptr,
    lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, lambda_, tau,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, Z_IN_P: tl.constexpr,
):
    """An ``ELEMENTWISE``, ``PARTIAL`` or ``FINISH`` item (a ``FINISH`` item's wait is the caller's)."""
    offs, mask, cols = _tile(slab, row0, col0, BLOCK_R, BLOCK_C, VEC)
    p = _data(p_anchor, tensor, T_P, VEC)
    prox = tl.load(slab + S_PROX)
    if kind == _FINISH:
        groups = tl.load(slab + S_GROUPS)
        gid = cols // tl.load(slab + S_GROUP_WIDTH)
        stat = tl.load(stats + tl.load(slab + S_STAT0) + gid, mask=gid < groups, other=0.0, cache_modifier=".cg")
        z = tl.load(_waiting_z(p_anchor, z_anchor, tensor, VEC, Z_IN_P) + offs, mask=mask, other=0.0,
                    cache_modifier=".cg").to(tl.float32)
        if prox == GROUP:
            x = z * _group_scale(stat, tau)[None, :]
        else:
            d = _waiting_d(p_anchor, z_anchor, tensor, offs, mask, sqrt_bc2, eps, VEC, Z_IN_P)
            x = _weighted_shrink(z, d, stat[None, :], tau)
        tl.store(p + offs, x.to(p.dtype.element_ty), mask=tl.where(write, mask, False))
    else:
        z, d = _adam(
            p, _data(g_anchor, tensor, T_G, VEC), _data(p_anchor, tensor, T_M, VEC),
            _data(p_anchor, tensor, T_V, VEC), offs, mask, write, grad_scale_ptr, lr, step_size, sqrt_bc2,
            beta1c, beta2, beta2c, eps, weight_decay, HAS_GRAD_SCALE, MAXIMIZE, DECOUPLED,
        )
        if kind == _ELEMENTWISE:
            if prox == L1:
                z = _l1(z, lr * lambda_)
            tl.store(p + offs, z.to(p.dtype.element_ty), mask=tl.where(write, mask, False))
        else:
            # z waits for the finishers; the slot's per-group partial sums go to `partials`.
            zp = _waiting_z(p_anchor, z_anchor, tensor, VEC, Z_IN_P)
            tl.store(zp + offs, z.to(zp.dtype.element_ty), mask=tl.where(write, mask, False))
            if not Z_IN_P:
                if prox == WEIGHTED:
                    tl.store(_data(z_anchor, tensor, T_D, VEC) + offs, d, mask=tl.where(write, mask, False))
            # One store per group present in the tile, from its first column here.
            groups = tl.load(slab + S_GROUPS)
            width = tl.load(slab + S_GROUP_WIDTH)
            gid = cols // width
            first = (tl.arange(0, BLOCK_C) == 0) | (cols % width == 0)
            at = partials + tl.load(slab + S_PARTIAL0) + slot * groups + gid
            live = first & (gid < groups) & (cols < tl.load(slab + S_WIDTH))
            if prox == GROUP:
                tl.store(at, _group_totals(z * z, col0, width, BLOCK_C), mask=live)
            else:
                dz2 = d * z * d * z
                tl.store(at, _group_totals(dz2, col0, width, BLOCK_C), mask=live)
                tl.store(at + tl.load(slab + S_PARTIALS) * groups, _group_totals(dz2 * d, col0, width, BLOCK_C), mask=live)


@triton.jit
def _stream_newton_sums(
    slab, tensor, p_anchor, z_anchor, theta, tau, sqrt_bc2, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, Z_IN_P: tl.constexpr,
):
    """One pass over a slab's waiting ``z`` and ``d``: per group the sums of
    :func:`_newton_terms`, ``[BLOCK_C]`` each, with ``theta`` one value per group."""
    col_tiles = tl.load(slab + S_COL_TILES)
    width = tl.load(slab + S_GROUP_WIDTH)
    zp = _waiting_z(p_anchor, z_anchor, tensor, 1, Z_IN_P)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(tl.load(slab + S_PARTIALS)):
        col0 = (j % col_tiles) * BLOCK_C
        offs, mask, cols = _tile(slab, (j // col_tiles) * BLOCK_R, col0, BLOCK_R, BLOCK_C, 1)
        z = tl.load(zp + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        d = _waiting_d(p_anchor, z_anchor, tensor, offs, mask, sqrt_bc2, eps, 1, Z_IN_P)
        q2, q2r, q2r2 = _newton_terms(z, tau / d, _per_column(theta, cols // width, BLOCK_C)[None, :])
        s1 += _per_group(_group_totals(q2, col0, width, BLOCK_C), width, BLOCK_C)
        s2 += _per_group(_group_totals(q2r, col0, width, BLOCK_C), width, BLOCK_C)
        s3 += _per_group(_group_totals(q2r2, col0, width, BLOCK_C), width, BLOCK_C)
    return s1, s2, s3


@triton.jit
def _reduce(
    slab, tensor, p_anchor, z_anchor, partials, stats, sqrt_bc2, eps, tau, rtol,
    MAX_ITER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, Z_IN_P: tl.constexpr,
):
    """The slab's statistics from its partial sums, added in slot order: ``sum z^2`` per group for
    ``group``; for ``group_weighted`` the solved ``theta``, streaming the slab once per Newton pass."""
    groups = tl.load(slab + S_GROUPS)
    n = tl.load(slab + S_PARTIALS)
    first = tl.load(slab + S_PARTIAL0)
    g = tl.arange(0, BLOCK_C)
    live = g < groups
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(n):
        total += tl.load(partials + first + j * groups + g, mask=live, other=0.0, cache_modifier=".cg")
    stat = total
    if tl.load(slab + S_PROX) == WEIGHTED:
        total_d = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in range(n):
            total_d += tl.load(partials + first + (n + j) * groups + g, mask=live, other=0.0, cache_modifier=".cg")
        theta, in_flight = _first_theta(total, total_d, tau, rtol)
        in_flight = in_flight & live
        it = 1
        while _any(in_flight) & (it < MAX_ITER):
            s1, s2, s3 = _stream_newton_sums(
                slab, tensor, p_anchor, z_anchor, theta, tau, sqrt_bc2, eps, BLOCK_R, BLOCK_C, Z_IN_P
            )
            theta, in_flight = _newton_update(theta, in_flight, s1, s2, s3, rtol)
            it += 1
        stat = theta
    tl.store(stats + tl.load(slab + S_STAT0) + g, stat, mask=live)


# --------------------------------------------------------------------------- the kernel


@triton.jit
def step_kernel(
    items, slabs, tensors, counters, partials, stats, p_anchor, g_anchor, z_anchor, step_anchor,
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    n_items, n_slabs, lr, beta1c, beta2, beta2c, eps, weight_decay, lambda_, rtol,
    HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, MAX_ITER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, Z_IN_P: tl.constexpr, SPIN: tl.constexpr,
):
    """Each program takes the next ticket and runs that item of the plan.

    ``counters`` (int64, zeroed when the plan is built and never reset) holds the ticket, then per
    slab the ``PARTIAL`` items done and the statistics published, then per tensor the items done,
    all counting over the launches: a launch's ticket divided by ``n_items`` is its epoch. The
    last item of a tensor to finish stores its new step count (one more); with a
    ``found_inf`` set, items keep the counters in step and write nothing.
    """
    ticket = tl.atomic_add(counters, 1, sem="relaxed")
    epoch = ticket // n_items
    item = items + (ticket - epoch * n_items) * ITEM_FIELDS
    kind = tl.load(item + I_KIND)
    s = tl.load(item + I_SLAB)
    row0 = tl.load(item + I_ROW0)
    col0 = tl.load(item + I_COL0)
    slot = tl.load(item + I_SLOT)
    slab = slabs + s * SLAB_FIELDS
    t = tl.load(slab + S_TENSOR)
    tensor = tensors + t * TENSOR_FIELDS
    slab_count = counters + 1 + s
    slab_ready = counters + 1 + n_slabs + s
    tensor_done = counters + 1 + 2 * n_slabs + t

    write = True
    if HAS_FOUND_INF:
        write = tl.load(found_inf_ptr) == 0
    step_ptr = step_anchor + tl.load(tensor + T_STEP)
    step = tl.load(step_ptr) + 1
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    # Bias corrections and thresholds in float64, rounded once, as the reference's Python floats.
    step64 = step.to(tl.float64)
    lr64 = tl.cast(lr, tl.float64)
    bc1 = 1 - tl.exp(step64 * tl.load(tensor + T_LOG_BETA1).to(tl.float64, bitcast=True))
    bc2 = 1 - tl.exp(step64 * tl.load(tensor + T_LOG_BETA2).to(tl.float64, bitcast=True))
    step_size = (lr64 / bc1).to(tl.float32)
    sqrt_bc2 = tl.sqrt(bc2).to(tl.float32)
    tau = (lr64 * tl.cast(lambda_, tl.float64) * tl.sqrt(tl.load(tensor + T_GROUP_SIZE).to(tl.float64))).to(tl.float32)

    if kind == _FINISH:
        if write:
            if SPIN:
                while tl.atomic_add(slab_ready, 0, sem="acquire") <= epoch:
                    pass
            else:  # the interpreter runs programs one by one, in ticket order
                tl.device_assert(tl.atomic_add(slab_ready, 0) > epoch, "finisher before its statistics")
    if kind == _FUSED:
        _fused(
            slab, tensor, row0, col0, p_anchor, g_anchor, write, grad_scale_ptr,
            lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, tau, rtol,
            HAS_GRAD_SCALE, MAXIMIZE, DECOUPLED, MAX_ITER, BLOCK_R, BLOCK_C,
        )
    else:
        aligned = (tl.load(slab + S_ALIGNED) != 0) & (tl.load(tensor + T_ALIGNED) != 0)
        if aligned:
            _streamed(
                kind, slab, tensor, row0, col0, slot, p_anchor, g_anchor, z_anchor, partials, stats, write,
                grad_scale_ptr, lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, lambda_, tau,
                HAS_GRAD_SCALE, MAXIMIZE, DECOUPLED, BLOCK_R, BLOCK_C, VEC, Z_IN_P,
            )
        else:
            _streamed(
                kind, slab, tensor, row0, col0, slot, p_anchor, g_anchor, z_anchor, partials, stats, write,
                grad_scale_ptr, lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, lambda_, tau,
                HAS_GRAD_SCALE, MAXIMIZE, DECOUPLED, BLOCK_R, BLOCK_C, 1, Z_IN_P,
            )
    if kind == _PARTIAL:
        # Every thread's stores of z and the partial sums happen before the count that publishes them.
        tl.debug_barrier()
        done = tl.atomic_add(slab_count, 1, sem="acq_rel")
        if done + 1 == (epoch + 1) * tl.load(slab + S_PARTIALS):
            if write:
                _reduce(
                    slab, tensor, p_anchor, z_anchor, partials, stats, sqrt_bc2, eps, tau, rtol,
                    MAX_ITER, BLOCK_R, BLOCK_C, Z_IN_P,
                )
            tl.debug_barrier()
            tl.atomic_add(slab_ready, 1, sem="release")
    # The last item of the tensor stores the step: every item has read the old one by then.
    tl.debug_barrier()
    finished = tl.atomic_add(tensor_done, 1, sem="acq_rel")
    if write & (finished + 1 == (epoch + 1) * tl.load(tensor + T_ITEMS)):
        tl.store(step_ptr, step)
