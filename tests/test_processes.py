"""The end-to-end tests' hang detection (tests/processes.py): load slows a command and never fails
it; a process waiting for one that is gone is stopped and fails the test."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from .processes import run, wait_making_progress


def test_a_silent_process_that_keeps_computing_is_slow_not_hung():
    """Three CPU seconds without a word, twice the quiet limit: however busy the machine, it
    passes, because it keeps running (or waiting for a core)."""
    busy = "import time\nend = time.process_time() + 3\nwhile time.process_time() < end: pass\nprint('done')"
    assert run([sys.executable, "-c", busy], quiet_s=1.5).stdout == "done\n"


def test_a_process_waiting_for_one_that_exited_is_stopped(tmp_path):
    """As a rank left alone in a collective: it wrote its start and sleeps; its partner exited. The pair fails within the quiet limit (not at some deadline), and nothing is left running."""
    outputs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    commands = ([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(600)"],
                [sys.executable, "-c", "print('done')"])
    procs = []
    for command, output in zip(commands, outputs):
        with open(output, "w") as out:
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"hung: no output for 2s and asleep[^\n]*\n--- .*rank0.log\nwaiting"):
        wait_making_progress(procs, outputs, quiet_s=2)
    assert time.monotonic() - start < 60 and [p.poll() for p in procs] == [-9, 0]
