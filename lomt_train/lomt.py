"""LOMT, step 1: find the backbone layers each task uses, and where its head should attach.

Each task is trained *alone* with the group prox (one run per seed, through
:func:`~lomt_train.trainer.run_sweep`; finished runs are reused). For every backbone conv ``l``
with weight ``[C_out, C_in, k, k]`` a run's ``sparsity.json`` gives the active fraction

    a_t(l) = #{c : W_l[:, c] != 0} / C_in,

the share of input channels the conv still reads. As in the LOMT paper, conv ``l`` is **used**
by task ``t`` when ``a_t(l) > tau`` in every seed, with tau = 1% by default
(:data:`USED_THRESHOLD`; ``lomt-probe --threshold``, recorded in ``profile.json``). Short
probes thin convs without emptying them, so that at 1% every conv reads as used; a larger tau
(the README's probe on the synthetic data uses 0.25) counts a conv that keeps at most that share
of its inputs in some seed as unused.

The probe needs sparsity: every task's λ must be > 0 and the prox on. At λ = 0 no group is
driven to zero, every ``a_t(l)`` is 1, every conv reads as used and every task attaches at
the last stage, so :func:`probe` refuses it before any training.

**Attachment rule** (:func:`choose_attachment`): task ``t`` attaches at the output of the
deepest residual block (``layerS.B``) whose residual branch (``conv1``, ``conv2``[, ``conv3``])
holds a conv used by ``t``; the node is named ``layerS`` when that block is its stage's last,
else ``layerS.B`` (both valid ``create_feature_extractor`` nodes: the block's output after its
final ReLU). A stage's first block also has a shortcut projection (``downsample``: a strided or
channel-changing 1x1 conv), which carries the features on to the heads of a single-task probe
whatever the task needs, so it is used by every task that learns anything; it does not count:
a block whose branch is unused adds nothing but that pointwise re-mapping of its input, which
the task's head, reading the input itself, can learn. Every branch conv after the attachment
point is unused by ``t`` (at most tau of its inputs active in some seed), so the task's path
stops there. A task that uses no block attaches at the stem output (``"maxpool"``). Manual
attachments (``config.attach``, i.e. ``--attach seg=layer3.3.conv1``) override the rule.

:func:`write_profile` saves ``profile.json`` (read by ``lomt_train nyu --lomt profile.json``)
and the heatmap ``lomt_profile.png``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import RunConfig
from .models import build_backbone, extract_features
from .tasks import get_task, resolve_tasks
from .trainer import run_dir_for, run_sweep

USED_THRESHOLD = 0.01
STEM_NODE = "maxpool"


def rule(threshold: float = USED_THRESHOLD) -> str:
    """The attachment rule in words, as ``profile.json`` records it."""
    return (
        f"a conv is used by a task when more than {threshold:g} of its input-channel groups are active "
        "in every seed; the task attaches at the output of the deepest residual block whose residual branch "
        "holds a conv it uses (shortcut projections do not count; the stage name when that block is the "
        f"stage's last; '{STEM_NODE}' when it uses none)"
    )

_BLOCK = re.compile(r"^(layer\d+)\.(\d+)\.")
_SHORTCUT = ".downsample."


def block_of(layer: str) -> tuple[str, int] | None:
    """``("layer3", 2)`` for a conv of block ``layer3.2`` (its downsample included); ``None`` for the stem."""
    match = _BLOCK.match(layer)
    return (match.group(1), int(match.group(2))) if match else None


def active_fractions(sparsity: Mapping[str, Any]) -> dict[str, float]:
    """``{conv: a(conv)}`` from a run's ``sparsity.json``, for every 4-D (conv) weight, in model order."""
    return {
        layer["name"].removesuffix(".weight"): 1.0 - layer["zero_groups"] / layer["groups"]
        for layer in sparsity["layers"]
        if len(layer["shape"]) == 4 and layer["groups"]
    }


def used_layers(fractions: Mapping[str, Sequence[float]], threshold: float = USED_THRESHOLD) -> dict[str, bool]:
    """``{conv: every seed's active fraction > threshold}``."""
    return {layer: all(a > threshold for a in per_seed) for layer, per_seed in fractions.items()}


def choose_attachment(used: Mapping[str, bool]) -> str:
    """The attachment node of the rule in the module docstring, from one task's ``{conv: used}``.

    ``used`` must list every conv of the backbone (stage depths are read off its names).
    """
    last_block: dict[str, int] = {}
    for layer in used:
        if (block := block_of(layer)) is not None:
            last_block[block[0]] = max(last_block.get(block[0], -1), block[1])
    deepest: tuple[str, int] | None = None
    for layer, is_used in used.items():
        block = block_of(layer)
        # Stage names compare as strings ("layer1" < "layer4"); ResNets have at most 4 stages.
        on_branch = _SHORTCUT not in layer
        if is_used and on_branch and block is not None and (deepest is None or block > deepest):
            deepest = block
    if deepest is None:
        return STEM_NODE
    stage, index = deepest
    return stage if index == last_block[stage] else f"{stage}.{index}"


def probe(
    config: RunConfig, lambdas: Sequence[float], seeds: Sequence[int], *,
    threshold: float = USED_THRESHOLD, progress: bool = True,
) -> dict[str, Any]:
    """Train each of ``config.tasks`` alone (seeds ``seeds``) and choose its attachment node.

    Args:
        config: the base run (dataset, tasks, training options). Runs go to ``config.out`` as
            usual; ``config.attach`` holds manual attachments that override the rule.
        lambdas: one sparsity strength for every task, or one per task (in ``config.tasks`` order).
        seeds: the seeds of each task's runs; "used" needs the layer active in all of them.
        threshold: tau in [0, 1): a conv is used when more than this fraction of its input
            channels is active.

    Returns the profile: ``{"attach": {task: node}, "chosen": {task: node by the rule},
    "used": {task: {conv: bool}}, "active_fraction": {task: {conv: [per seed]}}, "layers":
    [convs in model order], "rule", "threshold", "lambdas": {task: lambda_}, "seeds"}``.
    """
    tasks = [t.name for t in resolve_tasks(config.tasks, config.dataset)]
    if len(lambdas) not in (1, len(tasks)):
        raise ValueError(f"give one --lambda for every task or one per task ({len(tasks)}), got {list(lambdas)}")
    task_lambdas = dict(zip(tasks, lambdas if len(lambdas) == len(tasks) else list(lambdas) * len(tasks)))
    unsparse = [t for t, lam in task_lambdas.items() if not lam > 0]
    if unsparse or config.prox == "none":
        cause = "--prox none" if config.prox == "none" else f"λ = 0 for {unsparse}"
        raise ValueError(
            f"lomt-probe needs sparsity, but {cause}: nothing is driven to zero, so every layer reads as "
            "used and the probe chooses nothing. Pass a positive --lambda (e.g. --lambda 1e-2) and a "
            "sparsifying --prox (group_weighted, the default, or group)."
        )
    if not 0 <= threshold < 1:
        raise ValueError(f"--threshold {threshold}: must be a fraction of the input channels in [0, 1)")
    override = {get_task(t).name: node for t, node in config.attach.items()}
    extra = sorted(set(override) - set(tasks))
    if extra:
        raise ValueError(f"--attach names task(s) {extra} that are not among the probed tasks {tasks}")
    # Fail before any training, not in the LOMT run, when an override names no backbone node.
    if override:
        extract_features(build_backbone(config.backbone), sorted(set(override.values())))
    # Single-task probes see the whole backbone: attachments apply to the LOMT model only.
    configs = {t: dataclasses.replace(config, tasks=[t], attach={}, lambda_=task_lambdas[t]) for t in tasks}
    for task, task_config in configs.items():
        run_sweep(task_config, [task_lambdas[task]], seeds, resume=True, progress=progress)

    fractions: dict[str, dict[str, list[float]]] = {}
    for task, task_config in configs.items():
        per_seed = [
            active_fractions(json.loads((run_dir_for(dataclasses.replace(task_config, seed=s)) / "sparsity.json").read_text()))
            for s in seeds
        ]
        fractions[task] = {layer: [run[layer] for run in per_seed] for layer in per_seed[0]}
    used = {task: used_layers(f, threshold) for task, f in fractions.items()}
    chosen = {task: choose_attachment(u) for task, u in used.items()}
    attach = {**chosen, **override}
    return {
        "attach": attach, "chosen": chosen, "used": used, "active_fraction": fractions,
        "layers": list(next(iter(fractions.values()))), "rule": rule(threshold), "threshold": threshold,
        "lambdas": task_lambdas, "seeds": list(seeds),
    }


def _column(node: str, layers: Sequence[str]) -> int:
    """The heatmap column where a head reading ``node`` sits: the last conv at or before it."""
    if node == STEM_NODE:
        return 0
    parts = node.split(".")
    while parts:
        prefix = ".".join(parts)
        hits = [i for i, layer in enumerate(layers) if layer == prefix or layer.startswith(prefix + ".")]
        if hits:
            return hits[-1]
        parts.pop()  # an fx node such as "layer2.1.relu_2": fall back to its block
    return 0


def write_profile(profile: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/profile.json`` and ``out/lomt_profile.png``; returns both paths.

    The heatmap has one row per task and one column per conv (model order): colour is the
    mean active fraction over seeds, ``x`` marks convs the task does not use, and a red
    triangle marks the column after which the task's head reads the backbone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "profile.json"
    atomic_write_text(json.dumps(profile, indent=2), json_path)
    tasks, layers = list(profile["active_fraction"]), list(profile["layers"])
    grid = [[sum(profile["active_fraction"][t][l]) / len(profile["active_fraction"][t][l]) for l in layers] for t in tasks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(layers)), 1.2 + 0.5 * len(tasks)))
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    for row, task in enumerate(tasks):
        unused = [col for col, layer in enumerate(layers) if not profile["used"][task][layer]]
        ax.scatter(unused, [row] * len(unused), marker="x", s=12, color="white", linewidths=0.8)
        ax.scatter([_column(profile["attach"][task], layers) + 0.5], [row], marker="<", s=60, color="red")
    ax.set_yticks(range(len(tasks)), [f"{t} @ {profile['attach'][t]}" for t in tasks])
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=5)
    ax.set_title("active input-channel fraction per conv (x: unused; red: attachment)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    png_path = out / "lomt_profile.png"
    fig.savefig(png_path, dpi=150)
    plt.close(fig)
    return json_path, png_path
