"""Subprocesses for the end-to-end tests, with hang detection that does not depend on the machine's
load: a command fails when it stops making progress (writes nothing while none of its threads runs or
waits for a core), as a rank waiting in a collective for a rank that exited or never came does, and
never because the machine is busy and it is slow. Used by test_cli.py and the tests that run lm_eval."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET_S = 120.0  # this long with no output and asleep: a hang (a busy machine slows a run, never stops it)
AWAKE = 0.2  # a waiting process's polling threads wake now and then; a working one is awake at most looks


def _children() -> dict[int, list[int]]:
    """Every process's children, from Linux's /proc (elsewhere none, and only output counts as progress)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):  # a process that ended while we looked
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    return children


def _trees(pids: list[int], children: dict[int, list[int]]) -> list[int]:
    """``pids`` and all their descendants (accelerate launch starts its ranks as children)."""
    found, todo = [], list(pids)
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _awake(pid: int) -> bool:
    """Whether a thread of ``pid`` runs, waits for a core (R) or for the disk (D)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return any(state in "RD" for state in states)


def wait_making_progress(procs: list[subprocess.Popen], outputs: list[Path], quiet_s: float = QUIET_S) -> list[int]:
    """Wait for every process; kill them (and their children) and fail the test when for ``quiet_s``
    seconds none wrote to its output file and they were asleep at more than 1 - AWAKE of the looks
    (twice a second): waiting for another process, not slowed down by a busy machine."""
    last_written, since, looks = -1, time.monotonic(), []
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        now, written = time.monotonic(), sum(path.stat().st_size for path in outputs if path.exists())
        if written != last_written:
            last_written, since, looks = written, now, []
            continue
        tree = _trees([p.pid for p in procs if p.poll() is None], _children())
        looks = [(t, a) for t, a in looks if t > now - quiet_s] + [(now, any(_awake(pid) for pid in tree))]
        if now - since > quiet_s and sum(a for _, a in looks) < AWAKE * len(looks):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for p in procs:
                p.wait()
            tails = "\n".join(f"--- {path}\n{path.read_text()[-2000:]}" for path in outputs if path.exists())
            pytest.fail(f"hung: no output for {quiet_s:.0f}s and asleep (a process waiting for another?)\n{tails}")
    return [p.returncode for p in procs]


def run(cmd: list[str], check: bool = True, env: dict | None = None, quiet_s: float = QUIET_S,
        **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose only deadline is a hang."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [Path(tmp, "stdout"), Path(tmp, "stderr")]
        with open(outputs[0], "w") as out, open(outputs[1], "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env or ENV, **kwargs)
            [code] = wait_making_progress([proc], outputs, quiet_s)
        done = subprocess.CompletedProcess(cmd, code, outputs[0].read_text(), outputs[1].read_text())
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def lm_eval(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return run([python, "-m", "lm_eval", *args])


def launch_ranks(args: list[str], logs: Path, ranks: tuple[int, ...] = (0, 1), quiet_s: float = QUIET_S) -> list[int]:
    """``python -m lm_eval ARGS`` as ranks of two processes, started as torchrun starts them
    (accelerate on CPU, gloo); their exit codes. ``ranks`` leaves one out to plant a hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in ranks:
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "lm_eval", *args], stdout=log, stderr=subprocess.STDOUT,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return wait_making_progress(procs, [logs / f"rank{rank}.log" for rank in ranks], quiet_s)


def launch_two(args: list[str], logs: Path) -> None:
    """Both ranks, which must both succeed; a pair that hangs fails the test (wait_making_progress)."""
    codes = launch_ranks(args, logs)
    assert codes == [0, 0], (logs / "rank0.log").read_text()[-3000:] + (logs / "rank1.log").read_text()[-3000:]
    assert "on rank 1..." in (logs / "rank1.log").read_text()  # really two ranks, not two copies of one
