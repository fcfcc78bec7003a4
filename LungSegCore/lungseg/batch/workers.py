"""The batch's helper processes, readers and finishers: how they start, their priority, how they leave with their
batch process, and what the batch does when one of them dies (killed for memory, or a crash).

Everything a helper runs is defined at module level: under `spawn` (Windows, macOS) it is pickled by name and
imported again in the new process.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from ..errors import LungSegError

HELPER_NICENESS = 10
PARENT_POLL_S = 1.0  # how often a helper looks whether its batch process is still there
START_METHOD_VARIABLE = "LUNGSEG_START_METHOD"  # fork or spawn: overrides the platform's choice (tests)

# Held by a finisher while it works on an input: one whose batch process died exits between inputs, never within one.
WORKING = threading.Lock()


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def start_method() -> str:
    """How reader and finisher processes start. `fork` on Linux: at once, sharing the loaded code. Windows has only
    `spawn`, and on macOS `fork` after the model has run is unsafe (CPython's documentation), so `spawn` there."""
    method = os.environ.get(START_METHOD_VARIABLE, "").strip()
    if not method:
        return "fork" if sys.platform.startswith("linux") else "spawn"
    available = multiprocessing.get_all_start_methods()
    if method not in ("fork", "spawn") or method not in available:
        raise LungSegError(
            f"{START_METHOD_VARIABLE}={method}: this platform starts processes with "
            f"{' or '.join(m for m in ('fork', 'spawn') if m in available)}"
        )
    return method


def helper_process(method: str, role: str) -> None:
    """Start of a reader or finisher process: one thread, at a lower priority than the model. The model's threads
    then take every core whenever they can run, and the helpers fill the gaps; giving the model only the cores
    left over by the helpers capped it at its one-thread forward rate.

    A helper also leaves when its batch process dies (killed, or out of memory): neither kind saw it go. A
    process pool's worker waits for work on a pipe whose write end it (forked) holds too, and a reader could wait
    forever at exit to flush an image into a pipe no one reads. Each killed batch left them behind, holding their
    memory."""
    _name_process(f"lungseg-{role}")
    _lower_priority()
    wait = functools.partial(_wait_for_parent_fork, os.getppid()) if method == "fork" else _wait_for_parent_spawn
    threading.Thread(target=_exit_with_parent, args=(wait,), daemon=True).start()


def _name_process(name: str) -> None:
    """The name `ps` and `top` show (Linux; 15 characters at most), so that readers and finishers can be told
    apart."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def _lower_priority() -> None:
    if hasattr(os, "nice"):  # POSIX
        os.nice(HELPER_NICENESS)
    elif sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), 0x4000)  # BELOW_NORMAL_PRIORITY_CLASS


def _wait_for_parent_fork(parent: int) -> None:
    """Forked helpers inherit each other's end of the pipe that signals the parent's exit, so poll the parent's id,
    which changes when the process is handed to another."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)


def _wait_for_parent_spawn() -> None:
    """A spawned helper holds a handle on its parent (Windows) or a pipe only the parent writes (POSIX), which its
    exit signals; Windows hands no orphan to another parent, so the parent's id would not change."""
    multiprocessing.parent_process().join()


def _exit_with_parent(wait) -> None:
    """Once the parent is gone, finish the input at hand (a finisher writes it whole, and the batch skips it when
    run again), then exit at once, without waiting on the pipes."""
    wait()
    WORKING.acquire()
    os._exit(1)


class ReaderDied(RuntimeError):
    """A reader process died: `held` are the inputs that were being read (and may have killed it)."""

    def __init__(self, held: list[Path], reason: str):
        super().__init__(reason)
        self.held, self.reason = held, reason


def reader_death_errors(suspects: list[Path], reason: str, base: dict) -> list[dict]:
    """The error rows of the inputs a dead reader process may have held. The inputs never read are not among them:
    they go to a new round, with new readers."""
    error = (
        f"not segmented: a reader process died while this input was among the {len(suspects)} being read "
        f"({reason}; too little memory, or a crash decoding one of them); a rerun retries it"
    )
    return [{**base, "input": str(path), "status": "error", "error": error} for path in suspects]


FINISHER_DIED_ALONE = (
    "not finished: a finisher process died while it held this input alone, after one died with "
    "it among others (too little memory, or a crash post-processing or writing it); a rerun "
    "retries it"
)


def recover_from_finisher_death(
    waiting: list[tuple[dict, Future]], handed: set[Path], suspects: set[Path], settle: Callable[..., None]
) -> list[Path]:
    """A finisher process died (killed for memory, or a crash): the pool failed every input it held (of `waiting`,
    the submitted rows and their futures), which are returned; the others are settled. A failed input is taken off
    `handed` and made a suspect, to be segmented again in the next round and finished alone; a suspect whose
    finisher dies then is the cause, and becomes an error."""
    interrupted = []
    for row, future in waiting:
        if not isinstance(future.exception(), BrokenProcessPool):
            settle(row, future)
            continue
        path = Path(row["input"])
        interrupted.append(path)
        if path not in suspects:
            suspects.add(path)
            handed.discard(path)
        else:
            settle({**row, "status": "error", "error": FINISHER_DIED_ALONE})
    retried = sum(path not in handed for path in interrupted)
    if retried:  # else the one input it held has its error line
        tqdm.write(
            f"lungseg: a finisher process died (too little memory, or a crash) holding {retried} input(s): "
            "they are segmented again, each finished alone",
            file=sys.stderr,
        )
    return interrupted
