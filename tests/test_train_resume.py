"""Resuming router training: from a run stopped before its first save, on a finished run, in a
copied folder; an exact log; and what lm_eval says of a router saved mid-training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lm_eval_dlmskip.train.loop as train_module
from lm_eval_dlmskip.train.config import TrainConfig
from lm_eval_dlmskip.train.loop import train

from .test_router import _config, _log


def _dies_at(monkeypatch, index: int) -> None:
    """Kill training (as Ctrl-C would) when it reaches optimizer step ``index`` (0-based)."""
    real = train_module.step_examples

    def step_examples(pairs, step, per_step, seed):
        if step == index:
            raise KeyboardInterrupt("killed")
        return real(pairs, step, per_step, seed)

    monkeypatch.setattr(train_module, "step_examples", step_examples)


def _rows(path) -> list[tuple[int, str]]:
    """(step, kind) of every log row: kind "train" for a logged step, "val" for a validation."""
    return [(e["step"], "train" if "loss" in e else "val") for e in _log(path)]


def _board(path) -> dict[str, list[tuple[int, float]]] | None:
    """What TensorBoard shows of a run, read by TensorBoard's own reader (which hides the events a
    resumed run's purge step withdrew): (step, value) per tag, or None without tensorboard. The
    examples/s depend on the machine's speed, so only their steps count."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    board = EventAccumulator(str(path / "tensorboard")).Reload()
    return {tag: [(e.step, None if tag == "examples_per_s" else e.value) for e in board.Scalars(tag)]
            for tag in board.Tags()["scalars"]}


def _same_routers(a, b) -> bool:
    x, y = load_file(str(a / "router.safetensors")), load_file(str(b / "router.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_run_stopped_before_its_first_save_resumes_from_step_0(ref_dir, tmp_path, monkeypatch):
    settings = dict(lam=1.0, max_steps=4, eval_every=100, log_every=2)
    train(_config(ref_dir, tmp_path, "straight", **settings))
    stopped = _config(ref_dir, tmp_path, "stopped", **settings)
    _dies_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(stopped)
    monkeypatch.undo()
    # Only the logs: the metrics, and TensorBoard's events where tensorboard is installed.
    logs = ["metrics.jsonl"] if _board(tmp_path / "straight") is None else ["metrics.jsonl", "tensorboard"]
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == logs
    assert _rows(tmp_path / "stopped") == [(0, "val"), (2, "train")]
    with pytest.raises(ValueError, match="holds only the log of a run stopped before its first checkpoint; "
                                         "pass --resume to start it again from step 0"):
        train(stopped)
    train(TrainConfig(**{**stopped.__dict__, "resume": True}))
    assert _same_routers(tmp_path / "straight", tmp_path / "stopped")
    assert _rows(tmp_path / "stopped") == _rows(tmp_path / "straight") == [(0, "val"), (2, "train"), (4, "train"), (4, "val")]
    assert _board(tmp_path / "stopped") == _board(tmp_path / "straight")


def test_a_resumed_run_logs_each_point_once(ref_dir, tmp_path, monkeypatch):
    """Killed during step 7, after step 6 was logged but with the checkpoint at step 4: the rows
    past step 4 are dropped and logged again, once."""
    settings = dict(lam=1.0, max_steps=8, eval_every=4, log_every=2, save_every=4)
    train(_config(ref_dir, tmp_path, "straight", **settings))
    killed = _config(ref_dir, tmp_path, "killed", **settings)
    _dies_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    monkeypatch.undo()
    assert _rows(tmp_path / "killed")[-1] == (6, "train")
    train(TrainConfig(**{**killed.__dict__, "resume": True}))
    expected = [(0, "val"), (2, "train"), (4, "train"), (4, "val"), (6, "train"), (8, "train"), (8, "val")]
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight") == expected
    assert _board(tmp_path / "killed") == _board(tmp_path / "straight")  # TensorBoard too shows each point once
    assert _same_routers(tmp_path / "straight", tmp_path / "killed")


def test_resuming_a_finished_run_keeps_its_metrics_also_in_a_moved_folder(ref_dir, tmp_path):
    done = _config(ref_dir, tmp_path, "done", lam=1.0, max_steps=4, eval_every=2, log_every=2)
    metrics = train(done)
    meta = json.loads((tmp_path / "done" / "router.json").read_text())
    assert meta["metrics"] == metrics and "val_execution_ratio" in metrics
    log = (tmp_path / "done" / "metrics.jsonl").read_text()
    shutil.copytree(tmp_path / "done", tmp_path / "copied")
    for folder in ("done", "copied"):  # in place, and in a copy: the output path is no training setting
        assert train(TrainConfig(**{**done.__dict__, "output": str(tmp_path / folder), "resume": True})) == metrics
        again = json.loads((tmp_path / folder / "router.json").read_text())
        assert again["metrics"] == metrics and again["training"] == meta["training"]
        assert (tmp_path / folder / "metrics.jsonl").read_text() == log
    assert json.loads((tmp_path / "copied" / "train_state.json").read_text())["config"]["output"] == str(tmp_path / "copied")


def test_run_folders_a_run_cannot_use_are_refused_before_loading(ref_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before checking --output")

    monkeypatch.setattr(train_module, "load_model", no_loading)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; choose another path"):
        train(_config(ref_dir, tmp_path, "other"))
    with pytest.raises(ValueError, match="holds no training state \\(train_state.json\\) to resume from"):
        train(_config(ref_dir, tmp_path, "other", resume=True))
    with pytest.raises(ValueError, match="--resume: .*missing does not exist"):
        train(_config(ref_dir, tmp_path, "missing", resume=True))
    with pytest.raises(ValueError, match="is a file; give a folder path"):
        train(_config(ref_dir, tmp_path, "other/notes.txt"))


def test_a_router_saved_mid_training_is_warned_about_and_recorded(ref_dir, tmp_path, monkeypatch, caplog):
    import shlex

    from lm_eval_dlmskip.cli import main
    from lm_eval_dlmskip.harness.llada import LLaDASkipLM

    cfg = _config(ref_dir, tmp_path, "half", lam=1.0, max_steps=4, save_every=2, eval_every=100, mask_scaling=False, norm_first=True)
    _dies_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    router = tmp_path / "half"
    with caplog.at_level("WARNING", logger="lm_eval.llada_skip"):
        lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(router), mc_num=2)
    warnings = [r.getMessage() for r in caplog.records if "mid-training" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "stopped at step 2 of 4" in warnings[0]
    skip = lm.get_model_info()["dlmskip"]["skip"]
    assert (skip["completed_steps"], skip["training_steps"], skip["finished"]) == (2, 4, False)
    # The command the warning gives finishes the run.
    command = warnings[0].split("finish it with: ")[1]
    assert command.startswith("dlmskip train ") and command.endswith(" --resume") and f"--output {router}" in command
    assert " --no-mask-scaling " in command and " --norm-first " in command and " --lambda 1.0 " in command
    assert main(shlex.split(command)[1:]) == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm_eval.llada_skip"):
        lm = LLaDASkipLM(pretrained=str(ref_dir), device="cpu", router=str(router), mc_num=2)
    assert not [r for r in caplog.records if "mid-training" in r.getMessage()]
    skip = lm.get_model_info()["dlmskip"]["skip"]
    assert (skip["completed_steps"], skip["training_steps"], skip["finished"]) == (4, 4, True)
