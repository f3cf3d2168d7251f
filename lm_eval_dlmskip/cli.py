"""The ``dlmskip`` command: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlmskip", description="Layer skipping for diffusion LMs in lm-eval")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build a tiny offline LLaDA and task, then run lm_eval with and without skipping")
    demo.add_argument("--out", default="dlmskip-demo", help="directory for the checkpoint, task and results")
    demo.add_argument("--skip-layers", default="[1,3]", help="0-based blocks to skip in the second run")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.out, args.skip_layers)
    return 1


if __name__ == "__main__":
    sys.exit(main())
