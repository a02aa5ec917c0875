"""Run a test's worker function in spawned processes, as the multi-process tests need.

``run(worker, *args, nprocs=...)`` starts ``worker(rank, *args)`` in ``nprocs`` fresh
interpreters, re-raises the first worker error with its traceback, and kills every process
on an error or after ``timeout`` seconds.

A worker that returns ends its process with ``os._exit(0)``, skipping interpreter
finalization. With torch 2.14 and gloo, a rank that had finished its work, written its
results and called ``destroy_process_group()`` was seen to abort during finalization
("terminate called without an active exception", SIGABRT) in about one run in twenty: a
C++ thread of the distributed stack still joinable at exit. Nothing of the test is left to
run at that point, so skipping finalization loses nothing; an error raised by the worker
itself still fails the test with its traceback.
"""

from __future__ import annotations

import os
import sys
import time

import torch.multiprocessing as mp

#: The longest a spawned run may take, in seconds, before its processes are killed.
DEFAULT_TIMEOUT = 55.0


def run(worker, *args, nprocs: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``worker(rank, *args)`` for ``rank`` in ``range(nprocs)`` and wait for all of them."""
    context = mp.start_processes(
        _exit_when_done, args=(worker, *args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0, grace_period=5.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _exit_when_done(rank: int, worker, *args) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
