"""The canonical task names each dataset provides; they are also the keys of a sample.

Aliases (``smile``, ``semseg``, ``normals``) are resolved by the task registry before the
loaders see a name, so the loaders accept canonical names only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .class_names import CELEBA_ATTRIBUTES

NYU_TASKS: tuple[str, ...] = ("seg", "depth", "normal", "edge")
CELEBA_ATTRIBUTE_TASKS: tuple[str, ...] = tuple(name.lower() for name in CELEBA_ATTRIBUTES)
CELEBA_TASKS: tuple[str, ...] = ("seg", *CELEBA_ATTRIBUTE_TASKS)


def check_tasks(tasks: Sequence[str], valid: Iterable[str], where: str) -> tuple[str, ...]:
    """Return ``tasks`` as a tuple, or raise ``ValueError`` naming the valid ones.

    ``where`` names the dataset (and layout) in the message.
    """
    if isinstance(tasks, str):
        # A bare string would iterate as characters and fail confusingly.
        raise TypeError(f"tasks must be a sequence of names, got the string {tasks!r}")
    valid = tuple(valid)
    if not tasks:
        raise ValueError(f"{where}: no tasks requested; valid tasks are {list(valid)}")
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {unknown}; valid tasks are {list(valid)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{where}: tasks {list(tasks)} name a task twice")
    return tuple(tasks)
