"""How many CPU threads torch uses for the demo's tiny model, and how to pass that on.

torch starts one thread per core. On a CPU of two cores that another program also keeps busy, each
operation of a tiny model then waits for the thread that is not running: the demo's training took 10
times as long with 2 threads as with 1 on such a machine. A tiny model gains little from more than a
few threads even on an idle machine, so the default is half the cores this process may use, 1 to 4.
"""

from __future__ import annotations

import os

MAX_DEFAULT_THREADS = 4


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, e.g. a container's limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def choose_threads(requested: int | None) -> int | None:
    """The thread count to set: ``requested`` (--threads) if given; None (leave torch's own choice) when
    the user set OMP_NUM_THREADS; else half the usable cores, 1 to MAX_DEFAULT_THREADS."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: give 1 or more CPU threads")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, min(MAX_DEFAULT_THREADS, usable_cpus() // 2))


def use_threads(requested: int | None) -> dict[str, str]:
    """Set torch's threads in this process; returns the environment for child processes (lm_eval),
    with OMP_NUM_THREADS so that they use the same number."""
    import torch

    threads = choose_threads(requested)
    if threads is None:
        return dict(os.environ)
    torch.set_num_threads(threads)
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}
