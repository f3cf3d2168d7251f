"""The ``dlmskip`` command: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import logging
import sys

from .common.cli_help import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    from .report import analyze, calibrate, compare, sweep
    from .train.config import add_arguments as train_arguments

    parser = argparse.ArgumentParser(prog="dlmskip", description="Layer skipping for diffusion LMs in lm-eval",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    demo = add_parser("demo", "build a tiny offline model (LLaDA, Dream or Llama) and tasks, then run lm_eval with and without "
                                "skipping")
    demo.add_argument("--out", default="dlmskip-demo",
                      help="folder for the checkpoint (FAMILY-demo/), the tasks (tasks/) and the results (results/); "
                           "created in the current folder unless a path is given")
    demo.add_argument("--skip-layers", default="1,3", help="0-based blocks (0..7) to skip in the second run: 1,3 or '[1,3]' or '1 3'")
    demo.add_argument("--family", default="llada", choices=["llada", "dream", "llama"],
                      help="the model to build and evaluate: a LLaDA (llada_skip), a Dream (dream_skip) or a Llama-style "
                           "causal LM (hf_skip), each trained on the same toy language, into FAMILY-demo/")
    demo.add_argument("--threads", type=int, help="CPU threads for torch here and in lm_eval (default: OMP_NUM_THREADS "
                      "if set, else half the cores, 1 to 4: more threads than free cores slow a tiny model down)")
    demo.add_argument("--train-steps", type=int, default=400,
                      help="training steps of the demo model (a checkpoint already in --out is reused)")
    train_arguments(add_parser("train", "train router checkpoints that lm_eval's router= consumes"))
    calibrate.add_arguments(add_parser("calibrate", "choose a static skip set from hidden-state similarity"))
    analyze.add_arguments(add_parser("analyze", "plot hidden-state similarity and norms across blocks and steps"))
    sweep.add_arguments(add_parser("sweep", "run base, static, random and routed configurations through lm-eval"))
    compare.add_arguments(add_parser("compare", "leaderboard (and plots) of llada_skip runs"))
    add_check_arguments(add_parser("check", "judge --model_args (and the tasks' generation settings) as lm_eval "
                                            "would, without loading the model"))

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, argv[1:])
    except (ValueError, FileNotFoundError) as err:
        print(f"dlmskip {args.command}: error: {err}", file=sys.stderr)
        return 2


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """``lm_eval``'s own spelling and parsing of --model_args, --tasks and --include_path."""
    from lm_eval._cli.utils import MergeDictAction, SplitArgs

    parser.add_argument("--model", required=True, choices=["llada_skip", "dream_skip", "hf_skip"])
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction, required=True,
                        help="as for lm_eval: 'pretrained=PATH,gen_length=256' or a JSON object")
    parser.add_argument("--tasks", nargs="+", action=SplitArgs,
                        help="also judge these tasks' generation settings (reads lm-eval's task index)")
    parser.add_argument("--include_path", help="folder of task configs, as for lm_eval")


def _run(args: argparse.Namespace, command_argv: list[str]) -> int:
    if args.command == "check":
        from .harness.check import check_model

        print("\n".join(check_model(args.model, args.model_args, args.tasks, args.include_path)))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.out, args.skip_layers, args.family, args.threads, args.train_steps)
    if args.command == "train":
        from .train.cli import run_train

        return run_train(args, command_argv)
    from .report import analyze, calibrate, compare, sweep

    run = {"calibrate": calibrate.run_calibrate, "analyze": analyze.run_analyze,
           "sweep": sweep.run_sweep, "compare": compare.run_compare}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
