"""torchao's pruning-aware training (``torchao.prototype.pat``) as the peer of a target run.

``--peer pat --target-sparsity P`` trains with torchao's ``PruneOptimizer`` over
``torch.optim.Adam`` instead of :class:`lomt_kernels.FusedGroupProxAdam` and a
:class:`lomt_kernels.LambdaController`: the backbone's conv weights take PAT's
``MinSparsityConstraint`` (after each Adam step on a latent copy of the weights, the ``P%`` of
each conv's groups with the smallest norms are zeroed), its target ramps up on a cubic schedule after the same warm-up epoch, and the same last epochs heal (zeros frozen by
masking their gradients and re-zeroing them). Install it with ``pip install -e ".[peers]"``.

PAT groups a 4-D conv weight ``[N, C, kh, kw]`` as a 2-D ``[N, C*kh*kw]`` view, by rows
(``Dim0Grouper``: output channels ``W[n]``) or by columns (``Dim1Grouper``: one group per
``(c, i, j)``, not per input channel). It has no grouper for input channels ``W[:, c]``, so a
PAT run takes ``--grouping out_channel``, and its comparison is with our runs at the same
grouping.

Each conv gets its own ``P%``: PAT's ``GlobalMinSparsityConstraint``, which ranks the groups of
all convs together by RMS, zeroed the whole stem and most of ``layer4`` on the synthetic NYU
data at 50%, after which the backbone's output no longer depends on the image.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig

PEERS = ("pat",)


def _pat():
    try:
        from torchao.prototype import pat
    except ImportError as exc:
        raise ValueError(
            f"--peer pat needs torchao ({exc}); install it with: pip install -e \".[peers]\""
        ) from exc
    return pat


def check_peer(config: RunConfig) -> None:
    """Errors that name a bad ``--peer`` option and its fix; nothing to check without one."""
    if config.peer is None:
        return
    if config.peer not in PEERS:
        raise ValueError(f"unknown --peer {config.peer!r}: expected one of {PEERS}")
    if config.target_sparsity is None:
        raise ValueError("--peer pat reaches a sparsity target by a hard constraint: give --target-sparsity P")
    if config.grouping != "out_channel":
        raise ValueError(
            "torchao's PAT has no grouper for the input channels of a conv weight: pass --grouping out_channel "
            "(and compare with our runs at --grouping out_channel)"
        )
    _pat()


def pat_optimizer(
    config: RunConfig, groups: list[dict[str, Any]], steps_per_epoch: int, warmup_epochs: int, healing_epochs: int
) -> torch.optim.Optimizer:
    """PAT's ``PruneOptimizer`` over ``torch.optim.Adam`` for our param groups (the first is the backbone's convs)."""
    pat = _pat()
    sparse, *rest = groups
    adam_groups = [
        {
            "params": sparse["params"], "group_type": "Dim0Grouper", "prox_type": "MinSparsityConstraint",
            "min_sparsity": config.target_sparsity / 100.0, "min_sparsity_schedule": True,
        },
        *({k: v for k, v in g.items() if k not in ("lambda_", "prox", "grouping")} for g in rest),
    ]
    base = torch.optim.Adam(adam_groups, lr=config.lr, weight_decay=config.weight_decay)
    return pat.PruneOptimizer(
        base, warmup_steps=warmup_epochs * steps_per_epoch,
        healing_start_step=(config.epochs - healing_epochs) * steps_per_epoch,
    )
