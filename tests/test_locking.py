"""Folder locks: a second process is refused, naming the first; a dead holder leaves no lock."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lomt_train.locking import LockedError, hold_lock
from lomt_train.trainer import run_dir_for, train

from test_trainer import _config

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time\nfrom lomt_train.locking import hold_lock\nwith hold_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


@pytest.fixture
def holder():
    """Start a process that holds the lock on a path; yields a function taking the path."""
    procs = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_until_the_first_dies(tmp_path, holder):
    path = tmp_path / "run" / ".lock"
    proc = holder(path)
    with pytest.raises(LockedError, match=rf"folder {path.parent} is in use by pid {proc.pid} on "):
        with hold_lock(path):
            pass
    proc.kill()  # no clean exit: the kernel drops the lock with the process
    proc.wait()
    with hold_lock(path):
        assert path.read_text().startswith(f"pid {os.getpid()} ")


def test_training_into_a_run_folder_in_use_stops_before_writing(tmp_path, holder):
    config = _config(tmp_path, dataset="nyu", tasks=["seg"], epochs=1)
    run = run_dir_for(config)
    proc = holder(run / ".lock")
    with pytest.raises(LockedError, match=rf"run folder {run} is in use by pid {proc.pid}"):
        train(config, progress=False)
    assert [p.name for p in run.iterdir()] == [".lock"]
    assert not (tmp_path / "cache").exists()
