"""What a run folder must hold for a command to start or continue the run in it.

A run resumes only with the options it was started with: those in its ``config.json`` and the
copy its ``last.pt`` carries. Anything else would train with the checkpoint's values while the
folder claims the new ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import RunConfig
from .run_identity import check_legacy


def _check_same(config: RunConfig, saved: RunConfig, where: Path) -> None:
    diff = saved.differences(config)
    if diff:
        keys = ", ".join(f"{key} {new!r} (saved {old!r})" for key, (old, new) in diff.items())
        raise ValueError(
            f"--resume: this command's options differ from {where}: {keys}; resume with the saved options, "
            "or start a new run in another --out"
        )


def check_resume(config: RunConfig, run_dir: Path, *, resume: bool) -> dict[str, Any] | None:
    """Check ``run_dir`` against ``config`` before anything is written or generated.

    Returns the contents of ``last.pt`` to resume from, or ``None`` to start afresh. Raises when
    the folder holds a run and ``resume`` is false, when ``resume`` asks for options other than
    the saved ones (naming each differing key), when the saved options are unknown, and when the
    run sits in a folder of the layout before run identities (naming the move that adopts it).
    """
    check_legacy(config, run_dir)
    last, config_file = run_dir / "last.pt", run_dir / "config.json"
    if not resume:
        if last.exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        return None
    ckpt = load_checkpoint(last) if last.exists() else None
    saved: dict[Path, RunConfig] = {}
    if config_file.exists():
        saved[config_file] = RunConfig.load(config_file)
    if ckpt is not None and "config" in ckpt:
        saved[last] = RunConfig.from_dict(ckpt["config"])
    has_run = ckpt is not None or (run_dir / "results.json").exists()
    if has_run and not saved:
        raise ValueError(
            f"--resume: {run_dir} has no config.json and its checkpoint records no options, so the run's options "
            "are unknown and it cannot be resumed; start it again in another --out"
        )
    for where, saved_config in saved.items():
        _check_same(config, saved_config, where)
    return ckpt
