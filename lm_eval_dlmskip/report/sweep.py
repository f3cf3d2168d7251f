"""``dlmskip sweep``: run a grid of skip configurations through lm-eval, in a layout ``compare`` reads.

Runs, each into ``OUT/<run>/`` with ``lm_eval --output_path``: ``base``; ``static-k<k>`` for k = 1..K
from a skip profile (its first k choices, ``skip_profile=..,skip_k=k``); ``random-k<k>-seed<s>``;
``routed-<name>`` for every router checkpoint. Every run gets the same ``mc_seed``, so they all score
with the same Monte-Carlo masks. A run whose directory already holds a results file
is skipped, so an interrupted sweep resumes where it stopped. ``OUT/sweep.json`` lists every run
with its command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from ..files import write_json


def plan_runs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(run name, model_args) for every configuration of the grid."""
    # One mask seed for every run, so random runs (which vary `seed`) score with the base run's masks.
    base = {"pretrained": args.model, "mc_seed": args.mc_seed, **_parse_model_args(args.model_args)}
    runs = [("base", base)]
    if args.static_k:
        if not args.skip_profile:
            raise ValueError("--static-k needs --skip-profile PATH (from dlmskip calibrate)")
        runs += [(f"static-k{k}", {**base, "skip_profile": args.skip_profile, "skip_k": k}) for k in range(1, args.static_k + 1)]
    for k in _ints(args.random_k):
        runs += [(f"random-k{k}-seed{s}", {**base, "skip_random": k, "seed": s}) for s in _ints(args.random_seeds)]
    for router in args.routers or []:
        runs.append((f"routed-{Path(router).name}", {**base, "router": router}))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a directory: {sorted(n for n in names if names.count(n) > 1)}")
    return runs


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()] if text else []


def _parse_model_args(text: str | None) -> dict:
    """Extra model_args in lm-eval's own syntax (``mc_num=128,cfg=0``)."""
    if not text:
        return {}
    from lm_eval._cli.utils import key_val_to_dict

    return key_val_to_dict(text)


def has_results(directory: Path) -> bool:
    return any(directory.rglob("results_*.json"))


def run_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out)
    runs = plan_runs(args)
    manifest, failed = [], []
    for name, model_args in runs:
        target = out / name
        cmd = [sys.executable, "-m", "lm_eval", "--model", "llada_skip", "--model_args", json.dumps(model_args),
               "--tasks", args.tasks, "--output_path", str(target)]
        if args.include_path:
            cmd += ["--include_path", args.include_path]
        cmd += shlex.split(args.lm_eval_args or "")
        manifest.append({"run": name, "model_args": model_args, "command": shlex.join(cmd)})
        if has_results(target):
            print(f"[{name}] results exist, skipped", flush=True)
            continue
        print(f"[{name}] {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        done = subprocess.run(cmd)
        if done.returncode:
            failed.append(name)
            print(f"[{name}] failed with exit code {done.returncode}", flush=True)
    write_json(out / "sweep.json", {"tasks": args.tasks, "runs": manifest})
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")
        return 1
    print(f"sweep done: {len(runs)} runs under {out}; compare them with: dlmskip compare {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="LLaDA hub id or checkpoint directory")
    a("--tasks", required=True, help="lm-eval tasks, comma-separated")
    a("--out", required=True, help="directory for the runs (one subdirectory each)")
    a("--include-path", help="extra lm-eval task folder (e.g. tasks/)")
    a("--skip-profile", help="skip profile from dlmskip calibrate, for --static-k")
    a("--static-k", type=int, default=0, help="static runs with the profile's first 1..K blocks")
    a("--random-k", help="random-skip runs, e.g. 1,2,4")
    a("--random-seeds", default="0", help="seeds of the random runs, e.g. 0,1,2")
    a("--mc-seed", type=int, default=1234, help="Monte-Carlo mask seed, the same for every run")
    a("--routers", nargs="*", help="router checkpoint directories")
    a("--model-args", help="extra model_args for every run, in lm-eval syntax (mc_num=128,cfg=0)")
    a("--lm-eval-args", help='extra lm_eval arguments, e.g. "--batch_size 8 --device cuda --limit 200"')
    a("--dry-run", action="store_true", help="print the commands only")
