"""``dlmskip demo``'s CPU threads (common/threads.py): --threads, else the user's OMP_NUM_THREADS,
else half the cores this process may use, 1 to 4; lm_eval's processes get the same number."""

from __future__ import annotations

import os

import pytest
import torch

from lm_eval_dlmskip.common import threads


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_the_default_is_half_the_usable_cores_from_1_to_4(cores, expected, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1000)  # a container may use fewer cores than the host has
    assert threads.choose_threads(None) == expected


def test_threads_given_win_and_omp_num_threads_is_left_to_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(None) is None
    assert threads.choose_threads(2) == 2
    with pytest.raises(ValueError, match="--threads 0: give 1 or more CPU threads"):
        threads.choose_threads(0)


def test_use_threads_sets_torch_and_the_child_processes(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        env = threads.use_threads(3)
        assert torch.get_num_threads() == 3 and env["OMP_NUM_THREADS"] == "3"
        torch.set_num_threads(1)
        env = threads.use_threads(None)  # the user's OMP_NUM_THREADS: nothing changed
        assert torch.get_num_threads() == 1 and env["OMP_NUM_THREADS"] == "1" and env["PATH"] == os.environ["PATH"]
    finally:
        torch.set_num_threads(before)


def test_demo_refuses_bad_threads_and_train_steps_before_any_work(tmp_path, capsys):
    from lm_eval_dlmskip.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--threads", "0"]) == 2
    assert "dlmskip demo: error: --threads 0: give 1 or more CPU threads" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--train-steps", "0"]) == 2
    assert "dlmskip demo: error: --train-steps 0: give 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
