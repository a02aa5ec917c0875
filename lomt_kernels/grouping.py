"""How a parameter tensor splits into groups, in index space and in memory.

Every backend works on the same groups:

* ``"in_channel"`` (paper Eq. 6): for a conv weight ``W[N, C, kh, kw]`` group ``c`` is
  ``W[:, c, :, :]`` with ``n_G = N * kh * kw``; for a Linear weight ``W[out, in]`` group ``j``
  is the column ``W[:, j]``.
* ``"out_channel"``: group ``n`` is ``W[n]``.

Tensors with fewer than two dimensions are never grouped.

The kernels address a group through a *memory layout* ``(A, B, K)``: the tensor's storage,
read as a dense ``[A, B, K]`` array, has group ``b`` at ``[:, b, :]``. A contiguous conv weight
grouped by input channel is ``(N, C, kh*kw)``; the same weight in ``channels_last`` is
``(N*kh*kw, C, 1)``; any tensor grouped by output channel is ``(1, N, numel/N)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

GROUPINGS = ("in_channel", "out_channel")


class GroupLayout(NamedTuple):
    """A tensor's storage seen as a dense ``[outer, groups, inner]`` array."""

    outer: int
    groups: int
    inner: int

    @property
    def group_size(self) -> int:
        return self.outer * self.inner


def is_grouped(t: Tensor) -> bool:
    """Whether the prox applies to ``t``: only tensors with at least two dimensions."""
    return t.dim() >= 2


def group_dim(grouping: str) -> int:
    """The dimension that indexes the groups (1 for in-channel, 0 for out-channel)."""
    if grouping == "in_channel":
        return 1
    if grouping == "out_channel":
        return 0
    raise ValueError(f"unknown grouping {grouping!r}: expected one of {GROUPINGS}")


def as_groups(t: Tensor, grouping: str) -> Tensor:
    """A ``[num_groups, group_size]`` copy (or view) of ``t``, one row per group."""
    dim = group_dim(grouping)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def from_groups(rows: Tensor, like: Tensor, grouping: str) -> Tensor:
    """Inverse of :func:`as_groups`: rows back in the shape of ``like``."""
    dim = group_dim(grouping)
    shape = list(like.shape)
    moved = [shape[dim]] + shape[:dim] + shape[dim + 1 :]
    return rows.reshape(moved).movedim(0, dim)


def group_layout(t: Tensor, grouping: str) -> GroupLayout | None:
    """The ``(A, B, K)`` memory layout of ``t``'s groups, or ``None`` if its strides have none.

    ``None`` means a kernel must work on a contiguous copy.
    """
    group_dim(grouping)  # validates
    if not is_grouped(t):
        return None
    shape = t.shape
    rest = math.prod(shape[2:])
    if t.is_contiguous():
        if grouping == "in_channel":
            return GroupLayout(shape[0], shape[1], rest)
        return GroupLayout(1, shape[0], t.numel() // max(shape[0], 1))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        if grouping == "in_channel":
            return GroupLayout(shape[0] * rest, shape[1], 1)
        return GroupLayout(1, shape[0], t.numel() // max(shape[0], 1))
    return None


def group_threshold(lr: float, lambda_: float, prox: str, group_size: int) -> float:
    """The prox threshold: ``lr * lambda_ * sqrt(n_G)`` for group proxes, ``lr * lambda_`` for l1."""
    if prox == "l1":
        return lr * lambda_
    return lr * lambda_ * math.sqrt(group_size)
