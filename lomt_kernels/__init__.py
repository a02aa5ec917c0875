"""Fused kernels for proximal group-sparse training.

The public surface: :class:`FusedGroupProxAdam`, :func:`group_sparsity`, and
:func:`prox_param_groups`, which builds the papers' param groups from a model.
"""

from .optimizer import FusedGroupProxAdam
from .sparsity import group_sparsity, prox_param_groups

__all__ = ["FusedGroupProxAdam", "group_sparsity", "prox_param_groups"]
