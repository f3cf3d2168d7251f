"""``dlmskip train`` and ``python -m lm_eval_dlmskip.train``: parse the options, train, say where the
routers went and how lm_eval uses them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from ..common.cli_help import HelpFormatter
from .config import TrainConfig, add_arguments, config_from_args
from .loop import train

DESCRIPTION = "learn the routers of a frozen diffusion LM (the router paper's objective and recipe)"


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    """Train; then say where the routers went and how lm_eval uses them. Ctrl-C (exit 130) says
    how to resume from the last checkpoint, or that none was saved yet. ``argv``: the train arguments."""
    cfg = config_from_args(args)
    out = Path(cfg.output).resolve()
    first_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process speaks
    try:
        metrics = train(cfg)
    except KeyboardInterrupt:
        if first_process:
            print(interrupted_message(cfg, argv), file=sys.stderr)
        return 130
    print(json.dumps(metrics))
    if not first_process:
        return 0
    meta = json.loads((out / "router.json").read_text())
    if "budget" in meta:
        print(budget_message(meta["budget"]))
    print(f"router checkpoint: {out}\nevaluate with it: {evaluation_command(cfg, meta['base_model']['family'])}")
    return 0


def budget_message(budget: dict) -> str:
    """The requested and achieved execution ratios of a --target-ratio run, and its dual variable."""
    return (f"execution ratio: target {budget['target_ratio']:.3f}, achieved {budget['achieved_ratio']:.4f} on "
            f"{budget['measured_on']} (before calibration {budget['uncalibrated_ratio']:.4f}; execute-logit offset "
            f"{budget['calibration_offset']:+.4f}); dual variable at the end of training (execute-logit offset) "
            f"{budget['dual_offset']:+.4f}")


def evaluation_command(cfg: TrainConfig, family: str) -> str:
    """The ``lm_eval`` command that evaluates the routers on what they were trained on: the task
    and its folder (absolute paths, so it runs from any folder), few-shot count and chat template
    as in training. Routers trained on ``--data`` leave the tasks to the user (TASKS)."""
    model = Path(cfg.model).expanduser()
    model_args = f"pretrained={model.resolve() if model.is_dir() else cfg.model},router={Path(cfg.output).resolve()}"
    quoted = "'" + model_args.replace("'", "'\"'\"'") + "'"  # always quoted, as the README writes model_args
    words = [quoted, "--tasks", shlex.quote(cfg.task or "TASKS")]
    if cfg.include_path is not None:
        words += ["--include_path", shlex.quote(str(Path(cfg.include_path).expanduser().resolve()))]
    if cfg.num_fewshot is not None:
        words += ["--num_fewshot", str(cfg.num_fewshot)]
    if cfg.apply_chat_template:  # lm_eval turns multi-turn few-shot on with the template; training may not
        words += ["--apply_chat_template", "--fewshot_as_multiturn", str(cfg.fewshot_as_multiturn).lower()]
    return f"lm_eval --model {family}_skip --model_args " + " ".join(words)


def interrupted_message(cfg: TrainConfig, argv: list[str]) -> str:
    out = Path(cfg.output).resolve()
    again = shlex.join(["dlmskip", "train", *[a for a in argv if a != "--resume"]])
    state = out / "train_state.json"
    if state.exists():
        step = json.loads(state.read_text())["step"]
        return (f"dlmskip train: interrupted; the last checkpoint ({out}) holds step {step}. "
                f"Continue it with:\n  {again} --resume")
    before = f"dlmskip train: interrupted before the first checkpoint (every --save-every {cfg.save_every} steps)"
    if out.is_dir():
        return f"{before}. Start it again from step 0 with:\n  {again} --resume"
    return f"{before}; nothing was written. Start again with:\n  {again}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlmskip train", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_train(args, argv)


if __name__ == "__main__":
    sys.exit(main())
