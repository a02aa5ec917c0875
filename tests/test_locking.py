"""Folder locks: a second process is refused, naming the first; a dead holder leaves no lock."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from lomt_train.locking import LockedError, hold_lock
from lomt_train.trainer import run_dir_for, train

from test_trainer import _config

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from lomt_train.locking import hold_lock
with hold_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


@contextmanager
def held_by_another_process(path: Path) -> Iterator[subprocess.Popen]:
    """A process that holds the lock on ``path`` until the block ends (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    path = tmp_path / "run" / ".lock"
    with held_by_another_process(path) as proc:
        with pytest.raises(LockedError, match=rf"folder {path.parent} is in use by pid {proc.pid} on "):
            with hold_lock(path):
                pass
    # The holder was killed (SIGKILL, no clean exit): the kernel dropped the lock with it.
    with hold_lock(path):
        assert path.read_text().startswith(f"pid {os.getpid()} ")


def test_training_into_a_run_folder_in_use_stops_before_writing(tmp_path):
    config = _config(tmp_path, dataset="nyu", tasks=["seg"], epochs=1)
    run = run_dir_for(config)
    with held_by_another_process(run / ".lock") as proc:
        with pytest.raises(LockedError, match=rf"run folder {run} is in use by pid {proc.pid}"):
            train(config, progress=False)
    assert [p.name for p in run.iterdir()] == [".lock"]
    assert not (tmp_path / "cache").exists()
