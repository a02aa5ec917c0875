r"""The ``"triton"`` backend: the proximal Adam step fused into one pass over memory.

The maths is :func:`lomt_kernels.reference.group_prox_adam`'s, computed in float32 whatever the
storage dtype (float32, float16 or bfloat16; ``m`` and ``v`` in the param's dtype, as
:class:`torch.optim.Adam`). Per element, with ``s = lr / (1 - beta1^t)`` and
``c = sqrt(1 - beta2^t)``:

.. math::

    m \leftarrow m + (1-\beta_1)(g - m),\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    d = \sqrt{v}/c + \epsilon,\quad z = p - s\, m / d

and then, per group ``G`` with ``tau = lr * lambda_ * sqrt(n_G)``: ``group`` scales ``z_G`` by
``max(0, 1 - tau/||z_G||)``; ``group_weighted`` solves the adaptive prox by Newton's method on
``phi(theta) = (sum_j z_j^2/(theta + tau/d_j)^2)^{-1/2} = 1`` from ``theta = 0`` (the first
step in closed form), clamped at 0 and stopped at ``1 - phi <= 1e-6`` or 30 iterations (as
:func:`~lomt_kernels.reference.weighted_group_prox`), then ``p_j = d_j theta z_j / (d_j theta + tau)``;
``l1`` soft-thresholds at ``lr * lambda_``; ``none`` keeps ``z``. With ``tau == 0`` (``lr == 0``)
every prox is the identity.

**Tiles.** A tensor's storage is read as ``[A, B, K]`` with group ``b`` at ``[:, b, :]``
(:class:`~lomt_kernels.grouping.GroupLayout`). A program owns the tile
``[BLOCK_A, BLOCK_G, BLOCK_K]`` of ``BLOCK_G`` neighbouring groups: for each ``a`` it reads the
contiguous run ``b*K + k`` of ``BLOCK_G * K`` elements, so in-channel groups of a 1x1 conv or a
channels-last conv (``K == 1``) are still read in runs of at least one 32-byte sector.

* **One pass** (the group fits: ``next_pow2(A) * next_pow2(K) <= ON_CHIP_MAX_TILE``): the tile
  covers all of ``A`` and ``K``, so each group's ``z`` (and ``d``) stays in registers from the
  Adam update through the norm (a reduction over axes 0 and 2) and the shrink or the Newton
  solve. Memory traffic is the minimum: read ``p, g, m, v`` and write ``p, m, v`` once,
  **28 bytes per float32 param** (14 for 16-bit params and state). A tile holds at most
  ``ON_CHIP_MAX_TILE`` elements (more spill registers: 4,096 at 16 warps compile to about 100
  registers and no spills for sm_90, 16,384 spill 0.8-2 KiB per thread), so a tall group leaves
  room for few neighbours and short rows: a ``[2048, 512, 1, 1]`` conv's tile reads 8 bytes per
  row. On an H200 such tiles moved 0.6 TB/s, where whole rows (the ``l1`` path) moved 3.6
  (``benchmarks/RESULTS-h200.md``). So the ``group`` prox takes one pass only where a tile's
  rows are at least ``LINE_BYTES`` long (or whole), and two phases elsewhere; the weighted prox
  keeps its one pass wherever the group fits, since its two phases cost more (below).
* **Two phases** (larger groups, e.g. the columns of an embedding table; for ``group`` also
  groups whose one-pass rows would be short), in ``TWO_PHASE_TILE``-element tiles whose rows are
  ``LINE_BYTES`` long for ``group`` (a sector for ``group_weighted``) where ``B`` allows: phase
  1 runs the same kernel on ``[BLOCK_A, BLOCK_G, BLOCK_K]`` chunks of the groups, writes ``z``
  into ``p`` and, for ``group``, adds each chunk's ``sum z^2`` into a per-group float32 buffer
  with atomics. Phase 2 re-reads ``z`` and writes the shrunk ``p``: **+8 bytes per param** (36
  in all). For ``group_weighted`` a solve kernel, one program per block of ``BLOCK_G`` groups,
  first streams the groups' ``z`` and ``v`` once for ``||D z||`` and the first Newton step,
  then once per Newton iteration until all of them have converged (**+8 bytes per param per
  pass**, partly from L2), and phase 2 also reads ``v`` for ``d`` (+4). For 16-bit params ``z``
  is rounded to the param dtype between the phases (one ulp at most).
* Plain Adam and ``l1`` (tensors with fewer than two dims, ``prox="none"``, ``lambda_ == 0``)
  are elementwise: the tensor is one ``[1, 1, numel]`` row cut into ``CHUNK_TILE`` tiles.

**Launches.** Tensors are bucketed by (dtypes, tile shape and path, step); each bucket is *one*
launch over a pointer table (an int64 row per tensor: the four data pointers, ``A, B, K``, its
first program and its first group in the stats buffer) and an int32 table giving each program
its tensor. Both tables are built once per set of tensors and cached on the device. A CNN has a
handful of buckets (one per distinct ``(next_pow2(A), next_pow2(K))``), each one launch. The
interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs the same path: its loads dereference the
host addresses in the table.

**Hyperparameters** are runtime arguments, so changing ``lr`` or ``lambda_`` never recompiles.
With ``capturable=True``, ``lr`` may be a 0-d device tensor and the bias corrections are computed
on the device from the ``state_steps`` (which must then live on the params' device), so the step
syncs nothing with the host and can be captured in a CUDA graph (after one eager step with the
same tensors, which builds the pointer tables).

The tile sizes below stay in registers without spills (``ptxas -v`` for sm_90); the two-phase
constants were picked on an H200 with :mod:`benchmarks.triton_tiles`.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..grouping import GroupLayout
from .prepare import WorkTensors, float64_on_reference, work_tensors, write_back

#: Largest tile (in padded elements) a program keeps on chip; larger groups take two phases.
#: At 8 elements per thread (16 warps) the weighted prox fits in registers without spills.
ON_CHIP_MAX_TILE = 4096
#: One-pass tiles take groups until they hold about this many elements.
TARGET_TILE = 4096
#: At most this many groups per tile (bounds the padding when groups are tiny).
MAX_GROUPS_PER_TILE = 64
#: Tile size of the elementwise path.
CHUNK_TILE = 2048
#: Tile size of the two-phase chunks (on an H200 the ResNet-50 group step's kernels took 0.46 ms
#: with 512, 0.60 with 1,024, 1.15 with 2,048, all with 256-byte rows: ``benchmarks/RESULTS-h200.md``).
TWO_PHASE_TILE = 512
#: One-pass tiles, and the weighted prox's two-phase tiles, have contiguous runs at least this
#: long when ``B`` allows (one DRAM sector).
SECTOR_BYTES = 32
#: The ``group`` prox takes one pass only where a tile's rows run at least this long (or whole),
#: and its two-phase tiles have rows this long where ``B`` allows (256 and 512 bytes measured the
#: same on an H200, 128 as slow as 8-byte rows).
LINE_BYTES = 256

# Prox codes: the kernels' PROX constexpr.
_NONE, _GROUP, _WEIGHTED, _L1 = (tl.constexpr(code) for code in range(4))
_PROX_CODE = {"none": _NONE.value, "group": _GROUP.value, "group_weighted": _WEIGHTED.value, "l1": _L1.value}

# Columns of the per-tensor int64 metadata table.
_P, _G, _M, _V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_A, _B, _K = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6)
_FIRST_PROGRAM, _FIRST_GROUP, _FIRST_BLOCK = tl.constexpr(7), tl.constexpr(8), tl.constexpr(9)
_META_FIELDS = tl.constexpr(10)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------- device functions


@triton.jit
def _tile_at(row, tb, ta, tk, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """Storage offsets ``[BLOCK_A, BLOCK_G, BLOCK_K]``, their mask and the groups ``b``
    ``[BLOCK_G]`` of the tile at block coordinates ``(tb, ta, tk)`` of the tensor in ``row``."""
    A = tl.load(row + _A)
    B = tl.load(row + _B)
    K = tl.load(row + _K)
    a = (ta * BLOCK_A + tl.arange(0, BLOCK_A))[:, None, None]
    b = tb * BLOCK_G + tl.arange(0, BLOCK_G)
    k = (tk * BLOCK_K + tl.arange(0, BLOCK_K))[None, None, :]
    b3 = b[None, :, None]
    offs = a * (B * K) + b3 * K + k
    mask = (a < A) & (b3 < B) & (k < K)
    return offs, mask, b


@triton.jit
def _tile(row, tile, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_tile_at` for the ``tile``-th tile of the tensor, ``k`` fastest, then ``a``, then ``b``."""
    tiles_a = tl.cdiv(tl.load(row + _A), BLOCK_A)
    tiles_k = tl.cdiv(tl.load(row + _K), BLOCK_K)
    tk = tile % tiles_k
    ta = (tile // tiles_k) % tiles_a
    tb = tile // (tiles_k * tiles_a)
    return _tile_at(row, tb, ta, tk, BLOCK_A, BLOCK_G, BLOCK_K)


@triton.jit
def _coefficients(t, lr, step_size, sqrt_bc2, lr_ptr, coef_ptr, CAPTURABLE: tl.constexpr):
    """``(lr, lr / (1 - beta1^t), sqrt(1 - beta2^t))`` for tensor ``t``: the scalar arguments,
    or with ``CAPTURABLE`` loaded from device memory (``coef`` has a row per tensor)."""
    if CAPTURABLE:
        lr = tl.load(lr_ptr)
        step_size = tl.load(coef_ptr + 2 * t)
        sqrt_bc2 = tl.load(coef_ptr + 2 * t + 1)
    return lr, step_size, sqrt_bc2


@triton.jit
def _tau(row, lr, lambda_):
    """The group threshold ``lr * lambda_ * sqrt(n_G)`` with ``n_G = A * K``."""
    group_size = (tl.load(row + _A) * tl.load(row + _K)).to(tl.float32)
    return lr * lambda_ * tl.sqrt_rn(group_size)


@triton.jit
def _group_sum(x):
    """Per-group sums ``[BLOCK_G]`` of a ``[BLOCK_A, BLOCK_G, BLOCK_K]`` tile."""
    return tl.sum(tl.sum(x, axis=2), axis=0)


@triton.jit
def _is_finite(x):
    """Neither NaN nor infinite."""
    return tl.abs(x) < float("inf")


@triton.jit
def _group_shrink(z, sum_sq, tau):
    """The group-lasso prox ``max(0, 1 - tau/||z_G||) z``; ``sum_sq`` broadcasts ``||z_G||^2``.
    A group whose norm is not finite passes through."""
    norm = tl.sqrt_rn(sum_sq)
    return tl.where(_is_finite(norm), tl.where(norm > tau, z * (1 - tau / norm), 0.0), z)


@triton.jit
def _newton_terms(z, a, theta):
    """The summands of ``phi(theta)^{-2}`` and of ``-phi'(theta) / phi^3`` (``a = tau / d``)."""
    q = z / (theta + a)
    q2 = q * q
    return q2, q2 / (theta + a)


@triton.jit
def _first_newton_step(sum_dz2, sum_dz2_d, tau):
    """The Newton step from ``theta = 0`` in closed form, ``||Dz||^2 (||Dz|| - tau) / sum (dz)^2 d``
    (see :func:`~lomt_kernels.reference.weighted_group_prox`)."""
    return sum_dz2 * (tl.sqrt_rn(sum_dz2) - tau) / sum_dz2_d


@triton.jit
def _newton_step(theta, phi, sum_dq):
    """One safeguarded Newton step on ``phi(theta) = 1``, clamped at 0."""
    dphi = sum_dq * phi * phi * phi
    return tl.maximum(theta + (1 - phi) / dphi, 0.0)


@triton.jit
def _weighted_passed_through(sum_dz2, sum_dz2_d):
    """The groups whose ``||D z||^2`` or ``sum (dz)^2 d`` is not finite: their ``theta`` is set
    to infinity, which :func:`_weighted_shrink` takes as ``x = z``."""
    return ~(_is_finite(sum_dz2) & _is_finite(sum_dz2_d))


@triton.jit
def _weighted_shrink(z, d, theta, tau):
    """``x_j = d_j theta z_j / (d_j theta + tau)`` (zero for ``theta == 0``); ``z`` for
    ``theta == inf`` (the limit: a group passed through) and at ``tau == 0``."""
    x = tl.where(tau > 0, d * theta * z / (d * theta + tau), z)
    return tl.where(theta < float("inf"), x, z)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _adam_prox_kernel(
    meta_ptr, program_tensor_ptr, stats_ptr, grad_scale_ptr, lr_ptr, coef_ptr,
    lr, step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, lambda_, rtol,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    PROX: tl.constexpr, ONE_PASS: tl.constexpr, MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CAPTURABLE: tl.constexpr,
    MAX_ITER: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The Adam update of one tile, then (``ONE_PASS``) its prox, or (phase 1) ``z`` written to
    ``p`` and, for ``group``, the tile's per-group ``sum z^2`` added to ``stats``.

    ``beta1c = 1 - beta1`` and ``beta2c = 1 - beta2`` come from the host in float64, so they
    carry one float32 rounding each, as in the reference.
    """
    pid = tl.program_id(0)
    t = tl.load(program_tensor_ptr + pid)
    row = meta_ptr + t * _META_FIELDS
    offs, mask, b = _tile(row, pid - tl.load(row + _FIRST_PROGRAM), BLOCK_A, BLOCK_G, BLOCK_K)
    lr, step_size, sqrt_bc2 = _coefficients(t, lr, step_size, sqrt_bc2, lr_ptr, coef_ptr, CAPTURABLE)
    p_ptr = tl.load(row + _P).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + _G).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + _M).to(tl.pointer_type(P_DTYPE))
    v_ptr = tl.load(row + _V).to(tl.pointer_type(P_DTYPE))

    x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        x = x * (1 - lr * weight_decay)
    elif weight_decay != 0:  # as Adam: 0 * x would make g NaN where x is not finite
        g = g + weight_decay * x
    m = m + beta1c * (g - m)  # torch.lerp(m, g, 1 - beta1) for 1 - beta1 < 0.5
    v = v * beta2 + beta2c * g * g
    tl.store(m_ptr + offs, m.to(P_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(P_DTYPE), mask=mask)
    # Padding lanes are zero (they would be NaN for eps == 0), so they drop out of the sums.
    d = tl.where(mask, tl.sqrt_rn(v) / sqrt_bc2 + eps, 1.0)
    z = tl.where(mask, x - step_size * m / d, 0.0)

    if PROX == _L1:
        shrunk = tl.where(z >= 0, 1.0, -1.0) * tl.maximum(tl.abs(z) - lr * lambda_, 0.0)
        z = tl.where(_is_finite(z), shrunk, z)  # tl.maximum would turn a NaN into 0
    elif PROX == _GROUP:
        tau = _tau(row, lr, lambda_)
        if ONE_PASS:
            z = _group_shrink(z, _group_sum(z * z)[None, :, None], tau)
        else:
            b_mask = b < tl.load(row + _B)
            tl.atomic_add(stats_ptr + tl.load(row + _FIRST_GROUP) + b, _group_sum(z * z), mask=b_mask)
    elif PROX == _WEIGHTED:
        tau = _tau(row, lr, lambda_)
        if ONE_PASS:
            dz2 = d * z * d * z
            sum_dz2 = _group_sum(dz2)
            sum_dz2_d = _group_sum(dz2 * d)
            passed = _weighted_passed_through(sum_dz2, sum_dz2_d)
            active = ~passed & (tl.sqrt_rn(sum_dz2) > tau)
            a = tau / d
            theta = tl.where(active, _first_newton_step(sum_dz2, sum_dz2_d, tau), 0.0)
            q2, dq = _newton_terms(z, a, theta[None, :, None])
            phi = tl.rsqrt(_group_sum(q2))
            sum_dq = _group_sum(dq)
            it = 1
            while (tl.sum((active & (1 - phi > rtol)).to(tl.int32)) > 0) & (it < MAX_ITER):
                theta = tl.where(active, _newton_step(theta, phi, sum_dq), 0.0)
                q2, dq = _newton_terms(z, a, theta[None, :, None])
                phi = tl.rsqrt(_group_sum(q2))
                sum_dq = _group_sum(dq)
                it += 1
            theta = tl.where(passed, float("inf"), theta)
            z = _weighted_shrink(z, d, theta[None, :, None], tau)
    tl.store(p_ptr + offs, z.to(P_DTYPE), mask=mask)


@triton.jit
def _group_newton_sums(
    row, tb, p_ptr, v_ptr, theta, tau, sqrt_bc2, eps,
    AT_ZERO: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One pass over the ``BLOCK_G`` groups of block ``tb`` (``z`` in ``p``), in
    ``[BLOCK_A, BLOCK_G, BLOCK_K]`` tiles, so that rows are read ``BLOCK_G`` groups wide: per group
    ``sum q^2`` and ``sum q^2/(theta + a)`` (see :func:`_newton_terms`; ``theta`` is ``[BLOCK_G]``),
    or with ``AT_ZERO`` ``||D z||^2`` and ``sum (dz)^2 d`` (``theta`` unused)."""
    tiles_a = tl.cdiv(tl.load(row + _A), BLOCK_A)
    tiles = tiles_a * tl.cdiv(tl.load(row + _K), BLOCK_K)
    first = tl.zeros([BLOCK_G], dtype=tl.float32)
    second = tl.zeros([BLOCK_G], dtype=tl.float32)
    for tile in range(tiles):
        offs, mask, _ = _tile_at(row, tb, tile % tiles_a, tile // tiles_a, BLOCK_A, BLOCK_G, BLOCK_K)
        z = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, tl.sqrt_rn(v) / sqrt_bc2 + eps, 1.0)
        if AT_ZERO:
            dz2 = d * z * d * z
            first += _group_sum(dz2)
            second += _group_sum(dz2 * d)
        else:
            q2, dq = _newton_terms(z, tau / d, theta[None, :, None])
            first += _group_sum(q2)
            second += _group_sum(dq)
    return first, second


@triton.jit
def _weighted_solve_kernel(
    meta_ptr, block_tensor_ptr, stats_ptr, lr_ptr, coef_ptr,
    lr, step_size, sqrt_bc2, eps, lambda_, rtol,
    P_DTYPE: tl.constexpr, CAPTURABLE: tl.constexpr, MAX_ITER: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Two-phase ``group_weighted``: one program per block of ``BLOCK_G`` neighbouring groups finds
    each group's ``theta = ||x_G||`` by streaming their ``z`` (in ``p`` after phase 1) and ``v``:
    once for ``||D z||`` and the first Newton step, then once per Newton iteration, until every
    group of the block has converged (as the one-pass kernel). Writes ``theta`` (0 for a zeroed
    group, infinity for one passed through) to ``stats``."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    row = meta_ptr + t * _META_FIELDS
    tb = pid - tl.load(row + _FIRST_BLOCK)
    lr, step_size, sqrt_bc2 = _coefficients(t, lr, step_size, sqrt_bc2, lr_ptr, coef_ptr, CAPTURABLE)
    p_ptr = tl.load(row + _P).to(tl.pointer_type(P_DTYPE))
    v_ptr = tl.load(row + _V).to(tl.pointer_type(P_DTYPE))
    tau = _tau(row, lr, lambda_)

    theta = tl.zeros([BLOCK_G], dtype=tl.float32)
    sum_dz2, sum_dz2_d = _group_newton_sums(
        row, tb, p_ptr, v_ptr, theta, tau, sqrt_bc2, eps, True, BLOCK_A, BLOCK_G, BLOCK_K
    )
    passed = _weighted_passed_through(sum_dz2, sum_dz2_d)
    active = ~passed & (tl.sqrt_rn(sum_dz2) > tau)
    theta = tl.where(active, _first_newton_step(sum_dz2, sum_dz2_d, tau), 0.0)
    sum_q2, sum_dq = _group_newton_sums(
        row, tb, p_ptr, v_ptr, theta, tau, sqrt_bc2, eps, False, BLOCK_A, BLOCK_G, BLOCK_K
    )
    phi = tl.rsqrt(sum_q2)
    it = 1
    while (tl.sum((active & (1 - phi > rtol)).to(tl.int32)) > 0) & (it < MAX_ITER):
        theta = tl.where(active, _newton_step(theta, phi, sum_dq), 0.0)
        sum_q2, sum_dq = _group_newton_sums(
            row, tb, p_ptr, v_ptr, theta, tau, sqrt_bc2, eps, False, BLOCK_A, BLOCK_G, BLOCK_K
        )
        phi = tl.rsqrt(sum_q2)
        it += 1
    theta = tl.where(passed, float("inf"), theta)
    b = tb * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(stats_ptr + tl.load(row + _FIRST_GROUP) + b, theta, mask=b < tl.load(row + _B))


@triton.jit
def _shrink_kernel(
    meta_ptr, program_tensor_ptr, stats_ptr, lr_ptr, coef_ptr,
    lr, step_size, sqrt_bc2, eps, lambda_,
    P_DTYPE: tl.constexpr, PROX: tl.constexpr, CAPTURABLE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Phase 2: ``p = prox(z)`` from ``z`` (in ``p``) and the per-group ``stats``: ``sum z^2``
    for ``group``, ``theta`` for ``group_weighted``."""
    pid = tl.program_id(0)
    t = tl.load(program_tensor_ptr + pid)
    row = meta_ptr + t * _META_FIELDS
    offs, mask, b = _tile(row, pid - tl.load(row + _FIRST_PROGRAM), BLOCK_A, BLOCK_G, BLOCK_K)
    lr, step_size, sqrt_bc2 = _coefficients(t, lr, step_size, sqrt_bc2, lr_ptr, coef_ptr, CAPTURABLE)
    p_ptr = tl.load(row + _P).to(tl.pointer_type(P_DTYPE))
    z = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    stat = tl.load(stats_ptr + tl.load(row + _FIRST_GROUP) + b, mask=b < tl.load(row + _B), other=0.0)
    tau = _tau(row, lr, lambda_)
    if PROX == _GROUP:
        x = _group_shrink(z, stat[None, :, None], tau)
    else:
        v_ptr = tl.load(row + _V).to(tl.pointer_type(P_DTYPE))
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = _weighted_shrink(z, tl.sqrt_rn(v) / sqrt_bc2 + eps, stat[None, :, None], tau)
    tl.store(p_ptr + offs, x.to(P_DTYPE), mask=mask)


# --------------------------------------------------------------------------- host side


class TilePlan(NamedTuple):
    """How one tensor is cut into tiles: the kernels' constexprs for it."""

    prox: int  # one of the _PROX codes
    one_pass: bool
    block_a: int
    block_g: int
    block_k: int

    @property
    def num_warps(self) -> int:
        # At most 8 elements of each live tile per thread: about 100 registers, no spills.
        return max(4, min(16, self.block_a * self.block_g * self.block_k // 256))


def plan_tiles(layout: GroupLayout, prox: str, itemsize: int) -> TilePlan:
    """The tile plan for a tensor with this ``[A, B, K]`` layout (elementwise for ``none``/``l1``).

    Memoized: every step plans every tensor, and planning in Python costs about as much as a
    kernel launch. The module's tile constants are part of the key, so changing one (as
    :mod:`benchmarks.triton_tiles` and the tests do) plans afresh.
    """
    constants = (
        ON_CHIP_MAX_TILE, TARGET_TILE, MAX_GROUPS_PER_TILE, CHUNK_TILE, TWO_PHASE_TILE, SECTOR_BYTES, LINE_BYTES
    )
    return _plan_tiles(layout, prox, itemsize, constants)


@functools.lru_cache(maxsize=1024)
def _plan_tiles(layout: GroupLayout, prox: str, itemsize: int, constants: tuple[int, ...]) -> TilePlan:
    ON_CHIP_MAX_TILE, TARGET_TILE, MAX_GROUPS_PER_TILE, CHUNK_TILE, TWO_PHASE_TILE, SECTOR_BYTES, LINE_BYTES = constants
    code = _PROX_CODE[prox]
    if code in (_NONE.value, _L1.value):
        return TilePlan(code, True, 1, 1, CHUNK_TILE)
    A, B, K = layout
    block_a, block_k = triton.next_power_of_2(A), triton.next_power_of_2(K)
    sector_groups = triton.next_power_of_2(-(-SECTOR_BYTES // (K * itemsize)))
    line_groups = triton.next_power_of_2(-(-LINE_BYTES // (K * itemsize)))
    max_groups = min(MAX_GROUPS_PER_TILE, triton.next_power_of_2(B))
    if block_a * block_k <= ON_CHIP_MAX_TILE:
        room = ON_CHIP_MAX_TILE // (block_a * block_k)
        block_g = max(TARGET_TILE // (block_a * block_k), min(sector_groups, room))
        block_g = max(1, min(block_g, room, max_groups))
        # The weighted prox keeps its one pass: in two phases its Newton passes cost more than
        # short rows do (2.36 against 1.31 ms on an H200, benchmarks/RESULTS-h200.md).
        if code == _WEIGHTED.value or min(block_g, B) >= min(line_groups, B):
            return TilePlan(code, True, block_a, block_g, block_k)
    # The weighted solve runs a program per block of groups, its Newton passes in sequence: few
    # groups a block keep enough programs in flight (for the three [512, 512, 3, 3] convs of
    # ResNet-50, one group a program solved in 0.13 ms on an H200, eight in 0.44).
    want = sector_groups if code == _WEIGHTED.value else line_groups
    block_k = min(block_k, TWO_PHASE_TILE)
    block_g = max(1, min(want, TWO_PHASE_TILE // block_k, max_groups))
    block_a = min(triton.next_power_of_2(A), TWO_PHASE_TILE // (block_g * block_k))
    return TilePlan(code, False, block_a, block_g, block_k)


def _programs(layout: GroupLayout, plan: TilePlan) -> int:
    A, B, K = layout
    return -(-B // plan.block_g) * -(-A // plan.block_a) * -(-K // plan.block_k)


class _Tables(NamedTuple):
    meta: Tensor  # int64 [tensors, _META_FIELDS]
    program_tensor: Tensor  # int32 [programs]: the tensor each program works on
    block_tensor: Tensor  # int32 [group blocks]: the tensor of each block of block_g groups (the solve's)
    groups: int


#: Device tables per set of tensors, keyed on data pointers and layouts: a bounded LRU. Tables
#: used while a CUDA graph is captured are also pinned in ``_CAPTURED``, since the graph reads
#: them on every replay.
_TABLE_CACHE: OrderedDict[tuple, _Tables] = OrderedDict()
_TABLE_CACHE_SIZE = 64
_CAPTURED: dict[tuple, _Tables] = {}


def _tables(
    entries: list[tuple[tuple[Tensor, ...], GroupLayout]], plan: TilePlan, device: torch.device
) -> _Tables:
    """The pointer tables of a bucket, from the cache or built (and copied to the device) once."""
    key = (device, plan, tuple((tuple(t.data_ptr() for t in ts), layout) for ts, layout in entries))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    tables = _TABLE_CACHE.get(key)
    if tables is not None:
        _TABLE_CACHE.move_to_end(key)
        if capturing:
            _CAPTURED[key] = tables
        return tables
    if capturing:
        raise RuntimeError(
            "the triton backend builds its pointer tables on the first step with a given set of "
            "tensors; run one step before capturing the CUDA graph (the usual warm-up)"
        )
    rows, programs, blocks = [], [], []
    first_program = first_group = first_block = 0
    for ts, layout in entries:
        rows.append([t.data_ptr() for t in ts] + list(layout) + [first_program, first_group, first_block])
        programs.append(_programs(layout, plan))
        blocks.append(-(-layout.groups // plan.block_g))
        first_program += programs[-1]
        first_group += layout.groups
        first_block += blocks[-1]
    index = torch.arange(len(entries), dtype=torch.int32)
    tables = _Tables(
        meta=torch.tensor(rows, dtype=torch.int64).to(device),
        program_tensor=index.repeat_interleave(torch.tensor(programs)).to(device),
        block_tensor=index.repeat_interleave(torch.tensor(blocks)).to(device),
        groups=first_group,
    )
    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


# --------------------------------------------------------------------------- launches


class _Bucket(NamedTuple):
    """Tensors that share one launch."""

    dtypes: tuple[torch.dtype, torch.dtype]  # params (and state), grads
    plan: TilePlan
    step: float | None  # None with capturable: steps are read on the device


class _Options(NamedTuple):
    """The switches of a call that select compiled kernel variants."""

    capturable: bool
    maximize: bool
    decoupled: bool
    grad_scale: bool


def group_prox_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
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
    capturable: bool = False,
) -> None:
    """One proximal Adam step, in place, with the fused Triton kernels (the ``"triton"`` backend).

    Same signature and semantics as :func:`lomt_kernels.reference.group_prox_adam`, plus
    ``capturable``: read ``lr`` (a float or a 0-d tensor on the params' device) and the steps
    (which must be on the params' device) in the kernels, with no host sync, so the step can be
    captured in a CUDA graph. All tensors must be on one device. float64 params take the
    reference path (the kernels compute in float32).
    """
    lr_tensor = lr if isinstance(lr, Tensor) else None
    torch.ops.lomt.triton_group_prox_adam_(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, lr_tensor,
        lr=0.0 if lr_tensor is not None else float(lr), beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
        lambda_=lambda_, prox=prox, grouping=grouping, capturable=capturable,
    )


@torch.library.custom_op("lomt::triton_group_prox_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _group_prox_adam_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    lr_tensor: Tensor | None,
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
    capturable: bool,
) -> None:
    """The step as a ``torch.library`` custom op, so ``torch.compile`` sees one opaque mutating
    op instead of tracing the pointer tables. ``lr_tensor``, if given, replaces ``lr``."""
    if lr_tensor is not None and not capturable:
        lr, lr_tensor = float(lr_tensor), None
    float64_on_reference(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr if lr_tensor is None else lr_tensor,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, lambda_=lambda_, prox=prox,
        grouping=grouping, grad_scale=grad_scale,
    )
    works = work_tensors(params, grads, exp_avgs, exp_avg_sqs, prox=prox, lambda_=lambda_, grouping=grouping)
    buckets: dict[_Bucket, list[int]] = {}
    for i, work in works.items():
        step = None if capturable else float(state_steps[i])
        plan = plan_tiles(work.layout, work.prox, work.p.element_size())
        buckets.setdefault(_Bucket((work.p.dtype, work.g.dtype), plan, step), []).append(i)

    options = _Options(capturable, maximize, decoupled_weight_decay, grad_scale is not None)
    for bucket, idx in buckets.items():
        _launch(
            bucket, [works[i] for i in idx], [state_steps[i] for i in idx], options, lr, lr_tensor,
            beta1, beta2, grad_scale, eps=eps, weight_decay=weight_decay, lambda_=lambda_,
        )
    write_back(params, exp_avgs, exp_avg_sqs, works)


@_group_prox_adam_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, lr_tensor, **kwargs) -> None:
    return None


def _variants(bucket: _Bucket, options: _Options) -> dict[triton.JITFunction, dict[str, object]]:
    """The kernels a bucket launches, in order, each with its constexprs."""
    plan = bucket.plan
    p_dtype, g_dtype = (_TL_DTYPES[dtype] for dtype in bucket.dtypes)
    shared = dict(P_DTYPE=p_dtype, CAPTURABLE=options.capturable)
    blocks = dict(BLOCK_A=plan.block_a, BLOCK_G=plan.block_g, BLOCK_K=plan.block_k)
    kernels: dict[triton.JITFunction, dict[str, object]] = {
        _adam_prox_kernel: dict(
            shared, **blocks, G_DTYPE=g_dtype, PROX=plan.prox, ONE_PASS=plan.one_pass,
            MAXIMIZE=options.maximize, DECOUPLED=options.decoupled,
            HAS_GRAD_SCALE=options.grad_scale, MAX_ITER=reference.WEIGHTED_PROX_MAX_ITER,
        )
    }
    if not plan.one_pass:
        if plan.prox == _WEIGHTED.value:
            kernels[_weighted_solve_kernel] = dict(shared, **blocks, MAX_ITER=reference.WEIGHTED_PROX_MAX_ITER)
        kernels[_shrink_kernel] = dict(shared, **blocks, PROX=plan.prox)
    return kernels


def _launch(
    bucket: _Bucket, works: list[WorkTensors], steps: list[Tensor], options: _Options, lr: float,
    lr_tensor: Tensor | None, beta1: float, beta2: float, grad_scale: Tensor | None, **scalars: float,
) -> None:
    """The launches of one bucket: one for a one-pass plan, two or three for a two-phase one.

    ``scalars`` are the remaining float hyperparameters (``eps``, ``weight_decay``, ``lambda_``).
    Every scalar goes to the kernels as a Python float: an int would be typed (and specialised)
    differently and compile another variant.
    """
    plan = bucket.plan
    device = works[0].p.device
    tables = _tables([((w.p, w.g, w.m, w.v), w.layout) for w in works], plan, device)
    lr_t = coef = None
    if options.capturable:
        if any(s.device != device for s in steps):
            raise ValueError(f"capturable=True needs state_steps on the params' device {device}")
        lr_t = (lr_tensor if lr_tensor is not None else torch.full((), lr, device=device)).to(torch.float32)
        t = torch.stack(steps).to(torch.float64)
        coef = torch.stack([lr_t.double() / (1 - beta1**t), (1 - beta2**t).sqrt()], dim=1).to(torch.float32)
        step_size = sqrt_bc2 = 0.0
    else:
        step_size = lr / (1 - beta1**bucket.step)
        sqrt_bc2 = math.sqrt(1 - beta2**bucket.step)
    args = dict(
        {name: float(value) for name, value in scalars.items()},
        meta_ptr=tables.meta, program_tensor_ptr=tables.program_tensor, block_tensor_ptr=tables.block_tensor,
        grad_scale_ptr=grad_scale, lr_ptr=lr_t, coef_ptr=coef,
        stats_ptr=None if plan.one_pass else torch.zeros(tables.groups, dtype=torch.float32, device=device),
        lr=float(lr), step_size=float(step_size), sqrt_bc2=float(sqrt_bc2), beta1c=1.0 - beta1,
        beta2=float(beta2), beta2c=1.0 - beta2,
        rtol=reference.WEIGHTED_PROX_RTOL[torch.float32],
    )
    for kernel, constexprs in _variants(bucket, options).items():
        grid = ((tables.block_tensor if kernel is _weighted_solve_kernel else tables.program_tensor).numel(),)
        kernel[grid](
            **{name: args[name] for name in kernel.arg_names if name not in constexprs},
            **constexprs, num_warps=plan.num_warps,
        )


def compile_kernels(arch: int = 90) -> int:
    """Compile, for ``sm_{arch}`` and without a GPU, every kernel variant that the launcher
    picks for a spread of layouts, dtypes and options; returns how many were compiled.

    A CI check that the kernels build with the real compiler, which checks types and control
    flow more strictly than the interpreter. Needs this module imported without
    ``TRITON_INTERPRET``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_kernels needs the module imported without TRITON_INTERPRET=1")
    pointer_types = dict(
        meta_ptr="*i64", program_tensor_ptr="*i32", block_tensor_ptr="*i32",
        stats_ptr="*fp32", grad_scale_ptr="*fp32", lr_ptr="*fp32", coef_ptr="*fp32",
    )
    layouts = [GroupLayout(64, 5, 9), GroupLayout(512, 64, 1), GroupLayout(1, 10, 4608)]
    seen: set[tuple] = set()
    for prox in _PROX_CODE:
        for layout in layouts:
            for dtype in (torch.float32, torch.bfloat16):
                plan = plan_tiles(layout, prox, dtype.itemsize)
                for capturable in (False, True):
                    options = _Options(capturable, maximize=True, decoupled=capturable, grad_scale=capturable)
                    bucket = _Bucket((dtype, dtype), plan, None)
                    for kernel, constexprs in _variants(bucket, options).items():
                        key = (kernel.fn.__name__, tuple(sorted(map(str, constexprs.items()))))
                        if key in seen:
                            continue
                        seen.add(key)
                        absent = {"stats_ptr": plan.one_pass, "grad_scale_ptr": not options.grad_scale,
                                  "lr_ptr": not capturable, "coef_ptr": not capturable}
                        constexprs = dict(constexprs, **{
                            name: None for name, none in absent.items() if none and name in kernel.arg_names
                        })
                        signature = {
                            name: "constexpr" if name in constexprs else pointer_types.get(name, "fp32")
                            for name in kernel.arg_names
                        }
                        triton.compile(
                            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": plan.num_warps},
                        )
    return len(seen)


#: Whether the kernels were built for Triton's interpreter (decided when this module was
#: imported, from ``TRITON_INTERPRET``).
INTERPRETED = not isinstance(_adam_prox_kernel, triton.runtime.JITFunction)


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the kernels can run on ``device``: a CUDA device, or the CPU under the interpreter."""
    if INTERPRETED:
        if device.type == "cpu":
            return None
        return "Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors only"
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu":
        return (
            "Triton kernels need a CUDA device; on the CPU they run only in Triton's interpreter, "
            "with TRITON_INTERPRET=1 set before this module is first imported"
            + (f" (it is {os.environ['TRITON_INTERPRET']!r} now)" if "TRITON_INTERPRET" in os.environ else "")
        )
    return f"Triton kernels need a CUDA device, not {device.type}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=compile_kernels.__doc__.split("\n\n")[0])
    parser.add_argument("--compile-only", action="store_true", required=True)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    print(f"compiled {compile_kernels(parser.parse_args().arch)} Triton kernel variants")
