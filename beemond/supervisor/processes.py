"""The orchestrator's child processes: what the forkserver preloads, and how its helpers (the
forkserver itself and multiprocessing's resource tracker) are stopped so that the orchestrator exits
last."""

from __future__ import annotations

import collections
import os
import time


# Imported by the forkserver before it forks the workers, so that their pages are shared (and frozen
# out of the garbage collector's reach: beemond.preload, last). Always: beemond's modules every worker
# uses (and Jinja2's sandbox). Libraries only where at least two configured workers import them: one
# worker gains nothing from sharing, and the forkserver would carry the library for nobody.
PRELOAD_ALWAYS = ("beemond.ipc", "beemond.worker", "beemond.config", "beemond.core.journal", "beemond.spool",
                  "beemond.records", "beemond.core.clock", "beemond.core", "beemond.core.fsio", "beemond.sensors.base", "jinja2.sandbox")
PRELOAD_SHARED = {"audio": ("numpy", "soundfile"), "audio_bands": ("numpy", "soundfile"),
                  "camera": ("numpy",)}


def forkserver_preload(cfg) -> list[str]:
    """Module names for ``set_forkserver_preload``: :data:`PRELOAD_ALWAYS`, the modules of the
    configured sensor and processor sections, the :data:`PRELOAD_SHARED` libraries of the configured
    types used by two or more of them, then ``beemond.preload`` (``gc.freeze()``).

    Every worker unpickles the whole config, which imports the module (and package) of each section
    class; preloaded, those are shared instead of imported again in every worker (full simulated
    hive: 6-8 MB PSS less, bench/footprint.py). They are light: the orchestrator loaded them too."""
    units = (*cfg.sensors, *cfg.processors)
    sections = sorted({type(unit).__module__ for unit in units})
    users = collections.Counter(lib for unit in units for lib in PRELOAD_SHARED.get(unit.type, ()))
    return [*PRELOAD_ALWAYS, *sections, *sorted(lib for lib, n in users.items() if n >= 2), "beemond.preload"]


def discard_queue(q) -> None:
    """Drop a dead worker's command queue without waiting on its feeder thread (whose reader is gone)."""
    q.cancel_join_thread()
    q.close()


def stop_multiprocessing_helpers(timeout: float) -> list[str]:
    """Stop the forkserver and the resource tracker and wait for them (at most *timeout* s each).
    Returns the names of any still running.

    Left alone they end only when the orchestrator's exit closes their pipes, a moment after the main
    process is gone; systemd (``KillMode=mixed``) SIGKILLs whatever is left in the cgroup then and logs
    "Killing process ... with signal SIGKILL". CPython 3.11-3.13 have no public call for this:
    ``ForkServer._stop()`` and ``ResourceTracker._stop()`` close the pipe and ``waitpid`` without a
    deadline, so their attributes are used here with one. Order matters: the forkserver holds a copy of
    the tracker's pipe, so the tracker sees EOF only after the forkserver has gone. Semaphores still
    registered (queues of workers) are unlinked first through multiprocessing's own finalizers, which
    would otherwise start a new tracker at interpreter exit to unregister them."""
    import gc
    from multiprocessing import forkserver, resource_tracker, util

    gc.collect()
    util._run_finalizers(0)  # what atexit would run: SemLock._cleanup unregisters with the live tracker
    left = []
    for name, obj, pid_attr, fd_attr in (
            ("forkserver", forkserver._forkserver, "_forkserver_pid", "_forkserver_alive_fd"),
            ("resource tracker", resource_tracker._resource_tracker, "_pid", "_fd")):
        pid, fd = getattr(obj, pid_attr, None), getattr(obj, fd_attr, None)
        if pid is None:
            continue
        if fd is not None:
            os.close(fd)  # EOF: the forkserver leaves its accept loop, the tracker its read loop
            setattr(obj, fd_attr, None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            if done:
                setattr(obj, pid_attr, None)
                break
            if time.monotonic() > deadline:
                left.append(f"{name} (pid {pid})")
                break
            time.sleep(0.02)
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:
        forkserver._forkserver._forkserver_address = None
    return left
