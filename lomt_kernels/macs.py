"""What a group-sparse network would still compute once its zero channels are removed.

The prox zeroes input-channel groups ``W[:, c]`` of convolutions. :func:`channel_plan` reads,
from the zero pattern alone, which channels each conv of an fx-traced module keeps when the
zero groups are removed (``lomt_train compact`` builds the smaller model from the same plan),
and :class:`MacFraction` turns it into multiply-accumulates without building anything:

* **Private channels** (a chain ``conv P -> BatchNorm B -> ReLU -> conv C`` in which each node
  has exactly one user, e.g. ``conv1 -> bn1 -> relu -> conv2`` inside a ResNet block): channel
  ``c`` leaves P's outputs, B's entries and C's inputs when ``C.weight[:, c] == 0``. C
  multiplies that channel by zero weights, so it never reaches C's output.
* **Shared channels** (every other conv input: a residual stream, the stem, nodes that other
  modules also read): the tensor stays full width and the conv reads only its kept channels.

For a conv with weight ``[C_out, C_in, k, k]`` the plan gives kept output rows ``keep_out``
(all of them unless the conv is a chain's P) and kept input groups
``keep_in = {c : W[keep_out, c] != 0}``. Convs are visited in reverse graph order, so a
chain's C is settled before its P reads C's ``keep_in``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ChannelPlan:
    """Kept channels of one conv; ``bn`` is the BatchNorm whose entries follow ``keep_out``.

    ``gather``: the conv reads a full-width input of which it keeps only ``keep_in``.
    """

    keep_in: Tensor
    keep_out: Tensor
    gather: bool
    bn: str | None = None


def _nonzero_groups(weight: Tensor) -> Tensor:
    """Indices of input channels ``c`` with ``weight[:, c] != 0``; at least one (a conv needs an input)."""
    keep = (weight.detach() != 0).flatten(2).any(dim=2).any(dim=0).nonzero().flatten()
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=weight.device)


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@torch.no_grad()
def channel_plan(module: GraphModule) -> dict[str, ChannelPlan]:
    """Kept channels for every ungrouped ``nn.Conv2d`` of ``module`` (see the module docstring).

    Keys are the convs' module names. Convs called more than once are left out (narrowing a
    conv narrows all its calls), as are grouped and depthwise convs.
    """
    calls = Counter(n.target for n in module.graph.nodes if n.op == "call_module")

    def submodule(node: Node | None, kind: type) -> nn.Module | None:
        if node is None or node.op != "call_module":
            return None
        # A ReLU has no channels and is shared by every call in a torchvision block.
        if calls[node.target] != 1 and kind is not nn.ReLU:
            return None
        m = module.get_submodule(node.target)
        return m if isinstance(m, kind) else None

    def chain_consumer(node: Node) -> tuple[str, str] | None:
        """``(bn, consumer conv)`` when ``node`` (a conv) starts a private chain, else ``None``."""
        bn = _single_user(node)
        if submodule(bn, nn.BatchNorm2d) is None:
            return None
        relu = _single_user(bn)
        if submodule(relu, nn.ReLU) is None:
            return None
        conv = _single_user(relu)
        if submodule(conv, nn.Conv2d) is None or conv.args[0] is not relu:
            return None
        return bn.target, conv.target

    plans: dict[str, ChannelPlan] = {}
    fed_by_chain: set[str] = set()
    for node in reversed(list(module.graph.nodes)):
        conv = submodule(node, nn.Conv2d)
        if conv is None or conv.groups != 1:
            continue
        chain = chain_consumer(node)
        keep_out = torch.arange(conv.out_channels, device=conv.weight.device)
        bn = None
        if chain is not None and chain[1] in plans:
            bn, consumer = chain
            keep_out = plans[consumer].keep_in
            fed_by_chain.add(consumer)
        keep_in = _nonzero_groups(conv.weight[keep_out])
        plans[node.target] = ChannelPlan(keep_in, keep_out, gather=False, bn=bn)
    for name, plan in plans.items():
        full = module.get_submodule(name).in_channels
        plan.gather = name not in fed_by_chain and plan.keep_in.numel() < full
    return plans


class MacFraction:
    """The MACs per example ``module`` would compute with its zero channels removed, over its dense MACs.

    ``MacFraction(module, example)`` runs ``module`` once on ``example`` (in eval mode, without
    gradients) to count its dense MACs with :class:`torch.utils.flop_counter.FlopCounterMode`
    (convolutions, matmuls; elementwise ops are free) and each conv's output size. Calling it
    later reads the current weights' zero pattern (:func:`channel_plan`) and returns, in
    ``(0, 1]``,

    .. math::

        \\frac{M_\\text{dense} - \\sum_\\text{conv} H_o W_o k_h k_w
        (C_\\text{out} C_\\text{in} - |\\text{keep\\_out}|\\,|\\text{keep\\_in}|)}{M_\\text{dense}},

    the count ``lomt_train compact`` reports for the compacted module, without compacting.
    A module that is not a :class:`torch.fx.GraphModule` is traced with
    :func:`torch.fx.symbolic_trace` (the trace shares the module's parameters).
    """

    #: More sparsity means a smaller figure (see :class:`lomt_kernels.LambdaController`).
    decreases_with_lambda = True

    def __init__(self, module: nn.Module, example: Tensor) -> None:
        self.module = module if isinstance(module, GraphModule) else torch.fx.symbolic_trace(module)
        self.positions: dict[str, int] = {}  # a conv's output positions (batch * H_o * W_o) per example
        convs = {name: m for name, m in self.module.named_modules() if isinstance(m, nn.Conv2d)}

        def record(name: str):
            def hook(conv: nn.Module, args, output: Tensor) -> None:
                self.positions[name] = output[0, 0].numel()
            return hook

        handles = [m.register_forward_hook(record(name)) for name, m in convs.items()]
        was_training = self.module.training
        counter = FlopCounterMode(display=False)
        try:
            self.module.eval()
            with torch.no_grad(), counter:
                self.module(example[:1])
        finally:
            self.module.train(was_training)
            for handle in handles:
                handle.remove()
        self.dense_macs = counter.get_total_flops() // 2
        if self.dense_macs == 0:
            raise ValueError("MacFraction: the module computed no MACs on the example input")

    def removed_macs(self) -> int:
        """MACs per example that removing the current zero channels would save."""
        removed = 0
        for name, plan in channel_plan(self.module).items():
            conv: nn.Conv2d = self.module.get_submodule(name)
            per_pair = self.positions[name] * conv.kernel_size[0] * conv.kernel_size[1]
            kept = plan.keep_out.numel() * plan.keep_in.numel()
            removed += per_pair * (conv.out_channels * conv.in_channels - kept)
        return removed

    def __call__(self) -> float:
        return 1.0 - self.removed_macs() / self.dense_macs
