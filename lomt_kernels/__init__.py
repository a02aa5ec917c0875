"""Fused kernels for proximal group-sparse training.

The public surface: :class:`FusedGroupProxAdam`, :func:`group_sparsity`, and
:func:`prox_param_groups`, which builds the papers' param groups from a model;
:class:`LambdaController`, which learns ``lambda_`` during training toward a target sparsity
(:class:`ZeroGroupFraction`) or compute budget (:class:`MacFraction`), and
:class:`FrozenGroups`, which holds zero groups at zero while the rest fine-tunes.
"""

from .healing import FrozenGroups
from .lambda_control import LambdaController, ZeroGroupFraction
from .macs import MacFraction, channel_plan
from .optimizer import FusedGroupProxAdam
from .sparsity import group_sparsity, prox_param_groups

__all__ = [
    "FrozenGroups", "FusedGroupProxAdam", "LambdaController", "MacFraction", "ZeroGroupFraction",
    "channel_plan", "group_sparsity", "prox_param_groups",
]
