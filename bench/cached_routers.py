"""Routers under cached decoding (issue 20 item 5): one lm-eval run per (model_args, task) in one
process, every cache mode with and without a threshold; prints a markdown table of accuracy, the
papers' and whole-model normalized FLOPs, mean blocks run and NFE per request.

    python bench/cached_routers.py --model M --include-path P --task T[:ROUTER] ... [--thresholds 0.9]
"""

from __future__ import annotations

import argparse
import json

import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

MODES = ("none", "prefix", "dual")


def run(model: str, task: str, router: str | None, cache: str, threshold: float | None, tasks: TaskManager,
        extra: str) -> dict:
    """Accuracy and the FLOPs meter's summary of one lm-eval run."""
    args = f"pretrained={model},cache={cache}" + (f",router={router}" if router else "")
    args += "" if threshold is None else f",threshold={threshold}"
    args += f",{extra}" if extra else ""
    lm = get_model("llada_skip").create_from_arg_string(args, {"device": "cpu", "batch_size": 16})
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=False)
    metrics = out["results"][task]
    accuracy = next(v for k, v in metrics.items() if k.startswith("exact_match,"))
    flops = lm.meter.summary()[task]
    return {"task": task, "router": router, "cache": cache, "threshold": threshold, "args": args,
            "accuracy": accuracy, **{k: flops[k] for k in (
                "normalized_flops_papers", "normalized_flops_whole_model", "mean_executed_blocks", "forwards",
                "nfe_per_request", "normalized_flops_vs_plain_decoding", "block_execution_ratio", "by_masked_fraction")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--include-path", required=True)
    parser.add_argument("--task", action="append", required=True, help="TASK or TASK:ROUTER_DIR")
    parser.add_argument("--thresholds", default="0.9", help="comma list; the fixed schedule is always run")
    parser.add_argument("--model-args", default="", help="extra model_args for every run")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    tasks = TaskManager(include_path=args.include_path)
    thresholds = [None] + [float(t) for t in args.thresholds.split(",") if t]
    rows = []
    for spec in args.task:
        task, _, router = spec.partition(":")
        for cache in MODES:
            for threshold in thresholds:
                rows.append(run(args.model, task, router or None, cache, threshold, tasks, args.model_args))
    print("| task | router | cache | threshold | acc | papers' FLOPs | whole-model FLOPs | blocks run | NFE | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {'yes' if r['router'] else 'no'} | {r['cache']} | {r['threshold'] or '-'} | "
              f"{r['accuracy']:.2f} | {r['normalized_flops_papers']:.3f} | {r['normalized_flops_whole_model']:.3f} | "
              f"{r['mean_executed_blocks']:.2f} | {r['nfe_per_request']:.2f} | {r['normalized_flops_vs_plain_decoding']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
