"""What makes a training run resumable: the optimizer state and position saved with each
checkpoint, the checks of a run folder, and the log kept up to the checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..common.files import check_output_dir
from .config import TrainConfig, command_arguments

# Settings a resumed run may change; any other difference is refused. The output path is where the
# run lies, not how it trains: a copied or moved run folder resumes.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "save_every", "eval_every", "log_every", "resume", "output"}
# What a run stopped before its first checkpoint leaves in its folder.
_BEFORE_FIRST_SAVE = {"metrics.jsonl", "tensorboard"}


def save_train_state(out: Path, step: int, optimizer: torch.optim.Optimizer, cfg: TrainConfig, micro_batch: int,
                     budget_offset: float | None = None) -> None:
    """Optimizer moments as safetensors (no pickle), the position, the micro-batch and the budget's
    dual variable (--target-ratio; the routers' biases carry it too) as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value.detach().cpu().contiguous()
        for index, moments in state["state"].items()
        for key, value in moments.items()
        if isinstance(value, Tensor)
    }
    save_file(tensors, str(out / "train_state.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    meta = {"step": step, "micro_batch_size": micro_batch, "budget_offset": budget_offset, "param_groups": groups, "config": asdict(cfg),
            "arguments": command_arguments(cfg)}  # the options to give again to continue it (common/resume.py)
    (out / "train_state.json").write_text(json.dumps(meta, indent=2))


def load_train_state(out: Path, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[int, int, float]:
    """The step to continue from, the micro-batch size to keep (the random draws depend on it) and
    the budget's dual variable (0 without --target-ratio)."""
    meta = json.loads((out / "train_state.json").read_text())
    saved = {f: v for f, v in meta["config"].items() if f not in _RESUMABLE_CHANGES}
    saved = {"target_ratio": None, "dual_lr": cfg.dual_lr, **saved}  # runs saved before --target-ratio existed
    differ = [f for f, v in saved.items() if getattr(cfg, f) != (tuple(v) if isinstance(v, list) else v)]  # JSON lists
    if differ:
        raise ValueError(f"--resume: {out} was trained with other settings ({', '.join(differ)}); resume with the same ones")
    tensors = load_file(str(out / "train_state.safetensors"))
    state = optimizer.state_dict()
    moments: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".")
        moments.setdefault(int(index), {})[name] = value
    state["state"] = moments
    for group, saved in zip(state["param_groups"], meta["param_groups"]):
        group.update(saved)
    optimizer.load_state_dict(state)
    return int(meta["step"]), int(meta.get("micro_batch_size", meta["config"]["batch_size"])), float(meta.get("budget_offset") or 0.0)


def check_run_folder(out: Path, resume: bool) -> bool:
    """Whether ``out`` holds a checkpoint to continue; refuses a folder a run cannot start or
    resume in. A folder with only the log of a run stopped before its first save resumes from step 0."""
    check_output_dir(out, "--output")
    if (out / "train_state.json").exists():
        if not resume:
            raise ValueError(f"--output {out} exists and is not empty; pass --resume to continue it or choose another path")
        return True
    contents = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if contents and not contents <= _BEFORE_FIRST_SAVE:
        what = "holds no training state (train_state.json) to resume from" if resume else "exists and is not empty"
        raise ValueError(f"--output {out} {what}; choose another path")
    if contents and not resume:
        raise ValueError(f"--output {out} holds only the log of a run stopped before its first checkpoint; pass "
                         "--resume to start it again from step 0 (its log restarts), or choose another path")
    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} does not exist; give the --output folder of the run to continue")
    return False


def resumed_log(out: Path, step: int) -> list[str]:
    """The log rows a run resumed at ``step`` keeps: those up to its checkpoint (rows written after
    the save are logged again); none from step 0, whose validation is logged again."""
    path = out / "metrics.jsonl"
    if step == 0 or not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
